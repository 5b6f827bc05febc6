"""The embedding's principal subspace: the leading directions of the training spots' image embeddings.

After training, SPADE keeps its embeddings in the span of their ``n_comps`` leading principal directions (fitted on
the training spots' image embeddings). The trailing directions hold much of the variance but add little to
expression retrieval, while a linear probe fitted on few spots overfits them; ``docs/quality.md`` has the
measurements.

The subspace is fitted to the training tissue. On images unlike it (another tissue) the heads' outputs spread into
the trailing directions, and projecting them away costs what the backbone knew about those images: trained on her2st
and applied to the mouse olfactory bulb (or the other way round), the subspace keeps 33–52 % of the new slides'
embedding variance against 55–75 % on training and held-out sections of the training data set
(``benchmarks/kept_share.py``), and the embedding falls below its backbone on H&E labels
(``benchmarks/morphology_transfer.py``). Another stain or half the resolution of a training-like section does not do
that: the share stays at 0.82–0.99 of the training share (2 of 126 embeddings below the warning's threshold) and the
embedding within the backbone's spread (``benchmarks/morphology_shift.py``).
:meth:`EmbeddingSubspace.kept_share` measures that share, :func:`spade_sd.tl.embed` records it and warns below
:data:`UNLIKE_TRAINING` of the training share, and :meth:`SpadeModel.full_rank <spade_sd.SpadeModel.full_rank>`
embeds without the subspace.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from spade_sd.config import check_n_comps

UNLIKE_TRAINING = 0.85
"""A slide whose kept share is below this fraction of the training spots' share is unlike the training data.

