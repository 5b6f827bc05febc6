"""Bins and cells embedded through a grid of patches (spade_sd.spots.grid): patches encoded ∝ the grid, not the
shapes; every shape takes the nearest grid patch's features; the tools run per bin or cell on spatialdata-io's
layouts and on the real Xenium sample."""

from __future__ import annotations

import dataclasses
import logging
import re

import anndata as ad
import numpy as np
import pytest
from conftest import SMALL_PATCH
from helpers import CountingMeans
from layouts import visium_hd_like, xenium_like
from spatialdata import SpatialData

import spade_sd as sd
from spade_sd.spots.geometry import resolve_geometry
from spade_sd.spots.patches import SpotPatches

HD_MPP, HE_MPP = 0.8, 0.9  # what the layouts' H&E images have, recorded nowhere in them
SIZE_UM = SMALL_PATCH["size_um"]
LAYOUTS = {
    "visium_hd": {"shapes_key": "hd_square_008um"},
    "xenium": {"shapes_key": "cell_boundaries"},
}


def _layout(name: str, grid: tuple[int, int] = (4, 4)):
    if name == "visium_hd":
        return visium_hd_like(bin_sizes=(8, 16), grid=grid, downscaled_images=False, mpp=HD_MPP)
    return xenium_like(grid=grid, he_mpp=HE_MPP, morphology=False)


@pytest.fixture(scope="module")
def hd():
    """8 and 16 µm bins over 400 µm of tissue (2,500 and 625 bins); never changed by a test (each copies it)."""
    return _layout("visium_hd")


def _copy(sdata):
    """The same elements, fresh tables: a test writes only to its own copy."""
    tables = {name: table.copy() for name, table in sdata.tables.items()}
    return SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables=tables, attrs=dict(sdata.attrs))


def _occupied_centres(geometry, stride_um: float) -> np.ndarray:
    """Centres (level-0 px) of the cells of a grid anchored at the image's origin that hold a shape's centre."""
    stride_px = stride_um / geometry.mpp
    cells = {tuple(cell) for cell in np.floor(geometry.centers / stride_px).astype(int)}
    return (np.array(sorted(cells)) + 0.5) * stride_px


def _features_at(sdata, geometry, centre: np.ndarray) -> np.ndarray:
    """CountingMeans' features of the patch centred at ``centre`` (level-0 px), read on its own."""
    one = dataclasses.replace(
        geometry, centers=centre[None], radius=geometry.radius[:1], table_rows=geometry.table_rows[:1]
    )
    patch = SpotPatches(sdata.images[geometry.image_key], one, **SMALL_PATCH).read([0])
    return CountingMeans()(patch)[0]


def _is_nearest_patchs(sdata, geometry, centres: np.ndarray, shape: int, features: np.ndarray) -> bool:
    """Whether ``features`` are those of a patch centred on a grid centre nearest the shape's, found by brute force.

    A shape centred on a grid line is as near to the centres on both sides of it; either is its nearest.
    """
    distance = np.linalg.norm(centres - geometry.centers[shape], axis=1)
    nearest = centres[distance <= distance.min() * (1 + 1e-9)]
    return any(np.allclose(features, _features_at(sdata, geometry, centre), rtol=1e-6) for centre in nearest)


@pytest.fixture
def reads(monkeypatch):
    """Counts the patches read, by any path: a refused call reads none."""
    counted = {"patches": 0}
    read = SpotPatches.read

    def counting(self, indices, **options):
        counted["patches"] += len(np.atleast_1d(indices))
        return read(self, indices, **options)

    monkeypatch.setattr(SpotPatches, "read", counting)
    return counted


# --- the grid


