"""Hostile input at the public entry points: a clear error naming what was expected and found, before any work.

"Before any work" is measured with a backbone that counts its calls: it must stay at 0. "Nothing lost" is checked
by comparing the SpatialData (and what it writes to disk) before and after the refused call.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import spatialdata
from anndata import AnnData
from helpers import CountingMeans
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, PointsModel, TableModel

import spade_sd as sd

PATCH = {"size_um": 64.0, "size_px": 64}
FAST = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "quiet": True, "cache": False, **PATCH}


def _slides(n: int = 2, seed: int = 0) -> list[SpatialData]:
    slides = sd.datasets.synthetic(n_slides=n, grid=(8, 8), mpp=1.0, n_genes=60, seed=seed)
    return slides if n > 1 else [slides]


@pytest.fixture
def counting():
    fn = CountingMeans()
    return fn, sd.Backbone(fn)


@pytest.fixture(scope="module")
def model():
    return sd.tl.pretrain(_slides(), backbone=sd.Backbone(CountingMeans()), seed=0, **FAST)


def _refused(error, match, call, counter: CountingMeans):
    with pytest.raises(error, match=match):
        call()
    assert counter.calls == 0, "the backbone ran before the error"


# --- numeric and choice parameters of tl.pretrain: name, value found and valid range, before any patch is read

PRETRAIN_PARAMETERS = [
    ("n_experts", 2.5, TypeError, r"n_experts must be an integer ≥ 1; found 2.5 \(float\)"),
    ("n_experts", "4", TypeError, r"n_experts must be an integer ≥ 1; found '4' \(str\)"),
    ("n_experts", True, TypeError, r"n_experts must be an integer ≥ 1; found True \(bool\)"),
    ("n_experts", 0, ValueError, r"n_experts must be an integer ≥ 1; found 0"),
    ("max_epochs", 0, ValueError, r"max_epochs must be an integer ≥ 1; found 0"),
    ("batch_size", 0, ValueError, r"batch_size must be an integer ≥ 2; found 0"),
    ("batch_size", 1, ValueError, r"batch_size must be an integer ≥ 2; found 1"),
    ("temperature", 0, ValueError, r"temperature must be a finite number > 0; found 0.0"),
    ("temperature", -1.0, ValueError, r"temperature must be a finite number > 0; found -1.0"),
    ("temperature", float("nan"), ValueError, r"temperature must be a finite number > 0; found nan"),
    ("lr", 0.0, ValueError, r"lr must be a finite number > 0; found 0.0"),
    ("lr", float("inf"), ValueError, r"lr must be a finite number > 0; found inf"),
    ("weight_decay", -0.1, ValueError, r"weight_decay must be a finite number ≥ 0; found -0.1"),
    ("dropout", 1.0, ValueError, r"dropout must be a finite number ≥ 0 and < 1; found 1.0"),
    ("patience", -1, ValueError, r"patience must be an integer ≥ 0; found -1"),
    ("out_dim", 0, ValueError, r"out_dim must be an integer ≥ 1; found 0"),
    ("n_fine", 0, ValueError, r"n_fine must be an integer ≥ 1; found 0"),
    ("n_fine", "auto", ValueError, r"n_fine must be a positive integer or 'elbow'; found 'auto'"),
    ("tau_scale", 0, ValueError, r"tau_scale must be a finite number > 0; found 0.0"),
    ("n_top_genes", 0, ValueError, r"n_top_genes must be an integer ≥ 1; found 0"),
    ("smoothing", 1.5, ValueError, r"smoothing must be a finite number ≥ 0 and ≤ 1; found 1.5"),
    ("seed", "abc", TypeError, r"seed must be an integer in \[0, 4294967295\]; found 'abc' \(str\)"),
    ("seed", None, TypeError, r"seed must be an integer in \[0, 4294967295\]; found None \(NoneType\)"),
    ("seed", -1, ValueError, r"seed must be an integer in \[0, 4294967295\]; found -1"),
    ("standardize", "per-slide", ValueError, r"standardize must be one of \['slide', 'global'\]; found 'per-slide'"),
    ("loss", "mse", ValueError, r"loss must be one of \['soft_target', 'clip'\]; found 'mse'"),
    ("panel_flavor", "seurat", ValueError, r"panel_flavor must be one of \['union', 'global'\]; found 'seurat'"),
    ("feature_batch_size", 0, ValueError, r"feature_batch_size must be an integer ≥ 1; found 0"),
    ("train_threads", 0, ValueError, r"train_threads must be an integer ≥ 1; found 0"),
    ("warm_start", "yes", TypeError, r"warm_start must be True or False; found 'yes' \(str\)"),
    ("size_um", 1e6, ValueError, r"size_um must be a finite number of µm ≥ 0.01 and ≤ 10000; found 1000000.0"),
    ("size_um", "112", TypeError, r"size_um must be a finite number of µm .*; found '112' \(str\)"),
    ("size_px", 0, ValueError, r"size_px must be an integer in \[8, 4096\]; found 0"),
    ("size_px", 10.5, TypeError, r"size_px must be an integer in \[8, 4096\]; found 10.5 \(float\)"),
    ("mpp", "0.5", TypeError, r"mpp must be a finite number of µm per pixel ≥ 0.001 and ≤ 1000; found '0.5' \(str\)"),
    ("mpp", True, TypeError, r"mpp must be a finite number of µm per pixel .*; found True \(bool\)"),
    ("mpp", 1e-9, ValueError, r"mpp must be a finite number of µm per pixel ≥ 0.001 and ≤ 1000; found 1e-09"),
    ("mpp", -0.5, ValueError, r"mpp must be a finite number of µm per pixel .*; found -0.5"),
    ("panel", ["gene_0001"], TypeError, r"panel must be a spade_sd.GenePanel or None; found list"),
    ("val_slides", ["nope"], ValueError, r"val_slides must name some of the slides \['synthetic_0', 'synthetic_1'\]"),
    ("val_slides", ["synthetic_0", "synthetic_1"], ValueError, r"val_slides holds every slide"),
    ("groupby", "organ", KeyError, r"groupby column 'organ' is not in table 'table'"),
    ("layer", "counts", KeyError, r"Table 'synthetic_0' has no layer 'counts'; available layers: \[\]"),
    ("expert_lr_factor", float("nan"), ValueError, r"expert_lr_factor must be a finite number > 0; found nan"),
]


@pytest.mark.parametrize(
    ("name", "value", "error", "match"), PRETRAIN_PARAMETERS, ids=[f"{p[0]}={p[1]!r}" for p in PRETRAIN_PARAMETERS]
)
def test_pretrain_refuses_bad_parameters_before_any_work(counting, name, value, error, match):
    fn, backbone = counting
    slides = _slides()
    before = [s.tables["table"].copy() for s in slides]
    _refused(error, match, lambda: sd.tl.pretrain(slides, backbone=backbone, **{**FAST, name: value}), fn)
    for sdata, table in zip(slides, before, strict=True):  # nothing was added to the tables
        assert set(sdata.tables["table"].obsm) == set(table.obsm) and set(sdata.tables["table"].uns) == set(table.uns)


# --- tables: problems surface before the features of any slide are computed


def _with_table(sdata: SpatialData, change) -> SpatialData:
    table = sdata.tables["table"].copy()
    table = change(table) or table
    sdata.tables["table"] = table
    return sdata


def _nan_counts(table: AnnData) -> None:
    X = table.X.toarray()
    X[3, 5] = np.nan
    table.X = sparse.csr_matrix(X)


def _negative_counts(table: AnnData) -> None:
    X = table.X.toarray()
    X[0, 0] = -2
    table.X = sparse.csr_matrix(X)


def _log_normalised(table: AnnData) -> None:
    table.X = sparse.csr_matrix(np.log1p(table.X.toarray() / 7))


def _duplicate_genes(table: AnnData) -> AnnData:
    names = table.var_names.to_list()
    names[1] = names[0]
    table.var_names = names
    return table


def _other_names(table: AnnData) -> None:
    table.var_names = [f"ENSMUSG{i:08d}" for i in range(table.n_vars)]


TABLE_PROBLEMS = [
    (_nan_counts, r"Table 'synthetic_1' X holds NaN or infinite values; GenePanel needs raw counts"),
    (_negative_counts, r"Table 'synthetic_1' X has negative values"),
    (_log_normalised, r"Table 'synthetic_1' X holds non-integer values .* looks normalised .* Pass layer="),
    (_duplicate_genes, r"Table 'synthetic_1' has 1 duplicated gene names in var_names, e.g. gene_0000"),
    (_other_names, r"The samples share no gene: 'synthetic_0' \(60 genes\), 'synthetic_1' \(60 genes\)"),
]


@pytest.mark.parametrize(("change", "match"), TABLE_PROBLEMS, ids=[p[0].__name__ for p in TABLE_PROBLEMS])
def test_pretrain_checks_every_table_before_computing_features(counting, change, match):
    fn, backbone = counting
    slides = _slides()
    _with_table(slides[1], change)
    _refused(ValueError, match, lambda: sd.tl.pretrain(slides, backbone=backbone, **FAST), fn)


def test_pretrain_checks_that_a_given_panel_covers_every_table(counting):
    fn, backbone = counting
    panel = sd.GenePanel(["gene_0001", "not_a_gene"])
    _refused(
        ValueError,
        r"Table 'synthetic_0' lacks 1 of the 2 panel genes, e.g. not_a_gene",
        lambda: sd.tl.pretrain(_slides(), backbone=backbone, panel=panel, **FAST),
        fn,
    )


def test_pretrain_reads_raw_counts_from_a_layer(caplog):
    slides = _slides()
    for sdata in slides:
        table = sdata.tables["table"]
        table.layers["counts"] = table.X.copy()
        table.X = sparse.csr_matrix(np.log1p(table.X.toarray()))
    with pytest.raises(ValueError, match="looks normalised"):
        sd.tl.pretrain(slides, backbone=sd.Backbone(CountingMeans()), **FAST)
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        model = sd.tl.pretrain(slides, backbone=sd.Backbone(CountingMeans()), layer="counts", **FAST)
    assert model.config.panel.layer == "counts" and "Expression from layers['counts']" in caplog.text


# --- keys that would leave a zarr store that cannot be read back

BAD_KEYS = [
    (None, TypeError, r"key_added must be a non-empty string; found None \(NoneType\)"),
    ("", ValueError, r"key_added must be a non-empty string of letters, .*; found ''"),
    ("a/b", ValueError, r"key_added must be .*; found 'a/b'"),
    (".hidden", ValueError, r"key_added must be .*not starting with '.' or '-'.*; found '.hidden'"),
    (42, TypeError, r"key_added must be a non-empty string; found 42 \(int\)"),
]


@pytest.mark.parametrize(("key", "error", "match"), BAD_KEYS, ids=[repr(k[0]) for k in BAD_KEYS])
def test_features_refuses_bad_keys_and_the_data_still_writes(counting, key, error, match, tmp_path):
    fn, backbone = counting
    sdata = _slides(1)[0]
    _refused(error, match, lambda: sd.tl.features(sdata, backbone=backbone, key_added=key, **PATCH), fn)
    sdata.write(tmp_path / "after.zarr")
    again = spatialdata.read_zarr(tmp_path / "after.zarr")
    assert set(again.tables["table"].obsm) == set(sdata.tables["table"].obsm)


@pytest.mark.parametrize(
    ("key", "error", "match"),
    [*BAD_KEYS, ("X_", ValueError, r"key_added must name something after the 'X_' prefix; found 'X_'")],
    ids=[*(repr(k[0]) for k in BAD_KEYS), "'X_'"],
)
def test_embed_refuses_bad_keys_before_any_work(model, key, error, match):
    fn = model.backbone._fn
    calls = fn.calls
    sdata = _slides(1, seed=3)[0]
    with pytest.raises(error, match=match):
        sd.tl.embed(sdata, model, key_added=key, cache=False)
    assert fn.calls == calls and not any(k.startswith("X_") for k in sdata.tables["table"].obsm)


# --- tl.embed's other arguments, and its gene side


EMBED_PARAMETERS = [
    ("genes", "yes", ValueError, r"genes must be None, True or False; found 'yes'"),
    ("hard", "no", TypeError, r"hard must be True or False; found 'no' \(str\)"),
    ("batch_size", 0, ValueError, r"batch_size must be an integer ≥ 1; found 0"),
    ("cache", None, TypeError, r"cache must be True or False; found None"),
    ("layer", "", ValueError, r"layer must be a non-empty string"),
    ("mpp", "1", TypeError, r"mpp must be a finite number of µm per pixel .*; found '1' \(str\)"),
]


@pytest.mark.parametrize(
    ("name", "value", "error", "match"), EMBED_PARAMETERS, ids=[f"{p[0]}={p[1]!r}" for p in EMBED_PARAMETERS]
)
def test_embed_refuses_bad_parameters_before_any_work(model, name, value, error, match):
    fn = model.backbone._fn
    calls = fn.calls
    sdata = _slides(1, seed=3)[0]
    with pytest.raises(error, match=match):
        sd.tl.embed(sdata, model, **{"cache": False, name: value})
    assert fn.calls == calls and "X_spade" not in sdata.tables["table"].obsm


def test_embed_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(TypeError, match=r"Expected a spade_sd.SpadeModel as model \(or the folder .*found dict"):
        sd.tl.embed(_slides(1)[0], {"weights": "model.safetensors"})
    # a string names a saved model's folder (or a Hub id): a file is not one
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="reads a folder .* is a file"):
        sd.tl.embed(_slides(1)[0], tmp_path / "model.safetensors")


def test_embed_genes_true_refuses_normalised_counts_before_any_work(model):
    fn = model.backbone._fn
    calls = fn.calls
    sdata = _with_table(_slides(1, seed=3)[0], _log_normalised)
    with pytest.raises(ValueError, match=r"No gene-side embedding possible: .*looks normalised.*genes=False"):
        sd.tl.embed(sdata, model, genes=True, cache=False)
    assert fn.calls == calls and "X_spade" not in sdata.tables["table"].obsm


def test_embed_genes_none_keeps_the_image_side_and_says_why(model, caplog):
    sdata = _slides(1, seed=3)[0]
    table = sdata.tables["table"]
    table.layers["counts"] = table.X.copy()
    _log_normalised(table)
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        sd.tl.embed(sdata, model, cache=False)
    assert "X_spade" in table.obsm and "X_spade_gene" not in table.obsm
    assert "No gene-side embedding (the image side is embedded as usual)" in caplog.text
    assert table.uns["spade"]["params"]["expression"] == "none"
    sd.tl.embed(sdata, model, layer="counts", cache=False)
    assert "X_spade_gene" in table.obsm and table.uns["spade"]["params"]["expression"] == "layers['counts']"


# --- elements: spots that are not shapes, channel names, scales stored in the table


def test_points_given_as_spots_are_refused_with_what_to_do(counting):
    fn, backbone = counting
    sdata = _slides(1)[0]
    sdata.points["cells"] = PointsModel.parse(np.random.default_rng(0).uniform(0, 100, (20, 2)))
    _refused(
        ValueError,
        r"'cells' is a point element, not shapes; .* spade_sd reads spots from shapes: circles",
        lambda: sd.tl.features(sdata, backbone=backbone, shapes_key="cells", **PATCH),
        fn,
    )


def test_a_table_annotating_points_says_so(counting):
    fn, backbone = counting
    sdata = _slides(1)[0]
    image = next(iter(sdata.images))
    points = PointsModel.parse(np.random.default_rng(0).uniform(0, 100, (20, 2)))
    table = TableModel.parse(
        AnnData(np.ones((20, 3)), obs={"region": ["cells"] * 20, "cell_id": np.arange(20)}),
        region="cells",
        region_key="region",
        instance_key="cell_id",
    )
    other = SpatialData(images={image: sdata.images[image]}, points={"cells": points}, tables={"table": table})
    _refused(
        ValueError,
        r"No table annotates a shapes element \(table 'table' annotates point 'cells'\)",
        lambda: sd.tl.features(other, backbone=backbone, **PATCH),
        fn,
    )


def _image_with_channels(sdata: SpatialData, order: list[int], names: list[str]) -> SpatialData:
    key = next(iter(sdata.images))
    level = next(iter(sdata.images[key]["scale0"].values()))
    pixels = np.asarray(level.data)[order]
    transformations = spatialdata.transformations.get_transformation(level, get_all=True)
    image = Image2DModel.parse(pixels, dims=("c", "y", "x"), c_coords=names, transformations=transformations)
    return SpatialData(images={key: image}, shapes=dict(sdata.shapes), tables=dict(sdata.tables))


def test_channel_names_are_honoured():
    sdata = _slides(1)[0]
    rgb = _image_with_channels(sdata, [0, 1, 2], ["r", "g", "b"])
    bgr = _image_with_channels(sdata, [2, 1, 0], ["b", "g", "r"])
    unnamed_bgr = _image_with_channels(sdata, [2, 1, 0], ["0", "1", "2"])
    expected = sd.pp.spot_patches(rgb, **PATCH).read(np.arange(5))
    np.testing.assert_array_equal(sd.pp.spot_patches(bgr, **PATCH).read(np.arange(5)), expected)
    assert not np.array_equal(sd.pp.spot_patches(unnamed_bgr, **PATCH).read(np.arange(5)), expected)


def test_channel_names_that_are_partly_colours_are_refused(counting):
    fn, backbone = counting
    odd = _image_with_channels(_slides(1)[0], [0, 1, 2], ["r", "g", "x"])
    _refused(
        ValueError,
        r"channel names \['r', 'g', 'x'\] name colours, but not exactly r, g, b",
        lambda: sd.tl.features(odd, backbone=backbone, **PATCH),
        fn,
    )


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("mpp", -0.5, r"the table's uns\['spade_sd'\]\['mpp'\] must be a finite number of µm per pixel .*; found -0.5"),
        ("mpp", "0.5", r"the table's uns\['spade_sd'\]\['mpp'\] must be a finite number .*; found '0.5' \(str\)"),
        ("spot_diameter_um", 0, r"uns\['spade_sd'\]\['spot_diameter_um'\] must be a finite number of µm > 0; found 0"),
    ],
)
def test_a_bad_scale_stored_in_the_table_is_refused(counting, field, value, match):
    fn, backbone = counting
    sdata = _slides(1)[0]
    sdata.tables["table"].uns["spade_sd"][field] = value
    error = TypeError if isinstance(value, str) else ValueError
    _refused(error, match, lambda: sd.tl.features(sdata, backbone=backbone, **PATCH), fn)


def test_a_patch_window_too_large_to_read_is_refused(counting):
    fn, backbone = counting
    sdata = _slides(1)[0]
    del sdata.tables["table"].uns["spade_sd"]["spot_diameter_um"]  # else the spots' size refuses mpp=0.001 first
    _refused(
        ValueError,
        r"A 5000 µm patch spans 2500000 px on pyramid level 1 .* at most 4096 px are read per patch. Check the scale",
        lambda: sd.tl.features(sdata, backbone=backbone, mpp=0.001, size_um=5000.0, size_px=64),
        fn,
    )


# --- non-finite results are never returned or written


def test_training_that_diverges_returns_no_model(monkeypatch):
    import torch

    import spade_sd.training.fit as pretraining

    train = pretraining.train_experts

    def diverging(*args, **kwargs):
        mixture, history = train(*args, **kwargs)
        with torch.no_grad():
            for name, parameter in mixture.named_parameters():
                if name != "logit_scale":
                    parameter.fill_(float("nan"))
        return mixture, history

    monkeypatch.setattr(pretraining, "train_experts", diverging)
    with pytest.raises(FloatingPointError, match=r"Training diverged: .* non-finite values \(\d+ of 128 image"):
        sd.tl.pretrain(_slides(), backbone=sd.Backbone(CountingMeans()), **FAST)


def test_an_embedding_with_nan_is_not_written(model):
    import copy

    import torch

    broken = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in broken.mixture.named_parameters():
            if name != "logit_scale":
                parameter.fill_(float("nan"))
    sdata = _slides(1, seed=3)[0]
    sd.tl.embed(sdata, model, cache=False)
    before = sdata.tables["table"].obsm["X_spade"].copy()
    with pytest.raises(FloatingPointError, match=r"non-finite values .* nothing was written to table 'table'"):
        sd.tl.embed(sdata, broken, cache=False)
    np.testing.assert_array_equal(sdata.tables["table"].obsm["X_spade"], before)


# --- determinism: the same seed gives identical embeddings, in this process and in another

_EMBED_IN_A_NEW_PROCESS = """
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, {tests!r})
import spade_sd as sd
from helpers import CountingMeans
from test_bad_input import FAST, _slides

