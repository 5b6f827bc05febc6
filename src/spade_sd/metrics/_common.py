"""What the metrics share: checks of their array inputs, Pearson r per gene and the per-gene result frame."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd


def as_matrix(name: str, array: npt.ArrayLike) -> np.ndarray:
    matrix = np.asarray(array, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"`{name}` must be a non-empty 2-D array (spots × columns); found shape {matrix.shape}.")
    n_bad = int((~np.isfinite(matrix)).sum())
    if n_bad:
        raise ValueError(f"`{name}` must be finite; found {n_bad} NaN or infinite values. Drop or impute those spots.")
    return matrix


def as_labels(name: str, labels: npt.ArrayLike, n_spots: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n_spots,):
        raise ValueError(f"`{name}` must hold one entry per spot, shape ({n_spots},); found shape {labels.shape}.")
    n_missing = int(pd.isna(labels).sum())
    if n_missing:
        raise ValueError(f"`{name}` has {n_missing} missing entries; drop those spots or give them a label.")
    return labels


def check_same_rows(**arrays: np.ndarray) -> None:
    sizes = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"Expected the same number of spots (rows) in {', '.join(sizes)}; found {sizes}.")


def check_same_columns(**arrays: np.ndarray) -> None:
    sizes = {name: array.shape[1] for name, array in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"Expected the same number of columns in {', '.join(sizes)}; found {sizes}.")


def checked_gene_names(genes: Sequence | None, n_genes: int) -> np.ndarray:
    if genes is None:
        return np.arange(n_genes)
    names = np.asarray(genes)
    if names.shape != (n_genes,):
        raise ValueError(f"`genes` must name each of the {n_genes} columns of Y; found shape {names.shape}.")
    return names


def check_positive_int(name: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; found {value!r}.")


def checked_folds(folds: np.ndarray) -> np.ndarray:
    ids = np.unique(folds)
    if ids.size < 2:
        raise ValueError(
            f"Need at least 2 folds (slides or patients) for leave-one-fold-out; found {ids.size}: {ids.tolist()}."
        )
    return ids


def probe_inputs(
    x: npt.ArrayLike, y: npt.ArrayLike, labels: npt.ArrayLike, labels_name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = as_matrix("X", x), as_matrix("Y", y)
    check_same_rows(X=x, Y=y)
    return x, y, as_labels(labels_name, labels, x.shape[0])


def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
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


def mean_pearson(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    r = pearson_per_gene(y_true, y_pred)
    return float(r[~np.isnan(r)].mean()) if (~np.isnan(r)).any() else np.nan


def gene_frame(
    label: str, genes: np.ndarray, r: np.ndarray, *, replicate: dict | None = None, **extra: object
) -> pd.DataFrame:
    return pd.DataFrame(
        {"encoder": label, **(replicate or {}), "gene": genes, "metric": "pearson", "value": r, **extra}
    )