@pytest.mark.parametrize("layout", ["visium_hd", "xenium"])
def test_bins_and_cells_take_the_features_of_the_nearest_grid_patch(layout, hd, caplog):
    sdata = _copy(hd) if layout == "visium_hd" else _layout(layout)
    elements = LAYOUTS[layout]
    counter = CountingMeans()
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        sd.tl.features(sdata, backbone=sd.Backbone(counter), cache=False, **elements, **SMALL_PATCH)
    geometry = resolve_geometry(sdata, **elements)
    centres = _occupied_centres(geometry, SIZE_UM)
    # one patch per occupied grid cell, far fewer than the shapes
    assert counter.patches == len(centres) and 10 * len(centres) < geometry.n_spots
    kind = "bins" if layout == "visium_hd" else "cells"
    line = (
        rf"{geometry.n_spots} {kind} of '{elements['shapes_key']}' take the features of the nearest of "
        rf"{len(centres)} patches \(64 µm, on a grid 64 µm apart\)"
    )
    assert re.search(line, caplog.text)

    table = sdata.tables[geometry.table_key]
    features = np.asarray(table.obsm["X_backbone"])[geometry.table_rows]
    assert features.shape == (geometry.n_spots, CountingMeans.dim) and np.isfinite(features).all()
    assert len(np.unique(features, axis=0)) == len(centres)  # shapes sharing a patch share its row
    stride_px = SIZE_UM / geometry.mpp
    for shape in np.random.default_rng(0).choice(geometry.n_spots, 6, replace=False):
        assert np.linalg.norm(centres - geometry.centers[shape], axis=1).min() <= stride_px / np.sqrt(2)
        assert _is_nearest_patchs(sdata, geometry, centres, shape, features[shape])
    params = table.uns["X_backbone"]["params"]
    assert (params["grid"], params["stride_um"], params["n_patches"]) == (True, SIZE_UM, len(centres))


def test_grid_false_encodes_one_patch_per_bin_and_a_smaller_stride_more_patches(hd):
    elements = {"shapes_key": "hd_square_016um"}
    geometry = resolve_geometry(hd, **elements)

    one_each = CountingMeans()
    sdata = _copy(hd)
    sd.tl.features(sdata, backbone=sd.Backbone(one_each), cache=False, grid=False, **elements, **SMALL_PATCH)
    table = sdata.tables["square_016um"]
    assert one_each.patches == geometry.n_spots == table.n_obs and table.uns["X_backbone"]["params"]["grid"] is False
    assert len(np.unique(np.asarray(table.obsm["X_backbone"]), axis=0)) > len(_occupied_centres(geometry, SIZE_UM))

    finer = CountingMeans()
    sdata = _copy(hd)
    sd.tl.features(sdata, backbone=sd.Backbone(finer), cache=False, stride_um=SIZE_UM / 2, **elements, **SMALL_PATCH)
    centres = _occupied_centres(geometry, SIZE_UM / 2)
    assert len(_occupied_centres(geometry, SIZE_UM)) < finer.patches == len(centres) < geometry.n_spots
    features = np.asarray(sdata.tables["square_016um"].obsm["X_backbone"])[geometry.table_rows]
    for shape in (0, 123, geometry.n_spots - 1):
        assert _is_nearest_patchs(sdata, geometry, centres, shape, features[shape])


def test_spots_keep_one_patch_each_unless_the_grid_is_asked_for(synthetic_slides):
    (sdata,) = synthetic_slides(1)  # Visium-like 55 µm spots: not much smaller than a 64 µm patch
    n_spots = sdata.tables["table"].n_obs
    counter = CountingMeans()
    sd.tl.features(sdata, backbone=sd.Backbone(counter), cache=False, **SMALL_PATCH)
    assert counter.patches == n_spots and sdata.tables["table"].uns["X_backbone"]["params"]["grid"] is False
    asked = CountingMeans()
    sd.tl.features(sdata, backbone=sd.Backbone(asked), cache=False, grid=True, stride_um=32.0, **SMALL_PATCH)
    assert asked.patches == len(_occupied_centres(resolve_geometry(sdata), 32.0))
    assert sdata.tables["table"].uns["X_backbone"]["params"]["n_patches"] == asked.patches


# --- bad input: refused before any patch is read, nothing written

BAD_GRID = [
    ({"stride_um": 0.0}, ValueError, r"stride_um must be a finite number of µm > 0; found 0.0"),
    ({"stride_um": -8.0}, ValueError, r"stride_um must be a finite number of µm > 0; found -8.0"),
    ({"stride_um": float("nan")}, ValueError, r"stride_um must be a finite number of µm > 0; found nan"),
    ({"stride_um": "16"}, TypeError, r"stride_um must be a finite number of µm > 0; found '16' \(str\)"),
    ({"stride_um": 65.0}, ValueError, r"stride_um=65 µm exceeds the patch side of 64 µm.*Pass stride_um ≤ 64"),
    ({"stride_um": 1e9}, ValueError, r"stride_um=1e\+09 µm exceeds the patch side of 64 µm"),
    ({"grid": "yes"}, TypeError, r"grid must be True or False; found 'yes'"),
    ({"grid": False, "stride_um": 16.0}, ValueError, r"grid=False encodes one patch per shape; pass grid=None"),
]


