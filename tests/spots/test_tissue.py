"""Tissue detection knows what glass looks like: all-tissue, all-glass and mixed images, real and synthetic."""

from __future__ import annotations

import numpy as np
import pytest
from spatialdata import SpatialData
from spatialdata.models import Image2DModel

from spade_sd.pp import tile_image
from spade_sd.spots.geometry import resolve_geometry
from spade_sd.spots.tiles import level_downsample, tissue_mask

# Crops of the real slides, checked by eye and against the spots under tissue: (level, (y0, y1), (x0, x1)).
# her2st C2 at level 4 (~11 µm/px, 619 × 579 px): the tumour's interior, the slide's top-left corner (glass with the
# faint print of the array's spots) and the tissue's left corner (about 80 % tissue). MOB1 at level 2 (~18.5 µm/px,
# 476 × 476 px): the granule layer and the plexiform layer around it, glass above the section (dust specks and the
# faint rim of the coverslip mount) and the left bulb with glass around it (about 75 % tissue). Mostly-tissue mixed
# crops are the hard case: Otsu's threshold alone splits their tissue in two.
CROPS = {
    "her2st_c2": {
        "size_um": 112.0,
        "level": 4,
        "image_level": 2,
        "tissue": ((320, 440), (320, 440)),
        "glass": ((0, 150), (0, 150)),
        "mixed": ((280, 480), (180, 430)),
    },
    "mob1": {
        "size_um": 200.0,
        "level": 2,
        "image_level": 0,
        "tissue": ((195, 255), (165, 215)),
        "glass": ((40, 130), (40, 200)),
        "mixed": ((160, 310), (120, 260)),
    },
}
SLIDES = list(CROPS)
PINK, WHITE = (230, 150, 190), 240  # eosin-stained tissue, bright glass


def _slide(request, name: str):
    sdata = request.getfixturevalue(name)
    geometry = resolve_geometry(sdata)
    levels, downsample = level_downsample(sdata.images[geometry.image_key])
    return sdata, geometry, levels, downsample


def _crop(request, name: str, kind: str) -> tuple[np.ndarray, float, float]:
    """``(c, y, x)`` pixels of a crop of a coarse level, its µm per pixel and the tile size to detect tissue for."""
    _, geometry, levels, downsample = _slide(request, name)
    crop = CROPS[name]
    (y0, y1), (x0, x1) = crop[kind]
    pixels = levels[crop["level"]].data[:, y0:y1, x0:x1].compute()
    return np.asarray(pixels), geometry.mpp * downsample[crop["level"]].max(), crop["size_um"]


@pytest.mark.parametrize("name", SLIDES)
def test_real_all_tissue_crop_is_all_tissue(name, request):
    mask, _ = tissue_mask(*_crop(request, name, "tissue"))
    assert mask.mean() > 0.97, mask.mean()


@pytest.mark.parametrize("name", SLIDES)
def test_real_glass_crop_has_no_tissue(name, request):
    pixels, pixel_um, size_um = _crop(request, name, "glass")
    assert pixels.mean(axis=0).min() > 150 and np.percentile(pixels.mean(axis=0), 1) > 200  # bright: glass
    mask, _ = tissue_mask(pixels, pixel_um, size_um)
    assert mask.mean() < 0.01, mask.mean()


@pytest.mark.parametrize("name", SLIDES)
def test_real_mixed_crop_agrees_with_the_whole_slide(name, request):
    _, geometry, levels, downsample = _slide(request, name)
    crop = CROPS[name]
    level = crop["level"]
    whole, _ = tissue_mask(levels[level].values, geometry.mpp * downsample[level].max(), crop["size_um"])
    # the whole slide's mask is a sound reference: it covers the spots under tissue (but for some on its edge, partly
    # on glass) and leaves the corners as glass
    x, y = (geometry.centers / downsample[level]).astype(int).T
    assert whole[y, x].mean() > 0.92, whole[y, x].mean()
    corner = max(whole.shape) // 10
    assert not whole[:corner, :corner].any() and not whole[-corner:, -corner:].any()

    (y0, y1), (x0, x1) = crop["mixed"]
    reference = whole[y0:y1, x0:x1].mean()
    mask, _ = tissue_mask(*_crop(request, name, "mixed"))
    assert 0.5 < reference < 0.9, reference
    assert abs(mask.mean() - reference) < 0.05, (mask.mean(), reference)


