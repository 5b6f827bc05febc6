"""Training SEAL with Lightning: LoRA adapters of the backbone's suffix and SEAL's heads, from cached prefixes.

Each step runs only the adapted suffix of the backbone on the cached activations entering its first adapted block
(:class:`~spade_sd.encoders.finetuned.PrefixEncoder`), then the losses of Hemker et al.: CLIP InfoNCE between the
image projection and the VAE's ``μ`` (fixed temperature, negatives gathered across processes), the VAE's gene
reconstruction and KL term, and the image → gene reconstruction. BatchNorm layers stay in eval mode (their running
statistics would otherwise drift to the training slides); only the adapters' dropout follows the training mode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch.utils.data import DataLoader, Dataset

from spade_sd.config import SealConfig, check_trainer_kwargs
from spade_sd.encoders.finetuned import FineTunedBackbone
from spade_sd.model.seal_heads import SealHeads
from spade_sd.training.data import FAULT_AROUND_BYTES, ExpressionRows, PageBudget, ZScoredRows, validation_mask
from spade_sd.training.lightning_loop import (
    HISTORY,
    BestWeights,
    fit_trainer,
    lightning_quiet,
    lightning_verbose,
    quiet_trainer_options,
    torch_flags_restored,
    torch_threads,
    warmup_cosine,
)
from spade_sd.training.losses import contrastive_loss
from spade_sd.utils.logging import logger

# Floor of a gene's standard deviation when z-scoring (constant genes become zeros)
MIN_GENE_STD = 1e-3


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, mse_weight: float) -> torch.Tensor:
    """``(1 − mean per-gene Pearson r over the batch) + mse_weight × MSE`` on z-scored genes."""
    p = prediction - prediction.mean(0)
    t = target - target.mean(0)
    r = (p * t).sum(0) / (p.norm(dim=0) * t.norm(dim=0)).clamp(min=1e-8)
    return (1 - r.mean()) + mse_weight * torch.nn.functional.mse_loss(prediction, target)


class PrefixRows(Dataset):
    """Spots as ``(prefix activations, z-scored expression)`` rows over per-slide (memory-mapped) arrays.

    Parameters
    ----------
    sources
        One array per slide, ``(n_spots, *prefix_shape)``; memory maps are read only where rows are asked for.
    expression
        Every spot's z-scored expression ``(total spots, n_genes)``, slides in the same order: a float32 array, or
        :class:`~spade_sd.training.data.ZScoredRows` standardizing the rows as they are read.
    rows
        The global rows (over all slides, in order) this dataset serves.
    """

    def __init__(self, sources: Sequence[Any], expression: np.ndarray | ZScoredRows, rows: np.ndarray) -> None:
        self.sources, self.expression, self.rows = list(sources), expression, np.asarray(rows)
        self.offsets = np.cumsum([0, *(len(source) for source in self.sources)])
        # memory-mapped prefixes release the pages a batch maps, so the resident memory stays bounded over an epoch
        self._pages = PageBudget(self.sources)
        self._row_bytes = [
            source.itemsize * math.prod(source.shape[1:]) if isinstance(source, np.ndarray) else 0
            for source in self.sources
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[np.asarray(indices)]
        slide = np.searchsorted(self.offsets, rows, side="right") - 1
        batch = None
        for s in np.unique(slide):
            at = np.flatnonzero(slide == s)
            read = self.read(self.sources[s], rows[at] - self.offsets[s])
            self._pages.read(len(at) * max(self._row_bytes[s], FAULT_AROUND_BYTES))  # each a scattered row
            if batch is None:
                batch = np.empty((len(rows), *read.shape[1:]), dtype=read.dtype)
            batch[at] = read
        return torch.from_numpy(batch), torch.from_numpy(self.expression[rows])

    @staticmethod
    def read(source: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The prefix activations of ``rows`` of one slide, as float32."""
        return np.asarray(source[rows], dtype=np.float32)


class PatchRows(PrefixRows):
    """Spots as ``(uint8 patches, z-scored expression)`` rows, patches read lazily from each slide's image.

    Used when the patches are augmented at every step, so that no prefix can be cached. ``sources`` holds one
    :class:`~spade_sd.spots.patches.SpotPatches` per slide; otherwise as :class:`PrefixRows`.
    """

    @staticmethod
    def read(source: Any, rows: np.ndarray) -> np.ndarray:
        """The uint8 patches of ``rows`` of one slide."""
        return source.read(rows)


def random_dihedral(patches: torch.Tensor) -> torch.Tensor:
    """Each ``(batch, 3, height, width)`` image flipped and rotated by a random multiple of 90° (torch's RNG)."""
    turns = torch.randint(0, 4, (len(patches),)).tolist()
    flips = torch.randint(0, 2, (len(patches),)).tolist()
    out = [torch.rot90(x.flip(-1) if f else x, k, dims=(-2, -1)) for x, k, f in zip(patches, turns, flips, strict=True)]
    return torch.stack(out)


