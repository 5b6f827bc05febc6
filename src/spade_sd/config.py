"""Configuration as a value: what a SPADE model is trained with, each default written once.

Small frozen dataclasses, one per stage: :class:`PatchConfig` (patch geometry), :class:`PanelConfig` (gene panel),
:class:`ClusteringConfig` (standardization, experts, routing), :class:`TrainingConfig` (the heads and their
training), and :class:`SpadeConfig` holding all four plus the provenance training adds. :func:`spade_sd.tl.pretrain`
builds them from its keywords (same names and defaults; ``panel_flavor`` is :attr:`PanelConfig.flavor`), each
validates its values once when created, the lower layers receive them instead of keywords, and
:class:`~spade_sd.SpadeModel` saves them in its ``config.json``. Error messages name the keyword of
:func:`spade_sd.tl.pretrain`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral
from typing import Any, Literal, Self

from spade_sd.utils.validation import (
    check_bool,
    check_choice,
    check_int,
    check_key,
    check_number,
    check_patch_geometry,
    check_seed,
)

STANDARDIZE = ("slide", "global")
PANEL_FLAVORS = ("union", "global")
LossName = Literal["soft_target", "clip"]
LOSSES: tuple[str, ...] = ("soft_target", "clip")
OutputName = Literal["aligned", "joint"]
OUTPUTS: tuple[str, ...] = ("aligned", "joint")
RepresentationName = Literal["backbone+readout", "heads"]
REPRESENTATIONS: tuple[str, ...] = ("backbone+readout", "heads")
HeadInitName = Literal["random", "backbone"]
HEAD_INITS: tuple[str, ...] = ("random", "backbone")

# Training at scale (docs/scale.md, benchmarks/pretrain_scale.py). From SCALE_SPOTS training spots on,
# training.fit.fit_model reads the features (memory maps allowed) in row blocks instead of holding their
# standardized copy, fits every principal basis (clustering, head start, subspaces, joint block) and the reference
# bank's extra genes on a seeded draw of FIT_SPOTS spots, and clusters a stage-1 group of more than MINIBATCH_SPOTS
# spots by mini-batch k-means; below it, a model is trained exactly as before these thresholds existed.
SCALE_SPOTS = 65_536
FIT_SPOTS = 32_768
MINIBATCH_SPOTS = 32_768
# Whichever the size: the choice of experts that keep the generalist's heads scores at most SELECTION_SPOTS validation
# spots (a seeded draw per expert above it; every contrastive pair costs compute), SCORE_CHUNK rows of logits at a time
# (512 rows of 16,384 held 118 MB at the choice's peak, 2,048 rows 317 MB, in the same time)
SELECTION_SPOTS = 16_384
SCORE_CHUNK = 512
# Embedding shapes much smaller than a patch (spade_sd.spots.grid): shapes whose size (a bin's side, a circle's
# diameter, a cell's median diameter) is below this fraction of the patch side take the features of the nearest
# patch of a grid by default (grid=None), as 8 and 16 µm Visium HD bins and ~10–20 µm Xenium cells do under 112 µm
# patches; Visium's 55 µm spots, tiles and pseudo-spots keep one patch each. Their neighbours' patches would overlap
# their own by more than 3/4 of a side, so one patch per shape costs time ∝ shapes for nearly the same features.
GRID_SHAPE_FRACTION = 0.25


def _set(config: Any, name: str, value: Any) -> None:
    # frozen dataclasses keep the validated (normalized) value, e.g. an int given for a float
    object.__setattr__(config, name, value)


def check_n_comps(n_comps: int | None, out_dim: int, n_spots: int | None = None, *, name: str = "n_comps") -> None:
    """Raise a ValueError unless ``n_comps`` is ``None`` or an int in ``[1, min(out_dim, n_spots)]``."""
    if n_comps is None:
        return
    if isinstance(n_comps, bool) or not isinstance(n_comps, Integral) or n_comps < 1:
        raise ValueError(f"{name} must be a positive int or None; found {n_comps!r}.")
    if n_comps > out_dim:
        raise ValueError(f"{name} must be at most out_dim ({out_dim}); found {n_comps}.")
    if n_spots is not None and n_comps > n_spots:
        raise ValueError(f"{name} must be at most the number of training spots ({n_spots}); found {n_comps}.")


class _Config:
    """``to_dict``/``from_dict`` of a flat config: JSON values (lists, not tuples), unknown keys refused."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-able values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; missing fields take their defaults, unknown ones are refused."""
        names = _field_names(cls)
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {unknown}; it has {list(names)}.")
        return cls(**values)


