"""The embedding's principal subspace: the leading directions of the training spots' image embeddings.

After training, SPADE keeps its embeddings in the span of their ``n_comps`` leading principal directions (fitted on
the training spots' image embeddings). The trailing directions hold much of the variance but add little to
expression retrieval, while a linear probe fitted on few spots overfits them; ``docs/quality.md`` has the
measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spade_sd.config import check_n_comps


@dataclass
class EmbeddingSubspace:
    """An affine subspace of the embedding space that embeddings are projected onto.

    Attributes
    ----------
    mean
        Mean training embedding, ``(out_dim,)``.
    basis
        Orthonormal columns spanning the kept directions, ``(out_dim, n_comps)``.
    """

    mean: np.ndarray
    basis: np.ndarray

    @property
    def n_comps(self) -> int:
        """Number of kept directions."""
        return self.basis.shape[1]

    @classmethod
    def fit(cls, embedding: np.ndarray, n_comps: int) -> EmbeddingSubspace:
        """The ``n_comps`` leading principal directions of ``embedding`` ``(n, out_dim)`` and its mean."""
        embedding = np.asarray(embedding, dtype=np.float64)
        check_n_comps(n_comps, embedding.shape[1], len(embedding))
        mean = embedding.mean(axis=0)
        _, _, vt = np.linalg.svd(embedding - mean, full_matrices=False)
        # a deterministic sign per direction (largest loading positive), so equal inputs give equal bases
        basis = vt[:n_comps].T
        basis *= np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(n_comps)])
        # C order, as a reloaded copy has: a transposed (Fortran-order) basis takes another BLAS path, whose
        # rounding made a model's embeddings differ from its reloaded copy's by ~1e-6
        return cls(mean.astype(np.float32), np.ascontiguousarray(basis, dtype=np.float32))

    def project(self, embedding: np.ndarray) -> np.ndarray:
        """``mean + (embedding − mean) · basis · basisᵀ``: same shape, coordinates and distances within the subspace."""
        centered = np.asarray(embedding, dtype=np.float32) - self.mean
        return (self.mean + (centered @ self.basis) @ self.basis.T).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to save."""
        return {"mean": self.mean, "basis": self.basis}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EmbeddingSubspace:
        """Inverse of :meth:`to_arrays`."""
        return cls(np.asarray(arrays["mean"], dtype=np.float32), np.asarray(arrays["basis"], dtype=np.float32))
