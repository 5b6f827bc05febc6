"""Turning a registry's JPEG into a lazily read multiscale image.

A JPEG cannot be read by tiles, so it is decoded once into an uncompressed array file in the cache (keyed by the
file's SHA-256); afterwards every read is a memory-mapped tile and the pyramid is built lazily by dask.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np
from xarray import DataTree

from .._logging import logger
from ._registry import cache_dir

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


def _decoded_array(path: Path, sha256: str) -> np.ndarray:
    """Memory map of the decoded RGB pixels (y, x, c), decoding the image into the cache on first use."""
    target = cache_dir() / "decoded" / f"{sha256}.npy"
    if not target.is_file():
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # the H&E images are larger than PIL's decompression-bomb guard
        logger.info("Decoding %s once into %s", path.name, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        partial = target.with_suffix(f".{os.getpid()}.partial.npy")
        np.save(partial, pixels)
        partial.replace(target)  # atomic: a crash never leaves a half-written cache entry behind
    return np.load(target, mmap_mode="r")


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
    The image as a :class:`spatialdata.models.Image2DModel` multiscale element.
    """
    from spatialdata.models import Image2DModel

    pixels = _decoded_array(path, sha256)
    cyx = da.from_array(pixels, chunks=(CHUNK, CHUNK, 3)).transpose(2, 0, 1)
    return Image2DModel.parse(
        cyx,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=pyramid_scale_factors(cyx.shape[1:]),
        chunks=(3, CHUNK, CHUNK),
        transformations=transformations,
    )
