"""spade_sd: spatial transcriptomics teaches a pathology image encoder.

Submodules and the two classes are imported on first use, so ``import spade_sd`` stays fast and does not
import torch, timm or lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = ("pp", "tl", "pl", "datasets")
_CLASSES = {"Backbone": "spade_sd._backbones", "SpadeModel": "spade_sd._model", "GenePanel": "spade_sd._genes"}

__all__ = [*_SUBMODULES, *_CLASSES, "__version__"]

if TYPE_CHECKING:
    from . import datasets, pl, pp, tl  # noqa: F401
    from ._backbones import Backbone  # noqa: F401
    from ._genes import GenePanel  # noqa: F401
    from ._model import SpadeModel  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