Measured (``benchmarks/results/kept_share.md``): held-out sections of the training data set keep 0.93–1.0 of the
training share (7 of 7 above the threshold), sections of the other data set 0.56–0.70 (24 of 24 below).
"""


@dataclass
class EmbeddingSubspace:
    """An affine subspace of the embedding space that embeddings are projected onto.

    Attributes
    ----------
    mean
        Mean training embedding, ``(out_dim,)``.
    basis
        Orthonormal columns spanning the kept directions, ``(out_dim, n_comps)``.
    kept
        Share of the training embeddings' variance (around :attr:`mean`) inside the subspace; ``None`` for models
        saved before it was recorded.
    """

    mean: np.ndarray
    basis: np.ndarray
    kept: float | None = None

    @property
    def n_comps(self) -> int:
        """Number of kept directions."""
        return self.basis.shape[1]

    @classmethod
    def fit(cls, embedding: np.ndarray, n_comps: int) -> EmbeddingSubspace:
        """The ``n_comps`` leading principal directions of ``embedding`` ``(n, out_dim)`` and its mean."""
        embedding = np.asarray(embedding, dtype=np.float64)
        check_n_comps(n_comps, embedding.shape[1], len(embedding))
        mean, basis = principal_directions(embedding, n_comps)
        # C order, as a reloaded copy has: a transposed (Fortran-order) basis takes another BLAS path, whose
        # rounding made a model's embeddings differ from its reloaded copy's by ~1e-6
        subspace = cls(mean.astype(np.float32), np.ascontiguousarray(basis, dtype=np.float32))
        subspace.kept = subspace.kept_share(embedding).share
        return subspace

    def project(self, embedding: np.ndarray, share: KeptShare | None = None) -> np.ndarray:
        """``mean + (embedding − mean) · basis · basisᵀ``: same shape, coordinates and distances within the subspace.

        ``share``, if given, accumulates how much of ``embedding``'s variance the projection keeps.
        """
        centered = np.asarray(embedding, dtype=np.float32) - self.mean
        coordinates = centered @ self.basis
        if share is not None:
            share.add(coordinates, centered)
        return (self.mean + coordinates @ self.basis.T).astype(np.float32)

    def kept_share(self, embedding: np.ndarray) -> KeptShare:
        """How much of the variance of ``embedding`` ``(n, out_dim)`` (around :attr:`mean`) lies in the subspace."""
        centered = np.asarray(embedding, dtype=np.float64) - self.mean
        share = KeptShare()
        share.add(centered @ self.basis, centered)
        return share

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to save."""
        arrays = {"mean": self.mean, "basis": self.basis}
        if self.kept is not None:
            arrays["kept"] = np.asarray([self.kept], dtype=np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EmbeddingSubspace:
        """Inverse of :meth:`to_arrays`."""
        kept = float(arrays["kept"][0]) if "kept" in arrays else None
        return cls(np.asarray(arrays["mean"], dtype=np.float32), np.asarray(arrays["basis"], dtype=np.float32), kept)


def principal_directions(data: np.ndarray, n_comps: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean ``(d,)`` of ``data`` ``(n, d)`` and its ``n_comps`` leading principal directions ``(d, n_comps)``.

    In float64; each direction has a deterministic sign (its largest loading positive), so equal inputs give equal
    bases. ``n_comps`` is at most ``min(n, d)``.
    """
    data = np.asarray(data, dtype=np.float64)
    mean = data.mean(axis=0)
    _, _, vt = np.linalg.svd(data - mean, full_matrices=False)
    return mean, _signed(vt[:n_comps].T)


class RowMoments:
    """The count, mean and scatter matrix of rows gathered a block at a time, in float64.

    The sums are taken around the first block's mean, so a large common offset does not cancel digits away; memory
    is ``d²`` whatever the number of rows.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift: np.ndarray | None = None
        self._total: np.ndarray | None = None
        self._products: np.ndarray | None = None

    def add(self, block: np.ndarray) -> None:
        """Add the rows of ``block`` ``(n_block, d)``."""
        block = np.array(block, dtype=np.float64)  # a copy: it is shifted in place
        if block.ndim != 2:
            raise ValueError(f"Expected blocks of rows (n_block, d); found a block of shape {block.shape}.")
        if self._shift is None:
            self._shift = block.mean(axis=0) if len(block) else np.zeros(block.shape[1])
            self._total, self._products = np.zeros_like(self._shift), np.zeros((len(self._shift),) * 2)
        block -= self._shift
        self.n += len(block)
        self._total += block.sum(axis=0)
        self._products += block.T @ block

    def _check(self) -> None:
        if self.n == 0:
            raise ValueError("Expected at least one row to gather statistics from; found none.")

    @property
    def mean(self) -> np.ndarray:
        """The rows' mean ``(d,)``."""
        self._check()
        return self._shift + self._total / self.n

    @property
    def scatter(self) -> np.ndarray:
        """``Σ (x − mean)(x − mean)ᵀ`` over the rows, ``(d, d)``: ``n`` times their (population) covariance."""
        self._check()
        offset = self._total / self.n
        return self._products - self.n * np.outer(offset, offset)


def leading_eigenvectors(scatter: np.ndarray, n_comps: int) -> np.ndarray:
    """The ``n_comps`` leading eigenvectors ``(d, n_comps)`` of a scatter matrix, signed as :func:`principal_directions`."""
    _, vectors = np.linalg.eigh(scatter)  # ascending eigenvalues
    return _signed(np.ascontiguousarray(vectors[:, ::-1][:, :n_comps]))


def principal_directions_of_blocks(blocks: Iterable[np.ndarray], n_comps: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`principal_directions` of the rows of ``blocks`` (each ``(n_block, d)``), holding one block at a time.

    The directions are the eigenvectors of the rows' scatter matrix (:class:`RowMoments`): the same subspace as the
    rows' SVD, in ``d²`` memory whatever the number of rows, instead of several float64 copies of them. Fewer than
    ``n_comps`` directions (``min(n, d)``) where the rows have fewer.
    """
    moments = RowMoments()
    for block in blocks:
        moments.add(block)
    mean, scatter = moments.mean, moments.scatter
    return mean, leading_eigenvectors(scatter, min(n_comps, moments.n, len(mean)))


def _signed(basis: np.ndarray) -> np.ndarray:
    """``basis`` with each column's sign set so that its largest loading is positive (equal inputs, equal bases)."""
    basis *= np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(basis.shape[1])])
    return basis


@dataclass
class KeptShare:
    """Running sums of squares of embeddings around the subspace's mean: all of it, and the part inside it."""

    inside: float = 0.0
    total: float = 0.0

    def add(self, coordinates: np.ndarray, centered: np.ndarray) -> None:
        """Add rows given by their subspace ``coordinates`` and their ``centered`` embeddings."""
        self.inside += float(np.square(coordinates, dtype=np.float64).sum())
        self.total += float(np.square(centered, dtype=np.float64).sum())

    @property
    def share(self) -> float | None:
        """``inside / total``; ``None`` before any row with variance."""
        return self.inside / self.total if self.total > 0 else None
