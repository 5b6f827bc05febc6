"""Pieces every Lightning training loop of the package shares: schedule, best weights, quiet runs, torch flags."""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch

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


@contextmanager
def lightning_quiet(quiet: bool) -> Iterator[None]:
    """Silence Lightning's info logs and warnings for the context when ``quiet`` (its worker hint always)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        if not quiet:
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
