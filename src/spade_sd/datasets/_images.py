"""Turning a registry's JPEG into a lazily read multiscale image.

A JPEG cannot be read by tiles, so it is decoded once into uncompressed array files in the cache (keyed by the
file's SHA-256), one per pyramid level (2 × 2 means of the level above), written in row strips; afterwards every
read maps the file, copies the chunk asked for and unmaps it. A pyramid computed lazily from level 0 instead would
read the whole slide to show its coarsest level.

The levels enter dask as :class:`NpyLevel` objects, not as memory maps: ``dask.array.from_array`` copies any
array it is given (dask 2026.8 does) and hashes a memory map's every byte to name it, which put a copy of every level
in memory on each load (a process loading her2st C2, whose level 0 is 276 MB, peaked at 1.78 GB instead of 0.84 GB).
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

# Side of a chunk in pixels. A patch reads whole chunks: 512 px chunks read 224 px windows as fast as 1024 px ones
# (reading alone ~450 patches/s on her2st C2, far above encoding) with half the transient memory; 256 px chunks
# read at half the speed (benchmarks/results/scale_log.md)
CHUNK = 512
MIN_COARSEST_SIDE = 256


def pyramid_scale_factors(shape: tuple[int, int]) -> list[int]:
    """Factors of 2 until the coarsest level's short side would fall below ``MIN_COARSEST_SIDE`` pixels."""
    factors = []
    side = min(shape)
    while side // 2 >= MIN_COARSEST_SIDE:
        factors.append(2)
        side //= 2
    return factors


class NpyLevel:
    """One cached pyramid level, ``(y, x, c)`` uint8 in a ``.npy`` file, read a slice at a time.

    Each slice maps the file, copies the pixels asked for and unmaps it, so that reading a whole slide leaves no
    file pages mapped in this process (they would count in its resident memory) and pickling it (for reader
    processes) sends the file name, not the pixels.
    """

    def __init__(self, path: Path) -> None:
        pixels = np.load(path, mmap_mode="r")
        self.path, self.shape, self.dtype = path, pixels.shape, pixels.dtype
        self.ndim = len(self.shape)
        del pixels

    def __getitem__(self, key) -> np.ndarray:
        return np.array(np.load(self.path, mmap_mode="r")[key])


def _write_strips(target: Path, shape: tuple[int, int, int], strips) -> None:
    """Write a ``(y, x, c)`` uint8 ``.npy`` file from its row strips, atomically.

    A crash never leaves a half-written cache entry behind: the file is written under another name and renamed.
    """
    partial = target.with_suffix(f".{os.getpid()}.partial.npy")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    rows = 0
    try:
        with partial.open("wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            for strip in strips:
                handle.write(np.ascontiguousarray(strip, dtype=np.uint8).tobytes())
                rows += len(strip)
        if rows != shape[0]:
            raise RuntimeError(f"Wrote {rows} rows of {target.name}, expected {shape[0]}.")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)


def _decode(path: Path, target: Path) -> None:
    """Level 0 of an image file, decoded once and written in row strips (no second full-size copy)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the H&E images are larger than PIL's decompression-bomb guard
    with Image.open(path) as image:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        width, height = rgb.size
        strips = (np.asarray(rgb.crop((0, top, width, min(top + CHUNK, height)))) for top in range(0, height, CHUNK))
        _write_strips(target, (height, width, 3), strips)


def _halve(source: NpyLevel, target: Path) -> None:
    """2 × 2 block means of a level, rounded, read and written in row strips to bound memory."""
    height, width = source.shape[0] // 2, source.shape[1] // 2

    def strips():
        for start in range(0, height, CHUNK):
            stop = min(start + CHUNK, height)
            block = source[2 * start : 2 * stop, : 2 * width].astype(np.float32)
            yield np.rint(block.reshape(stop - start, 2, width, 2, -1).mean(axis=(1, 3)))

    _write_strips(target, (height, width, source.shape[2]), strips())


def _decoded_levels(path: Path, sha256: str) -> list[NpyLevel]:
    """Every pyramid level's RGB pixels (y, x, c), decoding into the cache on first use."""
    folder = settings.cache_dir / "decoded" / sha256
    level0 = folder / "scale0.npy"
    if not level0.is_file():
        logger.info("Decoding %s once into %s", path.name, folder)
        folder.mkdir(parents=True, exist_ok=True)
        _decode(path, level0)
    levels = [NpyLevel(level0)]
    for i, _ in enumerate(pyramid_scale_factors(levels[0].shape[:2]), start=1):
        target = folder / f"scale{i}.npy"
        if not target.is_file():
            _halve(levels[-1], target)
        levels.append(NpyLevel(target))
    return levels


def _as_cyx(pixels: NpyLevel, name: str) -> da.Array:
    # named, so that dask neither hashes the level's pixels to name it nor keeps a copy of them in its graph
    lazy = da.from_array(pixels, chunks=(CHUNK, CHUNK, 3), name=name, meta=np.empty((0, 0, 0), np.uint8))
    return lazy.transpose(2, 0, 1)


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
    The image as a :class:`spatialdata.models.Image2DModel` multiscale element whose levels are read from
    the decoded copy in the cache, chunk by chunk, when computed.
    """
    from spatialdata.models import Image2DModel

    levels = _decoded_levels(path, sha256)
    names = [f"decoded-{sha256}-scale{i}-{CHUNK}" for i in range(len(levels))]
    # spatialdata computes each level's shape and transformation; its lazily averaged pixels are then swapped for
    # the cached levels of the same shapes
    model = Image2DModel.parse(
        _as_cyx(levels[0], names[0]),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=pyramid_scale_factors(levels[0].shape[:2]),
        chunks=(3, CHUNK, CHUNK),
        transformations=transformations,
    )
    nodes = {}
    for scale, pixels, name in zip(model, levels, names, strict=True):
        lazy = next(iter(model[scale].values()))
        cyx = _as_cyx(pixels, name).rechunk(lazy.data.chunksize)
        nodes[scale] = xr.Dataset({lazy.name: lazy.copy(data=cyx)})
    image = DataTree.from_dict(nodes)
    Image2DModel().validate(image)
    return image
