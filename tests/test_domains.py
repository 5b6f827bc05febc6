"""Domains: sd.metrics.domain_agreement, sd.tl.domains on spots and on tiles, sd.pl.domains, tl.evaluate's task."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import CountingMeans
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

import spade_sd as sd
from spade_sd import metrics
from spade_sd.spots import neighbourhood
from spade_sd.spots.genes import GenePanel
from spade_sd.spots.patches import resolve_patches

N_TYPES = 4


@pytest.fixture(autouse=True)
def _single_blas_thread():
    # These matrices are tiny: multithreaded BLAS only adds contention on a busy 2-core machine.
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _blobs(n_per: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four well separated Gaussian blobs in 8 dimensions and their labels."""
    rng = np.random.default_rng(seed)
    centers = 10 * rng.normal(size=(N_TYPES, 8))
    labels = np.repeat(np.arange(N_TYPES), n_per)
    return centers[labels] + rng.normal(size=(labels.size, 8)), labels


def _slide(seed: int = 0, noise: float = 0.0, sdata=None):
    """A synthetic slide whose table holds a cheap representation: expression PCs (plus noise) in .obsm['X_expr']."""
    sdata = sd.datasets.synthetic(grid=(12, 12), mpp=1.0, n_genes=60, seed=seed) if sdata is None else sdata
    table = sdata.tables["table"]
    expression = GenePanel(genes=list(table.var_names)).transform(table)
    centred = expression - expression.mean(axis=0)
    pcs = np.linalg.svd(centred, full_matrices=False)[0][:, :8] * 10
    table.obsm["X_expr"] = pcs + noise * np.random.default_rng(seed).normal(size=pcs.shape)
    return sdata


def _types(sdata) -> np.ndarray:
    return sdata.tables["table"].obs["tissue_type"].astype(str).to_numpy()


# --- metrics.domain_agreement ------------------------------------------------------------------------------


def test_agreement_is_one_for_the_same_partition_renamed():
    X, labels = _blobs()
    renamed = np.array(["stroma", "tumour", "immune", "fat"])[(labels + 2) % N_TYPES]
    df = metrics.domain_agreement(X, renamed, n_seeds=2, reference="regions", label="blobs")
    assert set(df["metric"]) == {"ari", "nmi"} and set(df["repeat"]) == {0, 1}
    np.testing.assert_allclose(df["value"], 1.0)
    assert (df["n_domains"] == N_TYPES).all() and (df["mean_clusters"] == N_TYPES).all()
    summary = metrics.summarize(df)
    assert set(summary["encoder"]) == {"blobs"} and (summary["n"] == 2).all()


def test_agreement_is_near_zero_for_random_domains():
    X, _ = _blobs()
    random = np.random.default_rng(1).integers(0, N_TYPES, size=len(X))
    df = metrics.domain_agreement(X, random, n_seeds=2).set_index(["metric", "repeat"])["value"]
    assert df["ari"].abs().max() < 0.05, df
    assert df["nmi"].max() < 0.1, df


def test_resolution_is_matched_to_the_reference_count():
    counts = {0.1: [2, 2], 0.5: [4, 5], 1.0: [6, 6], 1.5: [9, 9]}
    assert metrics.matched_resolution(counts, 5) == 0.5  # mean 4.5 is nearer 5 than 6 is
    assert metrics.matched_resolution(counts, 6) == 1.0
    assert metrics.matched_resolution({0.4: 5, 0.2: 3}, 4) == 0.2  # a tie goes to the lower resolution
    # through the metric: two far apart groups of two blobs each, which Leiden splits into 4 above resolution ~0.3
    rng = np.random.default_rng(0)
    group, blob = np.repeat([0, 1], 100), np.tile(np.repeat([0, 1], 50), 2)
    X = np.c_[30 * group, 4 * blob, np.zeros((200, 6))] + rng.normal(size=(200, 8))
    two = metrics.domain_agreement(X, group, n_seeds=2)
    four = metrics.domain_agreement(X, 2 * group + blob, n_seeds=2)
    assert (two["mean_clusters"] == 2).all() and (four["mean_clusters"] == 4).all()
    assert two["resolution"].iloc[0] < four["resolution"].iloc[0]
    np.testing.assert_allclose(two["value"], 1.0)
    assert (four["value"] > 0.9).all()  # the blobs of a group touch: a few spots go to the neighbour


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda X, y: (X, np.zeros(len(y))), ValueError, "single domain"),
        (lambda X, y: (X[:10], y[:10]), ValueError, "more spots than n_neighbors=15"),
        (lambda X, y: (np.where(np.arange(len(X))[:, None] == 3, np.nan, X), y), ValueError, "finite"),
        (lambda X, y: (X, y[:-1]), ValueError, "one entry per spot"),
    ],
    ids=["one domain", "too few spots", "NaN", "length"],
)
def test_agreement_refuses_bad_input(change, error, match):
    X, labels = change(*_blobs())
    with pytest.raises(error, match=match):
        metrics.domain_agreement(X, labels, n_seeds=1)


