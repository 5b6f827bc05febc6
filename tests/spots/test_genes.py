from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

from spade_sd.datasets._synthetic import synthetic
from spade_sd.spots.genes import GenePanel

MOB = Path("/work/shared/data/stutility_mob/inst/extdata/counts")


@pytest.fixture(scope="module")
def tables() -> list[ad.AnnData]:
    slides = synthetic(n_slides=3, genes_dropped_per_slide=10, grid=(10, 10), mpp=4.0, seed=0)
    return [s.tables["table"] for s in slides]


@pytest.fixture(scope="module")
def panel(tables) -> GenePanel:
    return GenePanel.fit(tables)


def _scanpy_log1p(table: ad.AnnData, target_sum: float | None = 1e4) -> ad.AnnData:
    copy = table.copy()
    copy.X = copy.X.astype(np.float64)
    sc.pp.normalize_total(copy, target_sum=target_sum)
    sc.pp.log1p(copy)
    return copy


def _read_mob(name: str) -> ad.AnnData:
    frame = pd.read_csv(MOB / f"{name}.tsv", sep="\t", index_col=0)
    return ad.AnnData(
        sparse.csr_matrix(frame.to_numpy(dtype=np.float32)),
        obs=pd.DataFrame(index=frame.index.astype(str)),
        var=pd.DataFrame(index=frame.columns.astype(str)),
    )


def test_union_panel_is_union_of_per_slide_hvgs_over_shared_genes(tables, panel):
    shared = set.intersection(*(set(t.var_names) for t in tables))
    assert set(panel.genes) <= shared
    assert len(shared) == 170
    expected = set()
    for table in tables:
        logged = _scanpy_log1p(table)
        totals = np.asarray(table.X.sum(axis=0)).ravel()
        eligible = [g for g, total in zip(table.var_names, totals, strict=True) if g in shared and total >= 3]
        hvg = sc.pp.highly_variable_genes(logged[:, eligible].copy(), n_top_genes=50, flavor="seurat", inplace=False)
        expected |= set(np.asarray(eligible)[hvg["highly_variable"].to_numpy()])
    assert set(panel.genes) == expected
    assert 50 < len(panel) <= 150
    order = list(tables[0].var_names)
    assert panel.genes == sorted(panel.genes, key=order.index)
    assert (panel.flavor, panel.n_top_genes, panel.target_sum, panel.smoothing) == ("union", 50, 1e4, 0.0)


def test_transform_matches_scanpy(tables, panel):
    for table in tables:
        values = panel.transform(table)
        assert values.shape == (table.n_obs, len(panel))
        assert values.dtype == np.float32
        expected = _scanpy_log1p(table)[:, panel.genes].X.toarray()
        np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-6)


def test_transform_with_median_target_matches_scanpy(tables):
    panel = GenePanel.fit(tables, target_sum=None)
    expected = _scanpy_log1p(tables[1], target_sum=None)[:, panel.genes].X.toarray()
    np.testing.assert_allclose(panel.transform(tables[1]), expected, rtol=1e-6, atol=1e-6)


def test_dense_counts_give_the_same_result(tables, panel):
    dense = tables[0].copy()
    dense.X = dense.X.toarray().astype(np.int32)
    np.testing.assert_allclose(panel.transform(dense), panel.transform(tables[0]), rtol=1e-6)


def test_global_flavor(tables):
    panel = GenePanel.fit(tables, flavor="global", n_top_genes=40)
    shared = set.intersection(*(set(t.var_names) for t in tables))
    assert len(panel) == 40
    assert set(panel.genes) <= shared
    assert panel.transform(tables[2]).shape == (tables[2].n_obs, 40)


def test_save_load_roundtrip(tmp_path, tables):
    panel = GenePanel.fit(tables, smoothing=0.3)
    panel.save(tmp_path / "panel.json")
    loaded = GenePanel.load(tmp_path / "panel.json")
    assert loaded == panel
    assert np.array_equal(loaded.transform(tables[0]), panel.transform(tables[0]))
    assert GenePanel.from_dict(panel.to_dict()) == panel


def test_missing_genes_are_named(tables):
    panel = GenePanel.fit(tables[0])
    missing = [g for g in panel.genes if g not in set(tables[1].var_names)]
    assert missing
    with pytest.raises(ValueError, match=f"lacks {len(missing)} of the {len(panel)} panel genes") as error:
        panel.transform(tables[1])
    assert "synthetic_1" in str(error.value)
    assert all(g in str(error.value) for g in missing[:10])


