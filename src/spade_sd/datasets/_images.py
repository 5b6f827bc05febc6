"""Turning a registry's JPEG into a lazily read multiscale image.

A JPEG cannot be read by tiles, so it is decoded once into uncompressed array files in the cache (keyed by the
file's SHA-256), one per pyramid level (2 × 2 means of the level above); afterwards every read is a memory-mapped
tile of the level asked for. A pyramid computed lazily from level 0 instead would read the whole slide to show
its coarsest level.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from xarray import DataTree

from spade_sd.utils.logging import logger
from spade_sd.utils.settings import settings

CHUNK = 1024
MIN_COARSEST_SIDE = 256


def pyramid_scale_factors(shape: tuple[int, int]) -> list[int]:
    """Factors of 2 until the coarsest level's short side would fall below ``MIN_COARSEST_SIDE`` pixels."""
    factors = []
    side = min(shape)
    while side // 2 >= MIN_COARSEST_SIDE:
        factors.append(2)
        side //= 2
    return factors


def _save_atomically(target: Path, pixels: np.ndarray) -> None:
    partial = target.with_suffix(f".{os.getpid()}.partial.npy")
    np.save(partial, pixels)
    partial.replace(target)  # atomic: a crash never leaves a half-written cache entry behind


def _halved(pixels: np.ndarray) -> np.ndarray:
    """2 × 2 block means of a (y, x, c) uint8 array, in row strips to bound memory."""
    height, width = pixels.shape[0] // 2, pixels.shape[1] // 2
    out = np.empty((height, width, pixels.shape[2]), dtype=np.uint8)
    for start in range(0, height, CHUNK):
        stop = min(start + CHUNK, height)
        block = np.asarray(pixels[2 * start : 2 * stop, : 2 * width], dtype=np.float32)
        out[start:stop] = np.rint(block.reshape(stop - start, 2, width, 2, -1).mean(axis=(1, 3)))
    return out


def _decoded_levels(path: Path, sha256: str) -> list[np.ndarray]:
    """Memory maps of every pyramid level's RGB pixels (y, x, c), decoding into the cache on first use."""
    folder = settings.cache_dir / "decoded" / sha256
    level0 = folder / "scale0.npy"
    if not level0.is_file():
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # the H&E images are larger than PIL's decompression-bomb guard
        logger.info("Decoding %s once into %s", path.name, folder)
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            _save_atomically(level0, np.asarray(image.convert("RGB")))
    levels = [np.load(level0, mmap_mode="r")]
    for i, _ in enumerate(pyramid_scale_factors(levels[0].shape[:2]), start=1):
        target = folder / f"scale{i}.npy"
        if not target.is_file():
            _save_atomically(target, _halved(levels[-1]))
        levels.append(np.load(target, mmap_mode="r"))
    return levels


def _as_cyx(pixels: np.ndarray) -> da.Array:
    return da.from_array(pixels, chunks=(CHUNK, CHUNK, 3)).transpose(2, 0, 1)


def multiscale_from_file(path: Path, sha256: str, transformations: dict | None = None) -> DataTree:
    """A lazily read multiscale uint8 (c, y, x) image of an RGB image file.

    Parameters
    ----------
    path
        The image file (JPEG or PNG).
    sha256
        Its verified SHA-256, which names the decoded copy in the cache.
    transformations
        Transformations of the full-resolution level to coordinate systems (default: identity to ``"global"``).

    Returns
    -------
    The image as a :class:`spatialdata.models.Image2DModel` multiscale element whose levels are memory-mapped.
    """
    from spatialdata.models import Image2DModel

    levels = _decoded_levels(path, sha256)
    # spatialdata computes each level's shape and transformation; its lazily averaged pixels are then swapped for
    # the cached levels of the same shapes
    model = Image2DModel.parse(
        _as_cyx(levels[0]),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=pyramid_scale_factors(levels[0].shape[:2]),
        chunks=(3, CHUNK, CHUNK),
        transformations=transformations,
    )
    nodes = {}
    for name, pixels in zip(model, levels, strict=True):
        lazy = next(iter(model[name].values()))
        nodes[name] = xr.Dataset({lazy.name: lazy.copy(data=_as_cyx(pixels).rechunk(lazy.data.chunksize))})
    image = DataTree.from_dict(nodes)
    Image2DModel().validate(image)
    return image
