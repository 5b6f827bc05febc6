"""The reference bank: training spots whose image embedding and measured expression a model keeps.

What the aligned space knows about expression lives in these spots: :func:`spade_sd.tl.predict_expression` retrieves
the nearest ones to an H&E patch (or fits a linear map on them), and :func:`spade_sd.tl.query` builds expression
profiles from their panel expression. The bank is bounded (``TrainingConfig.reference_size`` spots, drawn per
expert) and covers more genes than the panel (``TrainingConfig.reference_genes``), so predictions reach genes the
gene heads never saw. It is saved with the model: arrays in ``model.safetensors``, names in ``config.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from spade_sd.utils.validation import did_you_mean

_MAX_LISTED = 10


@dataclass
class ReferenceBank:
    """Reference spots of a trained model: image-side embeddings and log1p-normalized expression.

    Attributes
    ----------
    embedding
        Image-side embedding ``(n, out_dim)`` float32 of every reference spot, as :func:`spade_sd.tl.embed`
        computes it on the training slide.
    expression
        ``log1p(target_sum · counts / library size)`` ``(n, n_genes)`` of the same spots over :attr:`genes`, stored
        as float16 (about three significant digits, far below the noise of spot counts).
    genes
        Gene names, the model's panel genes first.
    expert
        Expert with the largest routing weight of every spot, ``(n,)``.
    slide
        Training slide of every spot, ``(n,)``.
    obs_names
        The spots' names in their slide's table.
    target_sum
        Counts per spot after normalization (the panel's); ``None``: each slide's median library size.
    """

    embedding: np.ndarray
    expression: np.ndarray
    genes: list[str]
    expert: np.ndarray
    slide: np.ndarray
    obs_names: list[str]
    target_sum: float | None = 1e4

    def __post_init__(self) -> None:
        self.embedding = np.ascontiguousarray(self.embedding, dtype=np.float32)
        self.expression = np.ascontiguousarray(self.expression, dtype=np.float16)
        self.genes = [str(g) for g in self.genes]
        self.expert = np.asarray(self.expert, dtype=np.int64)
        self.slide = np.asarray(self.slide).astype(str)
        self.obs_names = [str(name) for name in self.obs_names]
        n = len(self.embedding)
        expected = {
            "embedding": (self.embedding.ndim == 2, "(n, out_dim)"),
            "expression": (self.expression.shape == (n, len(self.genes)), f"({n}, {len(self.genes)})"),
            "expert": (self.expert.shape == (n,), f"({n},)"),
            "slide": (self.slide.shape == (n,), f"({n},)"),
            "obs_names": (len(self.obs_names) == n, f"{n} names"),
        }
        for name, (ok, shape) in expected.items():
            if not ok:
                raise ValueError(
                    f"ReferenceBank.{name} must have shape {shape}; found {np.shape(getattr(self, name))}."
                )
        duplicated = pd.Index(self.genes)[pd.Index(self.genes).duplicated()]
        if len(duplicated):
            raise ValueError(f"ReferenceBank.genes must be unique; found duplicates {list(duplicated[:_MAX_LISTED])}.")
        if not (np.isfinite(self.embedding).all() and np.isfinite(self.expression).all()):
            raise ValueError("ReferenceBank embedding and expression must be finite.")

    def __len__(self) -> int:
        return len(self.embedding)

    def __repr__(self) -> str:
        return (
            f"ReferenceBank(n_spots={len(self)}, genes={len(self.genes)}, dim={self.embedding.shape[1]}, "
            f"slides={sorted(map(str, set(self.slide)))})"
        )

    def gene_indices(self, genes: Sequence[str]) -> np.ndarray:
        """Columns of :attr:`expression` holding ``genes``; a KeyError lists the genes the bank lacks."""
        return gene_indices(self.genes, genes, "the model's reference bank")

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays for safetensors and names for ``config.json``: the inverse of :meth:`from_arrays`."""
        slides, codes = np.unique(self.slide, return_inverse=True)
        arrays = {
            "embedding": self.embedding,
            "expression": self.expression,
            "expert": self.expert,
            "slide": codes.astype(np.int64),
        }
        metadata = {
            "genes": list(self.genes),
            "slides": slides.tolist(),
            "obs_names": list(self.obs_names),
            "target_sum": self.target_sum,
        }
        return arrays, metadata

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> ReferenceBank:
        """The bank saved by :meth:`to_arrays`."""
        slides = np.asarray(metadata["slides"], dtype=str)
        return cls(
            embedding=arrays["embedding"],
            expression=arrays["expression"],
            genes=metadata["genes"],
            expert=arrays["expert"],
            slide=slides[np.asarray(arrays["slide"], dtype=np.int64)],
            obs_names=metadata["obs_names"],
            target_sum=metadata["target_sum"],
        )


def gene_indices(available: Sequence[str], genes: Sequence[str], where: str) -> np.ndarray:
    """Positions of ``genes`` in ``available``, or a KeyError naming the genes ``where`` lacks."""
    index = pd.Index(available)
    positions = index.get_indexer(pd.Index(genes))
    missing = [g for g, p in zip(genes, positions, strict=True) if p < 0]
    if missing:
        shown = ", ".join(map(str, missing[:_MAX_LISTED])) + (
            f" … ({len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
        )
        raise KeyError(
            f"{len(missing)} of the {len(genes)} genes asked for are not in {where} ({len(index)} genes, e.g. "
            f"{', '.join(map(str, index[:5]))}): {shown}.{did_you_mean(missing, index)}"
        )
    return positions


def stratified_sample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of ``size`` rows drawn without replacement, each label in proportion to its rows.

    Every label gets ``size · share`` rows, rounded by largest remainder, so each expert is represented as it is
    among the spots; all rows are returned when ``size`` covers them.
    """
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = size * counts / counts.sum()
    taken = np.floor(quota).astype(int)
    # the fractional parts sum to fewer than len(classes): one more row for the largest remainders
    taken[np.argsort(-(quota - taken), kind="stable")[: size - taken.sum()]] += 1
    rng = np.random.default_rng(seed)
    drawn = [rng.choice(np.flatnonzero(inverse == c), size=taken[c], replace=False) for c in range(len(classes))]
    return np.sort(np.concatenate(drawn))
