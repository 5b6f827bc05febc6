"""The backbone block of a joint embedding: standardized backbone features kept next to the aligned coordinates.

With ``output="joint"`` (:class:`~spade_sd.config.TrainingConfig`) the image-side embedding is
``[aligned coordinates, block]``, where the block is the standardized backbone features (the heads' input), or their
``n_comps`` leading principal components over the training spots, times one scale. The contrastive heads and the
principal subspace keep what predicts expression; the block keeps what the backbone knew about morphology, so a
user who swaps the backbone's features for the embedding loses nothing. The gene side has no image, so its block is
zero (the block's training mean). ``docs/quality.md`` has the measurements.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from spade_sd.model.subspace import RowMoments, leading_eigenvectors, principal_directions


@dataclass
class BackboneBlock:
    """A linear map of standardized backbone features to the block appended to a joint embedding.

    Attributes
    ----------
    basis
        Orthonormal columns ``(n_features, n_comps)`` of the kept principal directions, or ``None`` to keep every
        standardized feature as it is.
    scale
        Factor applied to the (projected) features.
    """

    basis: np.ndarray | None
    scale: float

    @property
    def dim(self) -> int | None:
        """Width of the block; ``None`` when it keeps every feature (the features' width)."""
        return None if self.basis is None else self.basis.shape[1]

    def width(self, n_features: int) -> int:
        """Width of the block for ``n_features`` standardized backbone features."""
        return n_features if self.basis is None else self.basis.shape[1]

    @classmethod
    def fit(
        cls, standardized: np.ndarray, aligned: np.ndarray, n_comps: int | None, weight: float = 1.0
    ) -> BackboneBlock:
        """The block for training spots' standardized features ``(n, d)`` and aligned embeddings ``(n, out_dim)``.

        Parameters
        ----------
        standardized
            The training spots' standardized backbone features (centered: the model's scaler was fitted on them).
        aligned
            The same spots' aligned coordinates (the heads' outputs, after the principal subspace).
        n_comps
            Leading principal directions to keep (at most ``min(n, d)``); ``None`` keeps every feature.
        weight
            The block's total variance over the training spots, relative to the aligned coordinates'.
        """
        standardized = np.asarray(standardized, dtype=np.float64)
        _check_n_comps(n_comps, *standardized.shape)
        basis = None
        if n_comps is not None:
            basis = np.ascontiguousarray(principal_directions(standardized, n_comps)[1], dtype=np.float32)
        block = standardized if basis is None else standardized @ basis
        block_variance = float(block.var(axis=0).sum())
        aligned_variance = float(np.asarray(aligned, dtype=np.float64).var(axis=0).sum())
        return cls(basis, _scale(weight, aligned_variance, block_variance))

    @classmethod
    def fit_blocks(
        cls, blocks: Iterable[tuple[np.ndarray, np.ndarray]], n_comps: int | None, weight: float = 1.0
    ) -> BackboneBlock:
        """:meth:`fit` on ``(standardized, aligned)`` blocks of training spots, holding one block at a time.

        The directions and both variances come from the rows' scatter matrices (:class:`~spade_sd.model.subspace.
        RowMoments`), ``d²`` memory whatever the number of spots, where :meth:`fit` takes the SVD of all of them.
        """
        features, aligned = RowMoments(), RowMoments()
        for standardized, aligned_block in blocks:
            features.add(standardized)
            aligned.add(aligned_block)
        scatter = features.scatter
        _check_n_comps(n_comps, features.n, len(features.mean))
        basis = None
        if n_comps is not None:
            basis = np.ascontiguousarray(leading_eigenvectors(scatter, n_comps), dtype=np.float32)
        if basis is None:
            block_variance = float(np.trace(scatter)) / features.n
        else:
            kept = basis.astype(np.float64)
            block_variance = float(np.sum(kept * (scatter @ kept))) / features.n  # the trace of keptᵀ·scatter·kept
        aligned_variance = float(np.trace(aligned.scatter)) / aligned.n
        return cls(basis, _scale(weight, aligned_variance, block_variance))

    def transform(self, standardized: np.ndarray) -> np.ndarray:
        """The block ``(n, width)`` of standardized backbone features ``(n, d)``, float32."""
        standardized = np.asarray(standardized, dtype=np.float32)
        block = standardized if self.basis is None else standardized @ self.basis
        return (block * np.float32(self.scale)).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to save."""
        arrays = {"scale": np.asarray([self.scale], dtype=np.float64)}
        if self.basis is not None:
            arrays["basis"] = self.basis
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> BackboneBlock:
        """Inverse of :meth:`to_arrays`."""
        basis = arrays.get("basis")
        return cls(None if basis is None else np.asarray(basis, dtype=np.float32), float(arrays["scale"][0]))


def _check_n_comps(n_comps: int | None, n: int, d: int) -> None:
    if n_comps is not None and n_comps > min(n, d):
        raise ValueError(
            f"backbone_comps must be at most min(training spots, backbone features) = {min(n, d)}; found {n_comps}."
        )


def _scale(weight: float, aligned_variance: float, block_variance: float) -> float:
    """The factor giving the block ``weight`` times the aligned coordinates' total variance."""
    return float(np.sqrt(weight * aligned_variance / block_variance)) if block_variance > 0 else 1.0
