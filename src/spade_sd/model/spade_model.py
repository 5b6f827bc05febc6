"""SpadeModel: a trained mixture of data experts with everything needed to embed new patches.

The model owns the backbone it was trained with, the gene panel, the feature standardization, the two-stage
clustering, the routing temperature, the experts' heads and its configuration (:class:`~spade_sd.config.SpadeConfig`).
It may keep a bank of reference spots (:class:`~spade_sd.model.reference.ReferenceBank`) for expression
prediction and queries. It is saved as ``model.safetensors`` (every array) plus ``config.json`` (everything else):
loading runs no code.
``config.json`` records the SHA-256 of the bytes of ``model.safetensors`` (key ``weights_sha256``), checked on load;
models saved before the digest was recorded load unverified; models saved before the reference bank existed load
with ``reference=None``.

Formats: ``spade_sd.model/2`` saves the configuration as one section per stage (``SpadeConfig.to_dict``);
``spade_sd.model/1`` saved it as one flat dict, which :meth:`SpadeModel.load` migrates on load
(:func:`~spade_sd.config.config_from_format_1`). The arrays are the same in both.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spade_sd.config import TRAINING_ABSENT, SpadeConfig, config_from_format_1
from spade_sd.encoders.backbone import Backbone
from spade_sd.model.backbone_block import BackboneBlock
from spade_sd.model.clustering import ExpertClustering
from spade_sd.model.heads import ExpertMixture
from spade_sd.model.reference import ReferenceBank
from spade_sd.model.routing import expert_weights
from spade_sd.model.standardization import FeatureScaler, fit_slide_scaler
from spade_sd.model.subspace import EmbeddingSubspace, KeptShare
from spade_sd.spots.genes import GenePanel
from spade_sd.utils.logging import logger

MODEL_FORMAT = "spade_sd.model/2"
# The earlier format, read by migrating its flat configuration
FORMAT_1 = "spade_sd.model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# config.json key of the SHA-256 hex digest of the bytes of model.safetensors
WEIGHTS_DIGEST = "weights_sha256"
# Rows standardized, routed and embedded at a time: their float64 and activation temporaries stay ~10 MB
_CHUNK = 1024


@dataclass
class SpadeModel:
    """A trained SPADE model: backbone → standardized features → routed experts → joint embedding.

    Create one with :func:`spade_sd.tl.pretrain`; embed with :func:`spade_sd.tl.embed`; save with :meth:`save`
    and restore with :meth:`load`.

    Attributes
    ----------
    backbone
        The frozen patch encoder the experts were trained on.
    panel
        The gene panel of the gene heads.
    scaler
        Standardization of the backbone features (after the per-slide one, for ``standardize="slide"``).
    clustering
        Fine centroids and their experts (two-stage k-means).
    mixture
        The image and gene heads of every expert.
    tau
        Routing temperature of soft routing.
    config
        Patch geometry, panel, clustering and training configuration, and provenance. A plain dict is converted:
        one in the layout of :meth:`SpadeConfig.to_dict <spade_sd.config.SpadeConfig.to_dict>` (it has a
        ``"clustering"`` section), or the flat layout ``config`` had in format 1
        (:func:`~spade_sd.config.config_from_format_1`), where an absent ``"standardize"`` means ``"global"``.
    subspace
        The principal subspace of the training spots' image embeddings that every embedding (image and gene side)
        is projected onto; ``None`` keeps the heads' outputs as they are.
    history
        Training history (epochs, losses, spots per expert).
    reference
        Reference spots (image embeddings and measured expression) for :func:`spade_sd.tl.predict_expression` and
        :func:`spade_sd.tl.query`; ``None`` for a model trained with ``reference_size=0`` or saved before banks
        existed.
    block
        For ``output="joint"``: the block of standardized backbone features appended to every image-side embedding
        (zeros on the gene side); ``None`` (``output="aligned"``, and every model saved before the option existed)
        embeds the aligned coordinates only.
    expression_subspace
        The principal subspace of the training spots' aligned image embeddings within which the expression tools
        compare embeddings (:meth:`expression_space`); ``None`` (``expression_comps=None``, and every model saved
        before the option existed) compares whole embeddings.
    """

    backbone: Backbone
    panel: GenePanel
    scaler: FeatureScaler
    clustering: ExpertClustering
    mixture: ExpertMixture
    tau: float
    config: SpadeConfig
    subspace: EmbeddingSubspace | None = None
    history: dict[str, Any] = field(default_factory=dict)
    reference: ReferenceBank | None = None
    block: BackboneBlock | None = None
    expression_subspace: EmbeddingSubspace | None = None

    def __post_init__(self) -> None:
        self.mixture.eval()
        if isinstance(self.config, Mapping):
            self.config = (
                SpadeConfig.from_dict(self.config)
                if "clustering" in self.config
                else config_from_format_1(
                    self.config, panel=self.panel.to_dict(), out_dim=self.mixture.config["out_dim"]
                )
            )
        if not isinstance(self.config, SpadeConfig):
            raise TypeError(f"config must be a spade_sd.config.SpadeConfig; found {type(self.config).__name__}.")

    def __repr__(self) -> str:
        return (
            f"SpadeModel(n_experts={self.n_experts}, n_fine={self.clustering.n_fine}, genes={len(self.panel)}, "
            f"backbone={self.backbone.name!r}, dim={self.dim}, "
            f"n_comps={None if self.subspace is None else self.subspace.n_comps}, tau={self.tau:.3g}, "
            f"reference={None if self.reference is None else len(self.reference)})"
        )

    @property
    def dim(self) -> int:
        """Width of the embedding: ``out_dim``, plus the backbone block's width for a joint output."""
        out_dim = self.mixture.config["out_dim"]
        return out_dim if self.block is None else out_dim + self.block.width(self.mixture.config["image_dim"])

    @property
    def n_experts(self) -> int:
        """Number of experts."""
        return self.clustering.n_experts

    def full_rank(self) -> SpadeModel:
        """The same model without projecting its embeddings: they keep every direction of the heads' output.

        For a model trained with ``n_comps`` (the default before spade_sd 0.2 was 16): training does not depend on
        the subspace (it is fitted afterwards), so this is the model ``sd.tl.pretrain(..., n_comps=None)`` trains
        with the same data and seed. It keeps more of what the backbone knew about the image, most of all on slides
        unlike the training data (``docs/quality.md`` has the measurements). The subspace moves to the expression
        tools (:attr:`expression_subspace`, unless the model has one), so :func:`~spade_sd.tl.predict_expression`
        and :func:`~spade_sd.tl.query` give what they gave with this model. Its :meth:`identity` differs from this
        model's, so the embeddings of the two are never mixed. A model without the projection is returned as it is.
        """
        if self.subspace is None:
            return self
        tools = self.subspace if self.expression_subspace is None else self.expression_subspace
        return replace(self, subspace=None, expression_subspace=tools)

    @property
    def standardization(self) -> str:
        """``"slide"``: every slide's features are first standardized by that slide's own statistics; ``"global"``: not."""
        return self.config.clustering.standardize

    def slide_scaler(self, features: np.ndarray | Iterable[np.ndarray]) -> FeatureScaler | None:
        """The per-slide standardization fitted on all patches of one slide (``None`` for "global" :attr:`standardization`).

        Parameters
        ----------
        features
            Backbone features of every patch (spots or tiles) of the slide, as one array or as chunks of rows.
        """
        if self.standardization != "slide":
            return None
        chunks = features
        if isinstance(features, np.ndarray):
            chunks = (features[start : start + _CHUNK] for start in range(0, len(features), _CHUNK))
        return fit_slide_scaler(self._checked(chunk) for chunk in chunks)

    def _checked(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float32)
        expected = self.scaler.mean.shape[0]
        if features.ndim != 2 or features.shape[1] != expected:
            raise ValueError(
                f"The model was trained on {expected}-d features of backbone {self.backbone.name!r}; "
                f"found features of shape {features.shape}. Compute them with model.backbone."
            )
        return features

    def standardize(self, features: np.ndarray, slide_scaler: FeatureScaler | None = None) -> np.ndarray:
        """Standardized backbone features, after checking they come from a backbone of the right dimension.

        Parameters
        ----------
        features
            Backbone features ``(n, backbone.dim)``.
        slide_scaler
            The slide's own standardization (:meth:`slide_scaler`) for a model with ``standardize="slide"``;
            ``None`` fits it on ``features``, which must then be all patches of one slide.
        """
        features = self._checked(features)
        if self.standardization == "slide":
            features = (slide_scaler or self.slide_scaler(features)).transform(features)
        return self.scaler.transform(features)

    def _heads(self, inputs: np.ndarray, weights: np.ndarray, side: str, share: KeptShare | None = None) -> np.ndarray:
        embed = self.mixture.embed_image if side == "image" else self.mixture.embed_gene
        out_dim = self.mixture.config["out_dim"]
        out = np.zeros((len(inputs), self.dim), dtype=np.float32)  # the gene side's backbone block stays zero
        self.mixture.eval()
        with torch.inference_mode():
            for start in range(0, len(inputs), _CHUNK):
                stop = start + _CHUNK
                heads = embed(torch.from_numpy(inputs[start:stop]), torch.from_numpy(weights[start:stop])).numpy()
                out[start:stop, :out_dim] = heads if self.subspace is None else self.subspace.project(heads, share)
                if self.block is not None and side == "image":
                    out[start:stop, out_dim:] = self.block.transform(inputs[start:stop])
        return out

    def embed_features(
        self,
        features: np.ndarray,
        *,
        hard: bool = False,
        slide_scaler: FeatureScaler | None = None,
        share: KeptShare | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Image-side embedding of backbone features.

        Works through the rows in chunks, so ``features`` may be a memory map of a whole slide's tiles: only the
        ``(n, out_dim)`` embedding and ``(n, n_experts)`` weights are held in memory, never a standardized copy.

        Parameters
        ----------
        features
            Backbone features ``(n, backbone.dim)``.
        hard
            Route each patch to the expert of its nearest fine centroid only.
        slide_scaler
            For a model with ``standardize="slide"``: the slide's standardization (:meth:`slide_scaler`), needed
            when ``features`` are only part of a slide; ``None`` fits it on ``features`` (a whole slide).
        share
            Accumulates the share of the heads' output variance the principal subspace keeps (see
            :meth:`EmbeddingSubspace.kept_share <spade_sd.model.subspace.EmbeddingSubspace.kept_share>`).

        Returns
        -------
        The embedding ``(n, dim)`` and the expert weights ``(n, n_experts)``.
        """
        n = len(features)
        if slide_scaler is None and self.standardization == "slide":
            slide_scaler = self.slide_scaler(features)
        embedding = np.empty((n, self.dim), dtype=np.float32)
        weights = np.empty((n, self.n_experts), dtype=np.float32)
        for start in range(0, max(n, 1), _CHUNK):
            standardized = self.standardize(features[start : start + _CHUNK], slide_scaler)
            weights[start : start + _CHUNK] = expert_weights(standardized, self.clustering, tau=self.tau, hard=hard)
            embedding[start : start + _CHUNK] = self._heads(
                standardized, weights[start : start + _CHUNK], "image", share
            )
        return embedding, weights

    def embed_chunks(
        self,
        passes: Callable[[], Iterable[tuple[int, np.ndarray]]],
        n: int,
        *,
        hard: bool = False,
        share: KeptShare | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Image-side embedding of all ``n`` patches of one slide whose features arrive in chunks.

        This is how :func:`spade_sd.tl.embed` embeds a slide (and how training embeds its reference spots): with
        per-slide standardization a first pass over the chunks collects the slide's statistics, a second embeds.

        Parameters
        ----------
        passes
            Returns a fresh iterator of ``(start, features)`` chunks covering rows ``0 … n - 1``; called twice for a
            model with ``standardize="slide"``, once otherwise.
        n
            Number of patches.
        hard
            Route each patch to the expert of its nearest fine centroid only.
        share
            Accumulates the share of the heads' output variance the principal subspace keeps.

        Returns
        -------
        The embedding ``(n, dim)`` and the expert weights ``(n, n_experts)``.
        """
        embedding = np.empty((n, self.dim), dtype=np.float32)
        weights = np.empty((n, self.n_experts), dtype=np.float32)
        slide_scaler = (
            self.slide_scaler(features for _, features in passes()) if self.standardization == "slide" else None
        )
        for start, features in passes():
            stop = start + len(features)
            embedding[start:stop], weights[start:stop] = self.embed_features(
                features, hard=hard, slide_scaler=slide_scaler, share=share
            )
        return embedding, weights

    def expression_space(self, embedding: np.ndarray) -> np.ndarray:
        """Embeddings as the expression tools compare them: projected onto :attr:`expression_subspace`.

        ``embedding`` ``(n, dim)`` is an image- or gene-side embedding of this model. Its aligned coordinates are
        projected onto the subspace (``(n, out_dim)``, the backbone block of a joint output left out); without an
        expression subspace it is returned as it is.
        """
        if self.expression_subspace is None:
            return np.asarray(embedding, dtype=np.float32)
        aligned = np.asarray(embedding, dtype=np.float32)[:, : self.mixture.config["out_dim"]]
        return self.expression_subspace.project(aligned)

    def embed_expression(self, expression: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Gene-side embedding ``(n, dim)`` of panel expression (``panel.transform``) under given weights.

        For a joint output (:attr:`block`) the backbone block is zero: expression says nothing about the image.
        """
        expression = np.asarray(expression, dtype=np.float32)
        if expression.ndim != 2 or expression.shape[1] != len(self.panel):
            raise ValueError(
                f"Expected expression over the model's {len(self.panel)} panel genes; found shape {expression.shape}."
            )
        return self._heads(expression, np.asarray(weights, dtype=np.float32), "gene")

    def identity(self) -> str:
        """Digest of every trained array and the configuration: equal for a model and its reloaded copy.

        The reference bank is left out: it changes what the model can predict, not how it embeds.
        """
        arrays, metadata = self._arrays_and_metadata()
        digest = hashlib.sha256(json.dumps(metadata["config"], sort_keys=True).encode())
        for key in sorted(k for k in arrays if not k.startswith("reference.")):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(arrays[key]).tobytes())
        return digest.hexdigest()[:16]

    def _arrays_and_metadata(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"mixture.{k}": v.detach().cpu().numpy() for k, v in self.mixture.state_dict().items()}
        arrays.update({f"scaler.{k}": np.asarray(v) for k, v in self.scaler.to_dict().items()})
        clustering_arrays, clustering_metadata = self.clustering.to_arrays()
        arrays.update({f"clustering.{k}": v for k, v in clustering_arrays.items()})
        if self.subspace is not None:
            arrays.update({f"subspace.{k}": v for k, v in self.subspace.to_arrays().items()})
        if self.block is not None:
            arrays.update({f"block.{k}": v for k, v in self.block.to_arrays().items()})
        if self.expression_subspace is not None:
            arrays.update({f"expression_subspace.{k}": v for k, v in self.expression_subspace.to_arrays().items()})
        metadata = {
            "format": MODEL_FORMAT,
            "config": self.config.to_dict(),
            "tau": self.tau,
            "mixture": self.mixture.config,
            "panel": self.panel.to_dict(),
            "clustering": clustering_metadata,
            "backbone": self.backbone.to_config(),
            "history": self.history,
        }
        if self.reference is not None:
            reference_arrays, metadata["reference"] = self.reference.to_arrays()
            arrays.update({f"reference.{k}": v for k, v in reference_arrays.items()})
        return arrays, metadata

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save to a folder holding ``model.safetensors`` and ``config.json`` (no pickle).

        ``config.json`` records the SHA-256 digest of the bytes of ``model.safetensors``, which :meth:`load`
        checks.

        Parameters
        ----------
        path
            Target folder; it must not exist unless ``overwrite`` is set. Missing parent folders are created.
        overwrite
            Replace a model saved earlier at ``path``. Only a folder holding exactly ``config.json`` (of a spade_sd
            model format) and ``model.safetensors`` is replaced; anything else at ``path`` (a file, another folder,
            a model folder holding other files too, the current directory or one of its parents, a symbolic link)
            is refused before anything is written.

        Raises
        ------
        FileExistsError
            ``path`` exists and ``overwrite`` is not set, or ``path`` is not a spade_sd model folder.
        OSError
            Writing or renaming failed. The replacement is atomic: the new model is written in full into a hidden
            staging folder beside ``path``, the old folder is renamed aside to a hidden backup, the staging folder
            is renamed into place and only then is the backup deleted. If the rename into place fails, the backup is
            renamed back, so either the old or the new model is at ``path``, never neither or a mixture. Staging
            folders are always removed.
        """
        from safetensors.numpy import save_file

        path = Path(path)
        replacing = path.exists() or path.is_symlink()
        if replacing:
            if not overwrite:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
            _check_replaceable(path)
        arrays, metadata = self._arrays_and_metadata()
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-", dir=path.parent))
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, staging / WEIGHTS_FILE)
            metadata[WEIGHTS_DIGEST] = _sha256(staging / WEIGHTS_FILE)
            (staging / CONFIG_FILE).write_text(json.dumps(metadata, indent=1, default=_json_default))
            if not replacing:
                staging.replace(path)
                return
            backup = path.parent / f".{path.name}.backup-{secrets.token_hex(6)}"
            path.replace(backup)
            try:
                staging.replace(path)
            except BaseException as error:
                try:
                    backup.replace(path)
                except OSError as restore_error:
                    raise OSError(
                        f"Could not move the new model into {path} ({error}) nor restore the previous one "
                        f"({restore_error}); the previous model is kept at {backup}."
                    ) from error
                raise
            _remove_model_folder(backup)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone: Backbone | None = None) -> SpadeModel:
        """Load a model saved with :meth:`save`; no code is run (safetensors and JSON only, no pickle).

        The bytes of ``model.safetensors`` are checked against the SHA-256 digest recorded in ``config.json``;
        a model saved by an older spade_sd without the digest loads with an info message that its weights were not
        verified. A model saved in format ``spade_sd.model/1`` has its configuration migrated (see
        :func:`~spade_sd.config.config_from_format_1`); saving it again writes the current format.

        Parameters
        ----------
        path
            The folder written by :meth:`save`.
        backbone
            The backbone to use. Needed when the model was trained on anything but the packaged default or a
            timm name; it must have the same identity (architecture and weights) as the one saved.

        Returns
        -------
        The model, giving the same embeddings (and the same :meth:`identity`) as the saved one.

        Raises
        ------
        FileNotFoundError
            ``config.json`` or ``model.safetensors`` is missing.
        ValueError
            ``config.json`` is not valid JSON or of another format; ``model.safetensors`` cannot be read or its
            digest differs from the recorded one (the file is damaged or belongs to another model); or the backbone
            is not the one the model was trained on.
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load

        path = Path(path)
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        for required in (config_path, weights_path):
            if not required.is_file():
                raise FileNotFoundError(f"{required} is missing: {path} is not a folder written by SpadeModel.save.")
        try:
            metadata = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is damaged (not valid JSON: {error}).") from error
        found = metadata.get("format") if isinstance(metadata, dict) else None
        if found not in (MODEL_FORMAT, FORMAT_1):
            raise ValueError(
                f"{path} holds model format {found!r}; this spade_sd ({_version()}) reads {MODEL_FORMAT!r} "
                f"(and migrates {FORMAT_1!r}). Load it with the spade_sd version that saved it."
            )
        # the bytes that are hashed are the bytes that are parsed
        data = weights_path.read_bytes()
        expected = metadata.get(WEIGHTS_DIGEST)
        if expected is None:
            logger.info(
                "%s records no digest of %s (saved by an older spade_sd): the weights were not verified.",
                config_path,
                WEIGHTS_FILE,
            )
        else:
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected:
                raise ValueError(
                    f"{weights_path} does not match {config_path}: SHA-256 {digest[:12]}… found, "
                    f"{str(expected)[:12]}… expected. The file is damaged or belongs to another model."
                )
        try:
            arrays = load(data)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{weights_path} is damaged and cannot be read: {error}") from error
        return cls._from_saved(_migrated(metadata), arrays, backbone)

    @classmethod
    def _from_saved(cls, metadata: dict, arrays: dict[str, np.ndarray], backbone: Backbone | None) -> SpadeModel:
        saved = metadata["backbone"]
        if backbone is None:
            if saved["kind"] not in ("packaged", "timm"):
                raise ValueError(
                    f"The model was trained on a {saved['kind']} backbone {saved['name']!r}; pass it as backbone=."
                )
            backbone = Backbone(saved["name"])
        if backbone.identity() != saved["identity"]:
            message = (
                f"Backbone {backbone.name!r} (identity {backbone.identity()[:12]}) is not the one the model was "
                f"trained on ({saved['name']!r}, identity {saved['identity'][:12]}): the embeddings would be "
                "meaningless. Pass the original backbone."
            )
            if saved.get("kind") == "callable" or not getattr(backbone, "stable_identity", True):
                message += (
                    ' Plain callables must be given a stable identity with Backbone(fn, version="...") (the same '
                    "version when training and loading): one without version= or a to_config() method has a new identity "
                    "in every session."
                )
            raise ValueError(message)
        part = {
            prefix: {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{prefix}.")}
            for prefix in ("mixture", "scaler", "clustering", "subspace", "reference", "block", "expression_subspace")
        }
        mixture_config = dict(metadata["mixture"])
        mixture = ExpertMixture(
            mixture_config.pop("n_experts"),
            mixture_config.pop("image_dim"),
            mixture_config.pop("gene_dim"),
            **mixture_config,
        )
        mixture.load_state_dict({k: torch.from_numpy(v) for k, v in part["mixture"].items()}, strict=True)
        return cls(
            backbone=backbone,
            panel=GenePanel.from_dict(metadata["panel"]),
            scaler=FeatureScaler.from_dict(part["scaler"]),
            clustering=ExpertClustering.from_arrays(part["clustering"], metadata["clustering"]),
            mixture=mixture,
            tau=float(metadata["tau"]),
            config=SpadeConfig.from_dict(metadata["config"]),
            subspace=EmbeddingSubspace.from_arrays(part["subspace"]) if part["subspace"] else None,
            history=metadata.get("history", {}),
            reference=ReferenceBank.from_arrays(part["reference"], metadata["reference"])
            if part["reference"]
            else None,
            block=BackboneBlock.from_arrays(part["block"]) if part["block"] else None,
            expression_subspace=EmbeddingSubspace.from_arrays(part["expression_subspace"])
            if part["expression_subspace"]
            else None,
        )


def _migrated(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata of a saved model in the current format.

    A format-1 flat configuration is migrated; a training option the saved configuration does not record takes the
    value the code of its time used (:data:`~spade_sd.config.TRAINING_ABSENT`), not today's default.
    """
    if metadata["format"] == FORMAT_1:
        config = config_from_format_1(
            metadata["config"], panel=metadata["panel"], out_dim=metadata["mixture"]["out_dim"]
        )
        return {**metadata, "format": MODEL_FORMAT, "config": config.to_dict()}
    config = metadata["config"]
    training = {**TRAINING_ABSENT, **config.get("training", {})}
    return {**metadata, "config": {**config, "training": training}}


