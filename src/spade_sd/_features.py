"""Batched frozen-backbone features of spot patches, and their on-disk cache.

Reading the next batch of patches overlaps with encoding the current one (a reader thread), so the backbone is
kept busy. Features are cached as ``.npy`` files named by a digest of the patches (image content under a sample
of spots, every spot position, scale and patch geometry) and the backbone (architecture and weights), so a
second run with the same inputs reads them back instead of recomputing.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ._logging import logger
from ._patches import SpotPatches

CACHE_FORMAT = "spade_sd.features/1"


def cache_key(patches: SpotPatches, backbone) -> str:
    """Digest naming the features of these patches under this backbone."""
    digest = hashlib.blake2b(digest_size=20)
    for part in (CACHE_FORMAT, patches.fingerprint(), backbone.identity()):
        digest.update(part.encode())
    return digest.hexdigest()


def _features_cache_dir() -> Path:
    from .datasets._registry import cache_dir

    return cache_dir() / "features"


def iter_batches(patches: SpotPatches, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(indices, uint8 patches)`` batches in order, the next one read while the caller works on the current."""
    starts = range(0, len(patches), batch_size)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spade_sd-read") as reader:
        pending = None
        for start in starts:
            indices = np.arange(start, min(start + batch_size, len(patches)))
            future = reader.submit(patches.read, indices)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (indices, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def extract_features(
    patches: SpotPatches, backbone, *, batch_size: int = 64, cache: bool = True, out: np.ndarray | None = None
) -> np.ndarray:
    """Features of every patch, computed in batches or read from the cache.

    Parameters
    ----------
    patches
        The spot patches.
    backbone
        A :class:`~spade_sd.Backbone`.
    batch_size
        Patches read and encoded at a time.
    cache
        Read and write the on-disk cache (``$SPADE_SD_CACHE_DIR/features``).
    out
        Optional ``(len(patches), backbone.dim)`` float32 array (e.g. a memory map) written batch by batch, so
        very many patches never sit in memory at once.

    Returns
    -------
    float32 array ``(len(patches), backbone.dim)``.
    """
    path = _features_cache_dir() / f"{cache_key(patches, backbone)}.npy" if cache else None
    if path is not None and path.is_file():
        features = np.load(path, allow_pickle=False)
        if features.shape == (len(patches), backbone.dim):
            logger.info("Read %d cached %s features from %s", len(features), backbone.name, path)
            if out is not None:
                out[:] = features
                return out
            return features
        logger.warning(
            "Ignoring cached features of shape %s at %s: expected %s",
            features.shape,
            path,
            (len(patches), backbone.dim),
        )

    start = time.perf_counter()
    features = out if out is not None else np.empty((len(patches), backbone.dim), dtype=np.float32)
    for indices, batch in iter_batches(patches, batch_size):
        features[indices] = backbone(batch)
    elapsed = time.perf_counter() - start
    logger.info(
        "Encoded %d patches with %s in %.1f s (%.1f patches/s)",
        len(patches),
        backbone.name,
        elapsed,
        len(patches) / max(elapsed, 1e-9),
    )
    if not np.isfinite(features).all():
        raise FloatingPointError(f"Backbone {backbone.name!r} produced non-finite features; nothing was cached.")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial.npy")
        np.save(partial, np.asarray(features))
        partial.replace(path)
    return features


def spot_features(
    sdata,
    backbone,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    size_um: float = 112.0,
    size_px: int = 224,
    mpp: float | None = None,
    batch_size: int = 64,
    cache: bool = True,
):
    """Resolve the spots of a SpatialData and compute (or read cached) backbone features of their patches.

    Returns
    -------
    The :class:`~spade_sd._geometry.SpotGeometry` and the float32 features ``(n_spots, backbone.dim)`` in the
    order of ``geometry.table_rows``.
    """
    from ._geometry import resolve_geometry

    geometry = resolve_geometry(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key, mpp=mpp)
    patches = SpotPatches(sdata.images[geometry.image_key], geometry, size_um=size_um, size_px=size_px)
    return geometry, extract_features(patches, backbone, batch_size=batch_size, cache=cache)