slides = _slides()
model = sd.tl.pretrain(slides, backbone=sd.Backbone(CountingMeans()), seed=0, **FAST)
sd.tl.embed(slides[0], model, cache=False)
np.save({out!r}, slides[0].tables["table"].obsm["X_spade"])
"""


def test_same_seed_same_embeddings_within_and_across_processes(model, tmp_path):
    here = _slides()
    again = sd.tl.pretrain(here, backbone=sd.Backbone(CountingMeans()), seed=0, **FAST)
    sd.tl.embed(here[0], again, cache=False)
    first = _slides()[0]
    sd.tl.embed(first, model, cache=False)
    np.testing.assert_array_equal(here[0].tables["table"].obsm["X_spade"], first.tables["table"].obsm["X_spade"])
    out = tmp_path / "embedding.npy"
    code = _EMBED_IN_A_NEW_PROCESS.format(tests=str(Path(__file__).parent), out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONHASHSEED": "7"})
    np.testing.assert_array_equal(np.load(out), first.tables["table"].obsm["X_spade"])


# --- pp.tile_image

TILE_PARAMETERS = [
    ("size_um", "100", TypeError, r"size_um must be a finite number of µm .*; found '100' \(str\)"),
    ("stride_um", -1.0, ValueError, r"stride_um must be a finite number of µm ≥ 0.01 and ≤ 10000; found -1.0"),
    ("mpp", 0.0, ValueError, r"mpp must be a finite number of µm per pixel ≥ 0.001 and ≤ 1000; found 0.0"),
    ("min_tissue_fraction", 2, ValueError, r"min_tissue_fraction must be a finite number ≥ 0 and ≤ 1; found 2.0"),
    ("tissue_level", -1, ValueError, r"tissue_level must be an integer ≥ 0; found -1"),
    ("tissue_only", "yes", TypeError, r"tissue_only must be True or False; found 'yes' \(str\)"),
    ("key_added", "", ValueError, r"key_added must be a non-empty string of letters"),
]


@pytest.mark.parametrize(
    ("name", "value", "error", "match"), TILE_PARAMETERS, ids=[f"{p[0]}={p[1]!r}" for p in TILE_PARAMETERS]
)
def test_tile_image_refuses_bad_parameters_and_adds_nothing(name, value, error, match):
    sdata = _slides(1)[0]
    elements = set(sdata.shapes) | set(sdata.tables)
    with pytest.raises(error, match=match):
        sd.pp.tile_image(sdata, **{"mpp": 1.0, name: value})
    assert set(sdata.shapes) | set(sdata.tables) == elements


def test_tiles_honour_channel_names():
    sdata = _slides(1)[0]
    rgb = _image_with_channels(sdata, [0, 1, 2], ["r", "g", "b"])
    bgr = _image_with_channels(sdata, [2, 1, 0], ["b", "g", "r"])
    for data in (rgb, bgr):
        sd.pp.tile_image(data, size_um=50.0, tissue_only=False)
    np.testing.assert_array_equal(
        bgr.tables["tiles_table"].obs["tissue_fraction"], rgb.tables["tiles_table"].obs["tissue_fraction"]
    )


# --- tl.evaluate

EVALUATE_PARAMETERS = [
    ("tasks", "nope", ValueError, r"Unknown tasks \['nope'\]; choose from"),
    ("fraction", 0.0, ValueError, r"fraction must be a finite number > 0 and < 1; found 0.0"),
    ("k_neighbors", 0, ValueError, r"k_neighbors must be an integer ≥ 1; found 0"),
    ("k_shots", (5, 0), ValueError, r"k_shots must be an integer ≥ 1; found 0"),
    ("n_repeats", 2.0, TypeError, r"n_repeats must be an integer ≥ 1; found 2.0 \(float\)"),
    ("labels", "region_type", KeyError, r"labels column 'region_type' is not in .obs of tables \[0, 1\]"),
]


@pytest.mark.parametrize(
    ("name", "value", "error", "match"), EVALUATE_PARAMETERS, ids=[f"{p[0]}={p[1]!r}" for p in EVALUATE_PARAMETERS]
)
def test_evaluate_refuses_bad_parameters(name, value, error, match):
    tables = [s.tables["table"] for s in _slides()]
    for table in tables:
        table.obsm["X_r"] = np.random.default_rng(0).normal(size=(table.n_obs, 4))
    with pytest.raises(error, match=match):
        sd.tl.evaluate(tables, use_rep="X_r", **{name: value})
