"""Contrastive losses between image and expression embeddings; under DDP the negatives come from every process."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spade_sd.config import LOSSES, LossName, TrainingConfig

MAX_LOGIT_SCALE = 100.0


def soft_target_loss(
    image: torch.Tensor, gene: torch.Tensor, temperature: float = TrainingConfig.temperature
) -> torch.Tensor:
    """SPADE/BLEEP symmetric contrastive loss with soft targets.

    ``logits = G Iᵀ / T``; ``targets = softmax((I Iᵀ + G Gᵀ) / 2 · T)``; the loss is the mean of the row-wise
    and column-wise cross-entropies. As upstream, the targets are not detached.

    Parameters
    ----------
    image
        Image embeddings, (n, k).
    gene
        Expression embeddings of the same spots, (n, k).
    temperature
        ``T`` (fixed, 1 upstream).

    Returns
    -------
    Scalar loss.
    """
    logits = gene @ image.T / temperature
    targets = F.softmax((image @ image.T + gene @ gene.T) / 2 * temperature, dim=-1)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2


def clip_loss(image: torch.Tensor, gene: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on L2-normalized embeddings.

    Parameters
    ----------
    image, gene
        Image and expression embeddings of the same spots, each (n, k).
    logit_scale
        Log of the inverse temperature; the scale is clamped at 100 as in CLIP.

    Returns
    -------
    Scalar loss.
    """
    image, gene = F.normalize(image, dim=-1), F.normalize(gene, dim=-1)
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * gene @ image.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # every process computed the same global loss from these rows, so their gradients add up
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_across_processes(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping the gradient; ``x`` itself outside DDP.

    Every process then computes the loss of the global batch. The gather's backward sums the gradients of all
    processes' (identical) losses, so after DDP averages the parameter gradients over processes they equal the
    gradients of one process training on the whole batch. All processes must pass the same number of rows.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def contrastive_loss(
    image: torch.Tensor,
    gene: torch.Tensor,
    *,
    loss: LossName,
    temperature: float = TrainingConfig.temperature,
    logit_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contrastive loss of a batch, with the negatives of every process under DDP.

    Parameters
    ----------
    image
        This process's image embeddings, (n, k).
    gene
        This process's expression embeddings of the same spots, (n, k).
    loss
        ``"soft_target"`` (:func:`soft_target_loss`) or ``"clip"`` (:func:`clip_loss`).
    temperature
        ``T`` of the soft-target loss.
    logit_scale
        Learnable log inverse temperature of the CLIP loss.

    Returns
    -------
    Scalar loss of the global batch.
    """
    image, gene = gather_across_processes(image), gather_across_processes(gene)
    if loss == "soft_target":
        return soft_target_loss(image, gene, temperature)
    if loss == "clip":
        if logit_scale is None:
            raise ValueError("The CLIP loss needs `logit_scale`.")
        return clip_loss(image, gene, logit_scale)
    raise ValueError(f"Unknown loss {loss!r}; choose one of {LOSSES}.")
