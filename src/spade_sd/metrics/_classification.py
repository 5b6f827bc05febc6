"""Few-shot classification of labelled regions (or expression domains) from an embedding."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from spade_sd.metrics._common import as_labels, as_matrix, check_positive_int
from spade_sd.utils.logging import logger


def few_shot_split(
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
    x = as_matrix("X", X)
    labels = as_labels("labels", labels, x.shape[0])
    ks = [k] if np.isscalar(k) else list(k)
    for shots in ks:
        check_positive_int("k", shots)
    check_positive_int("n_repeats", n_repeats)
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
            train, test = few_shot_split(labels, kept, shots, rng)
            value = _balanced_accuracy(x, labels, train, test, max_iter)
            sizes = {"n_classes": kept.size, "n_train": train.size, "n_test": test.size}
            rows.append({**row, "value": value, **sizes, "note": note})
    logger.info(f"few-shot classification of {label!r} finished in {time.perf_counter() - start:.1f} s")
    return pd.DataFrame(rows)
