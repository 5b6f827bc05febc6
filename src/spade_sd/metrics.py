"""Score embeddings: expression probes, retrieval, few-shot classification and their summaries.

These are the measurements behind :func:`spade_sd.tl.evaluate`, which runs them on the tables of several slides.
Call them directly to score any embedding held as arrays, including one computed outside spade_sd: they take
embeddings (spots × features), log1p expression (spots × genes) and labels (one slide, patient or class per
spot). Folds are always whole slides or patients, never spots, because neighbouring spots share expression.

.. code-block:: python

    import pandas as pd
    import spade_sd as sd
    from spade_sd import metrics

    df = pd.concat(
        [
            metrics.ridge_probe(X_backbone, Y, slide, label="backbone"),
            metrics.ridge_probe(X_spade, Y, slide, label="spade"),
        ]
    )
    metrics.summarize(df)  # mean ± std per encoder and metric
    sd.pl.benchmark(df)

- Expression prediction: :func:`ridge_probe` (the HEST-Benchmark linear probe, leave-one-slide-out),
  :func:`few_shot_probe` (trained on a few spots of the held-out slide), :func:`knn_expression` and
  :func:`knn_expression_cv` (BLEEP-style retrieval of the nearest spots' expression), whose prediction rule is
  :func:`knn_predict` (what :func:`spade_sd.tl.predict_expression` uses).
- Retrieval between the two sides of a joint embedding: :func:`gene_to_image_recall`.
- Classification: :func:`few_shot_classification` on labelled regions, or on the expression domains of
  :func:`expression_domains` where no annotation exists.
- Summaries: :func:`summarize`; :func:`hest_alpha` and :data:`DEFAULT_ALPHAS` are the probe's penalties.

Every evaluation returns a tidy :class:`pandas.DataFrame` with one row per (fold or repeat, gene or metric): the
columns ``encoder``, ``metric`` and ``value`` always, ``fold`` / ``repeat`` / ``group`` for the replicate and
``gene`` where the score is per gene. :func:`summarize` turns any of them into mean ± std per encoder and metric,
and concatenated frames of several encoders compare directly. Measured results are on the :doc:`/quality` page.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold, KFold
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from spade_sd.utils.logging import logger

__all__ = [
    "DEFAULT_ALPHAS",
    "expression_domains",
    "few_shot_classification",
    "few_shot_probe",
    "gene_to_image_recall",
    "hest_alpha",
    "knn_expression",
    "knn_expression_cv",
    "knn_predict",
    "ridge_probe",
    "summarize",
]

_Alpha = Literal["hest", "cv"] | float

DEFAULT_ALPHAS = np.logspace(-3, 7, 21)
"""Log grid searched by ``alpha="cv"`` (the HEST value is always added to it)."""

_REPLICATE_COLUMNS = ("fold", "repeat", "group")
_INNER_SPLITS = 5
# HEST passes max_iter=1000 to the lsqr solver; keep it so results match theirs.
_LSQR_MAX_ITER = 1000
_RECALL_BATCH = 1024


# --- validation -----------------------------------------------------------------------------------------------


def _as_matrix(name: str, array: npt.ArrayLike) -> np.ndarray:
    matrix = np.asarray(array, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"`{name}` must be a non-empty 2-D array (spots × columns); found shape {matrix.shape}.")
    n_bad = int((~np.isfinite(matrix)).sum())
    if n_bad:
        raise ValueError(f"`{name}` must be finite; found {n_bad} NaN or infinite values. Drop or impute those spots.")
    return matrix


def _as_labels(name: str, labels: npt.ArrayLike, n_spots: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n_spots,):
        raise ValueError(f"`{name}` must hold one entry per spot, shape ({n_spots},); found shape {labels.shape}.")
    n_missing = int(pd.isna(labels).sum())
    if n_missing:
        raise ValueError(f"`{name}` has {n_missing} missing entries; drop those spots or give them a label.")
    return labels


def _check_same_rows(**arrays: np.ndarray) -> None:
    sizes = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"Expected the same number of spots (rows) in {', '.join(sizes)}; found {sizes}.")


def _check_same_columns(**arrays: np.ndarray) -> None:
    sizes = {name: array.shape[1] for name, array in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"Expected the same number of columns in {', '.join(sizes)}; found {sizes}.")


def _gene_names(genes: Sequence | None, n_genes: int) -> np.ndarray:
    if genes is None:
        return np.arange(n_genes)
    names = np.asarray(genes)
    if names.shape != (n_genes,):
        raise ValueError(f"`genes` must name each of the {n_genes} columns of Y; found shape {names.shape}.")
    return names


def _check_alpha(alpha: _Alpha) -> None:
    if alpha in ("hest", "cv"):
        return
    if isinstance(alpha, str) or not np.isscalar(alpha) or not alpha > 0:
        raise ValueError(f'`alpha` must be "hest", "cv" or a positive number; found {alpha!r}.')


def _check_positive_int(name: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; found {value!r}.")


def _fold_ids(folds: np.ndarray) -> np.ndarray:
    ids = np.unique(folds)
    if ids.size < 2:
        raise ValueError(
            f"Need at least 2 folds (slides or patients) for leave-one-fold-out; found {ids.size}: {ids.tolist()}."
        )
    return ids


# --- metrics --------------------------------------------------------------------------------------------------


def _pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r per column; NaN where either side is constant, because r is undefined there."""
    true_centred = y_true - y_true.mean(axis=0)
    pred_centred = y_pred - y_pred.mean(axis=0)
    numerator = (true_centred * pred_centred).sum(axis=0)
    denominator = np.sqrt((true_centred**2).sum(axis=0) * (pred_centred**2).sum(axis=0))
    undefined = (np.ptp(y_true, axis=0) == 0) | (np.ptp(y_pred, axis=0) == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = numerator / denominator
    r[undefined] = np.nan
    return r


def _mean_pearson(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    r = _pearson_per_gene(y_true, y_pred)
    return float(r[~np.isnan(r)].mean()) if (~np.isnan(r)).any() else np.nan


# --- the HEST probe -------------------------------------------------------------------------------------------


def hest_alpha(n_features: int, n_genes: int) -> float:
    """Ridge penalty of the HEST-Benchmark probe.

    Parameters
    ----------
    n_features
        Number of features the ridge sees (after PCA).
    n_genes
        Number of target genes.

    Returns
    -------
    ``100 / (n_features · n_genes)``, e.g. 100 / (256 · 50) = 0.0078 for the published setting.
    """
    return 100.0 / (n_features * n_genes)


def _reducer(n_components: int | None, n_train: int, n_features: int, seed: int) -> Pipeline:
    if n_components is None:
        return make_pipeline(StandardScaler())
    n_kept = min(n_components, n_train, n_features)
    return make_pipeline(StandardScaler(), PCA(n_components=n_kept, random_state=seed))


def _inner_splits(n_train: int, groups: np.ndarray | None, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    # Splitting by slide keeps inner validation as honest as the outer one; with one slide left only spots remain.
    placeholder = np.zeros(n_train)
    if groups is not None and np.unique(groups).size >= 2:
        n_splits = min(_INNER_SPLITS, np.unique(groups).size)
        return GroupKFold(n_splits=n_splits).split(placeholder, groups=groups)
    return KFold(n_splits=min(_INNER_SPLITS, n_train), shuffle=True, random_state=seed).split(placeholder)


def _ridge_scores(
    z_train: np.ndarray, y_train: np.ndarray, z_val: np.ndarray, y_val: np.ndarray, alphas: np.ndarray
) -> np.ndarray:
    """Mean Pearson on the validation spots for every alpha of an intercept-free ridge, from one eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(z_train.T @ z_train)
    projected_targets = eigenvectors.T @ (z_train.T @ y_train)
    z_val_rotated = z_val @ eigenvectors
    return np.array(
        [_mean_pearson(y_val, z_val_rotated @ (projected_targets / (eigenvalues + alpha)[:, None])) for alpha in alphas]
    )


def _select_alpha(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None,
    *,
    n_components: int | None,
    alphas: np.ndarray,
    seed: int,
) -> float:
    fold_scores = []
    for train, val in _inner_splits(x.shape[0], groups, seed):
        reducer = _reducer(n_components, train.size, x.shape[1], seed).fit(x[train])
        z_train, z_val = reducer.transform(x[train]), reducer.transform(x[val])
        fold_scores.append(_ridge_scores(z_train, y[train], z_val, y[val], alphas))
    scores = np.array(fold_scores)
    n_defined = (~np.isnan(scores)).sum(axis=0)
    if not n_defined.any():
        raise ValueError("alpha='cv' found no gene with variance in any inner validation split; pass a number.")
    mean_scores = np.where(n_defined > 0, np.nansum(scores, axis=0) / np.maximum(n_defined, 1), -np.inf)
    return float(alphas[int(np.argmax(mean_scores))])


def _fit_predict(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    *,
    groups: np.ndarray | None,
    alpha: _Alpha,
    n_components: int | None,
    alphas: Sequence[float] | None,
    seed: int,
) -> tuple[np.ndarray, float]:
    """Fit the HEST probe (scaler → PCA → intercept-free ridge) and predict; also return the alpha used."""
    reducer = _reducer(n_components, x_train.shape[0], x_train.shape[1], seed).fit(x_train)
    z_train = reducer.transform(x_train)
    alpha_hest = hest_alpha(z_train.shape[1], y_train.shape[1])
    if alpha == "hest":
        alpha_value = alpha_hest
    elif alpha == "cv":
        grid = np.unique(np.append(DEFAULT_ALPHAS if alphas is None else np.asarray(alphas, float), alpha_hest))
        alpha_value = _select_alpha(x_train, y_train, groups, n_components=n_components, alphas=grid, seed=seed)
    else:
        alpha_value = float(alpha)
    ridge = Ridge(alpha=alpha_value, fit_intercept=False, solver="lsqr", max_iter=_LSQR_MAX_ITER)
    ridge.fit(z_train, y_train)
    return ridge.predict(reducer.transform(x_test)), alpha_value


def _probe_inputs(
    x: npt.ArrayLike, y: npt.ArrayLike, labels: npt.ArrayLike, labels_name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = _as_matrix("X", x), _as_matrix("Y", y)
    _check_same_rows(X=x, Y=y)
    return x, y, _as_labels(labels_name, labels, x.shape[0])


def ridge_probe(
    X: npt.ArrayLike,
    Y: npt.ArrayLike,
    folds: npt.ArrayLike,
    *,
    alpha: _Alpha = "hest",
    n_components: int | None = 256,
    alphas: Sequence[float] | None = None,
    genes: Sequence | None = None,
    label: str = "encoder",
    seed: int = 0,
) -> pd.DataFrame:
    """HEST-Benchmark linear probe: predict expression from embeddings, leaving one fold (slide/patient) out.

    For each fold, a probe is fitted on every spot of the other folds and scored on the held-out fold:
    :class:`~sklearn.preprocessing.StandardScaler` → :class:`~sklearn.decomposition.PCA` with
    ``min(n_components, n_train, n_features)`` components → :class:`~sklearn.linear_model.Ridge` with
    ``fit_intercept=False``, ``solver="lsqr"``, exactly as HEST does (targets are not centred; Pearson r does
    not see the missing intercept).

    Parameters
    ----------
    X
        Embeddings, spots × features.
    Y
        Targets, spots × genes, log1p-normalised expression (HEST: the 50 most variable genes).
    folds
        One label per spot naming its fold. Use slides or patients, never spots: neighbouring spots share
        expression, so spot-level folds leak.
    alpha
        ``"hest"``: ``100 / (n_pca · n_genes)`` (see :func:`hest_alpha`). ``"cv"``: chosen by inner
        cross-validation on the training folds, maximising the mean Pearson r over genes; the inner splits are
        the remaining slides (:class:`~sklearn.model_selection.GroupKFold`, at most 5 splits) when at least two
        remain, otherwise 5-fold :class:`~sklearn.model_selection.KFold` over the training spots (which
        shares the spatial leakage of spot-level splits, and so tends to favour weaker penalties).
        A number: that penalty.
    n_components
        PCA components before the ridge (HEST: 256); ``None`` skips PCA.
    alphas
        Grid for ``alpha="cv"``; default :data:`DEFAULT_ALPHAS` (``logspace(-3, 7, 21)``) plus the HEST value.
    genes
        Gene names for the ``gene`` column; default the column indices of ``Y``.
    label
        Written to the ``encoder`` column, so that frames of several encoders can be concatenated.
    seed
        Seeds PCA's randomised solver and the spot-level inner splits.

    Returns
    -------
    One row per (fold, gene) with columns ``encoder``, ``fold``, ``gene``, ``metric`` (``"pearson"``),
    ``value`` (Pearson r on the held-out fold; NaN for a gene constant in that fold), ``n_train``, ``n_test``
    and ``alpha`` (the penalty used). :func:`summarize` averages over genes, then folds, as HEST does.
    """
    x, y, folds = _probe_inputs(X, Y, folds, "folds")
    fold_ids = _fold_ids(folds)
    _check_alpha(alpha)
    gene_names = _gene_names(genes, y.shape[1])
    start = time.perf_counter()
    logger.info(f"ridge probe of {label!r}: {x.shape[0]} spots, {fold_ids.size} folds, alpha={alpha!r}")
    frames = []
    for fold in fold_ids:
        test = folds == fold
        prediction, alpha_used = _fit_predict(
            x[~test],
            y[~test],
            x[test],
            groups=folds[~test],
            alpha=alpha,
            n_components=n_components,
            alphas=alphas,
            seed=seed,
        )
        r = _pearson_per_gene(y[test], prediction)
        frames.append(
            _gene_frame(
                label,
                gene_names,
                r,
                replicate={"fold": fold},
                n_train=int((~test).sum()),
                n_test=int(test.sum()),
                alpha=alpha_used,
            )
        )
    result = pd.concat(frames, ignore_index=True)
    logger.info(f"ridge probe of {label!r} finished in {time.perf_counter() - start:.1f} s")
    return result


def _gene_frame(
    label: str, genes: np.ndarray, r: np.ndarray, *, replicate: dict | None = None, **extra: object
) -> pd.DataFrame:
    return pd.DataFrame(
        {"encoder": label, **(replicate or {}), "gene": genes, "metric": "pearson", "value": r, **extra}
    )


def _n_shots(n_spots: int, fraction: float | None, n_train: int | None) -> int:
    if n_train is not None:
        _check_positive_int("n_train", n_train)
        n_fit = int(n_train)
    else:
        if not 0 < fraction < 1:
            raise ValueError(f"`fraction` must lie strictly between 0 and 1; found {fraction!r}.")
        n_fit = round(fraction * n_spots)
    if not 2 <= n_fit <= n_spots - 2:
        raise ValueError(
            f"The probe needs at least 2 training and 2 test spots; {n_fit} of the slide's {n_spots} spots "
            "would be used for training. Change `fraction` / `n_train`."
        )
    return n_fit


def few_shot_probe(
    X: npt.ArrayLike,
    Y: npt.ArrayLike,
    slide: npt.ArrayLike,
    *,
    test_slide: object | None = None,
    fraction: float | None = None,
    n_train: int | None = None,
    n_repeats: int = 5,
    genes: Sequence | None = None,
    label: str = "encoder",
    seed: int = 0,
    alpha: _Alpha = "hest",
    n_components: int | None = 256,
    alphas: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Few-shot expression probe: within one slide, train the HEST probe on a few spots and test on the rest.

    Only the held-out slide's own spots are used; each repeat draws a new random training set.

    Parameters
    ----------
    X
        Embeddings, spots × features.
    Y
        Targets, spots × genes, log1p-normalised expression.
    slide
        One slide label per spot.
    test_slide
        The slide to evaluate; default every slide in turn (each one alone).
    fraction
        Share of the slide's spots used for training (default 0.2 when ``n_train`` is not given).
    n_train
        Number of training spots instead of a fraction; give one of the two.
    n_repeats
        Random training draws per slide.
    alpha, n_components, alphas
        As in :func:`ridge_probe`; with ``alpha="cv"`` the inner splits are 5-fold over the training spots.
    genes
        Gene names for the ``gene`` column; default the column indices of ``Y``.
    label
        Written to the ``encoder`` column.
    seed
        Seeds the draws (per slide, so a slide's draws do not depend on which other slides are evaluated) and PCA.

    Returns
    -------
    One row per (slide, repeat, gene) with columns ``encoder``, ``fold`` (the slide), ``repeat``, ``gene``,
    ``metric`` (``"pearson"``), ``value``, ``n_train``, ``n_test`` and ``alpha``.
    """
    x, y, slide = _probe_inputs(X, Y, slide, "slide")
    if fraction is not None and n_train is not None:
        raise ValueError(f"Give either `fraction` or `n_train`, not both; found {fraction=} and {n_train=}.")
    fraction = 0.2 if fraction is None and n_train is None else fraction
    _check_alpha(alpha)
    _check_positive_int("n_repeats", n_repeats)
    gene_names = _gene_names(genes, y.shape[1])
    slide_ids = np.unique(slide)
    if test_slide is not None and test_slide not in slide_ids:
        raise ValueError(f"`test_slide` {test_slide!r} is not among the slides {slide_ids.tolist()}.")
    evaluated = slide_ids if test_slide is None else [test_slide]
    start = time.perf_counter()
    logger.info(f"few-shot probe of {label!r}: {len(evaluated)} slide(s), {n_repeats} repeats, alpha={alpha!r}")
    frames = []
    for slide_id in evaluated:
        spots = np.flatnonzero(slide == slide_id)
        n_fit = _n_shots(spots.size, fraction, n_train)
        rng = np.random.default_rng((seed, int(np.searchsorted(slide_ids, slide_id))))
        for repeat in range(n_repeats):
            drawn = rng.permutation(spots)
            train, test = drawn[:n_fit], drawn[n_fit:]
            prediction, alpha_used = _fit_predict(
                x[train],
                y[train],
                x[test],
                groups=None,
                alpha=alpha,
                n_components=n_components,
                alphas=alphas,
                seed=seed,
            )
            r = _pearson_per_gene(y[test], prediction)
            replicate = {"fold": slide_id, "repeat": repeat}
            frames.append(
                _gene_frame(
                    label, gene_names, r, replicate=replicate, n_train=n_fit, n_test=test.size, alpha=alpha_used
                )
            )
    result = pd.concat(frames, ignore_index=True)
    logger.info(f"few-shot probe of {label!r} finished in {time.perf_counter() - start:.1f} s")
    return result


# --- retrieval ------------------------------------------------------------------------------------------------


def _similarity(distance: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        return 1.0 - distance
    return 1.0 / (1.0 + distance)


def _knn_predict(x_query: np.ndarray, x_ref: np.ndarray, y_ref: np.ndarray, *, k: int, metric: str) -> np.ndarray:
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f'`metric` must be "cosine" or "euclidean"; found {metric!r}.')
    _check_positive_int("k", k)
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
    x_query, x_ref, y_ref = _as_matrix("X_query", X_query), _as_matrix("X_ref", X_ref), _as_matrix("Y_ref", Y_ref)
    _check_same_rows(X_ref=x_ref, Y_ref=y_ref)
    _check_same_columns(X_query=x_query, X_ref=x_ref)
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
    x_query, x_ref = _as_matrix("X_query", X_query), _as_matrix("X_ref", X_ref)
    y_ref, y_query = _as_matrix("Y_ref", Y_ref), _as_matrix("Y_query", Y_query)
    _check_same_rows(X_query=x_query, Y_query=y_query)
    _check_same_rows(X_ref=x_ref, Y_ref=y_ref)
    _check_same_columns(X_query=x_query, X_ref=x_ref)
    _check_same_columns(Y_query=y_query, Y_ref=y_ref)
    gene_names = _gene_names(genes, y_ref.shape[1])
    prediction = _knn_predict(x_query, x_ref, y_ref, k=k, metric=metric)
    r = _pearson_per_gene(y_query, prediction)
    return _gene_frame(label, gene_names, r, k=k, n_ref=x_ref.shape[0], n_query=x_query.shape[0])


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
    x, y, slide = _probe_inputs(X, Y, slide, "slide")
    gene_names = _gene_names(genes, y.shape[1])
    frames = []
    for fold in _fold_ids(slide):
        query = slide == fold
        prediction = _knn_predict(x[query], x[~query], y[~query], k=k, metric=metric)
        r = _pearson_per_gene(y[query], prediction)
        sizes = {"n_ref": int((~query).sum()), "n_query": int(query.sum())}
        frames.append(_gene_frame(label, gene_names, r, replicate={"fold": fold}, k=k, **sizes))
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
    gene, image = _as_matrix("gene_emb", gene_emb), _as_matrix("image_emb", image_emb)
    _check_same_rows(gene_emb=gene, image_emb=image)
    _check_same_columns(gene_emb=gene, image_emb=image)
    for k in ks:
        _check_positive_int("ks", k)
    groups = np.full(gene.shape[0], "all") if groups is None else _as_labels("groups", groups, gene.shape[0])
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


# --- few-shot classification ----------------------------------------------------------------------------------


def _few_shot_split(
    labels: np.ndarray, classes: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    train = np.concatenate([rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c in classes])
    test = np.setdiff1d(np.flatnonzero(np.isin(labels, classes)), train)
    return train, test


def _balanced_accuracy(x: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, max_iter: int) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter)).fit(x[train], labels[train])
    return float(balanced_accuracy_score(labels[test], model.predict(x[test])))


def few_shot_classification(
    X: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    k: Sequence[int] | int = (1, 5, 10),
    n_repeats: int = 10,
    max_iter: int = 1000,
    label: str = "encoder",
    seed: int = 0,
) -> pd.DataFrame:
    """Few-shot linear classification: logistic regression on ``k`` labelled spots per class.

    Each repeat draws ``k`` spots of every class, fits :class:`~sklearn.preprocessing.StandardScaler` →
    :class:`~sklearn.linear_model.LogisticRegression`, and scores balanced accuracy on all remaining spots of
    those classes. Classes with ``k`` spots or fewer cannot be both trained and tested; they are skipped and
    named in the ``note`` column.

    Parameters
    ----------
    X
        Embeddings, spots × features.
    labels
        One categorical label per spot: pathologist regions, or expression domains from
        :func:`expression_domains`.
    k
        Labelled spots per class; one int or several.
    n_repeats
        Random draws per k.
    max_iter
        Iterations of the logistic regression solver.
    label
        Written to the ``encoder`` column.
    seed
        Seeds the draws.

    Returns
    -------
    One row per (repeat, k) with columns ``encoder``, ``repeat``, ``k``, ``metric``
    (``"balanced_accuracy@k"``), ``value`` (NaN when fewer than two classes are left), ``n_classes``,
    ``n_train``, ``n_test`` and ``note``. Chance is ``1 / n_classes``.
    """
    x = _as_matrix("X", X)
    labels = _as_labels("labels", labels, x.shape[0])
    ks = [k] if np.isscalar(k) else list(k)
    for shots in ks:
        _check_positive_int("k", shots)
    _check_positive_int("n_repeats", n_repeats)
    classes, counts = np.unique(labels, return_counts=True)
    start = time.perf_counter()
    logger.info(f"few-shot classification of {label!r}: {classes.size} classes, k={ks}, {n_repeats} repeats")
    rows = []
    for repeat in range(n_repeats):
        rng = np.random.default_rng((seed, repeat))
        for shots in ks:
            kept, skipped = classes[counts > shots], classes[counts <= shots]
            note = f"skipped classes with <= {shots} spots: {skipped.tolist()}" if skipped.size else ""
            row = {"encoder": label, "repeat": repeat, "k": shots, "metric": f"balanced_accuracy@{shots}"}
            if kept.size < 2:
                note = f"{note}; fewer than 2 classes left".lstrip("; ")
                rows.append({**row, "value": np.nan, "n_classes": kept.size, "n_train": 0, "n_test": 0, "note": note})
                continue
            train, test = _few_shot_split(labels, kept, shots, rng)
            value = _balanced_accuracy(x, labels, train, test, max_iter)
            sizes = {"n_classes": kept.size, "n_train": train.size, "n_test": test.size}
            rows.append({**row, "value": value, **sizes, "note": note})
    logger.info(f"few-shot classification of {label!r} finished in {time.perf_counter() - start:.1f} s")
    return pd.DataFrame(rows)


def expression_domains(
    Y: npt.ArrayLike,
    *,
    resolution: float = 0.5,
    n_neighbors: int = 15,
    n_pcs: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Expression-defined domains: Leiden clusters of the spots' expression, as labels where no annotation exists.

    PCA → k-nearest-neighbour graph with Gaussian-kernel weights → Leiden (igraph implementation), with scanpy.

    Parameters
    ----------
    Y
        Log-normalised expression, spots × genes.
    resolution
        Leiden resolution; higher gives more domains.
    n_neighbors
        Neighbours in the graph.
    n_pcs
        Principal components (capped by the data's size).
    seed
        Seeds PCA, the graph and Leiden.

    Returns
    -------
    One integer domain per spot, numbered from 0.
    """
    import anndata as ad
    import scanpy as sc

    y = _as_matrix("Y", Y)
    if y.shape[0] <= n_neighbors:
        raise ValueError(f"Need more spots than `n_neighbors`={n_neighbors}; found {y.shape[0]}.")
    adata = ad.AnnData(y)
    sc.pp.pca(adata, n_comps=min(n_pcs, y.shape[0] - 1, y.shape[1] - 1), random_state=seed)
    # The Gaussian kernel avoids UMAP's numba-compiled connectivities, which cost 10-80 s of compilation per process.
    sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep="X_pca", method="gauss", random_state=seed)
    sc.tl.leiden(adata, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return adata.obs["leiden"].astype(int).to_numpy()


# --- summary --------------------------------------------------------------------------------------------------


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std per encoder and metric of any frame returned by this module's evaluations (or several concatenated).

    Per-gene values are first averaged within each replicate (fold, repeat, group), ignoring NaN; the mean
    and standard deviation (``ddof=0``, as HEST reports it) are then taken over replicates.

    Parameters
    ----------
    df
        A tidy evaluation frame with at least ``encoder``, ``metric`` and ``value``.

    Returns
    -------
    One row per (encoder, metric), in order of appearance, with columns ``encoder``, ``metric``, ``mean``,
    ``std``, ``n`` (replicates with a defined value) and ``n_undefined`` (NaN rows left out, e.g. genes
    constant in a test fold).
    """
    missing = {"encoder", "metric", "value"} - set(df.columns)
    if missing:
        raise ValueError(
            f"`df` needs the columns encoder, metric and value; missing {sorted(missing)} in {list(df.columns)}."
        )
    keys = ["encoder", "metric"]
    replicates = [column for column in _REPLICATE_COLUMNS if column in df.columns]
    per_replicate = df.groupby([*keys, *replicates], sort=False, dropna=False)["value"].mean().reset_index()
    summary = per_replicate.groupby(keys, sort=False)["value"].agg(
        mean="mean", std=lambda values: values.std(ddof=0), n="count"
    )
    undefined = df["value"].isna().groupby([df["encoder"], df["metric"]], sort=False).sum().rename("n_undefined")
    return summary.join(undefined).reset_index()
