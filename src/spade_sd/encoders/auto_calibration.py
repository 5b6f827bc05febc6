"""Real patches for ``engine="auto"``'s precision gate, taken by the tools from the first slide they encode.

A :class:`~spade_sd.Backbone` with ``engine="auto"`` runs float32 unless it has real patches to judge the
low-precision engines by (:mod:`~spade_sd.encoders.precision`). For a transformer (:func:`wants_calibration`) the
tools (:func:`spade_sd.tl.features`, :func:`~spade_sd.tl.embed`, :func:`~spade_sd.tl.pretrain`, ...) give it some:
:data:`CALIBRATION_PATCHES` patches spread evenly over the first slide it encodes, stored once per backbone identity in ``$SPADE_SD_CACHE_DIR/onnx``.
Every later slide, in this process or another on this machine, reuses the stored patches, so the gate is measured
once and every slide's features come from the same engine. ``sd.settings.low_precision = False`` turns this off.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from spade_sd.encoders import precision as low
from spade_sd.encoders.onnx_engine import onnx_path
from spade_sd.utils.logging import logger
from spade_sd.utils.settings import settings

# Patches taken from the first slide: half calibrate a static int8 quantization, half judge the engines
# (precision.split_calibration). More did not help: EfficientNet-Lite0's int8 kept a median cosine of 0.9953, 0.9949
# and 0.9951 calibrated on 64, 128 and 256 patches (benchmarks/results/scale_log.md, "Lite0 int8, session 2026-12-05")
CALIBRATION_PATCHES = 64
# A smaller slide gives none: precision.check_calibration's least number of patches
MIN_PATCHES = 16


def calibration_path(identity: str) -> Path:
    """Where the calibration patches of the backbone with this :meth:`~spade_sd.Backbone.identity` are stored."""
    return onnx_path(identity).with_suffix(".calibration.npy")


def wants_calibration(backbone: Any) -> bool:
    """Whether the tools should give ``backbone`` real patches to judge its engines by.

    Only a torch :class:`~spade_sd.Backbone` with ``engine="auto"`` on the CPU, without calibration patches and
    whose engine is not settled yet, while ``sd.settings.low_precision`` is on; and only a transformer (quantized
    dynamically, :func:`~spade_sd.encoders.precision.int8_scheme`). A convolutional backbone's static quantization
    takes 27-70 s to calibrate and choose its float32 layers, and on EfficientNet-Lite0 it stayed under the gate
    (``benchmarks/results/throughput_precision_lite0.md``): such backbones stay float32 unless given
    ``calibration=`` or another ``engine``.
    """
    from spade_sd.encoders.backbone import Backbone

    return (
        settings.low_precision
        and isinstance(backbone, Backbone)
        and backbone.module is not None
        and backbone.engine == "auto"
        and backbone.calibration is None
        and backbone.device.type == "cpu"
        and not backbone.engine_settled
        and low.int8_scheme(backbone.module) == "dynamic"
    )


def calibrate_from(backbone: Any, patches: Any) -> None:
    """Give ``backbone`` its stored calibration patches, else :data:`CALIBRATION_PATCHES` of ``patches`` (stored).

    Parameters
    ----------
    backbone
        Any encoder; only one :func:`wants_calibration` is changed (its ``calibration`` set).
    patches
        The slide's :class:`~spade_sd.SpotPatches` (or grid patches): ``len`` and ``read(indices)``. A slide with
        fewer than 16 patches gives none (the backbone stays as it is until a larger slide comes).
    """
    if not wants_calibration(backbone):
        return
    path = calibration_path(backbone.identity())
    stored = _load(path)
    if stored is None:
        n = len(patches)
        if n < MIN_PATCHES:
            logger.debug("backbone %s: %d patches are too few to calibrate on; it stays float32", backbone.name, n)
            return
        stored = _store(path, spread_patches(patches))
        logger.info(
            "backbone %s: %d patches of this slide stored in %s, to judge its low-precision engines by",
            backbone.name,
            len(stored),
            path,
        )
    backbone.calibration = stored


def spread_patches(patches: Any, n: int = CALIBRATION_PATCHES) -> np.ndarray:
    """``n`` patches (all of them if fewer) spread evenly over a slide's ``patches``, checked as calibration patches.

    What the tools take from the first slide (:func:`calibrate_from`); ``patches`` has ``len`` and ``read(indices)``.
    """
    index = np.unique(np.linspace(0, len(patches) - 1, min(n, len(patches))).round().astype(np.int64))
    return low.check_calibration(patches.read(index))


def _load(path: Path) -> np.ndarray | None:
    """The patches stored in ``path``, else ``None`` (an unreadable or invalid file is removed, with a warning)."""
    if not path.is_file():
        return None
    try:
        return low.check_calibration(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as err:
        logger.warning("Removing the unreadable calibration patches %s (%s); taking them again.", path, err)
        path.unlink(missing_ok=True)
        return None


def _store(path: Path, patches: np.ndarray) -> np.ndarray:
    """Store ``patches`` in ``path`` unless another process stored some first; return those stored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy.tmp", delete=False) as tmp:
        np.save(tmp, patches, allow_pickle=False)
    try:
        os.link(tmp.name, path)  # fails if the file exists: the first process to store wins, whole or not at all
    except FileExistsError:
        stored = _load(path)
        return patches if stored is None else stored
    finally:
        Path(tmp.name).unlink()
    return patches
