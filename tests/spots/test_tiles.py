from __future__ import annotations

import time
import tracemalloc

import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, Sequence, Translation, get_transformation, set_transformation
from xarray import DataArray, Dataset, DataTree

import spade_sd as sd
from spade_sd.pp._tile_image import tile_image
from spade_sd.spots.geometry import image_levels, resolve_geometry
from spade_sd.spots.tiles import tile_grid, tissue_fraction

MPP = 0.5
SIZE_UM = 32.0
TILE = int(SIZE_UM / MPP)  # 64 level-0 px
HEIGHT, WIDTH = 1000, 1200
DISC_CENTRE, DISC_RADIUS = (560.0, 480.0), 330.0
PINK, PURPLE = np.array([232, 160, 205]), np.array([95, 60, 150])


def _aligned() -> Sequence:
    return Sequence([Scale([2.0, 2.0], axes=("x", "y")), Translation([100.0, 50.0], axes=("x", "y"))])


def _disc(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (xx + 0.5 - DISC_CENTRE[0]) ** 2 + (yy + 0.5 - DISC_CENTRE[1]) ** 2 < DISC_RADIUS**2


def _he_disc(seed: int = 0) -> np.ndarray:
    """White, slightly noisy glass with a pink (eosin) disc of tissue dotted with purple (haematoxylin) nuclei."""
    rng = np.random.default_rng(seed)
    grey = rng.normal(238, 6, size=(HEIGHT, WIDTH, 1)) + rng.normal(0, 2, size=(HEIGHT, WIDTH, 3))
    tissue = np.where(rng.random((HEIGHT, WIDTH, 1)) < 0.15, PURPLE, PINK) + rng.normal(0, 12, (HEIGHT, WIDTH, 3))
    rgb = np.where(_disc()[..., None], tissue, grey)
    return np.clip(rgb, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def _sdata(image: np.ndarray, *, scale_factors: tuple[int, ...] | None = (2, 2, 2)) -> SpatialData:
    parsed = Image2DModel.parse(
        image,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=None if scale_factors is None else list(scale_factors),
        transformations={"aligned": _aligned()},
    )
    return SpatialData(images={"he": parsed})


def _with_spots(sdata: SpatialData, centres: np.ndarray, radius_px: float, diameter_um: float) -> SpatialData:
    ids = [f"s{i}" for i in range(len(centres))]
    circles = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"radius": np.full(len(ids), radius_px)}, geometry=gpd.points_from_xy(*centres.T), index=pd.Index(ids)
        ),
        transformations={"aligned": _aligned()},
    )
    obs = pd.DataFrame({"spot": ids, "region": pd.Categorical(["spots"] * len(ids))}, index=ids)
    table = TableModel.parse(AnnData(obs=obs), region="spots", region_key="region", instance_key="spot")
    table.uns["spade_sd"] = {"spot_diameter_um": diameter_um}
    sdata.shapes["spots"] = circles
    sdata.tables["table"] = table
    return sdata


@pytest.fixture(scope="module")
def he_disc() -> np.ndarray:
    return _he_disc()


def _disc_fraction_of_tiles(origins: np.ndarray) -> np.ndarray:
    padded = np.pad(_disc(), ((0, TILE), (0, TILE)))
    return np.array([padded[y : y + TILE, x : x + TILE].mean() for x, y in origins.astype(int)])


