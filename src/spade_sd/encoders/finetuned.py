"""A backbone whose last blocks carry LoRA adapters, its frozen prefix, and its adapters on disk.

:class:`FineTunedBackbone` is a :class:`~spade_sd.Backbone` (every tool accepts it) built from a base backbone: a
copy of the base's timm model gets LoRA adapters on its last ``n_blocks`` blocks (:mod:`spade_sd.encoders.lora`);
the base itself is not modified. Its identity digests the base's weights, the adapters and their configuration, so
it differs from the base's and changes whenever the adapters do.

:class:`PrefixEncoder` computes what enters the first adapted block. It depends on the base backbone and the
split point only, so its outputs are cached on disk like features (:mod:`spade_sd.encoders.features`) and every
fine-tuning run with the same split reads them back, running only the adapted suffix in its training steps.

The adapters are saved as ``adapters.safetensors`` + ``adapters.json`` (no pickle), the JSON describing the base
backbone (its name, input size, normalisation, model keywords and identity); loading them on another base is an
error that says what differs. Other tensors (SEAL's heads) travel in the same files as *attachments*, opaque to this
module. Format ``spade_sd.adapters/2`` also writes a copy of ``adapters.json`` into the header of
``adapters.safetensors``, whose SHA-256 ``adapters.json`` records: an edited, added or deleted entry is refused by
name (:mod:`spade_sd.utils.saved_metadata`). Adapters saved in format ``spade_sd.adapters/1`` load with an info
message that ``adapters.json`` was not verified (their tensors are); saving them again writes the current format.
:meth:`FineTunedBackbone.save_pretrained` adds a model card (``README.md``); :meth:`FineTunedBackbone.from_pretrained`
also reads from the Hugging Face Hub (:mod:`spade_sd.utils.hub`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from spade_sd.encoders.adapters_card import adapters_card
from spade_sd.encoders.backbone import Backbone
from spade_sd.encoders.identity import backbone_difference, identity_digest
from spade_sd.encoders.lora import (
    AdapterPlan,
    PrefixModule,
    SplitForward,
    adapter_state,
    inject_lora,
    merged_copy,
    plan_adapters,
)
from spade_sd.encoders.lora import split_forward as checked_split
from spade_sd.encoders.modules import eval_mode
from spade_sd.encoders.onnx_engine import OnnxEngine
from spade_sd.utils.hub import DEFAULT_LICENSE, MODEL_CARD, is_card, push_folder, saved_folder
from spade_sd.utils.logging import logger
from spade_sd.utils.saved_metadata import check_against_copy, require, write_weights

ADAPTERS_FORMAT = "spade_sd.adapters/2"
# The earlier format, without the copy of adapters.json in the header of adapters.safetensors
ADAPTERS_FORMAT_1 = "spade_sd.adapters/1"
ADAPTERS_CONFIG = "adapters.json"
ADAPTERS_WEIGHTS = "adapters.safetensors"
# adapters.json key of the SHA-256 hex digest of the bytes of adapters.safetensors
WEIGHTS_DIGEST = "weights_sha256"
# What load reads from adapters.json
_REQUIRED = (
    "base.name",
    "base.kind",
    "base.identity",
    "n_blocks",
    "targets",
    "lora.rank",
    "lora.alpha",
    "lora.dropout",
    "lora.seed",
    "identity",
    "attachments",
)
_FILES = frozenset({ADAPTERS_CONFIG, ADAPTERS_WEIGHTS})


def _same_input(backbone: Backbone) -> dict[str, Any]:
    """The keywords that give a new :class:`Backbone` this one's device, batches, input and output size."""
    names = ("batch_size", "dim", "input_size", "mean", "std")
    return {"device": str(backbone.device)} | {name: getattr(backbone, name) for name in names}