def test_smoothing_moves_a_spot_towards_its_neighbours(tables):
    table = tables[0]
    raw = GenePanel.fit(table).transform(table)
    smoothed = GenePanel.fit(table, smoothing=0.5).transform(table)
    rows, cols = table.obs["array_row"].to_numpy(), table.obs["array_col"].to_numpy()
    # on a square grid 1.5 × the pitch reaches the 8 surrounding spots (diagonals at √2 × pitch)
    for row, col, n_neighbours in [(4, 5, 8), (0, 0, 3)]:
        spot = np.flatnonzero((rows == row) & (cols == col))[0]
        around = (abs(rows - row) <= 1) & (abs(cols - col) <= 1)
        around[spot] = False
        assert around.sum() == n_neighbours
        neighbour_mean = raw[around].mean(axis=0)
        np.testing.assert_allclose(smoothed[spot], 0.5 * raw[spot] + 0.5 * neighbour_mean, rtol=1e-5, atol=1e-6)
        assert np.linalg.norm(smoothed[spot] - neighbour_mean) < np.linalg.norm(raw[spot] - neighbour_mean)


def test_smoothing_stays_within_each_slide(tables):
    # the slides share their grid coordinates, so mixing them would change every spot
    panel = GenePanel.fit(tables, smoothing=0.5)
    combined = ad.concat(tables, join="inner", index_unique="-")
    combined.obs["sample"] = combined.obs["sample"].astype("category")
    # library sizes come from all of a table's genes, so compare with slides cut to the same shared genes
    per_slide = np.vstack([panel.transform(t[:, combined.var_names]) for t in tables])
    np.testing.assert_allclose(panel.transform(combined), per_slide, rtol=1e-6, atol=1e-6)


def test_a_table_with_several_samples_counts_as_several(tables):
    combined = ad.concat(tables, join="inner", index_unique="-")
    combined.obs["sample"] = combined.obs["sample"].astype("category")
    separate = GenePanel.fit([t[:, combined.var_names] for t in tables])
    assert GenePanel.fit(combined) == separate


def test_tables_are_not_modified(tables):
    table = tables[0].copy()
    table.layers["counts"] = table.X.copy()
    before = table.copy()
    for flavor in ("union", "global"):
        panel = GenePanel.fit([table, tables[1]], flavor=flavor, smoothing=0.5)
        panel.transform(table)
        panel.transform(table, layer="counts")
    assert (table.X != before.X).nnz == 0
    assert (table.layers["counts"] != before.layers["counts"]).nnz == 0
    pd.testing.assert_frame_equal(table.var, before.var)
    pd.testing.assert_frame_equal(table.obs, before.obs)
    assert set(table.uns) == set(before.uns)


def test_log_transformed_input_is_rejected_but_a_counts_layer_works(tables, panel):
    logged = _scanpy_log1p(tables[0])
    with pytest.raises(ValueError, match="non-integer values"):
        GenePanel.fit(logged)
    with pytest.raises(ValueError, match="non-integer values"):
        panel.transform(logged)
    logged.layers["counts"] = tables[0].X.copy()
    np.testing.assert_array_equal(panel.transform(logged, layer="counts"), panel.transform(tables[0]))
    assert GenePanel.fit(logged, layer="counts") == GenePanel.fit(tables[0])


def test_bad_tables_are_rejected(tables):
    negative = tables[0].copy()
    negative.X = negative.X.copy()
    negative.X.data[0] = -1
    with pytest.raises(ValueError, match="negative"):
        GenePanel.fit(negative)

    duplicated = tables[0].copy()
    duplicated.var_names = ["gene_0000"] * 2 + list(duplicated.var_names[2:])
    with pytest.raises(ValueError, match="duplicated gene names.*gene_0000"):
        GenePanel.fit(duplicated)

    renamed = tables[1].copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="share no gene.*'synthetic_0'.*'synthetic_1'"):
        GenePanel.fit([tables[0], renamed])

    with pytest.raises(KeyError, match="no layer 'counts'"):
        GenePanel.fit(tables[0], layer="counts")


@pytest.mark.parametrize("kwargs", [{"flavor": "seurat"}, {"smoothing": 1.5}, {"n_top_genes": 0}, {"target_sum": -1.0}])
def test_bad_options_are_rejected(tables, kwargs):
    with pytest.raises(ValueError, match="must"):
        GenePanel.fit(tables[0], **kwargs)


def test_from_dict_rejects_foreign_dictionaries():
    with pytest.raises(ValueError, match="Not a GenePanel"):
        GenePanel.from_dict({"genes": ["a"], "n_hvg": 3})


def test_real_mouse_olfactory_bulb_counts():
    mob1, mob2 = _read_mob("MOB1"), _read_mob("MOB2")
    panel = GenePanel.fit([mob1, mob2])
    assert 0 < len(panel) <= 100
    assert set(panel.genes) <= set(mob1.var_names) & set(mob2.var_names)
    for table in (mob1, mob2):
        values = panel.transform(table)
        assert values.shape == (table.n_obs, len(panel))
        assert np.isfinite(values).all() and (values >= 0).all()
        assert values.std(axis=0).min() > 0