def _glass(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``(y, x, 3)`` blank glass: grey level 240 with independent ±2 grey-level noise in each channel."""
    return WHITE + np.random.default_rng(seed).integers(-2, 3, size=(*shape, 3))


def _pink(shape: tuple[int, int], seed: int = 0, noise: float = 0.0) -> np.ndarray:
    return np.asarray(PINK) + np.random.default_rng(seed).normal(0, noise, size=(*shape, 3))


def _chw(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def test_blank_glass_with_noise_is_no_tissue():
    mask, _ = tissue_mask(_chw(_glass((256, 256))), pixel_um=4.0, size_um=32.0)
    assert not mask.any(), mask.mean()


def test_uniformly_pink_image_is_all_tissue():
    mask, _ = tissue_mask(_chw(_pink((128, 128))), pixel_um=4.0, size_um=32.0)
    assert mask.all(), mask.mean()


def test_pink_on_white_halves_is_half_tissue_and_each_half_alone_agrees():
    shape = (128, 64)
    white, pink = _glass(shape), _pink(shape, noise=8.0)
    halves, _ = tissue_mask(_chw(np.concatenate([white, pink], axis=1)), pixel_um=4.0, size_um=32.0)
    assert abs(halves.mean() - 0.5) < 0.02 and halves[:, 64:].all() and not halves[:, :64].any(), halves.mean()
    # a crop's mask is the whole's mask restricted to it: the glass half alone is no tissue, the pink half all tissue
    assert not tissue_mask(_chw(white), pixel_um=4.0, size_um=32.0)[0].any()
    assert tissue_mask(_chw(pink), pixel_um=4.0, size_um=32.0)[0].all()


def _crop_sdata(request, name: str, kind: str) -> tuple[SpatialData, float, float]:
    """A SpatialData whose image (with its own pyramid) is a crop of a finer level, its mpp and a tile size.

    The crop is trimmed to whole tiles, so that no tile reaches beyond it onto the white padding.
    """
    _, geometry, levels, downsample = _slide(request, name)
    crop = CROPS[name]
    level = crop["image_level"]
    mpp = geometry.mpp * downsample[level].max()
    tile_px = 4 * round(crop["size_um"] / 8 / mpp)  # a multiple of 4, so that the crop halves twice exactly
    factor = 2 ** (crop["level"] - level)  # the crop's bounds are given on the crop's level
    (y0, y1), (x0, x1) = (np.asarray(crop[kind]) * factor).tolist()
    y1, x1 = y0 + (y1 - y0) // tile_px * tile_px, x0 + (x1 - x0) // tile_px * tile_px
    pixels = np.asarray(levels[level].data[:, y0:y1, x0:x1].compute())
    image = Image2DModel.parse(pixels, dims=("c", "y", "x"), c_coords=["r", "g", "b"], scale_factors=[2, 2])
    return SpatialData(images={"he": image}), mpp, tile_px * mpp


@pytest.mark.parametrize("name", SLIDES)
def test_tile_image_on_a_glass_crop_says_no_tissue(name, request):
    sdata, mpp, size_um = _crop_sdata(request, name, "glass")
    with pytest.raises(ValueError, match="No tile"):
        tile_image(sdata, size_um=size_um, mpp=mpp)


@pytest.mark.parametrize("name", SLIDES)
def test_tile_image_on_a_tissue_crop_keeps_every_tile(name, request):
    sdata, mpp, size_um = _crop_sdata(request, name, "tissue")
    tile_image(sdata, size_um=size_um, mpp=mpp)
    grid = tile_image(sdata, size_um=size_um, mpp=mpp, tissue_only=False, key_added="grid", copy=True)
    n_grid = grid.tables["grid_table"].n_obs
    assert n_grid >= 12 and sdata.tables["tiles_table"].n_obs == n_grid, (sdata.tables["tiles_table"].n_obs, n_grid)
