"""The spatial plots draw what the shapes are: Visium HD bins as squares, cells as their polygons, many of either
as one image at the panel's resolution; several slides in one figure; a stored UMAP drawn, not recomputed."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import shapely
from layouts import visium_hd_like, xenium_like
from matplotlib.collections import EllipseCollection, PolyCollection
from matplotlib.colors import to_rgba_array
from matplotlib.image import AxesImage

import spade_sd as sd
from spade_sd.pl._shapes import RASTER_ABOVE
from spade_sd.spots.geometry import resolve_geometry


def _label(sdata, table_key: str, key: str = "spade_expert", blocks_px: float = 100.0) -> pd.Series:
    """A categorical column in blocks of the image (as experts or domains would be), on the table's rows."""
    table = sdata.tables[table_key]
    shapes = sdata.shapes[table.uns["spatialdata_attrs"]["region"]]
    ids = table.obs[table.uns["spatialdata_attrs"]["instance_key"]].to_numpy()
    centroids = shapes.geometry.loc[ids].centroid
    block = (np.floor(centroids.x.to_numpy() / blocks_px) + np.floor(centroids.y.to_numpy() / blocks_px)) % 3
    table.obs[key] = pd.Categorical([f"type {int(b)}" for b in block])
    return table.obs[key]


def _only(ax, kind):
    found = [c for c in ax.collections if isinstance(c, kind)]
    assert len(found) == 1, ax.collections
    return found[0]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_bins_are_drawn_as_squares_of_their_side():
    sdata = visium_hd_like(bin_sizes=(16,), downscaled_images=False, mpp=0.8)
    _label(sdata, "square_016um")
    ax = sd.pl.experts(sdata, shapes_key="hd_square_016um", table_key="square_016um", show=False)
    squares = _only(ax, PolyCollection).get_paths()
    assert len(squares) == sdata.tables["square_016um"].n_obs
    corners = np.stack([np.unique(p.vertices[:-1], axis=0) for p in squares])  # the closing vertex left out
    assert corners.shape[1:] == (4, 2)
    sides = np.ptp(corners, axis=1)
    np.testing.assert_allclose(sides, 16 / 0.8)  # 16 µm at 0.8 µm per pixel, a side in the H&E's pixels


def test_bins_stored_as_circles_are_still_drawn_as_squares():
    sdata = visium_hd_like(bin_sizes=(16,), downscaled_images=False, bins_as_squares=False)
    _label(sdata, "square_016um")
    ax = sd.pl.experts(sdata, shapes_key="hd_square_016um", table_key="square_016um", show=False)
    assert not [c for c in ax.collections if isinstance(c, EllipseCollection)]
    assert {len(np.unique(p.vertices, axis=0)) for p in _only(ax, PolyCollection).get_paths()} == {4}


def test_cells_are_drawn_as_their_polygons():
    sdata = xenium_like()
    _label(sdata, "table")
    ax = sd.pl.experts(sdata, image_key="he_image", show=False)
    cells = _only(ax, PolyCollection).get_paths()
    table = sdata.tables["table"]
    polygons = sdata.shapes["cell_boundaries"].geometry.loc[table.obs["cell_id"]].to_numpy()
    expected = shapely.get_num_coordinates(shapely.get_exterior_ring(polygons)) - 1
    assert len(cells) == len(polygons)
    assert [len(p.vertices) - 1 for p in cells] == expected.tolist()
    assert (expected > 4).all()
    # the H&E is turned against the cells' µm frame: the outlines are drawn in its pixels, around the cells' centres
    geometry = resolve_geometry(sdata, image_key="he_image", require_scale=False)
    drawn_centres = np.array([shapely.centroid(shapely.Polygon(p.vertices)).coords[0] for p in cells])
    np.testing.assert_allclose(drawn_centres, geometry.centers, atol=1e-6)


def test_spots_are_drawn_as_circles_over_the_he(synthetic_slides):
    sdata = synthetic_slides(1, seed=1)[0]
    _label(sdata, "table")
    ax = sd.pl.experts(sdata, show=False)
    circles = _only(ax, EllipseCollection)
    assert len(circles.get_offsets()) == sdata.tables["table"].n_obs
    assert len(ax.images) == 1


