"""Pieces every Lightning training loop of the package shares: schedule, best weights, quiet runs, torch flags.

Lightning speaks for itself by default (seed lines, accelerator lines, tips for its cloud services, deprecation
warnings, a model summary, its own progress bar); within spade_sd's calls it is silent unless
``sd.settings.verbosity`` is debug, and an epoch bar of ours (:class:`EpochProgress`) follows
``sd.settings.progress``, so what the user sees is spade_sd's own start and finish lines.
"""

from __future__ import annotations

import difflib
import gc
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch

from spade_sd.utils.logging import progress_bar
from spade_sd.utils.settings import settings

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
HISTORY = "history/"


def check_trainer_arguments(trainer_kwargs: Mapping[str, Any], *, caller: str, keywords: Collection[str] = ()) -> None:
    """Refuse, before any work, a keyword that neither the caller nor :class:`lightning.pytorch.Trainer` takes.

    Lightning itself would refuse it only when the Trainer is built, after every patch was encoded.

    Parameters
    ----------
    trainer_kwargs
        The keywords the caller did not take, meant for the Trainer.
    caller
        The public function, named in the message (e.g. ``"pretrain"``).
    keywords
        The caller's own keywords, suggested with the Trainer's arguments when a name is close to one of them.

    Raises
    ------
    TypeError
        Naming the keyword, and the closest keyword or Trainer argument if one is close.
    """
    accepted = [name for name in inspect.signature(L.Trainer.__init__).parameters if name != "self"]
    for name in trainer_kwargs:
        if name in accepted:
            continue
        close = difflib.get_close_matches(name, [*keywords, *accepted], n=1)
        hint = f"Did you mean {close[0]}=?" if close else f"lightning.Trainer's arguments are {accepted}."
        raise TypeError(
            f"{caller}() got an unexpected keyword argument {name!r}: it is neither one of its own keywords nor an "
            f"argument of lightning.Trainer, where the other keywords go. {hint}"
        )


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Per-step learning-rate factor: linear warm-up over ``warmup_steps``, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class BestWeights(L.Callback):
    """Keeps the weights of the best epoch in memory, restores them at the end, and records the loss curves.

    The curves travel back in ``trainer.callback_metrics``, the channel Lightning also uses to return results
    from spawned processes.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.best, self.best_epoch = math.inf, -1
        self.state: dict[str, torch.Tensor] | None = None
        self.curves: dict[str, list[float]] = {"train_loss": [], "val_loss": []}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the validation loss (and the weights, if best)."""
        if not trainer.sanity_checking:
            self._record(trainer, pl_module, "val_loss")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the training loss (and the weights, if best and monitored)."""
        self._record(trainer, pl_module, "train_loss")

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, key: str) -> None:
        if key not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[key])
        self.curves[key].append(value)
        if key == self.monitor and value < self.best:
            self.best, self.best_epoch = value, trainer.current_epoch
            self.state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restore the best weights and publish the curves under ``HISTORY``."""
        if self.state is not None:
            pl_module.load_state_dict(self.state)
        for key, curve in self.curves.items():
            trainer.callback_metrics[HISTORY + key] = torch.tensor(curve, dtype=torch.float64)
        trainer.callback_metrics[HISTORY + "best_epoch"] = torch.tensor(self.best_epoch)
        trainer.callback_metrics[HISTORY + "best_loss"] = torch.tensor(self.best, dtype=torch.float64)


def lightning_verbose(quiet: bool = False) -> bool:
    """Whether Lightning's own messages and model summary are shown: at debug verbosity, in a call not ``quiet``."""
    return not quiet and settings.verbosity <= logging.DEBUG


class EpochProgress(L.Callback):
    """A progress bar over training epochs, with the latest losses (:func:`~spade_sd.utils.logging.progress_bar`).

    Lightning's own bar counts the batches of each epoch, one bar per epoch and per validation; what a user waits
    for is the epochs, bounded by ``max_epochs`` (early stopping may end sooner).
    """

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Open the bar (on the first process only)."""
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        self.bar = progress_bar(total=total, desc=self.desc, unit="epoch", enabled=trainer.is_global_zero)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Advance the bar and show the epoch's losses."""
        if self.bar is None:
            return
        losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train_loss", "val_loss")}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
        self.bar.update()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Close the bar."""
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Close the bar, also when training stops with an error."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def quiet_trainer_options(quiet: bool, desc: str, trainer_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The Trainer options that keep Lightning quiet, and our epoch bar among the callbacks.

    No logger (nothing written to disk), the model summary at debug verbosity only, Lightning's progress bar only
    when ``trainer_kwargs`` ask for it (``enable_progress_bar=True``); the caller's ``callbacks`` follow ours.
    Merge the result after ``trainer_kwargs``.

    Parameters
    ----------
    quiet
        The call was asked to be quiet: no bar, no Lightning output even at debug verbosity.
    desc
        What the epoch bar says is being trained.
    trainer_kwargs
        The Trainer arguments the user passed.
    """
    return {
        "logger": trainer_kwargs.get("logger", False),
        "enable_model_summary": trainer_kwargs.get("enable_model_summary", lightning_verbose(quiet)),
        "enable_progress_bar": trainer_kwargs.get("enable_progress_bar", False),
        "callbacks": [*([] if quiet else [EpochProgress(desc)]), *trainer_kwargs.get("callbacks", [])],
    }


@contextmanager
def lightning_quiet(quiet: bool) -> Iterator[None]:
    """Silence Lightning's info logs and its warnings for the context, unless :func:`lightning_verbose`.

    The levels of Lightning's loggers are restored on leaving, so a user's own Lightning runs speak as before.
    Its hint that a DataLoader has few workers is always silenced: ours read from memory.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        if lightning_verbose(quiet):
            yield
            return
        warnings.filterwarnings("ignore", module="lightning")
        loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
        levels = [log.level for log in loggers]
        for log in loggers:
            log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.setLevel(level)


@contextmanager
def torch_flags_restored() -> Iterator[None]:
    """Restore torch's deterministic-algorithm and cuDNN benchmark flags on leaving the context."""
    # Trainer(deterministic=True) switches torch to deterministic algorithms process-wide; undo that afterwards
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads, restoring the previous number afterwards."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit_trainer(trainer: L.Trainer, module: L.LightningModule, **data: Any) -> None:
    """``trainer.fit(module, **data)``, the garbage collected first when the training runs in several processes.

    Processes forked by Lightning (``strategy="ddp_fork"`` or ``"ddp_notebook"``) inherit every object of this one,
    garbage included. Garbage holding an onnxruntime session (a dropped :class:`~spade_sd.Backbone` is a reference
    cycle, freed only by the collector) hung a forked training process: destroying the session's thread pool, whose
    threads were not forked, waits forever. Collected here, it is freed before the fork.
    """
    if trainer.world_size > 1:
        gc.collect()
    trainer.fit(module, **data)
