from __future__ import annotations

import tracemalloc

import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale, Sequence, Translation, set_transformation
from xarray import DataArray, Dataset, DataTree

import spade_sd as sd
from spade_sd.spots.patches import choose_level

# Level-0 pixel centres of the spots; even, so that they stay integers at pyramid level 1.
PIXELS = np.array([[40, 60], [100, 50], [180, 140], [6, 4], [236, 196]])


def _transformed_sdata(image: np.ndarray, *, channels=("r", "g", "b"), scale_factors=(2, 2)) -> SpatialData:
    """Image: level-0 pixel p → 2 p + (100, 50) in "aligned"; shapes: u = 4 p + (7, 3) → 0.5 u + (96.5, 48.5)."""
    image_to_aligned = Sequence([Scale([2.0, 2.0], axes=("x", "y")), Translation([100.0, 50.0], axes=("x", "y"))])
    img = Image2DModel.parse(
        image,
        dims=("c", "y", "x"),
        c_coords=list(channels),
        scale_factors=list(scale_factors),
        transformations={"aligned": image_to_aligned},
    )
    shape_coords = PIXELS * 4 + np.array([7, 3])
    shapes_to_aligned = Affine(
        np.array([[0.5, 0, 96.5], [0, 0.5, 48.5], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y")
    )
    ids = [f"s{i}" for i in range(len(PIXELS))]
    circles = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"radius": np.full(len(PIXELS), 20.0)},
            geometry=gpd.points_from_xy(*shape_coords.T),
            index=pd.Index(ids, name="cell"),
        ),
        transformations={"aligned": shapes_to_aligned},
    )
    obs = pd.DataFrame({"cell": ids, "where": pd.Categorical(["spots"] * len(ids))}, index=[f"r{i}" for i in ids])
    table = TableModel.parse(
        AnnData(np.ones((len(ids), 3), dtype=np.float32), obs=obs),
        region="spots",
        region_key="where",
        instance_key="cell",
    )
    return SpatialData(images={"he": img}, shapes={"spots": circles}, tables={"expr": table})


def _hand_crop(level: np.ndarray, cx: int, cy: int, half: int) -> np.ndarray:
    padded = np.pad(level, ((0, 0), (half, half), (half, half)), constant_values=255)
    return padded[:, cy : cy + 2 * half, cx : cx + 2 * half].transpose(1, 2, 0)


@pytest.fixture(scope="module")
def random_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(3, 200, 240), dtype=np.uint8)


def test_patches_equal_hand_cut_level0(random_image):
    sdata = _transformed_sdata(random_image)
    patches = sd.pp.spot_patches(sdata, size_um=16.0, size_px=32, mpp=0.5)
    assert patches.level == 0 and len(patches) == len(PIXELS)
    assert patches.geometry.coordinate_system == "aligned" and patches.geometry.table_key == "expr"
    np.testing.assert_allclose(patches.geometry.centers, PIXELS, atol=1e-9)
    for i, (cx, cy) in enumerate(PIXELS):
        np.testing.assert_array_equal(patches[i], _hand_crop(random_image, cx, cy, 16))