@dataclass(frozen=True)
class PatchConfig(_Config):
    """Patch geometry: every spot's patch is ``size_um`` µm wide, resized to ``size_px`` pixels.

    Attributes
    ----------
    size_um
        Side of a patch in µm (0.01 to 10 000).
    size_px
        Side of a patch in pixels, as the backbone reads it (8 to 4096).
    """

    size_um: float = 112.0
    size_px: int = 224

    def __post_init__(self) -> None:
        size_um, size_px = check_patch_geometry(self.size_um, self.size_px)
        _set(self, "size_um", size_um)
        _set(self, "size_px", size_px)


@dataclass(frozen=True)
class PanelConfig(_Config):
    """How the gene panel is selected and what expression the gene heads read (see :class:`~spade_sd.GenePanel`).

    Attributes
    ----------
    n_top_genes
        Highly variable genes per sample (``"union"``) or in total (``"global"``).
    flavor
        ``"union"`` of every sample's HVGs (SPADE) or ``"global"`` HVGs over all samples (SEAL); the keyword
        ``panel_flavor`` of :func:`spade_sd.tl.pretrain`.
    smoothing
        Weight in ``[0, 1]`` of the spot-context smoothing of expression (each spot's with its neighbors' mean).
    layer
        Layer of the tables holding raw counts; ``None`` uses ``X``.
    """

    n_top_genes: int = 50
    flavor: Literal["union", "global"] = "union"
    smoothing: float = 0.0
    layer: str | None = None

    def __post_init__(self) -> None:
        _set(self, "n_top_genes", check_int("n_top_genes", self.n_top_genes, minimum=1))
        check_choice("panel_flavor", self.flavor, PANEL_FLAVORS)
        _set(self, "smoothing", check_number("smoothing", self.smoothing, minimum=0, maximum=1))
        if self.layer is not None:
            check_key("layer", self.layer)


@dataclass(frozen=True)
class ClusteringConfig(_Config):
    """Standardization of the backbone features, the two-stage clustering into experts and the routing softness.

    Attributes
    ----------
    n_experts
        Number of data experts (stage-2 clusters); ``1`` gives a single BLEEP-style expert.
    n_fine
        Stage-1 k-means clusters per group, or ``"elbow"`` to choose it per group.
    groupby
        Table ``obs`` column defining the stage-1 groups; ``None``: one group per slide.
    standardize
        ``"slide"``: standardize every slide's features by that slide's own statistics first; ``"global"``: only by
        the training set's.
    tau_scale
        Softness of routing relative to the training features' typical margin between experts.
    """

    n_experts: int = 4
    n_fine: int | Literal["elbow"] = 16
    groupby: str | None = None
    standardize: Literal["slide", "global"] = "slide"
    tau_scale: float = 0.25

    def __post_init__(self) -> None:
        _set(self, "n_experts", check_int("n_experts", self.n_experts, minimum=1))
        if self.n_fine != "elbow":
            if isinstance(self.n_fine, str):
                raise ValueError(f"n_fine must be a positive integer or 'elbow'; found {self.n_fine!r}.")
            _set(self, "n_fine", check_int("n_fine", self.n_fine, minimum=1))
        if self.groupby is not None:
            check_key("groupby", self.groupby)
        check_choice("standardize", self.standardize, STANDARDIZE)
        _set(self, "tau_scale", check_number("tau_scale", self.tau_scale, minimum=0, exclusive_minimum=True))