def test_many_bins_become_one_image_at_the_panels_resolution():
    sdata = visium_hd_like(bin_sizes=(2,), grid=(5, 5), n_genes=5, downscaled_images=False)
    labels = _label(sdata, "square_002um")
    assert len(labels) > RASTER_ABOVE
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    sd.pl.experts(sdata, shapes_key="hd_square_002um", table_key="square_002um", ax=ax, show=False)
    assert not [c for c in ax.collections if isinstance(c, PolyCollection | EllipseCollection)]
    images = [i for i in ax.get_children() if isinstance(i, AxesImage)]
    assert len(images) == 2  # the H&E, then the bins
    raster = np.asarray(images[1].get_array())
    assert max(raster.shape[:2]) <= 400  # no finer than the panel's pixels (4 inches at 100 dpi)
    covered = raster[..., 3] > 0
    assert covered.mean() > 0.8  # the bins tile the tissue the view frames
    palette = to_rgba_array(sdata.tables["square_002um"].uns.get("spade_expert_colors", None) or _default(3))[:, :3]
    pure = np.isclose(raster[covered][:, None, :3], palette[None], atol=1e-6).all(axis=2).any(axis=1)
    assert pure.mean() > 0.9  # inside the blocks each pixel is its category's colour; blends only at block edges
    assert len({tuple(c) for c in raster[covered][pure][:, :3]}) == 3


def _default(n: int) -> list[str]:
    from scanpy.plotting.palettes import default_20

    return default_20[:n]


def test_several_slides_make_a_row_of_panels(synthetic_slides):
    slides = synthetic_slides(2, seed=4)
    for sdata in slides:
        _label(sdata, "table")
    axes = sd.pl.experts(slides, show=False)
    assert isinstance(axes, list) and len(axes) == 2 and axes[0].figure is axes[1].figure
    assert all(len(_only(ax, EllipseCollection).get_offsets()) == 64 for ax in axes)
    assert axes[0].get_title() != axes[1].get_title()
    domains = sd.pl.domains(slides, "spade_expert", show=False)
    assert len(domains) == 2 and all(ax.images for ax in domains)

    # two slides in one SpatialData: lists of element names
    hd = visium_hd_like(bin_sizes=(8, 16), downscaled_images=False)
    for name in ("square_008um", "square_016um"):
        _label(hd, name)
    axes = sd.pl.experts(
        hd, shapes_key=["hd_square_008um", "hd_square_016um"], table_key=["square_008um", "square_016um"], show=False
    )
    assert [len(_only(ax, PolyCollection).get_paths()) for ax in axes] == [2500, 625]


def test_slide_lists_of_different_lengths_are_refused_before_drawing(synthetic_slides):
    slides = synthetic_slides(2, seed=4)
    with pytest.raises(ValueError, match=r"one entry per slide.*'sdata': 2, 'shapes_key': 3"):
        sd.pl.experts(slides, shapes_key=["a", "b", "c"], show=False)
    with pytest.raises(ValueError, match=r"title needs one entry per slide \(2\)"):
        sd.pl.experts(slides, title=["only one"], show=False)
    with pytest.raises(TypeError, match="list of them; found AnnData"):
        sd.pl.experts([slides[0], slides[0].tables["table"]], show=False)
    with pytest.raises(ValueError, match="ax holds one panel"):
        sd.pl.experts(slides, ax=plt.subplots()[1], show=False)
    assert len(plt.get_fignums()) == 1  # only the caller's


def test_a_stored_umap_is_drawn_not_recomputed(synthetic_slides):
    sdata = synthetic_slides(1, seed=6)[0]
    table = sdata.tables["table"]
    _label(sdata, "table")
    sentinel = np.random.default_rng(0).normal(size=(table.n_obs, 2)) * 1000
    table.obsm["X_umap"] = sentinel  # no X_spade: computing a UMAP would fail
    he, umap = sd.pl.experts(sdata, umap=True, show=False)
    np.testing.assert_array_equal(umap.collections[0].get_offsets(), sentinel)
    assert umap.get_title() == "the table's X_umap"

    # a UMAP recorded as one of another representation does not stand for X_spade's
    table.uns["neighbors"] = {"params": {"use_rep": "X_pca"}}
    with pytest.raises(KeyError, match="no 'X_umap' of it is stored"):
        sd.pl.experts(sdata, umap=True, show=False)
    table.uns["neighbors"] = {"params": {"use_rep": "X_spade"}}
    _, umap = sd.pl.experts(sdata, umap=True, show=False)
    assert umap.get_title() == "UMAP of X_spade"
