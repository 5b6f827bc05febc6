"""Spatial context of spots and tiles: their nearest neighbours, and features augmented with the neighbours' mean.

Clustering a representation alone ignores where a spot lies, so its clusters scatter; tissue domains are
contiguous. BANKSY (Singhal et al., Nature Genetics 2024) clusters each cell's standardized features next to the
mean of its neighbours' features, weighted ``√(1 − λ)`` and ``√λ``; :func:`spade_sd.tl.domains` does the same on
any representation of spots or tiles, with squidpy's spatial graph. A representation is centred and scaled as a
whole (:func:`scaled`), not feature by feature: its geometry, what Leiden on it alone sees, is kept. Scaling each
column to unit variance would give ``X_spade``'s 16 expression columns 16 / 1,296 of the weight next to the 1,280
backbone features (``benchmarks/clustering.py``: tl.domains on ``X_spade`` at 1.15× the backbone's plain Leiden ARI
with per-column scaling, 1.33× scaled as a whole).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import pandas as pd
from scipy import sparse


def spatial_graph(coordinates: np.ndarray, *, n_neighbors: int, groups: np.ndarray | None = None) -> sparse.csr_matrix:
    """Each spot's ``n_neighbors`` nearest spots of its own group, as a row-normalised adjacency (rows sum to 1).

    Parameters
    ----------
    coordinates
        Spot centers, spots × 2 (any unit).
    n_neighbors
        Nearest spots per spot (squidpy's :func:`~squidpy.gr.spatial_neighbors_knn`, without the spot itself).
    groups
        One label per spot (e.g. the shapes each row annotates): neighbours stay within a group, as coordinates of
        different sections are unrelated. ``None``: one group.

    Returns
    -------
    A spots × spots sparse matrix whose product with features gives each spot's neighbour mean.
    """
    import anndata as ad
    import squidpy as sq

    index = pd.RangeIndex(len(coordinates)).astype(str)
    library = None if groups is None else pd.Categorical(np.asarray(groups).astype(str))
    obs = pd.DataFrame(index=index) if library is None else pd.DataFrame({"library": library}, index=index)
    adata = ad.AnnData(obs=obs, obsm={"spatial": np.asarray(coordinates, dtype=np.float64)})
    library_key = None if library is None or len(library.categories) < 2 else "library"
    with _quiet("spatialdata._logging"):
        result = sq.gr.spatial_neighbors_knn(adata, n_neighs=n_neighbors, library_key=library_key, copy=True)
    adjacency = sparse.csr_matrix(result.connectivities, dtype=np.float64)
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    return sparse.diags(1.0 / np.maximum(degree, 1.0)) @ adjacency


@contextmanager
def _quiet(name: str):
    # squidpy announces every graph at info level through spatialdata's logger, which prints by default
    package_logger = logging.getLogger(name)
    level = package_logger.level
    package_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        package_logger.setLevel(level)


def scaled(X: np.ndarray) -> np.ndarray:
    """Columns centred, then all divided by one number: the root mean square of the rows' norms (1 afterwards).

    Distances keep their ratios, so the neighbour graph of the result is that of ``X``; constant ``X`` becomes 0.
    """
    x = np.asarray(X, dtype=np.float64)
    x = x - x.mean(axis=0)
    spread = np.sqrt(np.square(x).sum(axis=1).mean())
    return x / spread if spread > 0 else x


def neighbourhood_features(X: np.ndarray, graph: sparse.spmatrix, spatial_weight: float) -> np.ndarray:
    """``[√(1 − λ) · Z, √λ · graph @ Z]`` with ``Z`` the centred and scaled ``X`` (:func:`scaled`), λ ``spatial_weight``.

    Parameters
    ----------
    X
        Features, spots × features.
    graph
        Row-normalised spatial adjacency from :func:`spatial_graph`.
    spatial_weight
        λ in ``[0, 1]``.

    Returns
    -------
    Float32 array, spots × (2 · features).
    """
    z = scaled(X)
    neighbours = graph @ z
    weighted = np.hstack([np.sqrt(1.0 - spatial_weight) * z, np.sqrt(spatial_weight) * neighbours])
    return weighted.astype(np.float32)