def test_expression_domains_on_the_most_variable_genes():
    sdata = sd.datasets.synthetic(grid=(12, 12), mpp=1.0, n_genes=60, seed=0)
    table = sdata.tables["table"]
    expression = GenePanel(genes=list(table.var_names)).transform(table)
    domains = metrics.expression_domains(expression, n_top_genes=30, n_pcs=10, resolution=0.5)
    assert domains.shape == (table.n_obs,)
    assert adjusted_rand_score(_types(sdata), domains) > 0.5


# --- tl.domains ---------------------------------------------------------------------------------------------


def test_domains_writes_the_column_and_its_parameters():
    sdata = _slide()
    table = sdata.tables["table"]
    sd.tl.domains(sdata, use_rep="X_expr", spatial_weight=0.5, resolution=0.3)
    domains = table.obs["spade_domain"]
    assert isinstance(domains.dtype, pd.CategoricalDtype) and domains.notna().all()
    params = table.uns["spade_domain"]["params"]
    assert params["use_rep"] == "X_expr" and params["spatial_weight"] == 0.5 and params["resolution"] == 0.3
    assert table.uns["spade_domain"]["n_domains"] == domains.nunique()
    assert adjusted_rand_score(_types(sdata), domains) > 0.6
    # the same function as the metric's: the domains are the Leiden partition the benchmark scores
    graph = neighbourhood.spatial_graph(table.obsm["spatial"], n_neighbors=6)
    features = neighbourhood.neighbourhood_features(table.obsm["X_expr"], graph, 0.5)
    expected = metrics._domains.leiden_partitions(features, resolutions=[0.3], seeds=[0])[0.3, 0]
    np.testing.assert_array_equal(domains.astype(int).to_numpy(), expected)
    # running again replaces the tool's own column
    sd.tl.domains(sdata, use_rep="X_expr", spatial_weight=0.0, resolution=0.3)
    assert table.uns["spade_domain"]["params"]["spatial_weight"] == 0.0


def test_spatial_context_makes_noisy_domains_follow_the_tissue():
    # a noisy representation scatters plain Leiden clusters; averaging each spot with its neighbours removes noise
    sdata = _slide(noise=1.0)
    truth = _types(sdata)
    scores = {}
    for weight in (0.0, 0.8):
        sd.tl.domains(sdata, use_rep="X_expr", spatial_weight=weight, resolution=1.0)
        scores[weight] = adjusted_rand_score(truth, sdata.tables["table"].obs["spade_domain"])
    assert scores[0.8] > scores[0.0] + 0.3, scores


def test_domains_on_tiles_of_an_image_only_slide(tmp_path):
    sdata = sd.datasets.synthetic(grid=(10, 10), mpp=1.0, n_genes=20, seed=2)
    del sdata.tables["table"]  # H&E only: no spots' expression
    sd.pp.tile_image(sdata, size_um=100.0, mpp=1.0)
    # a representation from the H&E alone: the tiles' colour (the cheap features of CountingMeans, without torch)
    geometry, patches = resolve_patches(sdata, shapes_key="tiles", size_um=100.0, size_px=16)
    tiles = sdata.tables["tiles_table"]
    tiles.obsm["X_colour"] = np.zeros((tiles.n_obs, CountingMeans.dim))
    tiles.obsm["X_colour"][geometry.table_rows] = CountingMeans()(patches.read(np.arange(len(patches))))
    sd.tl.domains(sdata, use_rep="X_colour", resolution=0.5)
    assert tiles.obs["spade_domain"].notna().all() and tiles.obs["spade_domain"].nunique() >= 2
    assert tiles.uns["spade_domain"]["params"]["library_key"] == "region"
    ax = sd.pl.domains(sdata, show=False)
    assert isinstance(ax, Axes) and ax.images
    ax.figure.savefig(tmp_path / "tiles.png", dpi=60)


# --- bad input: refused before any work, nothing of the user's changed -----------------------------------------


@pytest.fixture
def counted_graph(monkeypatch):
    """Counts the spatial graphs built: a refusal before any work leaves it at 0."""
    calls = []
    original = neighbourhood.spatial_graph

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(neighbourhood, "spatial_graph", counted)
    return calls


def _without_spatial(sdata):
    del sdata.tables["table"].obsm["spatial"]


