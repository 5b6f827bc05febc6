"""Expression probes: the HEST-Benchmark ridge probe, leave-one-slide-out, and its few-shot variant within a slide."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold, KFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from spade_sd.metrics._common import (
    check_positive_int,
    checked_folds,
    checked_gene_names,
    gene_frame,
    mean_pearson,
    pearson_per_gene,
    probe_inputs,
)
from spade_sd.utils.logging import logger

_Alpha = Literal["hest", "cv"] | float

DEFAULT_ALPHAS = np.logspace(-3, 7, 21)
"""Log grid searched by ``alpha="cv"`` (the HEST value is always added to it)."""

_INNER_SPLITS = 5
# HEST passes max_iter=1000 to the lsqr solver; keep it so results match theirs.
_LSQR_MAX_ITER = 1000


def _check_alpha(alpha: _Alpha) -> None:
    if alpha in ("hest", "cv"):
        return
    if isinstance(alpha, str) or not np.isscalar(alpha) or not alpha > 0:
        raise ValueError(f'`alpha` must be "hest", "cv" or a positive number; found {alpha!r}.')


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
        [mean_pearson(y_val, z_val_rotated @ (projected_targets / (eigenvalues + alpha)[:, None])) for alpha in alphas]
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


def fit_predict(
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
    x, y, folds = probe_inputs(X, Y, folds, "folds")
    fold_ids = checked_folds(folds)
    _check_alpha(alpha)
    gene_names = checked_gene_names(genes, y.shape[1])
    start = time.perf_counter()
    logger.info(f"ridge probe of {label!r}: {x.shape[0]} spots, {fold_ids.size} folds, alpha={alpha!r}")
    frames = []
    for fold in fold_ids:
        test = folds == fold
        prediction, alpha_used = fit_predict(
            x[~test],
            y[~test],
            x[test],
            groups=folds[~test],
            alpha=alpha,
            n_components=n_components,
            alphas=alphas,
            seed=seed,
        )
        r = pearson_per_gene(y[test], prediction)
        frames.append(
            gene_frame(
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


def _n_shots(n_spots: int, fraction: float | None, n_train: int | None) -> int:
    if n_train is not None:
        check_positive_int("n_train", n_train)
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
    x, y, slide = probe_inputs(X, Y, slide, "slide")
    if fraction is not None and n_train is not None:
        raise ValueError(f"Give either `fraction` or `n_train`, not both; found {fraction=} and {n_train=}.")
    fraction = 0.2 if fraction is None and n_train is None else fraction
    _check_alpha(alpha)
    check_positive_int("n_repeats", n_repeats)
    gene_names = checked_gene_names(genes, y.shape[1])
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
            prediction, alpha_used = fit_predict(
                x[train],
                y[train],
                x[test],
                groups=None,
                alpha=alpha,
                n_components=n_components,
                alphas=alphas,
                seed=seed,
            )
            r = pearson_per_gene(y[test], prediction)
            replicate = {"fold": slide_id, "repeat": repeat}
            frames.append(
                gene_frame(label, gene_names, r, replicate=replicate, n_train=n_fit, n_test=test.size, alpha=alpha_used)
            )
    result = pd.concat(frames, ignore_index=True)
    logger.info(f"few-shot probe of {label!r} finished in {time.perf_counter() - start:.1f} s")
    return result
