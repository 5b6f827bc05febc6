"""Two-stage k-means that turns image features into data experts (after MoDE, Ma et al. CVPR 2024).

Stage 1 clusters the features of each group (an organ, a slide) into fine centroids, so that every group is
represented even when groups differ in size; stage 2 clusters all fine centroids into ``n_experts`` coarse
clusters. A spot belongs to the expert of its nearest fine centroid, over all groups, which is also how a new
patch is routed at inference (see :mod:`spade_sd.model.routing`).

At scale (``scalable=True``, which :func:`spade_sd.training.fit.fit_model` sets from
:data:`~spade_sd.config.SCALE_SPOTS` spots on) the features are read in row blocks (any array-like of rows: a memory
map, :class:`~spade_sd.training.data.StandardizedRows`), the principal axes are fitted on a seeded draw of
:data:`~spade_sd.config.FIT_SPOTS` spots and a group of more than :data:`~spade_sd.config.MINIBATCH_SPOTS` spots is
clustered by mini-batch k-means; every step stays deterministic under the seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from spade_sd.config import FIT_SPOTS, MINIBATCH_SPOTS, ClusteringConfig, TrainingConfig
from spade_sd.model.standardization import as_float_matrix
from spade_sd.utils.logging import logger

if TYPE_CHECKING:
    from sklearn.cluster import KMeans, MiniBatchKMeans

N_INIT = 10
# Mini-batch k-means: initializations and spots per batch
MINIBATCH_N_INIT = 3
MINIBATCH_SIZE = 4_096
# Most (spot, fine centroid) distances held at a time (float64: 32 MB)
MAX_DISTANCES = 2**22


@dataclass
class ExpertClustering:
    """Fine centroids and the expert each belongs to.

    Parameters
    ----------
    centroids
        Fine (stage-1) centroids, (n_fine_total, d), in the standardized feature space.
    centroid_expert
        Expert (stage-2 cluster) of each fine centroid, (n_fine_total,), values in ``0 .. n_experts - 1``.
    centroid_group
        Group label each fine centroid was found in, (n_fine_total,).
    n_experts
        Number of experts; every expert owns at least one fine centroid.
    components
        Optional ``(p, d)`` principal axes: distances are measured between the features' projections on them
        (the centroids then live in that ``p``-dimensional space).
    """

    centroids: np.ndarray
    centroid_expert: np.ndarray
    centroid_group: np.ndarray
    n_experts: int
    components: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.centroids = np.asarray(self.centroids, dtype=np.float32)
        self.centroid_expert = np.asarray(self.centroid_expert, dtype=np.int64)
        self.centroid_group = np.asarray(self.centroid_group)
        self.n_experts = int(self.n_experts)
        if self.components is not None:
            self.components = np.asarray(self.components, dtype=np.float32)
        n = self.centroids.shape[0]
        if self.centroids.ndim != 2 or self.centroid_expert.shape != (n,) or self.centroid_group.shape != (n,):
            raise ValueError(
                f"Expected centroids (n, d) with centroid_expert and centroid_group of length n; found shapes "
                f"{self.centroids.shape}, {self.centroid_expert.shape} and {self.centroid_group.shape}."
            )
        owned = np.unique(self.centroid_expert)
        if not np.array_equal(owned, np.arange(self.n_experts)):
            raise ValueError(
                f"Every expert 0..{self.n_experts - 1} must own at least one fine centroid; found experts {owned}."
            )

    @property
    def n_fine(self) -> int:
        """Total number of fine centroids over all groups."""
        return self.centroids.shape[0]

    def distances(self, X: np.ndarray) -> np.ndarray:
        """Euclidean distances (n_spots, n_fine) from each row of standardized ``X`` to every fine centroid."""
        X = as_float_matrix(X, "X")
        expected = self.centroids.shape[1] if self.components is None else self.components.shape[1]
        if X.shape[1] != expected:
            raise ValueError(f"X has {X.shape[1]} features, but the clustering was fitted on {expected}.")
        return _euclidean(self.project(X), self.centroids)

    def project(self, X: np.ndarray) -> np.ndarray:
        """Standardized features in the space of the centroids (their principal-axis projection, if any)."""
        return X if self.components is None else X @ self.components.T

    def assign(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest fine centroid of each row of ``X`` and that centroid's expert, both (n_spots,) int64.

        ``X`` may be any array-like of rows that slices (a memory map): it is read in blocks that bound the
        distance matrix to :data:`MAX_DISTANCES` entries.
        """
        fine = _nearest(X, self.n_fine, lambda block: self.distances(block))
        return fine, self.centroid_expert[fine]

    def without_small_experts(
        self, X: np.ndarray | None, min_spots: int = 1, *, fine: np.ndarray | None = None
    ) -> ExpertClustering:
        """Merge experts that fewer than ``min_spots`` rows of ``X`` are assigned to into their nearest expert.

        An expert's fine centroids move to the expert whose mean centroid is nearest; experts are renumbered.
        Outlier patches (glass, folds, pen marks) otherwise become experts of one or two spots that cannot be
        trained contrastively. Returns ``self`` when every expert is large enough. ``fine``, the rows' nearest
        fine centroids if already known (:meth:`assign`), spares computing them (then ``X`` is not read).
        """
        clustering = self
        # merging moves centroids between experts, never the centroids themselves: the nearest stay the nearest
        fine = self.assign(X)[0] if fine is None else np.asarray(fine)
        while clustering.n_experts > 1:
            expert = clustering.centroid_expert[fine]
            counts = np.bincount(expert, minlength=clustering.n_experts)
            smallest = int(np.argmin(counts))
            if counts[smallest] >= min_spots:
                break
            means = np.stack(
                [clustering.centroids[clustering.centroid_expert == e].mean(0) for e in range(len(counts))]
            )
            distance = np.linalg.norm(means - means[smallest], axis=1)
            distance[smallest] = np.inf
            target = int(np.argmin(distance))
            logger.warning(
                "Merging expert %d (%d spots, fewer than %d) into expert %d",
                smallest,
                counts[smallest],
                min_spots,
                target,
            )
            merged = np.where(clustering.centroid_expert == smallest, target, clustering.centroid_expert)
            clustering = ExpertClustering(
                centroids=clustering.centroids,
                centroid_expert=np.unique(merged, return_inverse=True)[1],
                centroid_group=clustering.centroid_group,
                n_experts=clustering.n_experts - 1,
                components=clustering.components,
            )
        return clustering

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Numeric arrays (for safetensors) and JSON-able metadata that :meth:`from_arrays` restores from."""
        groups, codes = np.unique(self.centroid_group, return_inverse=True)
        arrays = {
            "centroids": self.centroids.copy(),
            "centroid_expert": self.centroid_expert.copy(),
            "centroid_group_code": codes.astype(np.int64),
        }
        if self.components is not None:
            arrays["components"] = self.components.copy()
        metadata = {"n_experts": self.n_experts, "groups": [_plain(g) for g in groups]}
        return arrays, metadata

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> ExpertClustering:
        """Rebuild the clustering from the output of :meth:`to_arrays`."""
        groups = np.asarray(metadata["groups"])
        return cls(
            centroids=np.asarray(arrays["centroids"]),
            centroid_expert=np.asarray(arrays["centroid_expert"]),
            centroid_group=groups[np.asarray(arrays["centroid_group_code"])],
            n_experts=int(metadata["n_experts"]),
            components=arrays.get("components"),
        )


def two_stage_kmeans(
    X: np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    *,
    n_fine: int | Literal["elbow"] = ClusteringConfig.n_fine,
    n_experts: int | Literal["elbow"] = ClusteringConfig.n_experts,
    max_k: int = 16,
    n_pcs: int | None = 50,
    min_expert_fraction: float = 0.02,
    seed: int = TrainingConfig.seed,
    scalable: bool = False,
) -> ExpertClustering:
    """Cluster standardized image features into data experts in two stages.

    Stage 1 runs k-means within each group with ``k = min(n_fine, distinct spots in the group)``; stage 2 runs
    k-means over all stage-1 centroids into ``n_experts`` clusters. Each spot then belongs to the expert of its nearest
    fine centroid over all groups. An expert that no spot is nearest to is dropped (with a warning) and the
    experts are renumbered, so every returned expert has training spots.

    Parameters
    ----------
    X
        Standardized image features, (n_spots, d); with ``scalable``, any array-like of rows that slices and takes
        row positions (a memory map, :class:`~spade_sd.training.data.StandardizedRows`).
    groups
        Group label of each spot (slide, sample or organ); ``None`` puts all spots in one group.
    n_fine
        Fine clusters per group, or ``"elbow"`` to choose it per group by the elbow rule described below.
    n_experts
        Number of experts, or ``"elbow"`` to choose it over the fine centroids by the same rule.
    max_k
        Largest k the elbow rule tries.
    n_pcs
        Cluster the projections on the first ``n_pcs`` principal axes of ``X`` (``None``: the features as they
        are). In 1000+ standardized dimensions of a frozen backbone most directions are noise; distances in the
        leading components follow morphology, and k-means no longer isolates single outlier patches.
    min_expert_fraction
        Experts holding fewer than this fraction of the spots (at least 2 spots) are merged into their nearest
        expert (see :meth:`ExpertClustering.without_small_experts`).
    seed
        Seed of both k-means stages (each with a fixed ``n_init`` of 10), so results are reproducible.
    scalable
        Memory bounded whatever the number of spots, and deterministic under ``seed``: ``X`` is read in row
        blocks, the principal axes are fitted on a seeded draw of :data:`~spade_sd.config.FIT_SPOTS` spots, and a
        group of more than :data:`~spade_sd.config.MINIBATCH_SPOTS` spots is clustered by mini-batch k-means
        (``n_init`` 3, batches of 4,096 spots).

    Returns
    -------
    The fine centroids and their experts.

    Notes
    -----
    Elbow rule: fit k-means for k = 1 .. K (K = min(``max_k``, distinct points - 1)), scale k and the logarithm
    of the within-cluster sum of squares W(k) to [0, 1], and pick the k whose point lies furthest below the
    straight line from the first to the last point (the "kneedle" criterion). The logarithm makes a relative drop
    of W count the same at every k, so a well-separated cluster found late is not overshadowed by the first,
    largest drops. A curve without a bend gives a knee near its middle. For ``n_experts`` the rule needs many more
    fine centroids than experts (many groups); with few centroids it cannot pick ``k`` = all of them.
    """
    return fit_experts(
        X,
        groups,
        n_fine=n_fine,
        n_experts=n_experts,
        max_k=max_k,
        n_pcs=n_pcs,
        min_expert_fraction=min_expert_fraction,
        seed=seed,
        scalable=scalable,
    )[0]


def fit_experts(
    X: np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    *,
    n_fine: int | Literal["elbow"] = ClusteringConfig.n_fine,
    n_experts: int | Literal["elbow"] = ClusteringConfig.n_experts,
    max_k: int = 16,
    n_pcs: int | None = 50,
    min_expert_fraction: float = 0.02,
    seed: int = TrainingConfig.seed,
    scalable: bool = False,
) -> tuple[ExpertClustering, np.ndarray]:
    """:func:`two_stage_kmeans`, and the expert of every row of ``X`` (:meth:`ExpertClustering.assign`)."""
    start = time.perf_counter()
    X = X if scalable else as_float_matrix(X, "X")
    labels = np.zeros(X.shape[0], dtype=np.int64) if groups is None else np.asarray(groups)
    if labels.shape != (X.shape[0],):
        raise ValueError(f"`groups` must have one label per spot ({X.shape[0]}); found shape {labels.shape}.")
    check_group_sizes(labels)
    if scalable:
        fitted_on = as_float_matrix(X[sample_rows(len(X), FIT_SPOTS, seed)], "X")
        components = _principal_axes(fitted_on, n_pcs, seed)
        projected = _projected(X, components)
    else:
        components = _principal_axes(X, n_pcs, seed)
        projected = X if components is None else X @ components.T
    centroids, centroid_group, sizes = _fine_centroids(projected, labels, n_fine, max_k, seed, scalable=scalable)
    k = _elbow_k(centroids, max_k, seed) if n_experts == "elbow" else int(n_experts)
    n_distinct = _n_distinct(centroids)
    if not 1 <= k <= n_distinct:
        raise ValueError(
            f"n_experts={k} needs at least as many distinct fine centroids, but stage 1 found {n_distinct} "
            f"({len(centroids)} centroids over {len(np.unique(labels))} groups). Pass n_experts <= {n_distinct} "
            "or a larger `n_fine`."
        )
    # weighting by cluster size makes stage 2 split the spots, not the (outlier-rich) list of centroids
    centroid_expert = _kmeans(centroids, k, seed, sample_weight=sizes).labels_
    clustering = ExpertClustering(centroids, centroid_expert, centroid_group, n_experts=k, components=components)
    min_spots = max(2, int(np.ceil(min_expert_fraction * X.shape[0])))
    if scalable:  # the rows' projections are at hand: no second pass over X
        fine = _nearest(projected, clustering.n_fine, lambda block: _euclidean(as_float_matrix(block, "X"), centroids))
    else:
        fine = clustering.assign(X)[0]
    clustering = clustering.without_small_experts(X, min_spots, fine=fine)
    logger.info(
        "Two-stage k-means: %d fine centroids over %d groups -> %d experts in %.1f s",
        clustering.n_fine,
        len(np.unique(labels)),
        clustering.n_experts,
        time.perf_counter() - start,
    )
    return clustering, clustering.centroid_expert[fine]


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions of ``min(size, n)`` of ``n`` rows drawn without replacement with ``seed`` (all rows if fewer)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _nearest(X: np.ndarray, n_fine: int, distances: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The nearest fine centroid of every row of ``X``, read in blocks of at most :data:`MAX_DISTANCES` distances."""
    rows = max(1, MAX_DISTANCES // max(n_fine, 1))
    return np.concatenate(
        [distances(X[start : start + rows]).argmin(axis=1) for start in range(0, max(len(X), 1), rows)]
    )


def _projected(X: np.ndarray, components: np.ndarray | None) -> np.ndarray:
    """The rows of ``X`` on the principal axes, read block by block (without axes: ``X`` itself, rows read on use)."""
    if components is None:
        return X
    projected = np.empty((len(X), components.shape[0]), dtype=np.float32)
    rows = max(1, MAX_DISTANCES // X.shape[1])
    for start in range(0, len(X), rows):
        projected[start : start + rows] = as_float_matrix(X[start : start + rows], "X") @ components.T
    return projected


def check_group_sizes(groups: np.ndarray) -> None:
    """Refuse a stage-1 group of fewer than 2 spots, which k-means cannot cluster.

    :func:`spade_sd.tl.pretrain` calls it before any patch is encoded.

    Parameters
    ----------
    groups
        The group label of every spot.
    """
    labels, counts = np.unique(np.asarray(groups), return_counts=True)
    small = np.flatnonzero(counts < 2)
    if small.size:
        raise ValueError(
            f"Group {_plain(labels[small[0]])!r} has {counts[small[0]]} spot; stage-1 k-means needs at least 2 per "
            "group. Merge it into another group or drop it."
        )


def _principal_axes(X: np.ndarray, n_pcs: int | None, seed: int) -> np.ndarray | None:
    if n_pcs is None or n_pcs >= min(X.shape):
        return None
    from sklearn.decomposition import PCA

    return PCA(n_components=n_pcs, random_state=seed).fit(X).components_.astype(np.float32)


def _fine_centroids(
    X: np.ndarray,
    labels: np.ndarray,
    n_fine: int | Literal["elbow"],
    max_k: int,
    seed: int,
    *,
    scalable: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centroids, centroid_group, sizes = [], [], []
    groups, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(groups) + 1))
    for g, group in enumerate(groups):
        rows = order[bounds[g] : bounds[g + 1]]
        Xg = as_float_matrix(X[rows], "X") if scalable else X[rows]
        minibatch = scalable and len(Xg) > MINIBATCH_SPOTS
        # k-means cannot place more centroids than there are distinct points (counted on a draw of a large group)
        distinct = _n_distinct(Xg[sample_rows(len(Xg), MINIBATCH_SPOTS, seed)] if minibatch else Xg)
        k = _elbow_k(Xg, max_k, seed, minibatch=minibatch) if n_fine == "elbow" else min(int(n_fine), distinct)
        if k < 1:
            raise ValueError(f"n_fine must be a positive integer or 'elbow'; found {n_fine!r}.")
        kmeans = _kmeans(Xg, k, seed, minibatch=minibatch)
        centroids.append(kmeans.cluster_centers_)
        centroid_group.append(np.repeat(group, k))
        sizes.append(np.bincount(kmeans.labels_, minlength=k))
    return np.concatenate(centroids).astype(np.float32), np.concatenate(centroid_group), np.concatenate(sizes)


def _elbow_k(X: np.ndarray, max_k: int, seed: int, *, minibatch: bool = False) -> int:
    # k stops one short of the number of distinct points, where W(k) would reach 0 and its logarithm diverge
    distinct = _n_distinct(X[sample_rows(len(X), MINIBATCH_SPOTS, seed)] if minibatch else X)
    ks = np.arange(1, min(max_k, distinct - 1) + 1)
    if ks.size < 3:
        return int(ks[-1]) if ks.size else 1
    inertia = [_kmeans(X, int(k), seed, minibatch=minibatch).inertia_ for k in ks]
    log_w = np.log(np.maximum(inertia, np.finfo(np.float64).tiny))
    x = (ks - ks[0]) / (ks[-1] - ks[0])
    y = (log_w - log_w[-1]) / (log_w[0] - log_w[-1])
    return int(ks[np.argmax((1 - x) - y)])


def _kmeans(
    X: np.ndarray, k: int, seed: int, sample_weight: np.ndarray | None = None, *, minibatch: bool = False
) -> KMeans | MiniBatchKMeans:
    # imported on use: embedding with a trained model needs no scikit-learn
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if minibatch:
        options = {"n_init": MINIBATCH_N_INIT, "batch_size": MINIBATCH_SIZE, "random_state": seed}
        return MiniBatchKMeans(n_clusters=k, **options).fit(X, sample_weight=sample_weight)
    return KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(X, sample_weight=sample_weight)


def _n_distinct(X: np.ndarray) -> int:
    return np.unique(X, axis=0).shape[0]


def _euclidean(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    # float64 keeps the |x|^2 - 2 x.c + |c|^2 expansion from cancelling badly at small distances
    X64, C64 = X.astype(np.float64), C.astype(np.float64)
    sq = (X64**2).sum(1)[:, None] - 2.0 * X64 @ C64.T + (C64**2).sum(1)[None, :]
    return np.sqrt(np.maximum(sq, 0.0))


def _plain(label: Any) -> Any:
    """A numpy scalar label as the Python value JSON and messages expect."""
    return label.item() if isinstance(label, np.generic) else label
