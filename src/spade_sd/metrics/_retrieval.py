"""Retrieval: expression of the nearest spots in an embedding (BLEEP-style), and gene → image recall."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.neighbors import NearestNeighbors

from spade_sd.metrics._common import (
    as_labels,
    as_matrix,
    check_positive_int,
    check_same_columns,
    check_same_rows,
    checked_folds,
    checked_gene_names,
    gene_frame,
    pearson_per_gene,
    probe_inputs,
)

_RECALL_BATCH = 1024


def _similarity(distance: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        return 1.0 - distance
    return 1.0 / (1.0 + distance)


def _knn_predict(x_query: np.ndarray, x_ref: np.ndarray, y_ref: np.ndarray, *, k: int, metric: str) -> np.ndarray:
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f'`metric` must be "cosine" or "euclidean"; found {metric!r}.')
    check_positive_int("k", k)
    if k > x_ref.shape[0]:
        raise ValueError(f"`k`={k} exceeds the {x_ref.shape[0]} reference spots; pass a smaller k.")
    distance, neighbours = NearestNeighbors(n_neighbors=k, metric=metric).fit(x_ref).kneighbors(x_query)
    weights = np.clip(_similarity(distance, metric), 0.0, None)
    # A query whose neighbours are all anti-similar has no preferred neighbour: average them evenly.
    no_weight = weights.sum(axis=1) == 0
    weights[no_weight] = 1.0
    weights /= weights.sum(axis=1, keepdims=True)
    prediction = np.zeros((x_query.shape[0], y_ref.shape[1]))
    # Loop over the k neighbours rather than gathering a queries × k × genes block, which would not fit in memory.
    for j in range(k):
        prediction += weights[:, j, None] * y_ref[neighbours[:, j]]
    return prediction


def knn_predict(
    X_query: npt.ArrayLike,
    X_ref: npt.ArrayLike,
    Y_ref: npt.ArrayLike,
    *,
    k: int = 50,
    metric: Literal["cosine", "euclidean"] = "cosine",
) -> np.ndarray:
    """The prediction :func:`knn_expression` scores: each query's similarity-weighted mean of its ``k`` nearest references.

    Weights are the positive part of the similarity (cosine similarity, or ``1 / (1 + distance)`` for
    ``metric="euclidean"``), normalized to sum to 1; a query with no positively similar neighbour gets their plain
    mean.

    Parameters
    ----------
    X_query
        Embeddings of the query spots, queries × features.
    X_ref
        Embeddings of the reference spots in the same space, references × features.
    Y_ref
        What to average: expression (references × genes), or any per-reference values (e.g. one-hot labels, which
        gives a similarity-weighted vote).
    k, metric
        As in :func:`knn_expression`.

    Returns
    -------
    Float64 array, queries × columns of ``Y_ref``.
    """
    x_query, x_ref, y_ref = as_matrix("X_query", X_query), as_matrix("X_ref", X_ref), as_matrix("Y_ref", Y_ref)
    check_same_rows(X_ref=x_ref, Y_ref=y_ref)
    check_same_columns(X_query=x_query, X_ref=x_ref)
    return _knn_predict(x_query, x_ref, y_ref, k=k, metric=metric)


def knn_expression(
    X_query: npt.ArrayLike,
    X_ref: npt.ArrayLike,
    Y_ref: npt.ArrayLike,
    Y_query: npt.ArrayLike,
    *,
    k: int = 50,
    metric: Literal["cosine", "euclidean"] = "cosine",
    genes: Sequence | None = None,
    label: str = "encoder",
) -> pd.DataFrame:
    """BLEEP-style expression prediction by retrieval: average the expression of each query's nearest references.

    Each query spot's prediction is the weighted mean of the expression of its ``k`` nearest reference spots,
    with weights proportional to the positive part of the similarity (cosine similarity, or ``1 / (1 +
    distance)`` for ``metric="euclidean"``); a query with no positively similar neighbour gets their plain
    mean. Positive-similarity weights need no temperature, unlike a softmax, whose sharpness would depend on
    the scale of each embedding space.

    Parameters
    ----------
    X_query
        Embeddings of the query spots (e.g. image side), queries × features.
    X_ref
        Embeddings of the reference spots in the same space (e.g. image or gene side), references × features.
    Y_ref
        Expression of the reference spots, references × genes.
    Y_query
        True expression of the query spots, queries × genes, to score against.
    k
        Neighbours averaged per query.
    metric
        ``"cosine"`` or ``"euclidean"``.
    genes
        Gene names for the ``gene`` column; default the column indices.
    label
        Written to the ``encoder`` column.

    Returns
    -------
    One row per gene with columns ``encoder``, ``gene``, ``metric`` (``"pearson"``), ``value``, ``k``,
    ``n_ref`` and ``n_query``.
    """
    x_query, x_ref = as_matrix("X_query", X_query), as_matrix("X_ref", X_ref)
    y_ref, y_query = as_matrix("Y_ref", Y_ref), as_matrix("Y_query", Y_query)
    check_same_rows(X_query=x_query, Y_query=y_query)
    check_same_rows(X_ref=x_ref, Y_ref=y_ref)
    check_same_columns(X_query=x_query, X_ref=x_ref)
    check_same_columns(Y_query=y_query, Y_ref=y_ref)
    gene_names = checked_gene_names(genes, y_ref.shape[1])
    prediction = _knn_predict(x_query, x_ref, y_ref, k=k, metric=metric)
    r = pearson_per_gene(y_query, prediction)
    return gene_frame(label, gene_names, r, k=k, n_ref=x_ref.shape[0], n_query=x_query.shape[0])


def knn_expression_cv(
    X: npt.ArrayLike,
    Y: npt.ArrayLike,
    slide: npt.ArrayLike,
    *,
    genes: Sequence | None = None,
    label: str = "encoder",
    k: int = 50,
    metric: Literal["cosine", "euclidean"] = "cosine",
) -> pd.DataFrame:
    """Leave-one-slide-out :func:`~spade_sd.metrics.knn_expression`: each slide's spots query all the other slides.

    Parameters
    ----------
    X
        Embeddings, spots × features (query and reference sides alike).
    Y
        Expression, spots × genes.
    slide
        One slide label per spot; at least two slides.
    genes, label, k, metric
        As in :func:`knn_expression`.

    Returns
    -------
    One row per (fold, gene) with columns ``encoder``, ``fold`` (the held-out slide), ``gene``, ``metric``
    (``"pearson"``), ``value``, ``k``, ``n_ref`` and ``n_query``.
    """
    x, y, slide = probe_inputs(X, Y, slide, "slide")
    gene_names = checked_gene_names(genes, y.shape[1])
    frames = []
    for fold in checked_folds(slide):
        query = slide == fold
        prediction = _knn_predict(x[query], x[~query], y[~query], k=k, metric=metric)
        r = pearson_per_gene(y[query], prediction)
        sizes = {"n_ref": int((~query).sum()), "n_query": int(query.sum())}
        frames.append(gene_frame(label, gene_names, r, replicate={"fold": fold}, k=k, **sizes))
    return pd.concat(frames, ignore_index=True)


def _unit_rows(name: str, matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    n_zero = int((norms == 0).sum())
    if n_zero:
        raise ValueError(f"`{name}` has {n_zero} all-zero rows, for which cosine similarity is undefined.")
    return matrix / norms


def _true_ranks(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """0-based rank of candidate i for query i; ties count against the true spot (a pessimistic rank)."""
    ranks = np.empty(queries.shape[0], dtype=np.int64)
    # Batches keep the queries × candidates similarity block small on slides with ten thousand spots or more.
    for start in range(0, queries.shape[0], _RECALL_BATCH):
        stop = min(start + _RECALL_BATCH, queries.shape[0])
        similarity = queries[start:stop] @ candidates.T
        true = similarity[np.arange(stop - start), np.arange(start, stop)]
        ranks[start:stop] = (similarity >= true[:, None]).sum(axis=1) - 1
    return ranks


def gene_to_image_recall(
    gene_emb: npt.ArrayLike,
    image_emb: npt.ArrayLike,
    *,
    ks: Sequence[int] = (1, 5, 10, 50),
    groups: npt.ArrayLike | None = None,
    label: str = "encoder",
) -> pd.DataFrame:
    """Gene → image retrieval: how often a spot's expression embedding finds that spot's own patch.

    Row ``i`` of both inputs describes the same spot. Each gene-side embedding is ranked against the
    image-side embeddings of the spots of its group (slide) by cosine similarity; recall@k is the share of
    queries whose own patch is among the ``k`` most similar. Chance is ``min(k, n) / n`` for a group of ``n``
    spots.

    Parameters
    ----------
    gene_emb
        Gene-side (expression) embeddings, spots × dims.
    image_emb
        Image-side embeddings of the same spots, spots × dims.
    ks
        Cut-offs k.
    groups
        One label per spot (usually the slide); retrieval stays within a group. Default: one group, ``"all"``.
    label
        Written to the ``encoder`` column.

    Returns
    -------
    Two rows per (group, k) with columns ``encoder``, ``group``, ``k``, ``metric`` (``"recall@k"`` or
    ``"chance@k"``), ``value`` and ``n_spots``.
    """
    gene, image = as_matrix("gene_emb", gene_emb), as_matrix("image_emb", image_emb)
    check_same_rows(gene_emb=gene, image_emb=image)
    check_same_columns(gene_emb=gene, image_emb=image)
    for k in ks:
        check_positive_int("ks", k)
    groups = np.full(gene.shape[0], "all") if groups is None else as_labels("groups", groups, gene.shape[0])
    gene, image = _unit_rows("gene_emb", gene), _unit_rows("image_emb", image)
    rows = []
    for group in np.unique(groups):
        members = groups == group
        ranks = _true_ranks(gene[members], image[members])
        n_spots = int(members.sum())
        for k in ks:
            common = {"encoder": label, "group": group, "k": k}
            rows.append({**common, "metric": f"recall@{k}", "value": float((ranks < k).mean()), "n_spots": n_spots})
            rows.append({**common, "metric": f"chance@{k}", "value": min(k, n_spots) / n_spots, "n_spots": n_spots})
    return pd.DataFrame(rows)