@dataclass(frozen=True)
class TrainingConfig(_Config):
    """The experts' heads and their training (one Lightning run; AdamW, warm-up then cosine decay).

    Attributes
    ----------
    loss
        ``"clip"`` (InfoNCE on normalized embeddings, learnable temperature) or ``"soft_target"`` (the SPADE/BLEEP
        reference's symmetric loss with temperature ``temperature``).
    temperature
        ``T`` of the soft-target loss.
    out_dim
        Embedding dimension of the heads.
    n_comps
        Keep every embedding in the span of the ``n_comps`` leading principal directions of the training spots'
        image embeddings; ``None`` (the default) keeps every direction of the heads' outputs, so the embedding keeps
        what the backbone knew about slides unlike the training data.
    expression_comps
        The expression tools (:func:`~spade_sd.tl.predict_expression`, :func:`~spade_sd.tl.query`) compare
        embeddings within the span of the ``expression_comps`` leading principal directions of the training spots'
        image embeddings, and :func:`~spade_sd.tl.embed` writes that projection beside the embedding
        (``.obsm['X_spade_expr']``); ``None``: the tools compare whole embeddings and nothing more is written.
    representation
        What :func:`~spade_sd.tl.embed` writes as ``X_spade``, the representation to cluster and transfer labels on.
        ``"backbone+readout"``: the backbone's features, unchanged, followed by the expression the model reads from
        the image (:class:`~spade_sd.model.readout.ExpressionReadout`: the ridge read-out of the embeddings as the
        expression tools compare them, fitted on the reference bank, in its principal coordinates); needs a
        reference bank.
        ``"heads"``: the heads' output (the aligned coordinates, as ``output`` says), what models saved before 0.3
        wrote. The expression tools compare within the expression subspace either way.
    readout_weight
        With ``representation="backbone+readout"``: the read-out block's total standard deviation relative to the
        backbone features' on the training slides (each around its own mean).
    readout_lift
        With ``representation="backbone+readout"``: how much more the part of the backbone's features that the
        read-out predicts counts in ``X_spade`` (:meth:`ExpressionReadout.lifted
        <spade_sd.model.readout.ExpressionReadout.lifted>`): it counts ``1 + readout_lift`` times, every other
        direction once. 0 keeps the features unchanged (what 0.3.0 wrote).
    readout_emphasis
        With ``representation="backbone+readout"``: each column of the read-out block is multiplied by its spread
        on the reference bank to this power before the block's total spread is set (:meth:`ExpressionReadout.fit
        <spade_sd.model.readout.ExpressionReadout.fit>`), so that the leading components of the predicted expression
        weigh more in a neighbour graph. 0 keeps the block as read (what 0.4.0 wrote).
    output
        ``"aligned"``: the embedding is the heads' (aligned) coordinates; ``"joint"``: the aligned coordinates
        followed by a block of the standardized backbone features (:class:`~spade_sd.model.backbone_block.BackboneBlock`),
        so that nothing the backbone knew is projected away. The gene side fills that block with zeros.
    backbone_comps
        With ``output="joint"``: how many leading principal components of the training spots' standardized backbone
        features the block keeps; ``None`` keeps the standardized features themselves (no projection).
    backbone_weight
        With ``output="joint"``: the block's total variance over the training spots, relative to the aligned
        coordinates' (it sets the block's share in cosine similarities; per-coordinate standardized probes ignore it).
    reconstruction
        Weight of a reconstruction term added to the contrastive loss: every expert gets a linear decoder from its
        image embedding back to the standardized backbone features, and the mean squared error of that decoding
        (about 1 for a decoder that knows nothing) is added with this weight, so the image embedding keeps what is
        needed to recover the backbone features. 0: none (SPADE's loss alone).
    head_init
        ``"random"``: the heads start from PyTorch's default initialization. ``"backbone"``: every image head starts
        at the backbone's leading principal components: its first linear layer is the projection onto the
        ``out_dim`` leading principal directions of the training spots' standardized features and its residual
        branch (second linear layer) starts at zero, so training starts from the backbone's own geometry and moves
        only as far as the contrastive loss asks. The gene heads start at random either way.
    dropout
        Dropout of the heads.
    batch_size
        Spots per batch (per process); a contrastive batch needs at least 2.
    max_epochs
        Most epochs to train.
    lr
        Peak learning rate (of the generalist, and of experts trained from scratch).
    weight_decay
        AdamW weight decay.
    patience
        Epochs without improvement of the monitored loss before stopping.
    warmup_steps
        Linear warm-up steps before the cosine decay.
    val_slides
        Slide names to validate on; ``None``: a seeded draw of whole slides (or, with few slides, a block of each).
    val_fraction
        Fraction of slides (or of each slide's extent) held out when ``val_slides`` is ``None``; 0: no validation.
    min_val_slides
        Fewest slides for which whole slides are held out; with fewer, a block of every slide validates.
    warm_start
        With several experts, first train one generalist expert on all spots and start every expert from it.
    expert_lr_factor
        Warm-started experts are trained at ``lr * expert_lr_factor``.
    seed
        Seed of clustering, initialization, batching and the validation draw.
    train_threads
        Torch CPU threads while training the heads; ``None`` leaves torch's setting.
    reference_size
        Training spots kept in the model's reference bank (:class:`~spade_sd.model.reference.ReferenceBank`),
        drawn per expert in proportion to its spots with ``seed``; 0 stores no bank.
    reference_genes
        Genes of the reference bank: the panel's genes, then the training slides' shared highly variable genes up
        to this many in total.
    """

    loss: LossName = "clip"
    temperature: float = 1.0
    out_dim: int = 256
    n_comps: int | None = None
    expression_comps: int | None = 16
    representation: RepresentationName = "backbone+readout"
    readout_weight: float = 0.7
    readout_lift: float = 0.5
    readout_emphasis: float = 0.5
    output: OutputName = "aligned"
    backbone_comps: int | None = 64
    backbone_weight: float = 1.0
    reconstruction: float = 0.0
    head_init: HeadInitName = "backbone"
    dropout: float = 0.1
    batch_size: int = 128
    max_epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-2
    patience: int = 10
    warmup_steps: int = 0
    val_slides: tuple[str, ...] | None = None
    val_fraction: float = 0.2
    min_val_slides: int = 4
    warm_start: bool = True
    expert_lr_factor: float = 0.1
    seed: int = 0
    train_threads: int | None = 1
    reference_size: int = 2000
    reference_genes: int = 2000

    def __post_init__(self) -> None:
        check_choice("loss", self.loss, LOSSES)
        positive = {"minimum": 0, "exclusive_minimum": True}
        _set(self, "temperature", check_number("temperature", self.temperature, **positive))
        _set(self, "out_dim", check_int("out_dim", self.out_dim, minimum=1))
        check_n_comps(self.n_comps, self.out_dim)
        check_n_comps(self.expression_comps, self.out_dim, name="expression_comps")
        check_choice("representation", self.representation, REPRESENTATIONS)
        _set(self, "readout_weight", check_number("readout_weight", self.readout_weight, **positive))
        _set(self, "readout_lift", check_number("readout_lift", self.readout_lift, minimum=0))
        _set(self, "readout_emphasis", check_number("readout_emphasis", self.readout_emphasis, minimum=0))
        check_choice("output", self.output, OUTPUTS)
        if self.backbone_comps is not None:
            _set(self, "backbone_comps", check_int("backbone_comps", self.backbone_comps, minimum=1))
        _set(self, "backbone_weight", check_number("backbone_weight", self.backbone_weight, **positive))
        _set(self, "reconstruction", check_number("reconstruction", self.reconstruction, minimum=0))
        check_choice("head_init", self.head_init, HEAD_INITS)
        _set(self, "dropout", check_number("dropout", self.dropout, minimum=0, maximum=1, exclusive_maximum=True))
        _set(self, "batch_size", check_int("batch_size", self.batch_size, minimum=2))  # a batch needs negatives
        _set(self, "max_epochs", check_int("max_epochs", self.max_epochs, minimum=1))
        _set(self, "lr", check_number("lr", self.lr, **positive))
        _set(self, "weight_decay", check_number("weight_decay", self.weight_decay, minimum=0))
        _set(self, "patience", check_int("patience", self.patience, minimum=0))
        _set(self, "warmup_steps", check_int("warmup_steps", self.warmup_steps, minimum=0))
        _check_validation_split(self)
        _set(self, "warm_start", check_bool("warm_start", self.warm_start))
        _set(self, "expert_lr_factor", check_number("expert_lr_factor", self.expert_lr_factor, **positive))
        _set(self, "seed", check_seed(self.seed))
        if self.train_threads is not None:
            _set(self, "train_threads", check_int("train_threads", self.train_threads, minimum=1))
        _set(self, "reference_size", check_int("reference_size", self.reference_size, minimum=0))
        _set(self, "reference_genes", check_int("reference_genes", self.reference_genes, minimum=1))


