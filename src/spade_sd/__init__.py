"""spade_sd: spatial transcriptomics teaches a pathology image encoder.

Submodules and classes are imported on first use, so ``import spade_sd`` stays fast and does not import torch,
timm or lightning. The package is layered in tiers, each importing only from the tiers below it:
``utils`` → ``spots`` → ``encoders`` → ``model`` → ``training``, with ``datasets`` and ``metrics`` beside them and the
thin public ``pp``, ``tl`` and ``pl`` on top.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

from spade_sd.utils.settings import settings

__version__ = _version("spade_sd")

_SUBMODULES = ("pp", "tl", "pl", "datasets", "metrics")
_CLASSES = {
    "Backbone": "spade_sd.encoders.backbone",
    "FineTunedBackbone": "spade_sd.encoders.finetuned",
    "MorphologyFeatures": "spade_sd.encoders.morphology",
    "SpadeModel": "spade_sd.model.spade_model",
    "GenePanel": "spade_sd.spots.genes",
    "SpotPatches": "spade_sd.spots.patches",
}

__all__ = [*_SUBMODULES, *_CLASSES, "__version__", "settings"]

if TYPE_CHECKING:
    from spade_sd import datasets, metrics, pl, pp, tl  # noqa: F401
    from spade_sd.encoders.backbone import Backbone  # noqa: F401
    from spade_sd.encoders.finetuned import FineTunedBackbone  # noqa: F401
    from spade_sd.encoders.morphology import MorphologyFeatures  # noqa: F401
    from spade_sd.model.spade_model import SpadeModel  # noqa: F401
    from spade_sd.spots.genes import GenePanel  # noqa: F401
    from spade_sd.spots.patches import SpotPatches  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