def _as_batch(batch: Any) -> Any:
    return batch


class SealModule(L.LightningModule):
    """The adapted suffix of a fine-tuned backbone and SEAL's heads, trained together.

    Parameters
    ----------
    backbone
        The fine-tuned backbone; its adapters are the trained image-side parameters (shared, trained in place).
    heads
        SEAL's heads.
    config
        Loss weights, temperature and optimiser settings.
    """

    def __init__(self, backbone: FineTunedBackbone, heads: SealHeads, config: SealConfig) -> None:
        super().__init__()
        self.split = backbone.split
        self.heads = heads
        self.config = config
        self.register_buffer("logit_scale", torch.tensor(math.log(1 / config.temperature)), persistent=False)
        if config.augment:  # patches come in: the whole backbone runs (and moves with this module)
            self.backbone = backbone.module
            self.input_size = backbone.input_size
            self.register_buffer("shift", torch.tensor(backbone.mean).view(1, 3, 1, 1) * 255, persistent=False)
            self.register_buffer("scale", torch.tensor(backbone.std).view(1, 3, 1, 1) * 255, persistent=False)

    def prefix_input(self, batch: torch.Tensor) -> torch.Tensor:
        """The first adapted block's input: ``batch`` itself when prefixes are cached, else from uint8 patches.

        With ``augment``, every training patch is flipped and rotated at random, resized and normalised like the
        backbone's input, and passed through the frozen prefix (no gradients).
        """
        if not self.config.augment:
            return batch
        x = batch.permute(0, 3, 1, 2).float()
        if self.training:
            x = random_dihedral(x)
        if x.shape[-2:] != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            return self.split.prefix((x - self.shift) / self.scale)

    def train(self, mode: bool = True) -> SealModule:
        """Training mode for the heads and the adapters' dropout; every other backbone layer stays in eval mode."""
        super().train(mode)
        self.split.eval()
        if self.config.augment:
            self.backbone.eval()
        for name, layer in self.split.named_modules():
            if "lora_dropout" in name:
                layer.train(mode)
        return self

    def losses(self, h: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every loss term of a batch: prefix activations (or patches, see :meth:`prefix_input`) and expression.

        ``h`` is the batch's image input, ``y`` its z-scored panel expression.
        """
        config, heads = self.config, self.heads
        image = heads.embed_image(self.split.suffix(self.prefix_input(h)))
        mu, logvar = heads.encode_genes(y)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        parts = {
            "contrastive": contrastive_loss(image, mu, loss="clip", logit_scale=self.logit_scale),
            "gene": reconstruction_loss(heads.gene_decoder(z), y, config.mse_weight),
            "image_gene": reconstruction_loss(heads.image_decoder(image), y, config.mse_weight),
            "kl": -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean(),
        }
        weights = {
            "contrastive": config.contrastive_weight,
            "gene": config.gene_weight,
            "image_gene": config.image_gene_weight,
            "kl": config.kl_weight,
        }
        parts["loss"] = sum(weights[k] * parts[k] for k in weights)
        # what depends on the image: the gene VAE's own reconstruction says nothing of what the backbone learnt, and
        # it overfits the few training spots first
        parts["image_loss"] = sum(weights[k] * parts[k] for k in ("contrastive", "image_gene"))
        return parts

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Weighted sum of the losses of one batch (logged: every term, and as ``train_loss`` the image terms)."""
        parts = self.losses(*batch)
        for key, value in parts.items():
            name = {"loss": "train_total_loss", "image_loss": "train_loss"}.get(key, f"train_{key}")
            self.log(name, value, on_step=False, on_epoch=True, batch_size=len(batch[0]), sync_dist=True)
        return parts["loss"]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Losses of one validation batch (``μ`` in place of a sample, no dropout); ``val_loss`` is the image terms."""
        parts = self.losses(*batch)
        for key, value in parts.items():
            name = {"loss": "val_total_loss", "image_loss": "val_loss"}.get(key, f"val_{key}")
            self.log(name, value, on_epoch=True, batch_size=len(batch[0]), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the adapters and the heads, cosine decay per step."""
        trained = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=self.config.lr, weight_decay=self.config.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(0, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def zscore_stats(expression: np.ndarray | ExpressionRows) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation (floored at ``MIN_GENE_STD``) of the training spots."""
    if isinstance(expression, ExpressionRows):
        mean, std = expression.column_mean_std()
    else:
        mean, std = expression.mean(0, dtype=np.float64), expression.std(0, dtype=np.float64)
    return mean.astype(np.float32), np.maximum(std, MIN_GENE_STD).astype(np.float32)


def default_precision() -> str:
    """``"bf16-mixed"`` where bfloat16 is fast (a CUDA GPU that supports it, a CPU with AVX512-BF16/AMX), else 32."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def _trainer(
    config: SealConfig, *, monitor: str, has_validation: bool, quiet: bool, **trainer_kwargs: Any
) -> L.Trainer:
    early = EarlyStopping(
        monitor=monitor, patience=config.patience, mode="min", check_on_train_epoch_end=not has_validation
    )
    options = {
        "deterministic": True,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        **({} if has_validation else {"limit_val_batches": 0}),
        "max_epochs": config.max_epochs,
        "precision": default_precision(),
        **trainer_kwargs,
        **quiet_trainer_options(quiet, "Fine-tuning (SEAL)", trainer_kwargs),
    }
    callbacks = [early, BestWeights(monitor), *options.pop("callbacks")]
    return L.Trainer(callbacks=callbacks, **options)


def _loaders(
    sources: Sequence[Any], expression: np.ndarray | ZScoredRows, val_mask: np.ndarray, config: SealConfig
) -> tuple[DataLoader, DataLoader | None]:
    rows = PatchRows if config.augment else PrefixRows
    train_rows, val_rows = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    generator = torch.Generator().manual_seed(config.seed)
    drop_last = len(train_rows) > config.batch_size  # a last batch of a few spots has few negatives
    train = DataLoader(
        rows(sources, expression, train_rows),
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=drop_last,
        generator=generator,
        collate_fn=_as_batch,
    )
    if not len(val_rows):
        return train, None
    val = DataLoader(rows(sources, expression, val_rows), batch_size=config.batch_size, collate_fn=_as_batch)
    return train, val


def train_seal(
    backbone: FineTunedBackbone,
    sources: Sequence[Any],
    expression: np.ndarray | ZScoredRows,
    slide: np.ndarray,
    *,
    config: SealConfig,
    coords: np.ndarray | None = None,
    quiet: bool = True,
    trainer_kwargs: dict[str, Any] | None = None,
) -> tuple[SealHeads, dict[str, Any]]:
    """Train the backbone's adapters (in place) and SEAL's heads on cached prefixes (or patches) and expression.

    Parameters
    ----------
    backbone
        The fine-tuned backbone, adapters as initialised.
    sources
        Per slide, the prefix activations of its spots ``(n_spots, *prefix_shape)`` (memory maps welcome); with
        ``config.augment``, its :class:`~spade_sd.spots.patches.SpotPatches` instead.
    expression
        Z-scored panel expression of every spot, slides in order ``(total spots, n_genes)``: an array, or
        :class:`~spade_sd.training.data.ZScoredRows` (sparse expression standardized a batch at a time).
    slide
        Slide name of every spot.
    config
        The SEAL configuration.
    coords
        Spot coordinates, for a validation block when there are few slides (see
        :func:`~spade_sd.training.data.split_by_slide`).
    quiet
        No epoch progress bar, and no Lightning output even at debug verbosity.
    trainer_kwargs
        Passed to :class:`lightning.pytorch.Trainer` (``accelerator``, ``devices``, ``strategy``, ``precision``...).

    Returns
    -------
    The trained heads (on the CPU, eval mode) and the training history.
    """
    trainer_kwargs = check_trainer_kwargs(trainer_kwargs or {})
    val_mask = validation_mask(slide, config, coords)
    monitor = "val_loss" if val_mask.any() else "train_loss"
    start = time.perf_counter()
    with lightning_quiet(quiet), torch_flags_restored(), torch_threads(config.train_threads):
        L.seed_everything(config.seed, workers=True, verbose=lightning_verbose(quiet))
        heads = SealHeads(backbone.dim, expression.shape[1], config.embed_dim)
        module = SealModule(backbone, heads, config)
        train, val = _loaders(sources, expression, val_mask, config)
        trainer = _trainer(config, monitor=monitor, has_validation=val is not None, quiet=quiet, **trainer_kwargs)
        try:
            fit_trainer(trainer, module, train_dataloaders=train, val_dataloaders=val)
        finally:
            backbone.module.to(backbone.device).eval()
    metrics = trainer.callback_metrics
    history = {
        "epochs": len(metrics[HISTORY + "train_loss"]),
        "monitor": monitor,
        "best_epoch": int(metrics[HISTORY + "best_epoch"]),
        "best_loss": float(metrics[HISTORY + "best_loss"]),
        "train_loss": metrics[HISTORY + "train_loss"].tolist(),
        "val_loss": metrics[HISTORY + "val_loss"].tolist(),
        "val_slides": np.unique(slide[val_mask]).tolist(),
        "train_spots": int((~val_mask).sum()),
        "val_spots": int(val_mask.sum()),
        "precision": str(trainer.precision),
        "seconds": time.perf_counter() - start,
    }
    logger.info(
        "SEAL: trained %d epochs in %.1f s; best %s %.4f at epoch %d",
        history["epochs"],
        history["seconds"],
        monitor,
        history["best_loss"],
        history["best_epoch"],
    )
    return heads.cpu().eval(), history