def _check_validation_split(config: Any) -> None:
    """Validate and normalise a validation split by slide: ``val_slides``, ``val_fraction``, ``min_val_slides``."""
    _set(config, "val_slides", _slide_names(config.val_slides))
    _set(config, "val_fraction", check_number("val_fraction", config.val_fraction, minimum=0, maximum=1))
    _set(config, "min_val_slides", check_int("min_val_slides", config.min_val_slides, minimum=2))


def _slide_names(val_slides: Any) -> tuple[str, ...] | None:
    if val_slides is None:
        return None
    if isinstance(val_slides, str) or not isinstance(val_slides, Sequence):
        raise TypeError(f"val_slides must be a list of slide names or None; found {val_slides!r}.")
    return tuple(map(str, val_slides))


# tl.pretrain keywords whose name differs from the field they set
_KEYWORDS = {"flavor": "panel_flavor"}
_SECTIONS = {"patches": PatchConfig, "panel": PanelConfig, "clustering": ClusteringConfig, "training": TrainingConfig}


@dataclass(frozen=True)
class SpadeConfig:
    """Everything a :class:`~spade_sd.SpadeModel` is trained with, and the provenance training records.

    Attributes
    ----------
    patches, panel, clustering, training
        The configuration of each stage.
    slides
        Names of the training slides (set by training).
    n_spots
        Number of training spots (set by training).
    versions
        Versions of spade_sd and its main dependencies that trained the model (set by training).
    """

    patches: PatchConfig = field(default_factory=PatchConfig)
    panel: PanelConfig = field(default_factory=PanelConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    slides: tuple[str, ...] = ()
    n_spots: int | None = None
    versions: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name, kind in _SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}; found {type(getattr(self, name)).__name__}.")
        _set(self, "slides", tuple(map(str, self.slides)))
        _set(self, "versions", dict(self.versions))

    def to_dict(self) -> dict[str, Any]:
        """Nested JSON-able dicts, as saved in the model's ``config.json`` and written to ``.uns``."""
        sections = {name: getattr(self, name).to_dict() for name in _SECTIONS}
        return {**sections, "slides": list(self.slides), "n_spots": self.n_spots, "versions": dict(self.versions)}

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, Any]) -> SpadeConfig:
        """The configuration named by keywords such as :func:`spade_sd.tl.pretrain`'s.

        Each section takes the keywords that name its fields (``panel_flavor`` names :attr:`PanelConfig.flavor`);
        other keywords are ignored and fields without a keyword keep their defaults.
        """
        sections = {}
        for name, kind in _SECTIONS.items():
            given = {field: _KEYWORDS.get(field, field) for field in _field_names(kind)}
            sections[name] = kind(**{field: keywords[key] for field, key in given.items() if key in keywords})
        return cls(**sections)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SpadeConfig:
        """Inverse of :meth:`to_dict`; missing entries take their defaults, unknown ones are refused."""
        unknown = sorted(set(values) - set(_field_names(cls)))
        if unknown:
            raise ValueError(f"SpadeConfig has no entries {unknown}; it has {list(_field_names(cls))}.")
        sections = {name: kind.from_dict(values[name]) for name, kind in _SECTIONS.items() if name in values}
        return cls(**{**values, **sections})