def test_patches_read_from_coarser_pyramid_level(random_image):
    sdata = _transformed_sdata(random_image)
    patches = sd.pp.spot_patches(sdata, size_um=16.0, size_px=16, mpp=0.5)
    assert patches.level == 1  # 1 µm/px needed; level 1 has exactly 1 µm/px, level 2 is too coarse
    level1 = sdata.images["he"]["scale1"]["image"].values
    batch = patches.read(np.arange(len(PIXELS)))
    for i, (cx, cy) in enumerate(PIXELS // 2):
        np.testing.assert_array_equal(batch[i], _hand_crop(level1, cx, cy, 8))


def test_patch_beyond_border_is_white_and_resampling_is_smooth(random_image):
    sdata = _transformed_sdata(random_image)
    patch = sd.pp.spot_patches(sdata, size_um=16.0, size_px=32, mpp=0.5)[3]  # centre (6, 4): window from (-10, -12)
    assert (patch[:12] == 255).all() and (patch[:, :10] == 255).all()
    upsampled = sd.pp.spot_patches(sdata, size_um=16.0, size_px=64, mpp=0.5)[0]
    assert upsampled.shape == (64, 64, 3)
    # 2× bilinear upsampling of the same window keeps the mean colour
    assert abs(upsampled.astype(float).mean() - _hand_crop(random_image, 40, 60, 16).astype(float).mean()) < 3


def test_choose_level_prefers_coarsest_fine_enough(random_image):
    geometry = sd.pp.spot_patches(_transformed_sdata(random_image), size_um=16.0, size_px=32, mpp=0.5).geometry
    assert choose_level(geometry, 112.0, 224) == 0
    assert choose_level(geometry, 64.0, 32) == 2
    assert choose_level(geometry, 16.0, 64) == 0  # nothing is fine enough: the finest level


def test_grey_rgba_and_float_images():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(1, 200, 240), dtype=np.uint8)
    patch = sd.pp.spot_patches(_transformed_sdata(grey, channels=("l",)), size_um=16.0, size_px=32, mpp=0.5)[0]
    assert (patch[..., 0] == patch[..., 1]).all() and (patch[..., 0] == _hand_crop(grey, 40, 60, 16)[..., 0]).all()

    rgba = np.concatenate([rng.integers(0, 256, size=(3, 200, 240), dtype=np.uint8), np.zeros((1, 200, 240), np.uint8)])
    transparent = _transformed_sdata(rgba, channels=("r", "g", "b", "a"))
    assert (sd.pp.spot_patches(transparent, size_um=16.0, size_px=32, mpp=0.5)[0] == 255).all()

    as_float = rng.random((3, 200, 240)).astype(np.float32)
    patch = sd.pp.spot_patches(_transformed_sdata(as_float), size_um=16.0, size_px=32, mpp=0.5)[0]
    np.testing.assert_array_equal(patch, np.rint(_hand_crop(as_float, 40, 60, 16) * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sd.pp.spot_patches(_transformed_sdata(as_float * 300), size_um=16.0, size_px=32, mpp=0.5)[0]


def test_unsupported_images_are_rejected_before_reading():
    five = np.zeros((5, 200, 240), dtype=np.uint8)
    with pytest.raises(ValueError, match="5 channels"):
        sd.pp.spot_patches(_transformed_sdata(five, channels=tuple("abcde")), mpp=0.5)
    sixteen = np.zeros((3, 200, 240), dtype=np.uint16)
    with pytest.raises(ValueError, match="uint16"):
        sd.pp.spot_patches(_transformed_sdata(sixteen), mpp=0.5)
    with pytest.raises(ValueError, match="size_px"):
        sd.pp.spot_patches(_transformed_sdata(sixteen), mpp=0.5, size_px=0)


@pytest.mark.parametrize("fixture", ["her2st_c2", "mob1"])
def test_real_spot_patches_are_tissue_not_glass(fixture, request):
    sdata = request.getfixturevalue(fixture)
    patches = sd.pp.spot_patches(sdata)
    batch = patches.read(np.linspace(0, len(patches) - 1, 24).astype(int))
    assert batch.shape == (24, 224, 224, 3) and batch.dtype == np.uint8

    tree = sdata.images[patches.geometry.image_key]
    pixels = next(iter(tree[list(tree)[-1]].values())).values
    side = max(4, min(pixels.shape[1:]) // 10)
    corners = [pixels[:, :side, :side], pixels[:, :side, -side:], pixels[:, -side:, :side], pixels[:, -side:, -side:]]
    glass = np.mean([c.mean() for c in corners])
    tissue = batch.mean(axis=(1, 2, 3))
    assert np.median(tissue) < glass - 15, (np.median(tissue), glass)


def _huge_level(side: int, chunk: int = 2048) -> da.Array:
    """One level of a lazily generated slide, computed on its own like a stored pyramid's level."""

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
        yy, xx = np.ogrid[y0:y1, x0:x1]
        value = ((yy // 97 + xx // 89) % 200 + 30).astype(np.uint8)
        return np.broadcast_to(value, (3, y1 - y0, x1 - x0)).copy()

    chunks = (chunk,) * (side // chunk) + ((side % chunk,) if side % chunk else ())
    return da.map_blocks(block, dtype=np.uint8, chunks=((3,), chunks, chunks))


def _huge_slide(side: int = 100_000, n_levels: int = 5) -> SpatialData:
    levels = {
        f"scale{i}": Dataset(
            {"image": DataArray(_huge_level(side // 2**i), dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})}
        )
        for i in range(n_levels)
    }
    image = DataTree.from_dict(levels)
    set_transformation(image, {"global": Identity()}, set_all=True)
    rng = np.random.default_rng(0)
    centres = rng.uniform(1000, side - 1000, size=(40, 2))
    ids = [str(i) for i in range(len(centres))]
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame({"radius": np.full(len(ids), 55.0)}, geometry=gpd.points_from_xy(*centres.T), index=ids),
        transformations={"global": Identity()},
    )
    obs = pd.DataFrame({"spot": ids, "region": pd.Categorical(["spots"] * len(ids))}, index=ids)
    table = TableModel.parse(AnnData(obs=obs), region="spots", region_key="region", instance_key="spot")
    table.uns["spade_sd"] = {"spot_diameter_um": 55.0}
    return SpatialData(images={"slide": image}, shapes={"spots": shapes}, tables={"table": table})


def test_huge_lazy_slide_is_read_with_bounded_memory():
    sdata = _huge_slide()
    tracemalloc.start()
    fine = sd.pp.spot_patches(sdata)  # 0.5 µm/px: level 0
    coarse = sd.pp.spot_patches(sdata, size_um=112.0 * 8, size_px=224)  # 4 µm/px: level 3
    fine_batch = fine.read(np.arange(len(fine)))
    coarse_batch = coarse.read(np.arange(8))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert fine.level == 0 and coarse.level == 3
    assert fine_batch.shape == (40, 224, 224, 3) and coarse_batch.shape == (8, 224, 224, 3)
    assert fine_batch.std() > 5  # real pixels were read, not padding
    assert peak < 1.5e9, f"peak traced memory {peak / 1e6:.0f} MB"  # the slide is 30 GB
