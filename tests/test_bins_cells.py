"""Visium HD bins and Xenium cells, laid out as spatialdata-io reads them: the scale from what the readers record
(never from a spot diameter), pp.aggregate's pseudo-spots, and training and embedding on them."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import shapely
import spatialdata
from conftest import SMALL_PATCH
from helpers import CountingMeans
from layouts import XENIUM_PIXEL_UM, visium_hd_like, xenium_like
from scipy import sparse
from spatialdata.transformations import get_transformation

import spade_sd as sd
from spade_sd.spots.geometry import resolve_geometry

HD_MPP, HE_MPP = 0.8, 0.9  # what the layouts' H&E images have, recorded nowhere in them


@pytest.fixture(scope="module")
def hd():
    """8 and 16 µm bins with the full-resolution, hires and lowres images: built once, never changed."""
    return visium_hd_like(bin_sizes=(8, 16), mpp=HD_MPP)


def _renamed(sdata, old: str, new: str, table: str) -> spatialdata.SpatialData:
    """The bins under a name that states no size, their table re-pointed at it."""
    shapes = dict(sdata.shapes)
    shapes[new] = shapes.pop(old)
    counts = sdata.tables[table].copy()
    counts.obs["region"] = pd.Categorical([new] * counts.n_obs)
    counts.uns["spatialdata_attrs"]["region"] = new
    return spatialdata.SpatialData(images=dict(sdata.images), shapes=shapes, tables={"bins_table": counts})


def _refused(match: str, call) -> None:
    """``call(backbone)`` is refused with ``match`` before the backbone encodes a single patch."""
    counter = CountingMeans()
    with pytest.raises(ValueError, match=match):
        call(sd.Backbone(counter))
    assert counter.calls == 0, "the backbone ran before the error"


# --- the scale, from what the readers write


@pytest.mark.parametrize("table_key", ["square_008um", "square_016um"])
def test_visium_hd_bins_give_the_scale_by_their_names_on_every_image(hd, table_key):
    full = resolve_geometry(hd, table_key=table_key, image_key="hd_full_image")
    assert full.mpp == pytest.approx(HD_MPP, rel=0.01) and full.kind == "bins"
    assert f"element name 'hd_{table_key}'" in full.mpp_source
    # the hires PNG is a quarter of full resolution: its pixels are 4× larger, through its transformation
    assert resolve_geometry(hd, table_key=table_key, image_key="hd_hires_image").mpp == pytest.approx(4 * HD_MPP)
    assert resolve_geometry(hd, table_key=table_key, image_key="hd_lowres_image").mpp == pytest.approx(16 * HD_MPP)


def test_visium_hd_bins_read_as_circles_and_written_to_zarr_keep_their_scale(tmp_path):
    circles = visium_hd_like(bin_sizes=(16,), downscaled_images=False, bins_as_squares=False, mpp=1.3)
    assert resolve_geometry(circles).mpp == pytest.approx(1.3, rel=0.01)
    circles.write(tmp_path / "hd.zarr")
    assert resolve_geometry(spatialdata.read_zarr(tmp_path / "hd.zarr")).mpp == pytest.approx(1.3, rel=0.01)


@pytest.mark.parametrize(
    ("options", "source"),
    [
        ({}, "spatialdata-io's xenium reader"),
        ({"reader_attrs": False}, r"Xenium's cell areas in µm²"),
        ({"reader_attrs": False, "annotates": "cell_circles"}, r"Xenium's cell areas in µm²"),
    ],
    ids=["reader_attrs", "cell_area", "cell_circles"],
)
def test_xenium_cells_in_micrometres_give_the_scale_through_the_affine(options, source):
    sdata = xenium_like(he_mpp=HE_MPP, **options)
    with pytest.raises(ValueError, match=r"Several images could be meant: \['he_image', 'morphology_focus'\]"):
        resolve_geometry(sdata)
    geometry = resolve_geometry(sdata, image_key="he_image")
    assert geometry.kind == "cells" and geometry.mpp == pytest.approx(HE_MPP, rel=0.01)
    assert re.match(source, geometry.mpp_source)
    # the morphology image's pixels are Xenium's 0.2125 µm ones
    assert resolve_geometry(sdata, image_key="morphology_focus").mpp == pytest.approx(XENIUM_PIXEL_UM, rel=0.01)


def test_visium_hd_cells_take_the_scale_of_the_bins_beside_them():
    sdata = visium_hd_like(bin_sizes=(16,), downscaled_images=False, cells=True, mpp=HD_MPP)
    geometry = resolve_geometry(sdata, table_key="cell_segmentations")
    assert geometry.kind == "cells" and geometry.mpp == pytest.approx(HD_MPP, rel=0.01)
    assert "'hd_square_016um'" in geometry.mpp_source


def test_bins_and_cells_are_never_read_as_spots_of_a_known_diameter(hd):
    # the cases: 8 µm squares and Xenium-like cells with a spot diameter in the table's metadata
    bins = _renamed(hd, "hd_square_008um", "bins", "square_008um")
    bins.tables["bins_table"].uns["spade_sd"] = {"spot_diameter_um": 8.0}
    _refused(
        r"scale is unknown.*shapes 'bins' are polygons: squares of one size \(10 px a side\), read as bins.*"
        r"a spot diameter does not measure squares.*Pass mpp=.*'bin_size_um'",
        lambda backbone: sd.tl.features(bins, backbone=backbone, image_key="hd_full_image", **SMALL_PATCH),
    )
    cells = xenium_like(he_mpp=HE_MPP, reader_attrs=False, morphology=False)
    table = cells.tables["table"]
    table.obs = table.obs.drop(columns=["cell_area"])
    table.uns["spade_sd"] = {"spot_diameter_um": 10.0}
    _refused(
        r"scale is unknown.*'cell_boundaries' are cells \(polygons of varied size or shape\), which no spot "
        r"diameter measures.*Pass mpp=",
        lambda backbone: sd.tl.features(cells, backbone=backbone, **SMALL_PATCH),
    )
    # their recorded size is what measures bins, and the given mpp what measures cells
    bins.tables["bins_table"].uns["spade_sd"] = {"bin_size_um": 8.0}
    assert resolve_geometry(bins, image_key="hd_full_image").mpp == pytest.approx(HD_MPP, rel=0.01)
    assert resolve_geometry(cells, mpp=HE_MPP).mpp == HE_MPP


def test_cells_in_another_unit_than_their_areas_are_not_taken_for_micrometres():
    sdata = xenium_like(he_mpp=HE_MPP, reader_attrs=False, morphology=False)
    # cell areas in the morphology image's pixels (0.2125 µm): 22× the shapes' µm² areas
    sdata.tables["table"].obs["cell_area"] /= XENIUM_PIXEL_UM**2
    with pytest.raises(ValueError, match=r"scale is unknown.*'cell_boundaries' are cells"):
        resolve_geometry(sdata)


# --- pp.aggregate


def _brute_force_sums(sdata, shapes_key: str, table, key_added: str, n_checked: int = 5) -> None:
    """Each of a few squares' counts equals the sum over the shapes whose centre it holds, found one by one."""
    squares = sdata.shapes[key_added]
    summed = sdata.tables[f"{key_added}_table"]
    instance_key = table.uns["spatialdata_attrs"]["instance_key"]
    centres = sdata.shapes[shapes_key].geometry.centroid.loc[table.obs[instance_key].to_numpy()]
    dense = table.X.toarray()
    for row in np.random.default_rng(0).choice(summed.n_obs, n_checked, replace=False):
        x0, y0, x1, y1 = squares.geometry.loc[summed.obs["square_id"].iloc[row]].bounds
        inside = [(x0 <= c.x < x1) and (y0 <= c.y < y1) for c in centres]
        assert sum(inside) == summed.obs["n_aggregated"].iloc[row] > 0
        np.testing.assert_array_equal(summed.X[row].toarray().ravel(), dense[inside].sum(axis=0))