def check_trainer_kwargs(trainer_kwargs: Mapping[str, Any], keywords: Collection[str] = ()) -> dict[str, Any]:
    """``trainer_kwargs`` if none of them is a training option: they go to :class:`lightning.pytorch.Trainer` only.

    Parameters
    ----------
    trainer_kwargs
        Keyword arguments meant for the Lightning Trainer.
    keywords
        The caller's own keywords, named in the error as where an option belongs.

    Raises
    ------
    TypeError
        Naming the first key that is a field of one of the configs, and where to pass it instead.
    """
    for name in trainer_kwargs:
        owner = next((kind for kind in _SECTIONS.values() if name in _field_names(kind)), None)
        if owner is not None:
            keyword = _KEYWORDS.get(name, name)
            where = f"pass it as {keyword}=..." if keyword in keywords else f"set it in {owner.__name__}({name}=...)"
            raise TypeError(
                f"{name!r} is not a lightning.Trainer argument: **trainer_kwargs go to lightning.Trainer only, and "
                f"{name} is a training option ({owner.__name__}.{name}); {where}."
            )
    return dict(trainer_kwargs)


# What a format-1 model lacking one of these keys was trained with: each key came with the option it records
_FORMAT_1_ABSENT = {
    "standardize": "global",
    "warm_start": False,
    "expert_lr_factor": 1.0,
    "n_comps": None,
    "reference_size": 0,  # format 1 stored no reference bank
    "head_init": "random",
    "expression_comps": None,
}
_FORMAT_1_TRAINING = (
    "lr",
    "n_comps",
    "warm_start",
    "expert_lr_factor",
    "seed",
    "train_threads",
    "reference_size",
    "head_init",
    "expression_comps",
)
# What a later model lacking one of these training options was trained with: each came with the option it records,
# and the defaults changed later (the heads started at random and the tools compared whole embeddings).
TRAINING_ABSENT = {
    "head_init": "random",
    "expression_comps": None,
    "representation": "heads",
    "readout_lift": 0.0,
    "readout_emphasis": 0.0,
}