def test_tiles_cover_the_tissue_disc_and_not_the_glass(he_disc):
    sdata = _sdata(he_disc)
    tile_image(sdata, size_um=SIZE_UM, mpp=MPP)
    table = sdata.tables["tiles_table"]
    meta = table.uns["spade_sd"]
    assert meta["tissue_level"] == 3 and meta["mpp"] == MPP and meta["kind"] == "tiles"  # 4 µm px ≤ 32 µm / 4

    origins = table.obsm["spatial"] - TILE / 2
    truth = _disc_fraction_of_tiles(origins)
    disc_area = np.pi * DISC_RADIUS**2
    assert abs(table.n_obs * TILE**2 / disc_area - 1) < 0.2, (table.n_obs, disc_area / TILE**2)
    assert truth.min() > 0.25  # no tile on glass
    assert (table.obs["tissue_fraction"] >= 0.5).all()

    full = tile_image(sdata, size_um=SIZE_UM, mpp=MPP, tissue_only=False, key_added="grid", copy=True)
    grid = full.tables["grid_table"]
    truth = _disc_fraction_of_tiles(grid.obsm["spatial"] - TILE / 2)
    kept = set(table.obs["tile_id"])
    assert all(tile in kept for tile in grid.obs["tile_id"][truth >= 0.75])  # every tile mostly on the disc is kept
    # the mask has 8 px per tile side here, so an edge is placed to about one mask pixel: 1/8 of a tile
    error = grid.obs["tissue_fraction"].to_numpy() - truth
    edge = (truth > 0) & (truth < 1)
    assert np.abs(error).max() < 0.2 and abs(error[edge].mean()) < 0.03 and (error[~edge] == 0).all()


@pytest.mark.parametrize(("scale_factors", "tissue_level", "level", "step"), [(None, None, 0, 16), ((2, 2), 1, 1, 1)])
def test_unpyramided_image_is_strided_and_tissue_level_is_followed(he_disc, scale_factors, tissue_level, level, step):
    sdata = _sdata(he_disc, scale_factors=scale_factors)
    tile_image(sdata, size_um=SIZE_UM, mpp=MPP, tissue_only=False, tissue_level=tissue_level)
    table = sdata.tables["tiles_table"]
    assert (table.uns["spade_sd"]["tissue_level"], table.uns["spade_sd"]["tissue_step"]) == (level, step)
    truth = _disc_fraction_of_tiles(table.obsm["spatial"] - TILE / 2)
    tolerance = 0.2 if step > 1 else 0.05  # 4 or 32 mask pixels per tile side
    assert np.abs(table.obs["tissue_fraction"].to_numpy() - truth).max() < tolerance