@pytest.mark.parametrize(("options", "error", "match"), BAD_GRID, ids=lambda value: str(value)[:24])
def test_features_refuse_a_bad_grid_before_any_patch_is_read(hd, reads, options, error, match):
    sdata = _copy(hd)
    counter = CountingMeans()
    with pytest.raises(error, match=match):
        sd.tl.features(sdata, backbone=sd.Backbone(counter), shapes_key="hd_square_008um", **options, **SMALL_PATCH)
    assert counter.calls == 0 and reads["patches"] == 0
    assert "X_backbone" not in sdata.tables["square_008um"].obsm


def _tools(model):
    genes = list(model.panel.genes)
    reference = ad.AnnData(
        np.zeros((20, 1), dtype=np.float32),
        obs={"label": ["a", "b"] * 10},
        obsm={"X_spade": np.random.default_rng(0).normal(size=(20, model.representation_dim))},
    )
    return {
        "embed": lambda sdata, **kw: sd.tl.embed(sdata, model, **kw),
        "predict_expression": lambda sdata, **kw: sd.tl.predict_expression(sdata, model, **kw),
        "query": lambda sdata, **kw: sd.tl.query(sdata, model, genes=genes[:1], **kw),
        "transfer_labels": lambda sdata, **kw: sd.tl.transfer_labels(
            sdata, model, reference=reference, label_key="label", k=3, **kw
        ),
    }


@pytest.mark.parametrize("tool", ["embed", "predict_expression", "query", "transfer_labels"])
def test_tools_refuse_a_bad_grid_before_any_patch_is_read(hd, small_model, reads, tool):
    for options, error, match in [BAD_GRID[0], BAD_GRID[4], BAD_GRID[7]]:
        sdata = _copy(hd)
        before = {name: (set(t.obsm), set(t.obs), set(t.uns)) for name, t in sdata.tables.items()}
        with pytest.raises(error, match=match):
            _tools(small_model)[tool](sdata, shapes_key="hd_square_008um", **options)
        assert reads["patches"] == 0
        assert set(sdata.tables) == set(before)
        assert {name: (set(t.obsm), set(t.obs), set(t.uns)) for name, t in sdata.tables.items()} == before


def test_embed_without_a_model_refuses_a_stride_above_the_patch_before_training(hd, reads):
    sdata = _copy(hd)
    with pytest.raises(ValueError, match=r"stride_um=200 µm exceeds the patch side of 112 µm"):
        sd.tl.embed(sdata, shapes_key="hd_square_008um", stride_um=200.0)
    assert reads["patches"] == 0 and "X_spade" not in sdata.tables["square_008um"].obsm


def test_too_few_grid_patches_for_per_slide_statistics_fall_back_to_one_patch_per_bin(small_model, caplog):
    # 200 µm of tissue: 16 grid patches of 64 µm, fewer than the 30 the model's per-slide standardization needs
    sdata = visium_hd_like(bin_sizes=(8,), grid=(2, 2), downscaled_images=False, mpp=HD_MPP)
    elements = {"shapes_key": "hd_square_008um"}
    n_bins = sdata.tables["square_008um"].n_obs
    assert small_model.standardization == "slide"
    refused = rf"found 16 grid patches over the {n_bins} shapes.*Pass a smaller stride_um, or grid=False"
    with pytest.raises(ValueError, match=refused):
        sd.tl.embed(sdata, small_model, grid=True, **elements)
    assert "X_spade" not in sdata.tables["square_008um"].obsm
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        sd.tl.embed(sdata, small_model, **elements)
    line = f"A grid over the {n_bins} bins of 'hd_square_008um' holds 16 patches, fewer than the 30 needed: encoding"
    assert line in caplog.text and "take the features of the nearest" not in caplog.text
    table = sdata.tables["square_008um"]
    assert table.uns["spade"]["params"]["grid"] is False and table.obsm["X_spade"].shape[0] == n_bins


# --- the tools on spatialdata-io's layouts: aggregate → pretrain → embed, predict, query, transfer per bin/cell