def _base_module(base: Backbone) -> torch.nn.Module:
    if not isinstance(base, Backbone):
        raise TypeError(
            f"Fine-tuning needs a spade_sd.Backbone (or its constructor input) as the base; found {type(base).__name__}."
        )
    if isinstance(base, FineTunedBackbone):
        raise ValueError("The base backbone is already fine-tuned; merge it first (backbone.merge()) to tune further.")
    if base.module is None:
        raise ValueError(
            f"LoRA fine-tuning needs a torch model; backbone {base.name!r} is a plain callable ({base.kind}), whose "
            "layers cannot be adapted. Pass a timm name, the default backbone or a timm torch.nn.Module."
        )
    return base.module


class FineTunedBackbone(Backbone):
    """A backbone with LoRA adapters on its last blocks (SEAL): uint8 patches in, pooled features out.

    Built by :func:`spade_sd.tl.finetune`, or by :meth:`load`. Its adapters start at zero (the features equal the
    base's) until trained.

    Parameters
    ----------
    base
        The backbone to adapt: the default, a timm model or a timm :class:`torch.nn.Module` (a Vision Transformer
        or an EfficientNet). It is copied, not modified.
    n_blocks
        Final blocks receiving adapters.
    rank, alpha, dropout
        LoRA rank, scale numerator (updates scaled by ``alpha / rank``) and dropout.
    seed
        Seed of the adapters' random initialisation.
    """

    def __init__(
        self,
        base: Backbone,
        *,
        n_blocks: int = 1,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.15,
        seed: int = 0,
    ) -> None:
        module = _base_module(base)
        self.plan: AdapterPlan = plan_adapters(module, n_blocks)
        self.base_config = base.saved_config()
        self.lora = {"rank": int(rank), "alpha": float(alpha), "dropout": float(dropout), "seed": int(seed)}
        copied = copy.deepcopy(module)
        with _seeded(seed):
            inject_lora(copied, self.plan, rank=rank, alpha=alpha, dropout=dropout)
        super().__init__(copied, engine="torch", **_same_input(base))
        self.kind = "finetuned"
        self.name = f"{base.name}+lora{n_blocks}"
        self.attachments: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
        # the adapters.json this backbone was loaded from, named by errors about its attachments
        self.source: Path | None = None
        self._split: SplitForward | None = None

    def __repr__(self) -> str:
        return (
            f"FineTunedBackbone(base={self.base_config['name']!r}, n_blocks={self.plan.n_blocks}, "
            f"rank={self.lora['rank']}, alpha={self.lora['alpha']}, adapted={len(self.plan.targets)} layers, "
            f"dim={self.dim})"
        )

    @property
    def base_identity(self) -> str:
        """Identity of the backbone the adapters were trained on."""
        return self.base_config["identity"]

    def _state_token(self) -> Any:
        return super()._state_token(), json.dumps(self.lora, sort_keys=True)

    def _architecture(self) -> dict[str, Any]:
        return super()._architecture() | {
            "adapters": {"lora": self.lora, "targets": list(self.plan.targets), "base": self.base_identity}
        }

    @property
    def split(self) -> SplitForward:
        """The forward pass cut before the first adapted block (checked against the full pass once)."""
        if self._split is None:
            probe = self._preprocess(
                np.random.default_rng(0).integers(0, 256, (2, self.input_size, self.input_size, 3), dtype=np.uint8)
            )
            with eval_mode(self.module):
                self._split = checked_split(self.module, self.plan, probe)
        return self._split

    def prefix(self, patches: np.ndarray) -> torch.Tensor:
        """What enters the first adapted block, for uint8 patches ``(batch, height, width, 3)``."""
        with eval_mode(self.module), torch.inference_mode():
            return self.split.prefix(self._preprocess(np.asarray(patches, dtype=np.uint8)))

    def features_from_prefix(self, prefix: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Pooled features from cached prefix activations ``(n, *prefix_shape)``: only the adapted suffix runs.

        Equal to calling the backbone on the patches (to float tolerance), at a fraction of the cost.
        """
        out = np.empty((len(prefix), self.dim), dtype=np.float32)
        with eval_mode(self.module), torch.inference_mode():
            for start in range(0, len(prefix), batch_size):
                h = torch.as_tensor(np.asarray(prefix[start : start + batch_size]), device=self.device)
                out[start : start + len(h)] = self.split.suffix(h).float().cpu().numpy()
        return out

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapters' tensors by name (CPU copies)."""
        return adapter_state(self.module)

    def merge(self) -> Backbone:
        """A plain :class:`~spade_sd.Backbone` with the adapters merged into the weights (faster inference).

        Its timm model has no adapter layers, so ``engine="auto"`` runs it with onnxruntime on the CPU. Its
        features equal this backbone's to float tolerance; its identity is that of the merged weights.
        """
        merged = Backbone(merged_copy(self.module), **_same_input(self))
        merged.name = f"{self.name}-merged"
        return merged

    def attach(self, name: str, metadata: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        """Keep ``tensors`` and JSON ``metadata`` with the adapters (saved and loaded with them), under ``name``."""
        self.attachments[name] = (dict(metadata), {k: np.ascontiguousarray(v) for k, v in tensors.items()})

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``adapters.json`` and ``adapters.safetensors`` into the folder ``path``.

        ``adapters.safetensors`` holds a copy of ``adapters.json`` in its header and ``adapters.json`` the SHA-256
        of ``adapters.safetensors``: :meth:`load` refuses either file edited.

        Parameters
        ----------
        path
            A folder that does not exist yet (or is empty).
        overwrite
            Replace the two files of a folder that holds exactly them; a folder with anything else is refused.

        Raises
        ------
        FileExistsError
            ``path`` exists and is not replaceable, with nothing written.
        """
        self._save(Path(path), overwrite)

    def _save(self, path: Path, overwrite: bool, write_card: Callable[[dict[str, Any]], str] | None = None) -> None:
        """:meth:`save`, with the model card ``write_card(config)`` written beside the two files when given."""
        _check_target(path, overwrite)
        tensors = {f"adapter.{k}": v.numpy() for k, v in self.adapter_tensors().items()}
        for name, (_, arrays) in self.attachments.items():
            tensors |= {f"{name}.{k}": v for k, v in arrays.items()}
        config = self._saved_config()
        copy = json.dumps(config, sort_keys=True)  # what JSON cannot hold fails here, before anything is written
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path, prefix=".staging-") as staging:
            config[WEIGHTS_DIGEST] = write_weights(tensors, Path(staging) / ADAPTERS_WEIGHTS, copy)
            (Path(staging) / ADAPTERS_CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
            names = [ADAPTERS_WEIGHTS, ADAPTERS_CONFIG]
            if write_card is not None:
                (Path(staging) / MODEL_CARD).write_text(write_card(config), encoding="utf-8")
                names.append(MODEL_CARD)
            elif (path / MODEL_CARD).is_file():  # a card would describe the adapters replaced
                (path / MODEL_CARD).unlink()
            for name in names:
                (Path(staging) / name).replace(path / name)
        logger.info("Saved the adapters of %s to %s", self.name, path)

    def _saved_config(self) -> dict[str, Any]:
        return {
            "format": ADAPTERS_FORMAT,
            "base": self.base_config,
            "n_blocks": self.plan.n_blocks,
            "targets": list(self.plan.targets),
            "lora": self.lora,
            "identity": self.identity(),
            "attachments": {name: metadata for name, (metadata, _) in self.attachments.items()},
        }

    @classmethod
    def load(cls, path: str | os.PathLike, *, base: Backbone | None = None) -> FineTunedBackbone:
        """Load adapters saved with :meth:`save` onto their base backbone; no code is run (no pickle).

        Both files are checked before the base is built: ``adapters.safetensors`` against the SHA-256 that
        ``adapters.json`` records, and every entry of ``adapters.json`` against the copy inside
        ``adapters.safetensors`` (adapters saved in format ``spade_sd.adapters/1`` have no copy: their
        ``adapters.json`` is not verified, which an info message says).

        Parameters
        ----------
        path
            The folder written by :meth:`save`.
        base
            The base backbone. Default: the packaged default or the timm model recorded in the file, rebuilt with
            the recorded input size, normalisation and model keywords (timm weights are downloaded); any other base
            must be passed. Its identity must equal the recorded one.

        Raises
        ------
        ValueError
            The files are damaged, edited (the entry is named) or of another format, or ``base`` is not the
            backbone the adapters were trained on (what differs is named).
        """
        path = Path(path)
        config, arrays = _read(path)
        recorded, rebuilt = config["base"], base is None
        if rebuilt:
            if recorded["kind"] not in ("packaged", "timm"):
                raise ValueError(
                    f"The adapters in {path} were trained on a {recorded['kind']} backbone {recorded['name']!r}, which "
                    "cannot be rebuilt from its description; pass it as base=."
                )
            base = Backbone.from_config(recorded)
        if base.identity() != recorded["identity"]:
            raise ValueError(
                f"The adapters in {path} were trained on backbone {recorded['name']!r}; the base "
                f"{'rebuilt from ' + ADAPTERS_CONFIG if rebuilt else 'given'} differs: "
                f"{backbone_difference(recorded, base.saved_config())}. Pass the backbone they were trained on as base=."
            )
        lora = config["lora"]
        tuned = cls(
            base,
            n_blocks=config["n_blocks"],
            rank=lora["rank"],
            alpha=lora["alpha"],
            dropout=lora["dropout"],
            seed=lora["seed"],
        )
        adapters = {
            k.removeprefix("adapter."): torch.from_numpy(v) for k, v in arrays.items() if k.startswith("adapter.")
        }
        expected = tuned.adapter_tensors()
        if set(adapters) != set(expected) or any(adapters[k].shape != expected[k].shape for k in expected):
            raise ValueError(
                f"The adapter tensors in {path / ADAPTERS_WEIGHTS} do not fit 'n_blocks' ({config['n_blocks']}), "
                f"'targets' {config['targets']} and 'lora' {lora} recorded in {path / ADAPTERS_CONFIG}: that file was "
                "edited or belongs to other adapters."
            )
        tuned.module.load_state_dict(adapters, strict=False)
        for name, metadata in config["attachments"].items():
            tensors = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{name}.")}
            tuned.attach(name, metadata, tensors)
        if tuned.identity() != config["identity"]:
            raise ValueError(
                f"The adapters loaded from {path} do not reproduce the 'identity' recorded in "
                f"{path / ADAPTERS_CONFIG}: its 'lora' {lora} or 'targets' were edited, or the files are damaged."
            )
        tuned.source = path / ADAPTERS_CONFIG
        return tuned

    def save_pretrained(
        self, path: str | os.PathLike, *, overwrite: bool = False, license: str = DEFAULT_LICENSE
    ) -> None:
        """Save as :meth:`save` does, with a model card (``README.md``) beside the two files, ready to share.

        The card has YAML metadata (``library_name: spade_sd``, ``license``, ``tags``) and lists the base backbone
        and its identity, the adapters, SEAL's gene panel and training history (when :func:`spade_sd.tl.finetune`
        attached them) and the package versions. Read the folder back with :meth:`from_pretrained` (or
        :meth:`load`); upload it with :meth:`push_to_hub`.

        Parameters
        ----------
        path, overwrite
            As for :meth:`save` (a folder holding saved adapters and their card is replaceable).
        license
            The license of the shared adapters, as a Hub license id. The default is the package's own; the base
            backbone's or the training data's terms may require another.
        """
        self._save(Path(path), overwrite, adapters_card(license, None))

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        base: Backbone | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ) -> FineTunedBackbone:
        """Load adapters from a folder (written by :meth:`save_pretrained` or :meth:`save`) or the Hugging Face Hub.

        A local folder is read offline; anything else is taken as a Hub repository id (``"owner/name"``) and
        downloaded with :func:`huggingface_hub.snapshot_download` (cached). The files are checked as :meth:`load`
        checks them.

        Parameters
        ----------
        source
            A folder, or a Hub repository id.
        base
            As for :meth:`load`: needed only for adapters on neither the packaged default nor a timm model.
        revision, cache_dir, token
            For a Hub repository, see :func:`huggingface_hub.snapshot_download`.

        Raises
        ------
        FileNotFoundError
            ``source`` is neither a folder nor a repository id, or lacks the adapters' files.
        OSError
            Downloading failed (offline without a cached copy, an unknown repository, no access); the message
            says how to load a copy downloaded elsewhere.
        ValueError
            As for :meth:`load`.
        """
        folder, _ = saved_folder(
            source,
            files=(ADAPTERS_CONFIG, ADAPTERS_WEIGHTS),
            loader="FineTunedBackbone.from_pretrained",
            revision=revision,
            cache_dir=cache_dir,
            token=token,
        )
        return cls.load(folder, base=base)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        license: str = DEFAULT_LICENSE,
    ) -> str:
        """Upload the adapters with their card (:meth:`save_pretrained`) to the Hugging Face Hub repository ``repo_id``.

        Needs a network and a token with write access; the repository is created if it does not exist. Returns the
        commit the upload made (``""`` if the Hub gave none).
        """
        pushed = push_folder(
            lambda folder: self._save(folder, False, adapters_card(license, repo_id)),
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message or f"spade_sd adapters {self.identity()[:16]}",
        )
        logger.info("Uploaded the adapters of %s to the Hugging Face Hub repository %s", self.name, repo_id)
        return pushed.get("revision", "")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator for the block, restoring its state afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_symlink() or path.is_file():
        raise FileExistsError(f"{path} is a file or a link; adapters are saved into a folder of their own.")
    if not path.exists():
        return
    found = {p.name for p in path.iterdir()}
    if not found:
        return
    # a card spade_sd wrote goes with the adapters; a README.md of the user's own is never replaced
    replaceable = found == _FILES or (found == _FILES | {MODEL_CARD} and is_card(path / MODEL_CARD))
    if not replaceable or not overwrite:
        raise FileExistsError(
            f"{path} already holds {sorted(found)[:8]}; "
            + (
                "pass overwrite=True to replace saved adapters."
                if replaceable
                else f"adapters are only written into a new or empty folder, or over exactly {sorted(_FILES)} (and "
                f"the {MODEL_CARD} save_pretrained wrote)."
            )
        )


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``adapters.json`` and the tensors of ``adapters.safetensors``, after checking each file against the other."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    config_path, weights_path = path / ADAPTERS_CONFIG, path / ADAPTERS_WEIGHTS
    for required in (config_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(f"{required} is missing: {path} is not a folder written by FineTunedBackbone.save.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is damaged (not valid JSON: {error}).") from error
    found = config.get("format") if isinstance(config, dict) else type(config).__name__
    if found not in (ADAPTERS_FORMAT, ADAPTERS_FORMAT_1):
        raise ValueError(
            f"{config_path} holds format {found!r}; expected {ADAPTERS_FORMAT!r} (or {ADAPTERS_FORMAT_1!r})."
        )
    require(config, (WEIGHTS_DIGEST,), config_path, "FineTunedBackbone.save")
    # the bytes that are hashed are the bytes that are parsed
    data = weights_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != config[WEIGHTS_DIGEST]:
        raise ValueError(
            f"{weights_path} does not match {config_path}: SHA-256 {digest[:12]}… found, "
            f"{str(config[WEIGHTS_DIGEST])[:12]}… expected. The file is damaged or belongs to other adapters."
        )
    try:
        arrays = load(data)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_path} is damaged and cannot be read: {error}") from error
    if found == ADAPTERS_FORMAT:
        check_against_copy({k: v for k, v in config.items() if k != WEIGHTS_DIGEST}, data, config_path, weights_path)
    else:
        logger.info(
            "%s was saved in format %s, which keeps no copy of it with the tensors: %s was not verified (the "
            "tensors were). Save the adapters again to record one.",
            config_path,
            found,
            ADAPTERS_CONFIG,
        )
    require(config, _REQUIRED, config_path, "FineTunedBackbone.save")
    return config, arrays


class PrefixEncoder:
    """The frozen part of a fine-tuned backbone as a feature extractor, for the on-disk feature cache.

    Its "features" are the flattened activations entering the first adapted block. They depend only on the base
    backbone and the split point, so its :meth:`identity` names exactly those: fine-tuning runs with other ranks,
    seeds or losses share the cache.

    On the CPU the prefix runs in onnxruntime, exported once into ``$SPADE_SD_CACHE_DIR/onnx`` and checked against
    PyTorch, as :class:`~spade_sd.Backbone`'s ``engine="auto"`` runs a whole backbone (EfficientNet-Lite0's prefix:
    4.7× eager PyTorch on one thread, ``benchmarks/finetune.py``); where the export fails it runs in PyTorch, with a
    warning.

    Parameters
    ----------
    backbone
        The fine-tuned backbone whose prefix is computed.
    engine
        ``"auto"``: onnxruntime on the CPU, PyTorch on other devices; ``"torch"``: always PyTorch.
    """

    stable_identity = True

    def __init__(self, backbone: FineTunedBackbone, *, engine: Literal["auto", "torch"] = "auto") -> None:
        if engine not in ("auto", "torch"):
            raise ValueError(f"engine must be 'auto' or 'torch'; found {engine!r}.")
        self.backbone = backbone
        self.name = f"{backbone.base_config['name']} up to {backbone.plan.blocks[0]}"
        self.batch_size = backbone.batch_size
        side = backbone.input_size
        probe = np.zeros((1, side, side, 3), dtype=np.uint8)
        self.shape = tuple(backbone.prefix(probe).shape[1:])
        self.dim = math.prod(self.shape)
        self.engine = engine if backbone.device.type == "cpu" else "torch"
        self._onnx: OnnxEngine | None = None

    def identity(self) -> str:
        """Digest of the base backbone's identity and the split point."""
        return identity_digest(
            {"prefix of": self.backbone.base_identity, "block": self.backbone.plan.blocks[0], "shape": self.shape}, []
        )

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """Flattened float32 prefix activations ``(batch, dim)`` of uint8 patches."""
        run = self._onnx_runner() if self.engine == "auto" else None
        if run is None:
            return self.backbone.prefix(patches).float().reshape(len(patches), -1).cpu().numpy()
        out = np.empty((len(patches), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(patches), OnnxEngine.max_batch):  # the engine's sub-batches, as Backbone's
                batch = np.asarray(patches[start : start + OnnxEngine.max_batch], dtype=np.uint8)
                out[start : start + len(batch)] = run(self.backbone._preprocess(batch)).reshape(len(batch), -1)
        return out

    def _onnx_runner(self) -> Callable[[torch.Tensor], np.ndarray] | None:
        """The onnxruntime session's runner, exported and checked on first use; ``None`` (PyTorch) if that fails."""
        if self._onnx is None:
            split = self.backbone.split
            self._onnx = OnnxEngine(
                PrefixModule(split),
                name=f"{self.name} (prefix)",
                input_size=self.backbone.input_size,
                identity=self.identity,
                state=self.identity,  # the prefix is frozen: nothing but what the identity names changes it
                preprocess=self.backbone._preprocess,
                reference=lambda x: split.prefix(x).float().numpy(),
            )
            try:
                self._onnx.load()
            # tracing and export fail in model-specific ways (unsupported operators, data-dependent control flow)
            except Exception as err:  # noqa: BLE001
                logger.warning(
                    "%s: onnxruntime unavailable (%s: %s); computing the prefix in eager PyTorch, several times slower",
                    self.name,
                    type(err).__name__,
                    err,
                )
                self.engine = "torch"
                return None
        return self._onnx.runner()
