"""Routing a patch feature to the data experts at inference.

A feature's weight on each fine centroid is ``softmax(-d / tau)`` over its Euclidean distances ``d`` to all fine
centroids; an expert's weight is the sum over its centroids. Upstream used ``tau = 0.1`` on raw distances, which
for foundation-model features (distances in the tens) is hard routing in all but name, so here ``tau`` is set
relative to the training features by :func:`default_tau`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from spade_sd.config import ClusteringConfig
from spade_sd.model.clustering import MAX_DISTANCES, ExpertClustering

_CHUNK = 65_536


def default_tau(X: np.ndarray, clustering: ExpertClustering, *, scale: float = ClusteringConfig.tau_scale) -> float:
    """Routing temperature scaled to the typical margin between experts in the training features.

    For every training spot the margin is ``d_other - d_own``: the distance to the nearest fine centroid of any
    other expert minus the distance to its nearest fine centroid. ``tau = scale * median(margin)``.

    Parameters
    ----------
    X
        Standardized training features, (n_spots, d), the ones the clustering was fitted on.
    clustering
        The fitted two-stage clustering.
    scale
        Softness. At the median training spot the nearest centroid of the runner-up expert gets ``exp(-1 / scale)``
        of the weight of the spot's own nearest centroid (``exp(-4)``, about 2 %, at the default), so most spots are
        routed almost hard while spots near a boundary between experts blend them. Larger is softer.

    Returns
    -------
    The temperature ``tau`` (same units as the feature distances); 1.0 when there is a single expert, where
    routing does not depend on it.
    """
    if scale <= 0:
        raise ValueError(f"`scale` must be positive; found {scale}.")
    if clustering.n_experts == 1:
        return 1.0
    if len(X) == 0:
        raise ValueError("`X` has no spots; pass the standardized training features.")
    margins = np.concatenate([_margins(chunk, clustering) for chunk in _chunks(X, clustering.n_fine)])
    positive = margins[margins > 0]
    if positive.size == 0:
        raise ValueError("Every spot is equidistant from two experts; the features cannot calibrate a temperature.")
    return float(scale * np.median(positive))


def expert_weights(
    X: np.ndarray, clustering: ExpertClustering, *, tau: float | None = None, hard: bool = False
) -> np.ndarray:
    """Weight of each expert for each feature vector.

    Parameters
    ----------
    X
        Standardized features, (n_spots, d).
    clustering
        The fitted two-stage clustering.
    tau
        Routing temperature, typically :func:`default_tau` of the training features; required unless ``hard``.
    hard
        Give all weight to the expert of the nearest fine centroid.

    Returns
    -------
    Float32 array (n_spots, n_experts) whose rows sum to 1.
    """
    if not hard and (tau is None or not tau > 0):
        raise ValueError(f"Soft routing needs a positive `tau` (see `default_tau`); found {tau!r}. Or pass hard=True.")
    if len(X) == 0:
        return np.zeros((0, clustering.n_experts), dtype=np.float32)
    return np.concatenate([_weights(chunk, clustering, tau, hard) for chunk in _chunks(X, clustering.n_fine)])


def _weights(X: np.ndarray, clustering: ExpertClustering, tau: float | None, hard: bool) -> np.ndarray:
    d = clustering.distances(X)
    membership = np.eye(clustering.n_experts)[clustering.centroid_expert]
    if hard:
        return membership[d.argmin(axis=1)].astype(np.float32)
    # subtracting the row minimum keeps the nearest centroid at exp(0) = 1, so no row underflows to all zeros
    w = np.exp(-(d - d.min(axis=1, keepdims=True)) / tau)
    w /= w.sum(axis=1, keepdims=True)
    return (w @ membership).astype(np.float32)


def _margins(X: np.ndarray, clustering: ExpertClustering) -> np.ndarray:
    d = clustering.distances(X)
    own_expert = clustering.centroid_expert[d.argmin(axis=1)]
    other = np.where(clustering.centroid_expert[None, :] == own_expert[:, None], np.inf, d)
    return other.min(axis=1) - d.min(axis=1)


def _chunks(X: np.ndarray, n_fine: int) -> Iterator[np.ndarray]:
    # bounds the (chunk, n_fine) float64 distance matrix for whole-slide tile sets and for the thousands of fine
    # centroids of many slides; read one at a time, so X may be rows read on demand (training at scale)
    rows = min(_CHUNK, max(1, MAX_DISTANCES // max(n_fine, 1)))
    return (X[i : i + rows] for i in range(0, max(len(X), 1), rows))