@pytest.mark.parametrize("layout", ["visium_hd", "xenium"])
def test_aggregate_pretrain_then_every_tool_per_bin_or_cell_through_the_grid(layout, cache_dir, one_thread):
    sdata = _layout(layout, grid=(6, 6))
    elements = LAYOUTS[layout]
    geometry = resolve_geometry(sdata, **elements)
    sd.pp.aggregate(sdata, **elements, size_um=SIZE_UM)
    counter = CountingMeans()
    options = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "out_dim": 16, "n_comps": 4, "quiet": True}
    model = sd.tl.pretrain(
        sdata, shapes_key="pseudo_spots", backbone=sd.Backbone(counter), seed=0, **options, **SMALL_PATCH
    )
    squares = sdata.tables["pseudo_spots_table"]
    sd.tl.embed(sdata, model, shapes_key="pseudo_spots")
    first = np.asarray(squares.obsm["X_spade"])[:, 0]
    squares.obs["label"] = np.where(first > np.median(first), "high", "low")

    n_grid = len(_occupied_centres(geometry, SIZE_UM))
    table = sdata.tables[geometry.table_key]
    encoded = counter.patches
    # transfer_labels embeds the shapes (their X_spade is missing): the grid's patches, once each
    sd.tl.transfer_labels(sdata, model, reference=squares, label_key="label", k=5, cache=False, **elements)
    assert counter.patches - encoded == n_grid and 10 * n_grid < geometry.n_spots
    embedding = np.asarray(table.obsm["X_spade"])[geometry.table_rows]
    assert embedding.shape[0] == geometry.n_spots and np.isfinite(embedding).all()
    assert len(np.unique(embedding, axis=0)) <= n_grid
    assert table.uns["spade"]["params"]["grid"] is True and table.uns["spade"]["params"]["n_patches"] == n_grid
    assert table.obs["spade_labels"].notna().all()

    encoded = counter.patches
    sd.tl.predict_expression(sdata, model, cache=False, **elements)
    predicted = sdata.tables["spade_predicted"]
    assert counter.patches - encoded == n_grid
    assert predicted.n_obs == geometry.n_spots and np.isfinite(predicted.X).all()
    assert len(np.unique(predicted.X, axis=0)) <= n_grid
    assert predicted.uns["spade_predicted"]["params"]["n_patches"] == n_grid

    encoded = counter.patches
    sd.tl.query(sdata, model, genes=list(model.panel.genes[:2]), cache=False, **elements)
    assert counter.patches - encoded == n_grid
    score = table.obs["spade_query"].to_numpy()[geometry.table_rows]
    assert np.isfinite(score).all() and score.std() > 0


def test_real_xenium_sample_embeds_its_cells_through_the_grid(data_dir, cache_dir, one_thread):
    """aggregate → pretrain on the squares → embed the cells (grid: 20 µm cells, 112 µm patches) → predict."""
    xenium = sd.datasets.xenium_lung()
    sd.pp.aggregate(xenium, shapes_key="cell_circles", size_um=112.0, key_added="pseudo_spots")
    counter = CountingMeans()
    options = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "out_dim": 16, "quiet": True, "seed": 0}
    model = sd.tl.pretrain(xenium, shapes_key="pseudo_spots", backbone=sd.Backbone(counter), **options)
    geometry = resolve_geometry(xenium, shapes_key="cell_circles")
    n_grid = len(_occupied_centres(geometry, 112.0))

    encoded = counter.patches
    sd.tl.embed(xenium, model, shapes_key="cell_circles", cache=False)
    cells = xenium.tables["table"]
    assert counter.patches - encoded == n_grid < cells.n_obs
    assert cells.uns["spade"]["params"]["grid"] is True and cells.uns["spade"]["params"]["n_patches"] == n_grid
    assert cells.obsm["X_spade"].shape[0] == cells.n_obs and np.isfinite(cells.obsm["X_spade"]).all()
    sd.tl.predict_expression(xenium, model, shapes_key="cell_circles", k=10)
    predicted = xenium.tables["spade_predicted"]
    assert predicted.n_obs == cells.n_obs and list(predicted.obs_names) == list(cells.obs_names)
    assert np.isfinite(predicted.X).all() and predicted.X.std(axis=0).max() > 0