def test_aggregate_sums_visium_hd_bins_into_squares_known_by_their_size(hd):
    sdata = spatialdata.SpatialData(images=dict(hd.images), shapes=dict(hd.shapes), tables=dict(hd.tables))
    bins = sdata.tables["square_008um"] = hd.tables["square_008um"].copy()
    bins.layers["counts"] = bins.X.astype(np.int32)
    bins.layers["log1p"] = bins.X.log1p()
    sd.pp.aggregate(sdata, shapes_key="hd_square_008um", image_key="hd_full_image", size_um=56, key_added="squares")

    summed = sdata.tables["squares_table"]
    assert sparse.issparse(summed.X) and sparse.issparse(summed.layers["counts"])
    assert {key for key in summed.layers.keys() if key is not None} == {"counts"}  # log1p holds no counts
    assert list(summed.var_names) == list(bins.var_names)
    assert summed.obs["n_aggregated"].sum() == bins.n_obs and summed.X.sum() == bins.X.sum()
    np.testing.assert_array_equal(summed.layers["counts"].toarray(), summed.X.toarray())
    # 400 µm of tissue: 7 squares of 7 × 7 bins and an edge square of 1 × 7 bins along each side
    assert summed.n_obs == 64 and sorted(set(summed.obs["n_aggregated"])) == [1, 7, 49]
    _brute_force_sums(sdata, "hd_square_008um", bins, "squares")

    attrs = summed.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == ("squares", "region", "square_id")
    assert get_transformation(sdata.shapes["squares"], get_all=True).keys() == {
        "hd",
        "hd_downscaled_hires",
        "hd_downscaled_lowres",
    }
    geometry = resolve_geometry(sdata, shapes_key="squares", image_key="hd_full_image")
    assert geometry.kind == "bins" and geometry.mpp == pytest.approx(HD_MPP, rel=0.01)
    assert geometry.size_px == pytest.approx(56 / HD_MPP) and "bin_size_um" in geometry.mpp_source
    np.testing.assert_allclose(geometry.centers, summed.obsm["spatial"])  # the shapes' units are the image's pixels


