"""Standardization of backbone features: per feature, over the training set or over one slide.

Clustering and the projection heads work on standardized features, so that no feature dominates the Euclidean
distances only because of its scale. With ``standardize="slide"`` every slide is first standardized by its own
statistics, which removes what shifts a whole slide's features (stain, scanner, section thickness).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

_STD_FLOOR = 1e-6
# Fewest patches whose statistics standardize a slide (standardize="slide")
MIN_SLIDE_PATCHES = 30


def as_float_matrix(X: np.ndarray, name: str) -> np.ndarray:
    """``X`` as a finite float32 ``(n_spots, n_features)`` array, or a ValueError naming ``name``."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-d array (n_spots, n_features); found shape {X.shape}.")
    if not np.isfinite(X).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return X


class FeatureScaler:
    """Per-feature standardization, fitted on the training features (or on one slide's, see :func:`fit_slide_scaler`).

    Parameters
    ----------
    mean
        Per-feature mean, if already known (e.g. when loading a saved model).
    std
        Per-feature standard deviation; features with a standard deviation below ``1e-6`` are only centered.
    """

    def __init__(self, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
        if (mean is None) != (std is None):
            raise ValueError("Pass both `mean` and `std`, or neither (then call `fit`).")
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.std = None if std is None else np.asarray(std, dtype=np.float32)

    def fit(self, X: np.ndarray) -> FeatureScaler:
        """Learn the mean and standard deviation of each column of ``X`` (n_spots, d); returns ``self``."""
        X = as_float_matrix(X, "X")
        self.mean = X.mean(axis=0, dtype=np.float64).astype(np.float32)
        std = X.std(axis=0, dtype=np.float64)
        self.std = np.where(std < _STD_FLOOR, 1.0, std).astype(np.float32)
        return self

    def fit_chunks(self, chunks: Iterable[np.ndarray]) -> FeatureScaler:
        """Learn the mean and standard deviation of rows arriving in chunks (e.g. a whole slide's tiles); returns ``self``.

        Sums are accumulated in float64, so the result equals :meth:`fit` on the concatenated rows up to rounding,
        while only one chunk is in memory at a time.
        """
        n, total, squares = 0, None, None
        for chunk in chunks:
            chunk = as_float_matrix(chunk, "chunk")
            if total is None:
                total, squares = np.zeros(chunk.shape[1]), np.zeros(chunk.shape[1])
            total += chunk.sum(axis=0, dtype=np.float64)
            squares += np.square(chunk, dtype=np.float64).sum(axis=0)
            n += len(chunk)
        if total is None or n == 0:
            raise ValueError("Cannot fit a FeatureScaler on no rows: found 0 patches.")
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - np.square(mean), 0.0))
        self.mean = mean.astype(np.float32)
        self.std = np.where(std < _STD_FLOOR, 1.0, std).astype(np.float32)
        return self

    def transform(self, X: np.ndarray, *, copy: bool = True) -> np.ndarray:
        """Standardized copy of ``X`` as float32; ``copy=False`` standardizes a float32 ``X`` in place and returns it."""
        if self.mean is None or self.std is None:
            raise RuntimeError("The FeatureScaler is not fitted: call `fit` on the training features first.")
        X = as_float_matrix(X, "X")
        if X.shape[1] != self.mean.shape[0]:
            raise ValueError(f"X has {X.shape[1]} features, but the scaler was fitted on {self.mean.shape[0]}.")
        if not copy:
            X -= self.mean
            X /= self.std
            return X
        return ((X - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, np.ndarray]:
        """The fitted state as plain float32 arrays (``mean``, ``std``), e.g. for safetensors."""
        if self.mean is None or self.std is None:
            raise RuntimeError("The FeatureScaler is not fitted: nothing to save.")
        return {"mean": self.mean.copy(), "std": self.std.copy()}

    @classmethod
    def from_dict(cls, arrays: dict[str, np.ndarray]) -> FeatureScaler:
        """Rebuild a scaler from the output of :meth:`to_dict`."""
        return cls(mean=np.asarray(arrays["mean"]), std=np.asarray(arrays["std"]))


def fit_slide_scaler(chunks: Iterable[np.ndarray]) -> FeatureScaler:
    """Per-slide standardization: a :class:`FeatureScaler` fitted on every patch of one slide (rows in chunks).

    Raises
    ------
    ValueError
        With fewer than ``MIN_SLIDE_PATCHES`` patches: the statistics need enough of them.
    """
    n_rows = 0

    def counted() -> Iterator[np.ndarray]:
        nonlocal n_rows
        for chunk in chunks:
            n_rows += len(chunk)
            yield chunk

    scaler = FeatureScaler().fit_chunks(counted())
    if n_rows < MIN_SLIDE_PATCHES:
        raise ValueError(
            f"Per-slide standardization needs the features of at least {MIN_SLIDE_PATCHES} patches of the slide; "
            f"found {n_rows}. Embed all of a slide's spots or tiles at once, or train with standardize='global'."
        )
    return scaler
