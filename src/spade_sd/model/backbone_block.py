"""The backbone block of a joint embedding: standardized backbone features kept next to the aligned coordinates.

With ``output="joint"`` (:class:`~spade_sd.config.TrainingConfig`) the image-side embedding is
``[aligned coordinates, block]``, where the block is the standardized backbone features (the heads' input), or their
``n_comps`` leading principal components over the training spots, times one scale. The contrastive heads and the
principal subspace keep what predicts expression; the block keeps what the backbone knew about morphology, so a
user who swaps the backbone's features for the embedding loses nothing. The gene side has no image, so its block is
zero (the block's training mean). ``docs/quality.md`` has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spade_sd.model.subspace import principal_directions


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
        n, d = standardized.shape
        basis = None
        if n_comps is not None:
            if n_comps > min(n, d):
                raise ValueError(
                    f"backbone_comps must be at most min(training spots, backbone features) = {min(n, d)}; "
                    f"found {n_comps}."
                )
            basis = np.ascontiguousarray(principal_directions(standardized, n_comps)[1], dtype=np.float32)
        block = standardized if basis is None else standardized @ basis
        block_variance = float(block.var(axis=0).sum())
        aligned_variance = float(np.asarray(aligned, dtype=np.float64).var(axis=0).sum())
        scale = np.sqrt(weight * aligned_variance / block_variance) if block_variance > 0 else 1.0
        return cls(basis, float(scale))

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
