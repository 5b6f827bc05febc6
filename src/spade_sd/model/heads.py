"""Data experts: each is a pair of projection heads (image, gene); the mixture routes patches among them.

Only torch is needed here, so embedding with a trained model never imports Lightning; training lives in
:mod:`spade_sd.training.experts` (losses in :mod:`~spade_sd.training.losses`, batches in
:mod:`~spade_sd.training.data`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from spade_sd.config import TrainingConfig
from spade_sd.model.subspace import principal_directions, principal_directions_of_blocks

CLIP_TEMPERATURE_INIT = 0.07


class ProjectionHead(nn.Module):
    """SPADE/BLEEP projection head.

    Linear(in → out) → GELU → Linear(out → out) → Dropout → add the first linear's output → LayerNorm(out).

    Parameters
    ----------
    in_dim
        Input dimension.
    out_dim
        Embedding dimension.
    dropout
        Dropout probability after the second linear layer.
    """

    def __init__(
        self, in_dim: int, out_dim: int = TrainingConfig.out_dim, dropout: float = TrainingConfig.dropout
    ) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed ``x`` (n, in_dim) into (n, out_dim)."""
        projected = self.projection(x)
        return self.layer_norm(self.dropout(self.fc(self.gelu(projected))) + projected)


class ExpertMixture(nn.Module):
    """The image and gene projection heads of every expert, and the CLIP loss's learnable logit scale.

    Parameters
    ----------
    n_experts
        Number of experts.
    image_dim
        Dimension of the (standardized) image features.
    gene_dim
        Number of genes.
    out_dim
        Embedding dimension.
    dropout
        Dropout of every head.
    decoder
        Give every expert a linear decoder from its image embedding back to the image features (trained by the
        ``reconstruction`` term; embedding never uses it).
    """

    def __init__(
        self,
        n_experts: int,
        image_dim: int,
        gene_dim: int,
        *,
        out_dim: int = TrainingConfig.out_dim,
        dropout: float = TrainingConfig.dropout,
        decoder: bool = False,
    ) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be at least 1; found {n_experts}.")
        self.config = {
            "n_experts": n_experts,
            "image_dim": image_dim,
            "gene_dim": gene_dim,
            "out_dim": out_dim,
            "dropout": dropout,
        }
        if decoder:  # recorded only when set: the configuration of a mixture without decoders is unchanged
            self.config["decoder"] = True
            self.decoders = nn.ModuleList(nn.Linear(out_dim, image_dim) for _ in range(n_experts))
        self.image_heads = nn.ModuleList(ProjectionHead(image_dim, out_dim, dropout) for _ in range(n_experts))
        self.gene_heads = nn.ModuleList(ProjectionHead(gene_dim, out_dim, dropout) for _ in range(n_experts))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / CLIP_TEMPERATURE_INIT)))

    @property
    def n_experts(self) -> int:
        """Number of experts."""
        return len(self.image_heads)

    def embed_image(self, x: torch.Tensor, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Routed image embedding ``sum_e weights[:, e] * image_head_e(x)``, (n, out_dim)."""
        return _mix(self.image_heads, x, weights)

    def embed_gene(self, y: torch.Tensor, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Routed expression embedding ``sum_e weights[:, e] * gene_head_e(y)``, (n, out_dim)."""
        return _mix(self.gene_heads, y, weights)

    def start_from(self, generalist: ExpertMixture, experts: Sequence[int] | None = None) -> None:
        """Copy the heads of a one-expert mixture into ``experts`` (default: every expert, and the CLIP logit scale)."""
        if generalist.n_experts != 1 or generalist.config["out_dim"] != self.config["out_dim"]:
            raise ValueError(
                f"Expected a one-expert mixture with out_dim {self.config['out_dim']}; found "
                f"{generalist.n_experts} experts with out_dim {generalist.config['out_dim']}."
            )
        with torch.no_grad():
            for e in range(self.n_experts) if experts is None else experts:
                self.image_heads[e].load_state_dict(generalist.image_heads[0].state_dict())
                self.gene_heads[e].load_state_dict(generalist.gene_heads[0].state_dict())
                if hasattr(self, "decoders") and hasattr(generalist, "decoders"):
                    self.decoders[e].load_state_dict(generalist.decoders[0].state_dict())
            if experts is None:
                self.logit_scale.copy_(generalist.logit_scale)

    def start_at_components(self, standardized: np.ndarray | Iterator[np.ndarray]) -> None:
        """Start every image head at the leading principal components of ``standardized`` features ``(n, image_dim)``.

        Each head's first linear layer becomes the projection onto the ``out_dim`` leading principal directions
        (centred on the features' mean; with fewer directions than ``out_dim``, the remaining rows keep their random
        initialization) and its second linear layer, the residual branch, is set to zero: the head's output starts
        as the layer-normalized principal coordinates.

        ``standardized`` is the rows, or an iterator over blocks of them: the directions then come from their
        covariance, one block in memory at a time (:func:`~spade_sd.model.subspace.principal_directions_of_blocks`).
        """
        image_dim = self.config["image_dim"]
        if isinstance(standardized, Iterator):
            blocks = (_checked_width(np.asarray(block, dtype=np.float32), image_dim) for block in standardized)
            mean, basis = principal_directions_of_blocks(blocks, self.config["out_dim"])
        else:
            standardized = _checked_width(np.asarray(standardized, dtype=np.float64), image_dim)
            mean, basis = principal_directions(standardized, min(self.config["out_dim"], *standardized.shape))
        rows = basis.shape[1]
        weight = torch.from_numpy(basis.T).float()
        bias = torch.from_numpy(-(basis.T @ mean)).float()
        with torch.no_grad():
            for head in self.image_heads:
                head.projection.weight[:rows] = weight
                head.projection.bias[:rows] = bias
                head.fc.weight.zero_()
                head.fc.bias.zero_()

    def reconstruction_error(self, x: torch.Tensor, image: torch.Tensor, expert: int) -> torch.Tensor:
        """Mean squared error of one expert's decoding of its image embeddings ``image`` back to the features ``x``."""
        return torch.nn.functional.mse_loss(self.decoders[expert](image), x)

    def expert_embeddings(self, x: torch.Tensor, y: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and expression embeddings of one expert's heads, each (n, out_dim)."""
        return self.image_heads[expert](x), self.gene_heads[expert](y)


def _checked_width(standardized: np.ndarray, image_dim: int) -> np.ndarray:
    if standardized.ndim != 2 or standardized.shape[1] != image_dim:
        raise ValueError(f"Expected standardized features of shape (n, {image_dim}); found {standardized.shape}.")
    return standardized


def _mix(heads: nn.ModuleList, inputs: torch.Tensor, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
    weights = torch.as_tensor(weights, dtype=inputs.dtype, device=inputs.device)
    if weights.shape != (inputs.shape[0], len(heads)):
        raise ValueError(
            f"Expected routing weights of shape ({inputs.shape[0]}, {len(heads)}); found {tuple(weights.shape)}."
        )
    out = inputs.new_zeros(inputs.shape[0], heads[0].layer_norm.normalized_shape[0])
    for e, head in enumerate(heads):
        # experts nobody is routed to (hard routing) are skipped; a dense sum stays deterministic on GPUs
        if bool(weights[:, e].any()):
            out = out + weights[:, e, None] * head(inputs)
    return out