def test_full_grid_and_overlapping_tiles(he_disc):
    sdata = _sdata(he_disc)
    tile_image(sdata, size_um=SIZE_UM, mpp=MPP, tissue_only=False)
    table = sdata.tables["tiles_table"]
    # a tile belongs to the grid when its centre lies in the image
    n_rows, n_cols = len(range(0, HEIGHT - TILE // 2, TILE)), len(range(0, WIDTH - TILE // 2, TILE))
    assert (n_rows, n_cols) == (16, 19) and table.n_obs == n_rows * n_cols
    assert table.obs["tile_col"].max() == n_cols - 1 and table.obs["tile_row"].max() == n_rows - 1

    stride = 48  # px, 24 µm
    tile_image(sdata, size_um=SIZE_UM, stride_um=stride * MPP, mpp=MPP, tissue_only=False, key_added="dense")
    dense = sdata.shapes["dense"]
    n_rows, n_cols = len(range(0, HEIGHT - TILE // 2, stride)), len(range(0, WIDTH - TILE // 2, stride))
    assert len(dense) == n_rows * n_cols == 21 * 25
    first, right = dense.geometry.loc[0], dense.geometry.loc[1]
    assert first.area == TILE**2 and first.intersection(right).area == TILE * (TILE - stride)
    assert sdata.tables["dense_table"].uns["spade_sd"]["stride_um"] == stride * MPP


def test_tile_grid_counts_and_exact_fractions():
    grid = tile_grid(100, 250, size_px=30.0, stride_px=20.0)
    assert (grid.n_rows, grid.n_cols) == (5, 12)  # ceil((extent - 15) / 20)
    assert (grid.centers < [250, 100]).all() and (grid.ids == np.arange(60)).all()

    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    lower = np.array([[1.0, 1.0], [0.5, 0.5], [2.5, 1.0], [3.0, 3.0]])
    upper = np.array([[3.0, 3.0], [1.5, 1.5], [4.5, 2.0], [5.0, 5.0]])  # the last ones reach beyond the mask
    np.testing.assert_allclose(tissue_fraction(mask, lower, upper), [1.0, 0.25, 0.25, 0.0])


def _hand_crop(level: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    padded = np.pad(level, ((0, 0), (0, side), (0, side)), constant_values=255)
    return padded[:, y0 : y0 + side, x0 : x0 + side].transpose(1, 2, 0)


def test_tiles_round_trip_through_geometry_and_spot_patches():
    image = np.random.default_rng(1).integers(0, 256, size=(3, 200, 250), dtype=np.uint8)
    sdata = _sdata(image, scale_factors=(2,))
    tile_image(sdata, size_um=16.0, mpp=MPP, tissue_only=False)
    tiles = sdata.shapes["tiles"]
    assert get_transformation(tiles, get_all=True) == get_transformation(image_levels(sdata["he"])[0], get_all=True)

    geometry = resolve_geometry(sdata, shapes_key="tiles", table_key="tiles_table")
    assert geometry.mpp == MPP and "uns['spade_sd']['mpp']" in geometry.mpp_source
    assert geometry.coordinate_system == "aligned" and geometry.n_spots == 6 * 8  # the last column passes x = 250
    np.testing.assert_allclose(geometry.centers, sdata.tables["tiles_table"].obsm["spatial"])

    patches = sd.pp.spot_patches(sdata, shapes_key="tiles", size_um=16.0, size_px=32)
    assert patches.level == 0
    batch = patches.read(np.arange(len(patches)))
    for patch, (x0, y0) in zip(batch, geometry.centers - 16, strict=True):
        np.testing.assert_array_equal(patch, _hand_crop(image, int(x0), int(y0), 32))


def test_mpp_comes_from_the_spots_on_the_image(he_disc):
    radius_px = 10.0  # 55 µm spots of 20 px: 2.75 µm per pixel
    sdata = _with_spots(_sdata(he_disc), np.array([[560.0, 480.0], [500.0, 400.0]]), radius_px, 55.0)
    out = tile_image(sdata, size_um=112.0, copy=True)
    assert set(sdata.shapes) == {"spots"} and set(out.shapes) == {"spots", "tiles"}
    assert out.images["he"] is sdata.images["he"]  # shared, not duplicated
    meta = out.tables["tiles_table"].uns["spade_sd"]
    assert meta["mpp"] == pytest.approx(55.0 / (2 * radius_px)) and "'spots'" in meta["mpp_source"]

    tile_image(out, size_um=224.0, key_added="big")  # two spot-like tables now, which agree
    assert out.tables["big_table"].uns["spade_sd"]["mpp"] == pytest.approx(meta["mpp"])


def test_errors_say_what_to_pass(he_disc):
    sdata = _sdata(he_disc, scale_factors=(2,))
    with pytest.raises(ValueError, match="mpp="):
        tile_image(sdata)
    with pytest.raises(KeyError, match=r"available images: \['he'\]"):
        tile_image(sdata, image_key="slide", mpp=MPP)
    with pytest.raises(ValueError, match="size_um"):
        tile_image(sdata, size_um=-1.0, mpp=MPP)
    with pytest.raises(ValueError, match="stride_um"):
        tile_image(sdata, stride_um=0.0, mpp=MPP)
    with pytest.raises(ValueError, match="twice the image"):
        tile_image(sdata, size_um=2000.0, mpp=MPP)
    with pytest.raises(ValueError, match="tissue_level"):
        tile_image(sdata, mpp=MPP, tissue_level=5)
    with pytest.raises(ValueError, match="already has an element 'he'"):
        tile_image(sdata, mpp=MPP, key_added="he")
    assert set(sdata.shapes) == set() and set(sdata.tables) == set()

    tile_image(sdata, mpp=MPP, size_um=SIZE_UM)
    tiles = sdata.shapes["tiles"]
    with pytest.raises(ValueError, match="already has an element 'tiles'"):
        tile_image(sdata, mpp=MPP, size_um=SIZE_UM)
    assert sdata.shapes["tiles"] is tiles


@pytest.mark.parametrize("fixture", ["mob1", "her2st_c2"])
def test_real_tiles_lie_on_tissue(fixture, request):
    sdata = request.getfixturevalue(fixture)
    tiled = tile_image(sdata, copy=True)  # the fixtures are shared: leave them as they are
    table = tiled.tables["tiles_table"]
    meta = table.uns["spade_sd"]
    assert table.n_obs > 300, table.n_obs

    spots = resolve_geometry(sdata)
    size_px = meta["size_um"] / meta["mpp"]
    lower = table.obsm["spatial"] - size_px / 2
    inside = (spots.centers[:, None] >= lower[None]) & (spots.centers[:, None] < lower[None] + size_px)
    covered = inside.all(axis=2).any(axis=1).mean()
    assert covered > 0.8, covered

    patches = sd.pp.spot_patches(tiled, shapes_key="tiles")
    tissue = patches.read(np.linspace(0, len(patches) - 1, 24).astype(int)).mean(axis=(1, 2, 3))
    coarsest = image_levels(sdata.images[spots.image_key])[-1].values
    side = max(4, min(coarsest.shape[1:]) // 10)
    glass = np.mean(
        [
            coarsest[:, ys, xs].mean()
            for ys in (slice(side), slice(-side, None))
            for xs in (slice(side), slice(-side, None))
        ]
    )
    assert np.median(tissue) < glass - 15, (np.median(tissue), glass)


HUGE, HUGE_MPP, HUGE_LEVELS = 100_000, 0.5, 7
HUGE_DISC = (50_000.0, 45_000.0, 30_000.0)  # centre x, y and radius in level-0 px


def _huge_level(level: int, chunk: int = 4096) -> da.Array:
    """Level ``level`` of the slide, generated on its own like a stored pyramid's level (nothing reads level 0)."""
    factor = 2**level
    side = HUGE // factor

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
        yy, xx = np.ogrid[y0:y1, x0:x1]
        cx, cy, radius = HUGE_DISC
        tissue = ((xx + 0.5) * factor - cx) ** 2 + ((yy + 0.5) * factor - cy) ** 2 < radius**2
        stripes = ((yy // 7 + xx // 5) % 2).astype(bool)
        rgb = np.where(tissue[..., None], np.where(stripes[..., None], PINK, PURPLE), 240)
        return rgb.astype(np.uint8).transpose(2, 0, 1)

    chunks = [
        (min(chunk, side),) * (side // min(chunk, side)) + ((side % chunk,) if side > chunk and side % chunk else ())
    ]
    return da.map_blocks(block, dtype=np.uint8, chunks=((3,), *chunks * 2))


def _huge_slide() -> SpatialData:
    levels = {
        f"scale{i}": Dataset({"image": DataArray(_huge_level(i), dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})})
        for i in range(HUGE_LEVELS)
    }
    tree = DataTree.from_dict(levels)
    set_transformation(tree, {"global": Identity()}, set_all=True)
    return SpatialData(images={"slide": tree})


def test_huge_slide_is_tiled_from_a_coarse_level_with_bounded_memory():
    sdata = _huge_slide()
    assert image_levels(sdata["slide"])[0].shape == (3, HUGE, HUGE)
    start = time.perf_counter()
    tracemalloc.start()
    tile_image(sdata, mpp=HUGE_MPP)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    seconds = time.perf_counter() - start

    table = sdata.tables["tiles_table"]
    assert table.uns["spade_sd"]["tissue_level"] == 5  # 16 µm px ≤ 112 µm / 4 < 32 µm px
    tile_area = (112.0 / HUGE_MPP) ** 2
    assert abs(table.n_obs * tile_area / (np.pi * HUGE_DISC[2] ** 2) - 1) < 0.05, table.n_obs
    assert peak < 1.5e9, f"peak traced memory {peak / 1e6:.0f} MB"  # level 0 is 30 GB
    assert seconds < 60, f"{seconds:.0f} s"