def _nan_center(sdata):
    sdata.tables["table"].obsm["spatial"][3] = np.nan


@pytest.mark.parametrize(
    ("prepare", "kwargs", "error", "match"),
    [
        (None, {"use_rep": "X_unknown"}, KeyError, r"No table holds .obsm\['X_unknown'\]"),
        (None, {"use_rep": "X_unknown", "table_key": "table"}, KeyError, r"has no .obsm\['X_unknown'\].*X_expr"),
        (None, {"table_key": "tables"}, KeyError, r"No table 'tables'.*\['table'\]"),
        (None, {"spatial_neighbors": 144}, ValueError, "no more rows.*than spatial_neighbors=144"),
        (_without_spatial, {}, KeyError, r"no centers .*\.obsm\['spatial'\]"),
        (_nan_center, {}, ValueError, r"1 of the 144 rows .* no finite center"),
        (None, {"key_added": "tissue_type"}, ValueError, "did not write"),
        (None, {"library_key": "slide"}, KeyError, "library_key 'slide' is not a column"),
        (None, {"spatial_weight": 1.5}, ValueError, "spatial_weight must be"),
        (None, {"resolution": 0}, ValueError, "resolution must be"),
    ],
    ids=[
        "unknown use_rep",
        "unknown use_rep in table",
        "unknown table",
        "fewer spots than neighbours",
        "no coordinates",
        "NaN coordinates",
        "user's column",
        "unknown library_key",
        "spatial_weight",
        "resolution",
    ],
)
def test_domains_refuses_bad_input_before_any_work(counted_graph, prepare, kwargs, error, match):
    sdata = _slide()
    if prepare is not None:
        prepare(sdata)
    table = sdata.tables["table"]
    before = table.obs.copy(), set(table.uns), set(table.obsp)
    with pytest.raises(error, match=match):
        sd.tl.domains(sdata, **{"use_rep": "X_expr", **kwargs})
    assert not counted_graph
    pd.testing.assert_frame_equal(table.obs, before[0])
    assert set(table.uns) == before[1] and set(table.obsp) == before[2]


def test_domains_refuses_a_section_with_fewer_spots_than_neighbours(counted_graph):
    table = _slide().tables["table"]
    small = table[:6].copy()
    with pytest.raises(ValueError, match=r"\{'synthetic_0_spots': 6\}.*spatial_neighbors=6"):
        sd.tl.domains(small, use_rep="X_expr")
    assert not counted_graph and "spade_domain" not in small.obs


# --- pl.domains ---------------------------------------------------------------------------------------------


def test_pl_domains_returns_axes_over_the_image(tmp_path):
    sdata = _slide()
    sd.tl.domains(sdata, use_rep="X_expr", resolution=0.3)
    ax = sd.pl.domains(sdata, show=False)
    assert isinstance(ax, Axes) and ax.images and ax.collections
    assert "X_expr" in ax.get_title()
    ax.figure.savefig(tmp_path / "domains.png", dpi=60)
    assert (tmp_path / "domains.png").stat().st_size > 0
    assert isinstance(sd.pl.domains(sdata, "tissue_type", show=False, return_fig=True), Figure)
    with pytest.raises(KeyError, match=r"run sd.tl.domains first"):
        sd.pl.domains(sdata, "spade_missing", show=False)
    with pytest.raises(TypeError, match="not categories"):
        sd.pl.domains(sdata, "image_signal", show=False)


# --- tl.evaluate(tasks=("domains",)) ------------------------------------------------------------------------


def test_evaluate_scores_domains_against_expression_and_labels():
    slides = [_slide(sdata=s) for s in sd.datasets.synthetic(n_slides=2, grid=(12, 12), mpp=1.0, n_genes=60)]
    for sdata in slides:
        table = sdata.tables["table"]
        table.obsm["X_noise"] = np.random.default_rng(0).normal(size=(table.n_obs, 8))
    df = sd.tl.evaluate(slides, use_rep=["X_expr", "X_noise"], tasks=("domains",), labels="tissue_type")
    assert set(df["task"]) == {"domains"} and set(df["fold"]) == {"synthetic_0", "synthetic_1"}
    assert set(df["group"]) == {"expression@0.5", "expression@1", "tissue_type"}
    means = metrics.summarize(df).set_index(["encoder", "metric"])["mean"]
    for metric in ("ari vs expression domains", "ari vs tissue_type", "nmi vs tissue_type"):
        assert means["X_expr", metric] > means["X_noise", metric] + 0.3, means
    with pytest.raises(KeyError, match="'region_annotation' is not in .obs"):
        sd.tl.evaluate(slides, use_rep="X_expr", tasks=("domains",), labels="region_annotation")
