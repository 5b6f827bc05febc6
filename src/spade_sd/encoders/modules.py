"""Torch helpers shared by the PyTorch and ONNX engines: pooled outputs and eval mode for one call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class Pooled(nn.Module):
    """Average any spatial or token axes after the feature axis, so every module yields ``(batch, dim)``.

    Parameters
    ----------
    module
        The wrapped module, mapping ``(batch, 3, height, width)`` images to ``(batch, dim, ...)``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, dim)`` features: the module's output, averaged over any axes after the feature axis."""
        y = self.module(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"expected the backbone module to return a tensor, found {type(y).__name__}")
        return y.flatten(2).mean(-1) if y.ndim > 2 else y


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode for the duration of the context, then back into the mode it was in."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)