def config_from_format_1(
    flat: Mapping[str, Any], *, panel: Mapping[str, Any] | None = None, out_dim: int | None = None
) -> SpadeConfig:
    """The configuration of a model saved in format 1 (``spade_sd.model/1``), whose ``config`` was one flat dict.

    Format 1 kept the patch geometry, the clustering options and some training options at the top level and the
    other training keywords (with Lightning's) under ``"training"``; the panel options were recorded only by the
    saved panel and the embedding dimension only by the heads. An option such a model does not record takes the
    value the code of its time used without it (per-slide standardization, warm start, the expert learning-rate
    factor and the subspace came later), any other today's default; Lightning's options are dropped.

    Parameters
    ----------
    flat
        The ``config`` entry of a format-1 ``config.json`` (what ``SpadeModel.config`` was).
    panel
        The saved panel's ``to_dict()``: its ``n_top_genes``, ``flavor`` and ``smoothing``.
    out_dim
        The heads' embedding dimension.
    """
    flat = {**_FORMAT_1_ABSENT, **flat}
    training = {**flat.get("training", {}), **{k: flat[k] for k in _FORMAT_1_TRAINING if k in flat}}
    if out_dim is not None:
        training["out_dim"] = out_dim
    clustering = {k: flat[k] for k in ("n_fine", "standardize", "tau_scale") if k in flat}
    n_experts = flat.get("n_experts_requested", flat.get("n_experts"))
    if n_experts is not None:
        clustering["n_experts"] = n_experts
    panel = {k: v for k, v in (panel or {}).items() if k in ("n_top_genes", "flavor", "smoothing")}
    return SpadeConfig(
        patches=PatchConfig.from_dict(flat.get("patches", {})),
        panel=PanelConfig(**panel, layer=flat.get("layer")),
        clustering=ClusteringConfig(**clustering),
        training=TrainingConfig.from_dict({k: v for k, v in training.items() if k in _field_names(TrainingConfig)}),
        slides=flat.get("slides", ()),
        n_spots=flat.get("n_spots"),
        versions=flat.get("versions", {}),
    )


def _field_names(kind: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(kind))


