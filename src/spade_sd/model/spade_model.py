"""SpadeModel: a trained mixture of data experts with everything needed to embed new patches.

The model owns the backbone it was trained with, the gene panel, the feature standardization, the two-stage
clustering, the routing temperature, the experts' heads and its configuration (:class:`~spade_sd.config.SpadeConfig`).
It may keep a bank of reference spots (:class:`~spade_sd.model.reference.ReferenceBank`) for expression
prediction and queries. It is saved as ``model.safetensors`` (every array) plus ``config.json`` (everything else):
loading runs no code.
``config.json`` records the SHA-256 of the bytes of ``model.safetensors`` (key ``weights_sha256``), and
``model.safetensors`` holds a copy of ``config.json`` in its header, so the digest covers what is read back besides
the arrays (panel genes and order, standardization, subspace, routing temperature, ...): on load, an edited, added or
deleted entry of ``config.json`` is refused by name (:mod:`spade_sd.utils.saved_metadata`).

Formats: ``spade_sd.model/6`` records the weighting within the read-out block (``readout_emphasis``; models saved
as ``/5`` embed as they did, with none); ``spade_sd.model/5`` adds the read-out's lift (``readout_lift``; models saved as ``/4`` embed as they did,
with none); ``spade_sd.model/4`` adds the expression read-out of ``X_spade`` (:mod:`spade_sd.model.readout`);
``spade_sd.model/3`` writes the same copy, and its models embed as they did (``representation="heads"``). ``spade_sd.model/2`` (one configuration section per stage,
``SpadeConfig.to_dict``) and ``spade_sd.model/1`` (one flat configuration dict, migrated on load by
:func:`~spade_sd.config.config_from_format_1`) have none: they load with an info message that ``config.json`` was not
verified, after the checks that need no copy (every entry read is present and the configuration fits the arrays:
panel length, heads' dimensions, subspace size). Models saved before the weights digest load with an info message
that the weights were not verified; models saved before the reference bank existed load with ``reference=None``.
Saving a loaded model writes the current format. The arrays are the same in all three.

:meth:`SpadeModel.save_pretrained` writes the same folder plus a model card (``README.md``,
:mod:`spade_sd.model.model_card`); :meth:`SpadeModel.from_pretrained` reads such a folder, or downloads one from the
Hugging Face Hub (:mod:`spade_sd.utils.hub`); :meth:`SpadeModel.push_to_hub` uploads one.
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
from spade_sd.encoders.identity import backbone_difference
from spade_sd.model.backbone_block import BackboneBlock
from spade_sd.model.clustering import ExpertClustering
from spade_sd.model.heads import ExpertMixture
from spade_sd.model.model_card import model_card
from spade_sd.model.readout import ExpressionReadout
from spade_sd.model.reference import ReferenceBank
from spade_sd.model.routing import expert_weights
from spade_sd.model.standardization import FeatureScaler, fit_slide_scaler
from spade_sd.model.subspace import EmbeddingSubspace, KeptShare
from spade_sd.spots.genes import GenePanel
from spade_sd.utils.constants import SOURCE_PATH
from spade_sd.utils.hub import DEFAULT_LICENSE, MODEL_CARD, is_card, metrics_table, push_folder, saved_folder
from spade_sd.utils.logging import logger
from spade_sd.utils.saved_metadata import check_against_copy, require, write_weights

MODEL_FORMAT = "spade_sd.model/6"
FORMAT_5 = "spade_sd.model/5"
FORMAT_4 = "spade_sd.model/4"
FORMAT_3 = "spade_sd.model/3"
# The earlier formats: without the copy of config.json in model.safetensors; format 1 with a flat configuration
FORMAT_2 = "spade_sd.model/2"
FORMAT_1 = "spade_sd.model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# config.json key of the SHA-256 hex digest of the bytes of model.safetensors
WEIGHTS_DIGEST = "weights_sha256"
# What loading reads from config.json (and, for a model with a reference bank, _REFERENCE)
_REQUIRED = (
    "config",
    "tau",
    "mixture.n_experts",
    "mixture.image_dim",
    "mixture.gene_dim",
    "mixture.out_dim",
    "panel.genes",
    "clustering.n_experts",
    "clustering.groups",
    "backbone.name",
    "backbone.kind",
    "backbone.identity",
)
_REFERENCE = ("reference.genes", "reference.slides", "reference.obs_names", "reference.target_sum")
_EDITED = "The file was edited or belongs to another model; save the model again from the object that trained it."
# Rows standardized, routed and embedded at a time: their float64 and activation temporaries stay ~10 MB
_CHUNK = 1024


@dataclass
class SpadeModel:
    """A trained SPADE model: backbone → standardized features → routed experts → joint embedding.

    Create one with :func:`spade_sd.tl.pretrain`; embed with :func:`spade_sd.tl.embed`; save with :meth:`save`
    (or :meth:`save_pretrained`, with a model card) and restore with :meth:`load` (or :meth:`from_pretrained`, also
    from the Hugging Face Hub); share with :meth:`push_to_hub`.

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
    readout
        For ``representation="backbone+readout"``: the expression read-out whose block follows the backbone's
        features in ``X_spade`` (:meth:`represent`); ``None`` for models that write the heads' output.
    source
        Where the model was last saved to or loaded from: ``{"path": folder}`` (absolute) or, for the Hub,
        ``{"repo_id": …, "revision": commit}``; ``None`` for a model only in memory. :func:`spade_sd.tl.embed`
        records it with the embedding, so a later call finds the model again (after ``sdata.write`` and
        ``read_zarr``). Not part of :meth:`identity`; a changed copy (:meth:`full_rank`) has none.
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
    readout: ExpressionReadout | None = None
    # not a constructor argument: dataclasses.replace() gives a changed copy none
    source: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

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
        model's, so the embeddings of the two are never mixed; its configuration records ``n_comps=None`` and
        ``expression_comps``. A model without the projection is returned as it is.
        """
        if self.subspace is None:
            return self
        tools = self.subspace if self.expression_subspace is None else self.expression_subspace
        # its configuration records what it is: every direction kept, the subspace the tools'
        training = replace(self.config.training, n_comps=None, expression_comps=tools.n_comps)
        return replace(self, subspace=None, expression_subspace=tools, config=replace(self.config, training=training))

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
        represent: bool = False,
    ) -> tuple[np.ndarray, ...]:
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
        represent
            Also return ``X_spade`` (:meth:`represent`), from the same pass over the features.

        Returns
        -------
        The embedding ``(n, dim)`` and the expert weights ``(n, n_experts)``; with ``represent``, then ``X_spade``
        ``(n, representation_dim)``.
        """
        embedding = np.empty((n, self.dim), dtype=np.float32)
        weights = np.empty((n, self.n_experts), dtype=np.float32)
        representation = np.empty((n, self.representation_dim), dtype=np.float32) if represent else None
        slide_scaler = (
            self.slide_scaler(features for _, features in passes()) if self.standardization == "slide" else None
        )
        for start, features in passes():
            stop = start + len(features)
            embedding[start:stop], weights[start:stop] = self.embed_features(
                features, hard=hard, slide_scaler=slide_scaler, share=share
            )
            if representation is not None:
                representation[start:stop] = self.represent(features, embedding[start:stop])
        return (embedding, weights) if representation is None else (embedding, weights, representation)

    @property
    def representation_dim(self) -> int:
        """Width of ``X_spade``: the backbone's plus the read-out's, or :attr:`dim` for a model without a read-out."""
        return self.dim if self.readout is None else self.backbone.dim + self.readout.n_comps

    def represent(self, features: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        """``X_spade`` of patches from their backbone ``features`` and image-side ``embedding``.

        With a read-out (``representation="backbone+readout"``, the default): the features (lifted along what the
        read-out predicts, with ``readout_lift > 0``) followed by the expression block
        (:class:`~spade_sd.model.readout.ExpressionReadout`); without one, the embedding.
        """
        if self.readout is None:
            return np.asarray(embedding, dtype=np.float32)
        return self.readout.represent(features, self.expression_space(embedding))

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
        """Digest of what decides the embeddings: equal for a model and its reloaded copy, different otherwise.

        It covers every trained array, the configuration, the gene panel (genes, their order and normalisation),
        the routing temperature, the heads' and the clustering's settings and the backbone's identity. The
        reference bank is left out: it changes what the model can predict, not how it embeds.
        """
        arrays, metadata = self._arrays_and_metadata()
        decisive = {key: metadata[key] for key in ("config", "tau", "mixture", "clustering")}
        # which spade_sd wrote the panel does not change what it selects
        decisive["panel"] = {k: v for k, v in metadata["panel"].items() if k != "spade_sd_version"}
        decisive["backbone"] = metadata["backbone"]["identity"]
        digest = hashlib.sha256(json.dumps(decisive, sort_keys=True, default=_json_default).encode())
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
        if self.readout is not None:
            arrays.update({f"readout.{k}": v for k, v in self.readout.to_arrays().items()})
        metadata = {
            "format": MODEL_FORMAT,
            "config": self.config.to_dict(),
            "tau": self.tau,
            "mixture": self.mixture.config,
            "panel": self.panel.to_dict(),
            "clustering": clustering_metadata,
            "backbone": self.backbone.saved_config(),
            "history": self.history,
        }
        if self.reference is not None:
            reference_arrays, metadata["reference"] = self.reference.to_arrays()
            arrays.update({f"reference.{k}": v for k, v in reference_arrays.items()})
        return arrays, metadata

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save to a folder holding ``model.safetensors`` and ``config.json`` (no pickle).

        ``config.json`` records the SHA-256 digest of the bytes of ``model.safetensors``, and
        ``model.safetensors`` holds a copy of ``config.json`` in its header: :meth:`load` checks both.

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
        self._save(Path(path), overwrite)
        self.source = {SOURCE_PATH: str(Path(path).resolve())}

    def _save(self, path: Path, overwrite: bool, write_card: Callable[[dict[str, Any]], str] | None = None) -> None:
        """:meth:`save`, with the model card ``write_card(metadata)`` written beside the two files when given."""
        replacing = path.exists() or path.is_symlink()
        if replacing:
            if not overwrite:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
            _check_replaceable(path)
        arrays, metadata = self._arrays_and_metadata()
        # what JSON cannot hold fails here, before anything is written
        copy = json.dumps(metadata, sort_keys=True, default=_json_default)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-", dir=path.parent))
        try:
            tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
            metadata[WEIGHTS_DIGEST] = write_weights(tensors, staging / WEIGHTS_FILE, copy)
            (staging / CONFIG_FILE).write_text(json.dumps(metadata, indent=1, default=_json_default))
            if write_card is not None:
                (staging / MODEL_CARD).write_text(write_card(metadata), encoding="utf-8")
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

        Before anything is built, the bytes of ``model.safetensors`` are checked against the SHA-256 digest
        recorded in ``config.json`` and every entry of ``config.json`` against the copy inside
        ``model.safetensors``. Models saved in an earlier format load with an info message saying what was not
        verified: ``config.json`` (formats ``spade_sd.model/2`` and ``/1``, which keep no copy; it is still checked
        to hold every entry read and to fit the arrays), and the weights too for a model saved without the digest.
        A format-1 configuration is migrated (see :func:`~spade_sd.config.config_from_format_1`). Saving a loaded
        model writes the current format.

        Parameters
        ----------
        path
            The folder written by :meth:`save`.
        backbone
            The backbone to use. Needed when the model was trained on anything but the packaged default or a
            timm name (which are rebuilt with the recorded input size, normalisation and model keywords); it must
            have the same identity (architecture and weights) as the one saved.

        Returns
        -------
        The model, giving the same embeddings (and the same :meth:`identity`) as the saved one.

        Raises
        ------
        FileNotFoundError
            ``config.json`` or ``model.safetensors`` is missing.
        ValueError
            ``config.json`` is not valid JSON, of another format, edited (the entry is named), lacks an entry or
            does not fit the arrays; ``model.safetensors`` cannot be read or its digest differs from the recorded
            one (the file is damaged or belongs to another model); or the backbone is not the one the model was
            trained on (what differs is named).
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
        if found not in (MODEL_FORMAT, FORMAT_5, FORMAT_4, FORMAT_3, FORMAT_2, FORMAT_1):
            raise ValueError(
                f"{path} holds model format {found!r}; this spade_sd ({_version()}) reads {MODEL_FORMAT!r} (and "
                f"{FORMAT_5!r}, {FORMAT_4!r}, {FORMAT_3!r}, {FORMAT_2!r}, {FORMAT_1!r}). Load it with the spade_sd "
                "version that saved it."
            )
        if found in (MODEL_FORMAT, FORMAT_5, FORMAT_4, FORMAT_3):  # earlier formats could lack the digest
            require(metadata, (WEIGHTS_DIGEST,), config_path, "SpadeModel.save")
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
        if found in (MODEL_FORMAT, FORMAT_5, FORMAT_4, FORMAT_3):
            recorded = {k: v for k, v in metadata.items() if k != WEIGHTS_DIGEST}
            check_against_copy(recorded, data, config_path, weights_path)
        else:
            logger.info(
                "%s was saved in format %s, which keeps no copy of it with the weights: %s was not verified "
                "beyond fitting the arrays. Save the model again to record one.",
                config_path,
                found,
                CONFIG_FILE,
            )
        model = cls._from_saved(metadata, arrays, backbone, config_path)
        model.source = {SOURCE_PATH: str(path.resolve())}
        return model

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        license: str = DEFAULT_LICENSE,
        metrics: Any = None,
    ) -> None:
        """Save as :meth:`save` does, with a model card (``README.md``) beside the two files, ready to share.

        The card has YAML metadata (``library_name: spade_sd``, ``license``, ``tags``) and lists the training
        slides and spots, the gene panel (its size and first genes), the backbone and its identity, the training
        history, ``metrics`` if given, and the package versions that trained the model. Read the folder back with
        :meth:`from_pretrained` (or :meth:`load`); upload it with :meth:`push_to_hub`.

        Parameters
        ----------
        path
            Target folder, as for :meth:`save`; ``overwrite`` replaces a folder holding a saved model (and its card).
        overwrite
            Replace a model saved earlier at ``path`` (see :meth:`save`).
        license
            The license of the shared weights, as a Hub license id. The default is the package's own; the training
            data's terms may require another (the weights hold a reference bank of training spots' expression).
        metrics
            Evaluation results for the card: a mapping of metric names to values, or the DataFrame of
            :func:`spade_sd.tl.evaluate` (summarised per encoder, task and metric).

        Raises
        ------
        FileExistsError
            As for :meth:`save`, before anything is written.
        TypeError
            ``metrics`` is neither a mapping nor a DataFrame, before anything is written.
        """
        self._save_with_card(Path(path), overwrite, license=license, metrics=metrics, name=None)
        self.source = {SOURCE_PATH: str(Path(path).resolve())}
        logger.info("Saved the model and its card to %s; load it with sd.SpadeModel.from_pretrained(path)", path)

    def _save_with_card(self, path: Path, overwrite: bool, *, license: str, metrics: Any, name: str | None) -> None:
        if not isinstance(license, str) or not license:
            raise TypeError(
                f"license must be a Hub license id such as 'bsd-3-clause' or 'cc-by-4.0'; found {license!r}."
            )
        metrics_table(metrics)  # a bad metrics argument fails here, before anything is written
        options = {"identity": self.identity(), "dim": self.dim, "license": license, "metrics": metrics, "name": name}
        self._save(path, overwrite, lambda metadata: model_card(metadata, **options))

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        backbone: Backbone | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ) -> SpadeModel:
        """Load a model from a folder (written by :meth:`save_pretrained` or :meth:`save`) or the Hugging Face Hub.

        A local folder is read offline. Anything else is taken as a Hub repository id (``"owner/name"``) and
        downloaded with :func:`huggingface_hub.snapshot_download` (cached: a revision downloaded once loads
        offline). The files are checked as :meth:`load` checks them.

        Parameters
        ----------
        source
            A folder, or a Hub repository id.
        backbone
            As for :meth:`load`: needed only for a model trained on neither the packaged default nor a timm model.
        revision, cache_dir, token
            For a Hub repository: the branch, tag or commit, the download cache and the access token (see
            :func:`huggingface_hub.snapshot_download`).

        Returns
        -------
        The model; its :attr:`source` says where it came from, and :func:`spade_sd.tl.embed` records it.

        Raises
        ------
        FileNotFoundError
            ``source`` is neither a folder nor a repository id, or the folder or repository lacks the model's files.
        OSError
            Downloading failed (offline without a cached copy, an unknown repository, no access); the message
            says how to load a copy downloaded elsewhere.
        ValueError
            As for :meth:`load` (damaged or edited files, another backbone).
        """
        folder, origin = saved_folder(
            source,
            files=(CONFIG_FILE, WEIGHTS_FILE),
            loader="SpadeModel.from_pretrained",
            revision=revision,
            cache_dir=cache_dir,
            token=token,
        )
        model = cls.load(folder, backbone=backbone)
        model.source = origin
        return model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        license: str = DEFAULT_LICENSE,
        metrics: Any = None,
    ) -> str:
        """Upload the model with its card (:meth:`save_pretrained`) to the Hugging Face Hub repository ``repo_id``.

        Needs a network and a token with write access (``hf auth login``, or ``token=``); the repository is created
        if it does not exist. The reference bank (training spots' expression) is uploaded with the weights: share
        only what the training data's terms allow.

        Parameters
        ----------
        repo_id
            ``"owner/name"``.
        private
            Create the repository private (an existing one keeps its visibility).
        token
            Hub token; ``None`` uses the one saved by ``hf auth login``.
        commit_message
            Default: ``"spade_sd model <identity>"``.
        license, metrics
            For the card, as in :meth:`save_pretrained`.

        Returns
        -------
        The commit the upload made (the revision :meth:`from_pretrained` can pin), or ``""`` if the Hub gave none.
        """
        identity = self.identity()

        def write(folder: Path) -> None:
            self._save_with_card(folder, False, license=license, metrics=metrics, name=repo_id)

        pushed = push_folder(
            write, repo_id, private=private, token=token, commit_message=commit_message or f"spade_sd model {identity}"
        )
        self.source = pushed
        logger.info("Uploaded model %s to the Hugging Face Hub repository %s", identity, repo_id)
        return pushed.get("revision", "")

    @classmethod
    def _from_saved(
        cls, metadata: dict, arrays: dict[str, np.ndarray], backbone: Backbone | None, config_path: Path
    ) -> SpadeModel:
        part = {
            prefix: {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{prefix}.")}
            for prefix in (
                "mixture",
                "scaler",
                "clustering",
                "subspace",
                "reference",
                "block",
                "expression_subspace",
                "readout",
            )
        }
        require(metadata, _REQUIRED + (_REFERENCE if part["reference"] else ()), config_path, "SpadeModel.save")
        config = _saved_config(metadata, config_path)
        _check_fits(metadata, config, part, config_path)
        backbone = _saved_backbone(metadata["backbone"], backbone, config_path)
        mixture_config = dict(metadata["mixture"])
        mixture = ExpertMixture(
            mixture_config.pop("n_experts"),
            mixture_config.pop("image_dim"),
            mixture_config.pop("gene_dim"),
            **mixture_config,
        )
        try:
            mixture.load_state_dict({k: torch.from_numpy(v) for k, v in part["mixture"].items()}, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"{config_path}: 'mixture' {metadata['mixture']} does not fit the expert heads in {WEIGHTS_FILE}: "
                f"{str(error).splitlines()[-1].strip()} {_EDITED}"
            ) from error
        return cls(
            backbone=backbone,
            panel=GenePanel.from_dict(metadata["panel"]),
            scaler=FeatureScaler.from_dict(part["scaler"]),
            clustering=ExpertClustering.from_arrays(part["clustering"], metadata["clustering"]),
            mixture=mixture,
            tau=float(metadata["tau"]),
            config=config,
            subspace=EmbeddingSubspace.from_arrays(part["subspace"]) if part["subspace"] else None,
            history=metadata.get("history", {}),
            reference=ReferenceBank.from_arrays(part["reference"], metadata["reference"])
            if part["reference"]
            else None,
            block=BackboneBlock.from_arrays(part["block"]) if part["block"] else None,
            expression_subspace=EmbeddingSubspace.from_arrays(part["expression_subspace"])
            if part["expression_subspace"]
            else None,
            readout=ExpressionReadout.from_arrays(part["readout"]) if part["readout"] else None,
        )


def _saved_config(metadata: dict[str, Any], config_path: Path) -> SpadeConfig:
    """The configuration of a saved model; a format-1 flat configuration is migrated.

    A training option an earlier format does not record takes the value the code of its time used
    (:data:`~spade_sd.config.TRAINING_ABSENT`), not today's default.
    """
    try:
        if metadata["format"] == FORMAT_1:
            panel, out_dim = metadata["panel"], metadata["mixture"]["out_dim"]
            return config_from_format_1(metadata["config"], panel=panel, out_dim=out_dim)
        config = dict(metadata["config"])
        if metadata["format"] != MODEL_FORMAT:
            config["training"] = {**TRAINING_ABSENT, **config.get("training", {})}
        return SpadeConfig.from_dict(config)
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(
            f"{config_path}: its entry 'config' is not a valid configuration ({error}). {_EDITED}"
        ) from error


def _check_fits(
    metadata: dict[str, Any], config: SpadeConfig, part: dict[str, dict[str, np.ndarray]], config_path: Path
) -> None:
    """Refuse entries of ``config.json`` that contradict the arrays, naming the entry (no copy is needed to tell)."""
    heads = part["mixture"]
    image, gene = heads.get("image_heads.0.projection.weight"), heads.get("gene_heads.0.projection.weight")
    if image is None or gene is None:
        raise ValueError(
            f"{config_path.parent / WEIGHTS_FILE} holds no expert heads: it is not a SpadeModel's weights."
        )
    n_heads = len({key.split(".")[1] for key in heads if key.startswith("image_heads.")})
    held = {"n_experts": n_heads, "out_dim": image.shape[0], "image_dim": image.shape[1], "gene_dim": gene.shape[1]}
    found = {
        **{f"mixture.{key}": metadata["mixture"][key] for key in held},
        "config.training.out_dim": config.training.out_dim,
        "clustering.n_experts": metadata["clustering"]["n_experts"],
    }
    for entry, value in found.items():
        key = entry.rsplit(".", 1)[1]
        if isinstance(value, bool) or value != held[key]:
            raise ValueError(
                f"{config_path}: {entry!r} is {value!r}, but the expert heads in {WEIGHTS_FILE} have {key} "
                f"{held[key]}. {_EDITED}"
            )
    genes = metadata["panel"]["genes"]
    if not isinstance(genes, list) or not all(isinstance(gene, str) for gene in genes):
        raise ValueError(f"{config_path}: 'panel.genes' must be a list of gene names; found {genes!r:.80}. {_EDITED}")
    n_genes = len(genes)
    if n_genes != held["gene_dim"]:
        raise ValueError(
            f"{config_path}: 'panel.genes' lists {n_genes} genes, but the gene heads in {WEIGHTS_FILE} read "
            f"{held['gene_dim']}. {_EDITED}"
        )
    # without a subspace n_comps cannot be told: full_rank() models saved before it recorded None keep theirs
    for name, prefix in (("n_comps", "subspace"), ("expression_comps", "expression_subspace")):
        basis, recorded = part[prefix].get("basis"), getattr(config.training, name)
        if basis is not None and recorded != basis.shape[1]:
            raise ValueError(
                f"{config_path}: 'config.training.{name}' is {recorded!r}, but {WEIGHTS_FILE} holds a "
                f"{prefix.replace('_', ' ')} of {basis.shape[1]} principal directions. {_EDITED}"
            )
    lifted, lift = config.training.readout_lift > 0, part["readout"].get("lift")
    if part["readout"] and lifted != (lift is not None):
        raise ValueError(
            f"{config_path}: 'config.training.readout_lift' is {config.training.readout_lift!r}, but {WEIGHTS_FILE} "
            f"holds {'no' if lift is None else 'a'} lift of the read-out. {_EDITED}"
        )
    tau = metadata["tau"]
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not tau > 0:
        raise ValueError(f"{config_path}: 'tau' must be a positive number; found {tau!r}. {_EDITED}")


def _saved_backbone(recorded: dict[str, Any], backbone: Backbone | None, config_path: Path) -> Backbone:
    """``backbone``, or the recorded one rebuilt, after checking it is the one the model was trained on."""
    rebuilt = backbone is None
    if rebuilt:
        if recorded["kind"] not in ("packaged", "timm"):
            raise ValueError(
                f"The model was trained on a {recorded['kind']} backbone {recorded['name']!r}; pass it as backbone=."
            )
        backbone = Backbone.from_config(recorded)
    if backbone.identity() != recorded["identity"]:
        message = (
            f"The backbone {'rebuilt from ' + str(config_path) if rebuilt else 'given'} is not the one the model was "
            f"trained on ({backbone_difference(recorded, backbone.saved_config())}): the embeddings would be "
            "meaningless. Pass the original backbone as backbone=."
        )
        if recorded.get("kind") == "callable" or not getattr(backbone, "stable_identity", True):
            message += (
                ' Plain callables must be given a stable identity with Backbone(fn, version="...") (the same '
                "version when training and loading): one without version= or a to_config() method has a new identity "
                "in every session."
            )
        raise ValueError(message)
    return backbone


def _version() -> str:
    from importlib.metadata import version

    return version("spade_sd")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Cannot store {type(value).__name__} in the model's config.json.")


def _check_replaceable(path: Path) -> None:
    """Refuse, before anything is written, to replace ``path`` unless it is a folder holding only a saved model."""
    expected = f"a folder holding only {CONFIG_FILE} (of a spade_sd model) and {WEIGHTS_FILE} (and its {MODEL_CARD})"
    refuse = f"Refusing to replace {path} with overwrite=True: expected {expected}, found"
    if path.is_symlink():
        raise FileExistsError(f"{refuse} a symbolic link.")
    if not path.is_dir():
        raise FileExistsError(f"{refuse} a file.")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if not path.name or resolved == cwd or resolved in cwd.parents:
        raise FileExistsError(f"{refuse} the current directory or one that contains it. Save to a new folder.")
    entries = sorted(p.name for p in path.iterdir())
    # a card spade_sd wrote goes with the model; a README.md of the user's own is never replaced
    ours = [CONFIG_FILE, WEIGHTS_FILE] + ([MODEL_CARD] if is_card(path / MODEL_CARD) else [])
    other = [name for name in entries if name not in ours]
    if other:
        shown = ", ".join(other[:10]) + (f" and {len(other) - 10} more" if len(other) > 10 else "")
        raise FileExistsError(f"{refuse} other entries as well: {shown}. Move them away or save to a new folder.")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in entries]
    if missing:
        raise FileExistsError(f"{refuse} no {' or '.join(missing)}: this is not a spade_sd model folder.")
    config, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    files = [config, weights] + ([path / MODEL_CARD] if MODEL_CARD in entries else [])
    for file in files:
        if file.is_symlink() or not file.is_file():
            raise FileExistsError(f"{refuse} {file.name} that is not a regular file.")
    try:
        found = json.loads(config.read_text()).get("format")
    except (ValueError, UnicodeDecodeError, AttributeError):
        found = None
    if not (isinstance(found, str) and found.startswith(MODEL_FORMAT.rsplit("/", 1)[0] + "/")):
        raise FileExistsError(f"{refuse} a {CONFIG_FILE} of format {found!r}: this is not a spade_sd model folder.")


def _remove_model_folder(folder: Path) -> None:
    """Delete a replaced model's folder: only its files (two, and a model card), then the folder if it is empty."""
    try:
        for name in (CONFIG_FILE, WEIGHTS_FILE, MODEL_CARD):
            (folder / name).unlink(missing_ok=True)
        folder.rmdir()
    except OSError as error:
        logger.warning("The replaced model was kept at %s: it could not be removed (%s).", folder, error)