def test_aggregate_sums_xenium_cells_in_the_micrometre_frame(tmp_path):
    sdata = xenium_like(he_mpp=HE_MPP, morphology=False)
    cells = sdata.tables["table"]
    sd.pp.aggregate(sdata, shapes_key="cell_boundaries", size_um=40)
    summed = sdata.tables["pseudo_spots_table"]
    assert summed.obs["n_aggregated"].sum() == cells.n_obs and summed.X.sum() == cells.X.sum()
    _brute_force_sums(sdata, "cell_boundaries", cells, "pseudo_spots")
    side = np.sqrt(shapely.area(sdata.shapes["pseudo_spots"].geometry.values))
    np.testing.assert_allclose(side, 40.0)  # the cells' own units are µm
    geometry = resolve_geometry(sdata, shapes_key="pseudo_spots")
    assert geometry.kind == "bins" and geometry.mpp == pytest.approx(HE_MPP, rel=0.01)
    sdata.write(tmp_path / "xenium.zarr")  # the squares' size and the cells' µm survive the store
    read = spatialdata.read_zarr(tmp_path / "xenium.zarr")
    assert resolve_geometry(read, shapes_key="pseudo_spots").mpp == pytest.approx(HE_MPP, rel=0.01)
    assert resolve_geometry(read, shapes_key="cell_boundaries").mpp == pytest.approx(HE_MPP, rel=0.01)