@dataclass(frozen=True)
class SealConfig(_Config):
    """SEAL fine-tuning (:func:`spade_sd.tl.finetune`): LoRA on the backbone's last blocks, a VAE on the genes.

    Attributes
    ----------
    n_blocks
        Final blocks of the backbone that receive LoRA adapters (see :func:`~spade_sd.encoders.lora.plan_adapters`).
    rank, alpha, lora_dropout
        LoRA rank ``r``, scale numerator ``α`` (updates are scaled by ``α / r``) and dropout on the adapters' input.
    n_genes
        Size of the global highly variable gene panel the omics side reads (genes keyed by name).
    embed_dim
        Dimension of the shared space: the image projection and the VAE's latent ``μ``.
    temperature
        Fixed temperature ``τ`` of the CLIP InfoNCE loss on L2-normalised embeddings.
    contrastive_weight, gene_weight, image_gene_weight
        Weights of the InfoNCE loss, of the VAE's gene reconstruction and of the image → gene reconstruction.
    mse_weight
        Within a reconstruction loss: ``(1 − mean per-gene Pearson r) + mse_weight × MSE`` on z-scored genes.
    kl_weight
        Weight of the VAE's KL divergence to the standard normal prior.
    lr, weight_decay
        AdamW learning rate (adapters and heads) and weight decay; the rate follows a cosine decay per step.
    batch_size
        Spots per batch (per process); a contrastive batch needs at least 2.
    max_epochs, patience
        Most epochs, and epochs without improvement of the validation loss before stopping.
    val_slides, val_fraction, min_val_slides
        Validation by slide, as in :class:`TrainingConfig`.
    min_spots
        Fewest training spots accepted.
    augment
        Flip and rotate every training patch at random (by multiples of 90°) at every step. The frozen prefix's
        activations then differ at every step, so they are not cached: every step runs the full forward pass.
    seed
        Seed of the adapters' and heads' initialisation, batching, the VAE's noise, augmentation and the validation
        draw.
    train_threads
        Torch CPU threads while training; ``None`` leaves torch's setting.
    """

    n_blocks: int = 2
    rank: int = 8
    alpha: float = 32.0
    lora_dropout: float = 0.15
    n_genes: int = 256
    embed_dim: int = 256
    temperature: float = 0.05
    contrastive_weight: float = 1.0
    gene_weight: float = 1.0
    image_gene_weight: float = 1.0
    mse_weight: float = 5.0
    kl_weight: float = 1e-4
    lr: float = 1e-3
    weight_decay: float = 0.2
    batch_size: int = 64
    max_epochs: int = 20
    patience: int = 3
    val_slides: tuple[str, ...] | None = None
    val_fraction: float = 0.2
    min_val_slides: int = 4
    min_spots: int = 64
    augment: bool = False
    seed: int = 0
    train_threads: int | None = None

    def __post_init__(self) -> None:
        positive = {"minimum": 0, "exclusive_minimum": True}
        for name in ("n_blocks", "rank", "n_genes", "embed_dim", "max_epochs"):
            _set(self, name, check_int(name, getattr(self, name), minimum=1))
        _set(self, "alpha", check_number("alpha", self.alpha, **positive))
        dropout = check_number("lora_dropout", self.lora_dropout, minimum=0, maximum=1, exclusive_maximum=True)
        _set(self, "lora_dropout", dropout)
        for name in ("temperature", "lr"):
            _set(self, name, check_number(name, getattr(self, name), **positive))
        for name in ("contrastive_weight", "gene_weight", "image_gene_weight", "mse_weight", "kl_weight"):
            _set(self, name, check_number(name, getattr(self, name), minimum=0))
        _set(self, "weight_decay", check_number("weight_decay", self.weight_decay, minimum=0))
        _set(self, "batch_size", check_int("batch_size", self.batch_size, minimum=2))
        _set(self, "patience", check_int("patience", self.patience, minimum=0))
        _check_validation_split(self)
        _set(self, "min_spots", check_int("min_spots", self.min_spots, minimum=2))
        _set(self, "augment", check_bool("augment", self.augment))
        _set(self, "seed", check_seed(self.seed))
        if self.train_threads is not None:
            _set(self, "train_threads", check_int("train_threads", self.train_threads, minimum=1))
        if self.contrastive_weight + self.gene_weight + self.image_gene_weight == 0:
            raise ValueError("contrastive_weight, gene_weight and image_gene_weight are all 0: nothing would train.")


@dataclass(frozen=True)
class DomainsConfig(_Config):
    """Spatial domains (:func:`spade_sd.tl.domains`): Leiden clusters of a representation and its spatial context.

    Attributes
    ----------
    spatial_weight
        Weight λ in ``[0, 1]`` of the neighbourhood: each spot's centred and scaled features are weighted ``√(1 − λ)``
        and the mean of its spatial neighbours' features ``√λ`` (as BANKSY weighs them); 0 clusters the
        representation alone.
    spatial_neighbors
        Nearest spots (or tiles) whose mean is the neighbourhood (squidpy's ``n_neighs``).
    n_neighbors
        Neighbours of scanpy's graph on the neighbourhood-augmented representation.
    resolution
        Leiden resolution; higher gives more domains.
    seed
        Seed of the graph and of Leiden.
    """

    spatial_weight: float = 0.5
    spatial_neighbors: int = 6
    n_neighbors: int = 15
    resolution: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _set(self, "spatial_weight", check_number("spatial_weight", self.spatial_weight, minimum=0, maximum=1))
        _set(self, "spatial_neighbors", check_int("spatial_neighbors", self.spatial_neighbors, minimum=1))
        _set(self, "n_neighbors", check_int("n_neighbors", self.n_neighbors, minimum=2))
        positive = {"minimum": 0, "exclusive_minimum": True}
        _set(self, "resolution", check_number("resolution", self.resolution, **positive))
        _set(self, "seed", check_seed(self.seed))