def _version() -> str:
    from importlib.metadata import version

    return version("spade_sd")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Cannot store {type(value).__name__} in the model's config.json.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_replaceable(path: Path) -> None:
    """Refuse, before anything is written, to replace ``path`` unless it is a folder holding only a saved model."""
    expected = f"a folder holding only {CONFIG_FILE} (of a spade_sd model) and {WEIGHTS_FILE}"
    refuse = f"Refusing to replace {path} with overwrite=True: expected {expected}, found"
    if path.is_symlink():
        raise FileExistsError(f"{refuse} a symbolic link.")
    if not path.is_dir():
        raise FileExistsError(f"{refuse} a file.")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if not path.name or resolved == cwd or resolved in cwd.parents:
        raise FileExistsError(f"{refuse} the current directory or one that contains it. Save to a new folder.")
    entries = sorted(p.name for p in path.iterdir())
    other = [name for name in entries if name not in (CONFIG_FILE, WEIGHTS_FILE)]
    if other:
        shown = ", ".join(other[:10]) + (f" and {len(other) - 10} more" if len(other) > 10 else "")
        raise FileExistsError(f"{refuse} other entries as well: {shown}. Move them away or save to a new folder.")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in entries]
    if missing:
        raise FileExistsError(f"{refuse} no {' or '.join(missing)}: this is not a spade_sd model folder.")
    config, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for file in (config, weights):
        if file.is_symlink() or not file.is_file():
            raise FileExistsError(f"{refuse} {file.name} that is not a regular file.")
    try:
        found = json.loads(config.read_text()).get("format")
    except (ValueError, UnicodeDecodeError, AttributeError):
        found = None
    if not (isinstance(found, str) and found.startswith(MODEL_FORMAT.rsplit("/", 1)[0] + "/")):
        raise FileExistsError(f"{refuse} a {CONFIG_FILE} of format {found!r}: this is not a spade_sd model folder.")


def _remove_model_folder(folder: Path) -> None:
    """Delete a replaced model's folder: only its two files, then the folder if it is empty."""
    try:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (folder / name).unlink(missing_ok=True)
        folder.rmdir()
    except OSError as error:
        logger.warning("The replaced model was kept at %s: it could not be removed (%s).", folder, error)