def test_aggregate_refuses_bad_input_and_adds_nothing(hd):
    sdata = spatialdata.SpatialData(images=dict(hd.images), shapes=dict(hd.shapes), tables=dict(hd.tables))
    sdata.shapes["orphans"] = hd.shapes["hd_square_016um"]
    unnamed = _renamed(hd, "hd_square_008um", "bins", "square_008um")
    normalised = spatialdata.SpatialData(images=dict(hd.images), shapes=dict(hd.shapes), tables=dict(hd.tables))
    normalised.tables["square_008um"] = hd.tables["square_008um"].copy()
    normalised.tables["square_008um"].X = normalised.tables["square_008um"].X.log1p()
    cases = [
        (
            sdata,
            {"shapes_key": "hd_square_008um", "size_um": 5.0},
            r"size_um=5 µm is smaller than the shapes it sums: 'hd_square_008um' are squares of 8 µm.*Pass size_um ≥ 8",
        ),
        (sdata, {"shapes_key": "orphans"}, r"No table annotates shapes 'orphans'"),
        (
            sdata,
            {"shapes_key": "hd_square_008um", "key_added": "square_016um"},
            r"already has an element 'square_016um'",
        ),
        (
            sdata,
            {"shapes_key": "hd_square_008um", "key_added": "hd_square_016um"},
            r"element 'hd_square_016um' \(shape",
        ),
        (unnamed, {"shapes_key": "bins"}, r"scale is unknown.*squares of one size.*Pass mpp="),
        (normalised, {"shapes_key": "hd_square_008um"}, r"Table 'square_008um' holds no raw counts"),
    ]
    for target, options, match in cases:
        before = (set(target.shapes), set(target.tables))
        with pytest.raises(ValueError, match=match):
            sd.pp.aggregate(target, image_key="hd_full_image", **options)
        assert (set(target.shapes), set(target.tables)) == before
    sd.pp.aggregate(sdata, shapes_key="hd_square_016um", image_key="hd_full_image", key_added="squares")
    with pytest.raises(ValueError, match=r"already has an element 'squares' \(shape\); aggregate does not overwrite"):
        sd.pp.aggregate(sdata, shapes_key="hd_square_008um", image_key="hd_full_image", key_added="squares")


def test_bins_without_a_table_are_refused_before_any_patch_is_encoded(hd):
    sdata = spatialdata.SpatialData(images=dict(hd.images), shapes={"bins": hd.shapes["hd_square_008um"]})
    _refused(
        r"No table annotates shapes 'bins'.*TableModel.parse",
        lambda backbone: sd.tl.features(sdata, backbone=backbone, shapes_key="bins", **SMALL_PATCH),
    )


# --- pseudo-spots train and embed like spots


@pytest.mark.parametrize("layout", ["visium_hd", "xenium"])
def test_aggregate_then_pretrain_embed_and_predict_on_the_pseudo_spots(layout, cache_dir, one_thread):
    if layout == "visium_hd":
        sdata = visium_hd_like(bin_sizes=(8,), grid=(6, 6), downscaled_images=False, mpp=HD_MPP)
        shapes_key = "hd_square_008um"
    else:
        sdata = xenium_like(grid=(6, 6), he_mpp=HE_MPP, morphology=False)
        shapes_key = "cell_boundaries"
    sd.pp.aggregate(sdata, shapes_key=shapes_key, size_um=SMALL_PATCH["size_um"])
    counter = CountingMeans()
    options = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "out_dim": 16, "n_comps": 4, "quiet": True}
    model = sd.tl.pretrain(
        sdata, shapes_key="pseudo_spots", backbone=sd.Backbone(counter), seed=0, **options, **SMALL_PATCH
    )
    squares = sdata.tables["pseudo_spots_table"]
    assert 0 < counter.calls <= squares.n_obs  # batches of the squares' patches, not of the bins'
    sd.tl.embed(sdata, model, shapes_key="pseudo_spots")
    embedding = squares.obsm["X_spade"]
    assert embedding.shape[0] == squares.n_obs > 50 and np.isfinite(embedding).all()
    sd.tl.predict_expression(sdata, model, shapes_key="pseudo_spots")
    predicted = sdata.tables["spade_predicted"]
    assert predicted.n_obs == squares.n_obs and np.isfinite(predicted.X).all()
