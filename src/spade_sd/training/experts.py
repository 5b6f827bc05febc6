"""Training the data experts with Lightning (the heads and mixture are in :mod:`spade_sd.model.heads`).

Every expert is a pair of projection heads (image, gene) trained only on its own spots, so each batch holds
spots of a single expert and its negatives are morphologically similar. All experts train in one run: batches of
different experts are interleaved, and each step updates only that batch's expert.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.strategies import DDPStrategy

from spade_sd.config import FIT_SPOTS, SELECTION_SPOTS, LossName, TrainingConfig, check_trainer_kwargs
from spade_sd.model.clustering import sample_rows
from spade_sd.model.heads import ExpertMixture
from spade_sd.model.reference import stratified_sample
from spade_sd.training.data import (
    BLOCK_ROWS,
    ExpertDataModule,
    ExpressionRows,
    StandardizedRows,
    drawn_blocks,
    validation_mask,
)
from spade_sd.training.lightning_loop import (
    HISTORY,
    BestWeights,
    fit_trainer,
    lightning_quiet,
    lightning_verbose,
    quiet_trainer_options,
    torch_flags_restored,
    warmup_cosine,
)
from spade_sd.training.losses import chunked_contrastive_loss, contrastive_loss
from spade_sd.utils.logging import logger


class ExpertsModule(L.LightningModule):
    """Trains every expert of an :class:`ExpertMixture`; each batch updates the heads of its own expert.

    Parameters
    ----------
    mixture
        The heads to train.
    config
        The loss (``loss``, ``temperature``) and optimizer (``lr``, ``weight_decay``, ``warmup_steps``) to train
        them with.
    """

    def __init__(self, mixture: ExpertMixture, config: TrainingConfig) -> None:
        super().__init__()
        self.mixture = mixture
        self.config = config

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y, expert = batch
        image, gene = self.mixture.expert_embeddings(x, y, int(expert[0]))
        loss = contrastive_loss(
            image,
            gene,
            loss=self.config.loss,
            temperature=self.config.temperature,
            logit_scale=self.mixture.logit_scale,
        )
        if self.config.reconstruction > 0:
            loss = loss + self.config.reconstruction * self.mixture.reconstruction_error(x, image, int(expert[0]))
        return loss

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """Contrastive loss of one single-expert batch."""
        loss = self._loss(batch)
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch[0]), sync_dist=True
        )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """Contrastive loss of one validation batch."""
        self.log("val_loss", self._loss(batch), on_epoch=True, prog_bar=True, batch_size=len(batch[0]), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW and a per-step schedule: linear warm-up, then cosine decay to zero."""
        decayed = [p for name, p in self.mixture.named_parameters() if name != "logit_scale"]
        # decaying the log inverse temperature would pull the CLIP temperature towards 1
        groups = [
            {"params": decayed, "weight_decay": self.config.weight_decay},
            {"params": [self.mixture.logit_scale], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.config.lr)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.config.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train_experts(
    X_std: np.ndarray | StandardizedRows,
    Y: np.ndarray | ExpressionRows,
    expert_idx: np.ndarray,
    slide: np.ndarray,
    *,
    n_experts: int,
    config: TrainingConfig,
    coords: np.ndarray | None = None,
    init: ExpertMixture | None = None,
    quiet: bool = False,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> tuple[ExpertMixture, dict[str, Any]]:
    """Train the image and gene heads of every expert contrastively, in one Lightning run.

    Validation holds out whole slides (:func:`split_by_slide`); training stops early when the monitored loss
    has not improved for ``config.patience`` epochs, and the weights of the best epoch are returned. Training is
    deterministic: the same inputs and ``config.seed`` give the same heads.

    Parameters
    ----------
    X_std
        Standardized image features, (n_spots, d): an array, or :class:`~spade_sd.training.data.StandardizedRows`
        read batch by batch (then the backbone start, ``head_init="backbone"``, is fitted on a seeded draw of
        :data:`~spade_sd.config.FIT_SPOTS` training spots).
    Y
        Log-normalized expression, (n_spots, n_genes): an array, or with ``X_std`` read batch by batch, also
        :class:`~spade_sd.training.data.ExpressionRows` (held sparse, read batch by batch).
    expert_idx
        Expert of each spot, in ``0 .. n_experts - 1``.
    slide
        Slide (or patient) of each spot, for the validation split.
    n_experts
        Number of experts.
    config
        The heads (``out_dim``, ``dropout``), loss, optimizer, batches, stopping, validation split and seed; the
        learning rate is ``config.lr`` as given (the caller scales it for warm-started experts).
    coords
        Spot coordinates, used for validation blocks when there are few slides (see :func:`split_by_slide`).
    init
        A trained one-expert mixture (the generalist) whose heads start every expert; after training, experts get
        its heads back, one at a time, where that does not raise the contrastive loss of the whole validation set
        (``history["experts_from_generalist"]``; of a seeded draw of :data:`~spade_sd.config.SELECTION_SPOTS`
        validation spots, per expert in proportion to its spots, when there are more).
    quiet
        No epoch progress bar, and no Lightning output even at debug verbosity.
    trainer_kwargs
        :class:`lightning.pytorch.Trainer` arguments only (``accelerator``, ``devices``, ``num_nodes``,
        ``strategy``, ...; ``callbacks`` are added to ours; ``logger`` defaults to none, so nothing is written to
        disk); a training option among them is refused (:func:`~spade_sd.config.check_trainer_kwargs`). DDP
        strategies are told that some parameters get no gradient in a step (each step trains one expert).

    Returns
    -------
    The trained mixture (on CPU, in eval mode) and a history dict: ``epochs`` run, ``monitor``, ``best_epoch``,
    ``best_loss``, ``best_val_loss`` (``None`` without validation), per-epoch ``train_loss`` and ``val_loss``,
    ``val_slides``, ``train_spots_per_expert``, ``val_spots_per_expert`` and ``untrained_experts`` (experts with
    fewer than 2 training spots, whose heads keep their random initialization).
    """
    trainer_kwargs = check_trainer_kwargs(trainer_kwargs or {})
    X_std, Y, expert_idx, slide = _validated(X_std, Y, expert_idx, slide, n_experts)
    val_mask = validation_mask(slide, config, coords)
    train_counts = np.bincount(expert_idx[~val_mask], minlength=n_experts)
    untrained = np.flatnonzero(train_counts < 2).tolist()
    if untrained:
        logger.warning("Experts %s have fewer than 2 training spots; their heads stay untrained.", untrained)
    monitor = "val_loss" if val_mask.any() else "train_loss"
    logger.info(
        "Training %d experts on %d spots (validation: %d spots), loss=%s",
        n_experts,
        int((~val_mask).sum()),
        int(val_mask.sum()),
        config.loss,
    )
    start = time.perf_counter()
    with lightning_quiet(quiet), torch_flags_restored():
        L.seed_everything(config.seed, workers=True, verbose=lightning_verbose(quiet))
        mixture = ExpertMixture(
            n_experts,
            X_std.shape[1],
            Y.shape[1],
            out_dim=config.out_dim,
            dropout=config.dropout,
            decoder=config.reconstruction > 0,
        )
        if init is not None:
            mixture.start_from(init)
        elif config.head_init == "backbone":
            mixture.start_at_components(_training_rows(X_std, val_mask, config.seed))
        module = ExpertsModule(mixture, config)
        data = ExpertDataModule(X_std, Y, expert_idx, val_mask, batch_size=config.batch_size, seed=config.seed)
        trainer = _trainer(config, monitor=monitor, has_validation=bool(val_mask.any()), quiet=quiet, **trainer_kwargs)
        fit_trainer(trainer, module, datamodule=data)
    history = _history(trainer, monitor, slide, val_mask, expert_idx, n_experts, untrained)
    if init is not None:
        scored = _selection_rows(val_mask, expert_idx, config.seed)
        history["experts_from_generalist"] = _keep_generalist_where_better(
            module.mixture.cpu().eval(),
            init,
            X_std[scored],
            Y[scored],
            expert_idx[scored],
            config.loss,
            config.temperature,
        )
    logger.info(
        "Trained %d experts for %d epochs in %.1f s; best %s %.4f at epoch %d",
        n_experts,
        history["epochs"],
        time.perf_counter() - start,
        monitor,
        history["best_loss"],
        history["best_epoch"],
    )
    return module.mixture.cpu().eval(), history


def _training_rows(
    X_std: np.ndarray | StandardizedRows, val_mask: np.ndarray, seed: int
) -> np.ndarray | Iterator[np.ndarray]:
    """The training spots' features the backbone start is fitted on.

    In memory, all of them; read on demand, a seeded draw of them, read a block of rows at a time.
    """
    if isinstance(X_std, np.ndarray):
        return X_std[~val_mask]
    training = np.flatnonzero(~val_mask)
    return drawn_blocks(X_std, training[sample_rows(len(training), FIT_SPOTS, seed)], BLOCK_ROWS)


def _selection_rows(val_mask: np.ndarray, expert_idx: np.ndarray, seed: int) -> np.ndarray:
    """The validation spots that choose which experts keep the generalist's heads (a bounded per-expert draw)."""
    rows = np.flatnonzero(val_mask)
    if len(rows) <= SELECTION_SPOTS:
        return rows
    logger.info("Scoring the experts against the generalist on %d of %d validation spots", SELECTION_SPOTS, len(rows))
    return rows[stratified_sample(expert_idx[rows], SELECTION_SPOTS, seed)]


def _keep_generalist_where_better(
    mixture: ExpertMixture,
    generalist: ExpertMixture,
    X_val: np.ndarray,
    Y_val: np.ndarray,
    expert_val: np.ndarray,
    loss: LossName,
    temperature: float,
) -> list[int]:
    """Give experts back the generalist's heads, one at a time, where that does not raise the validation loss.

    The loss is that of the whole validation set (:func:`~spade_sd.training.losses.chunked_contrastive_loss`, so
    memory grows with the spots, not their pairs), every spot embedded by its own expert's heads (or the
    generalist's, for experts given back), so the negatives come from all experts, as they do when embeddings of
    different experts are compared. Experts are tried in order and a reset is kept when the loss does not rise.
    An expert then departs from the generalist it started from only where that helped on held-out spots, so on
    little data the mixture falls back to the single expert. Returns the experts reset.
    """
    if len(X_val) < 2:
        return []
    mixture, generalist = mixture.cpu().eval(), generalist.cpu().eval()
    x, y = torch.from_numpy(X_val), torch.from_numpy(Y_val)
    options = {"loss": loss, "temperature": temperature, "logit_scale": generalist.logit_scale}
    with torch.inference_mode():
        shared = generalist.expert_embeddings(x, y, 0)
        own = {}  # each expert's embeddings of its own spots only: one expert's of every spot in memory at a time
        for e in np.unique(expert_val).tolist():
            rows = torch.from_numpy(expert_val == e)
            own[e] = (rows, *(embedding[rows] for embedding in mixture.expert_embeddings(x, y, e)))

        def validation_loss(reset: set[int]) -> float:
            image, gene = shared[0].clone(), shared[1].clone()
            for e, (rows, own_image, own_gene) in own.items():
                if e not in reset:
                    image[rows], gene[rows] = own_image, own_gene
            return float(chunked_contrastive_loss(image, gene, **options))

        reset: set[int] = set()
        best = validation_loss(reset)
        for e in own:
            trial = validation_loss(reset | {e})
            if trial <= best:
                reset.add(e)
                best = trial
    mixture.start_from(generalist, sorted(reset))
    if reset:
        logger.info(
            "Experts %s keep the generalist's heads: the validation loss does not rise with them", sorted(reset)
        )
    return sorted(reset)


def _validated(
    X: np.ndarray | StandardizedRows,
    Y: np.ndarray | ExpressionRows,
    expert_idx: np.ndarray,
    slide: np.ndarray,
    n_experts: int,
) -> tuple[np.ndarray | StandardizedRows, np.ndarray | ExpressionRows, np.ndarray, np.ndarray]:
    # rows read on demand were checked finite when their standardization was fitted on every one of them
    streamed = isinstance(X, StandardizedRows)
    X = X if streamed else np.asarray(X, dtype=np.float32)
    if isinstance(Y, ExpressionRows) and not streamed:
        raise ValueError("Expression held sparse (ExpressionRows) needs features read on demand (StandardizedRows).")
    Y = Y if isinstance(Y, ExpressionRows) else np.asarray(Y, dtype=np.float32)
    expert_idx, slide = np.asarray(expert_idx, dtype=np.int64), np.asarray(slide)
    n = X.shape[0]
    if X.ndim != 2 or Y.ndim != 2 or Y.shape[0] != n or expert_idx.shape != (n,) or slide.shape != (n,):
        raise ValueError(
            f"Expected X (n, d), Y (n, n_genes), expert_idx (n,) and slide (n,); found {X.shape}, {Y.shape}, "
            f"{expert_idx.shape} and {slide.shape}."
        )
    if n and (expert_idx.min() < 0 or expert_idx.max() >= n_experts):
        raise ValueError(f"expert_idx must lie in 0..{n_experts - 1}; found {expert_idx.min()}..{expert_idx.max()}.")
    y_finite = Y.is_finite() if isinstance(Y, ExpressionRows) else np.isfinite(Y).all()
    if not ((streamed or np.isfinite(X).all()) and y_finite):
        raise ValueError("X and Y must be finite; found NaN or infinite values.")
    return X, Y, expert_idx, slide


def _trainer(
    config: TrainingConfig, *, monitor: str, has_validation: bool, quiet: bool, **trainer_kwargs: Any
) -> L.Trainer:
    early_stopping = EarlyStopping(
        monitor=monitor, patience=config.patience, mode="min", check_on_train_epoch_end=not has_validation
    )
    options = {
        "deterministic": True,
        "enable_checkpointing": False,  # the best weights are kept in memory: nothing is written to disk
        "num_sanity_val_steps": 0,
        **({} if has_validation else {"limit_val_batches": 0}),
        "max_epochs": config.max_epochs,
        **trainer_kwargs,
        **quiet_trainer_options(quiet, "Training experts", trainer_kwargs),
        "use_distributed_sampler": False,  # ExpertBatchSampler shards the single-expert batches itself
    }
    callbacks = [early_stopping, BestWeights(monitor), *options.pop("callbacks")]
    trainer = L.Trainer(callbacks=callbacks, **options)
    # each step trains one expert, so DDP must not wait for the other experts' gradients; setting it on the
    # strategy covers strings ("ddp", "ddp_spawn"), strategy objects and what "auto" resolves to alike
    if isinstance(trainer.strategy, DDPStrategy):
        trainer.strategy._ddp_kwargs["find_unused_parameters"] = True
    return trainer


def _history(
    trainer: L.Trainer,
    monitor: str,
    slide: np.ndarray,
    val_mask: np.ndarray,
    expert_idx: np.ndarray,
    n_experts: int,
    untrained: list[int],
) -> dict[str, Any]:
    metrics = trainer.callback_metrics
    curves = {key: metrics[HISTORY + key].tolist() for key in ("train_loss", "val_loss")}
    best_loss = float(metrics[HISTORY + "best_loss"])
    return {
        "epochs": len(curves["train_loss"]),
        "monitor": monitor,
        "best_epoch": int(metrics[HISTORY + "best_epoch"]),
        "best_loss": best_loss,
        "best_val_loss": best_loss if monitor == "val_loss" else None,
        **curves,
        "val_slides": np.unique(slide[val_mask]).tolist(),
        "train_spots_per_expert": np.bincount(expert_idx[~val_mask], minlength=n_experts).tolist(),
        "val_spots_per_expert": np.bincount(expert_idx[val_mask], minlength=n_experts).tolist(),
        "untrained_experts": untrained,
    }
