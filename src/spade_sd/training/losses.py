"""Contrastive losses between image and expression embeddings; under DDP the negatives come from every process."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spade_sd.config import LOSSES, SCORE_CHUNK, LossName, TrainingConfig

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


def chunked_contrastive_loss(
    image: torch.Tensor,
    gene: torch.Tensor,
    *,
    loss: LossName,
    temperature: float = TrainingConfig.temperature,
    logit_scale: torch.Tensor | None = None,
    chunk_size: int = SCORE_CHUNK,
) -> torch.Tensor:
    """:func:`contrastive_loss` of a whole (validation) set, ``chunk_size`` rows of the ``(n, n)`` logits at a time.

    Equal to :func:`contrastive_loss` up to float rounding, in memory that grows with ``n`` instead of ``n²``: the
    row-wise and column-wise log-sum-exps are accumulated block by block (the soft-target loss takes a second pass
    for its targets). Up to ``chunk_size`` spots it is :func:`contrastive_loss` itself. For scoring only: no
    gradient, and the set is this process's (nothing is gathered across processes).

    Parameters
    ----------
    image, gene
        Image and expression embeddings of the same spots, each (n, k).
    loss, temperature, logit_scale
        As in :func:`contrastive_loss`.
    chunk_size
        Rows of logits held at a time.

    Returns
    -------
    Scalar loss.
    """
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; choose one of {LOSSES}.")
    if loss == "clip" and logit_scale is None:
        raise ValueError("The CLIP loss needs `logit_scale`.")
    with torch.no_grad():
        if image.shape[0] <= chunk_size:
            return contrastive_loss(image, gene, loss=loss, temperature=temperature, logit_scale=logit_scale)
        if loss == "clip":
            return _chunked_clip(image, gene, logit_scale, chunk_size)
        return _chunked_soft_target(image, gene, temperature, chunk_size)


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _chunked_clip(image: torch.Tensor, gene: torch.Tensor, logit_scale: torch.Tensor, size: int) -> torch.Tensor:
    image, gene = F.normalize(image, dim=-1), F.normalize(gene, dim=-1)
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    rows = torch.empty(image.shape[0], dtype=image.dtype)
    columns = torch.full((image.shape[0],), -torch.inf, dtype=image.dtype)
    for block in _blocks(image.shape[0], size):
        logits = scale * gene[block] @ image.T
        rows[block] = torch.logsumexp(logits, dim=1)
        columns = torch.logaddexp(columns, torch.logsumexp(logits, dim=0))
    # the matching pairs' logits, the diagonal the cross-entropies' labels point at
    diagonal = scale * (gene * image).sum(dim=1)
    return ((rows - diagonal).mean() + (columns - diagonal).mean()) / 2


def _chunked_soft_target(image: torch.Tensor, gene: torch.Tensor, temperature: float, size: int) -> torch.Tensor:
    n = image.shape[0]
    blocks = _blocks(n, size)

    def logits_and_similarity(block: slice) -> tuple[torch.Tensor, torch.Tensor]:
        similarity = (image[block] @ image.T + gene[block] @ gene.T) / 2 * temperature
        return gene[block] @ image.T / temperature, similarity

    rows, targets_norm = torch.empty(n, dtype=image.dtype), torch.empty(n, dtype=image.dtype)
    columns = torch.full((n,), -torch.inf, dtype=image.dtype)
    for block in blocks:  # first pass: the log-sum-exps of the logits' rows and columns and of the targets' rows
        logits, similarity = logits_and_similarity(block)
        rows[block] = torch.logsumexp(logits, dim=1)
        columns = torch.logaddexp(columns, torch.logsumexp(logits, dim=0))
        targets_norm[block] = torch.logsumexp(similarity, dim=1)
    by_rows, by_columns = 0.0, 0.0
    for block in blocks:  # second pass: soft targets times the row-wise and column-wise log-softmax
        logits, similarity = logits_and_similarity(block)
        targets = torch.exp(similarity - targets_norm[block, None])
        by_rows -= float((targets * (logits - rows[block, None])).sum(dtype=torch.float64))
        by_columns -= float((targets * (logits - columns[None, :])).sum(dtype=torch.float64))
    return torch.tensor((by_rows / n + by_columns / n) / 2, dtype=image.dtype)
