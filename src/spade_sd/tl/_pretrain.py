from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from anndata import AnnData
from spatialdata import SpatialData

from spade_sd.config import (
    SCALE_SPOTS,
    ClusteringConfig,
    PanelConfig,
    PatchConfig,
    SpadeConfig,
    TrainingConfig,
    check_trainer_kwargs,
)
from spade_sd.spots.genes import GenePanel, check_expression_tables
from spade_sd.tl._common import as_backbone, attach_model, is_legacy_anndata, legacy_to_spatialdata, slide_name
from spade_sd.utils.logging import logger, timed
from spade_sd.utils.validation import check_bool, check_int


def _per_slide(value, n: int, name: str) -> list:
    if value is None or isinstance(value, str | float | int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} must be one value or one per SpatialData ({n}); found {len(value)}.")
    return value


@dataclass(frozen=True)
class _Slide:
    """One training slide, resolved before any patch is read: its name, spots' table rows and lazy patches."""

    name: str
    table: AnnData
    patches: Any


def resolve_slides(
    sdatas: list[SpatialData],
    image_key,
    shapes_key,
    table_key,
    mpp,
    *,
    patches: PatchConfig,
    groupby: str | None,
) -> list[_Slide]:
    """Every slide's elements, scale and patches (nothing read yet), with a clear error for the first bad one."""
    from spade_sd.spots.patches import resolve_patches

    n = len(sdatas)
    keys = zip(
        _per_slide(image_key, n, "image_key"),
        _per_slide(shapes_key, n, "shapes_key"),
        _per_slide(table_key, n, "table_key"),
        _per_slide(mpp, n, "mpp"),
        strict=True,
    )
    slides = []
    for data, (image, shapes, table_name, scale) in zip(sdatas, keys, strict=True):
        elements = {"image_key": image, "shapes_key": shapes, "table_key": table_name}
        geometry, spot_patches = resolve_patches(
            data, size_um=patches.size_um, size_px=patches.size_px, mpp=scale, **elements
        )
        table = data.tables[geometry.table_key][geometry.table_rows]
        if groupby is not None and groupby not in table.obs:
            raise KeyError(
                f"groupby column {groupby!r} is not in table {geometry.table_key!r}; it has {list(table.obs)}."
            )
        slides.append(_Slide(slide_name(table, geometry.shapes_key), table, spot_patches))
    return slides


def check_val_slides(val_slides: tuple[str, ...] | None, names: list[str]) -> None:
    if val_slides is None:
        return
    unknown = sorted(set(val_slides) - set(names))
    if unknown or not val_slides:
        raise ValueError(f"val_slides must name some of the slides {names}; found {list(val_slides)}.")
    if set(val_slides) == set(names):
        raise ValueError(f"val_slides holds every slide ({names}): no slide would be left to train on.")


def _checked_arguments(keywords: dict[str, Any]) -> tuple[SpadeConfig, dict[str, Any]]:
    """The configuration and the Trainer's arguments from :func:`pretrain`'s keywords; the first bad one raises."""
    from spade_sd.encoders.features import check_num_workers
    from spade_sd.training.lightning_loop import check_trainer_arguments

    check_num_workers(keywords["feature_num_workers"])
    check_int("feature_batch_size", keywords["feature_batch_size"], minimum=1)
    for name in ("cache", "quiet"):
        check_bool(name, keywords[name])
    if keywords["panel"] is not None and not isinstance(keywords["panel"], GenePanel):
        raise TypeError(f"panel must be a spade_sd.GenePanel or None; found {type(keywords['panel']).__name__}.")
    config = SpadeConfig.from_keywords(keywords)
    lightning = {name: keywords[name] for name in ("accelerator", "devices", "num_nodes", "strategy")}
    trainer = check_trainer_kwargs(keywords["trainer_kwargs"], keywords)
    check_trainer_arguments(trainer, caller="pretrain", keywords=own_keywords(keywords))
    return config, {**lightning, **trainer}


def _say_fewer_experts(trained: int, requested: int, n_spots: int) -> None:
    """Say once, plainly, that the model has fewer experts than asked for, and why."""
    if trained < requested:
        logger.warning(
            "The model has %d experts, not the %d requested: %d held too few of the %d spots (as the merge messages "
            "above say) and were merged into their nearest expert, since an expert trains on its own spots only. "
            "Pass n_experts=%d to ask for what the data support, or train on more spots.",
            trained,
            requested,
            requested - trained,
            n_spots,
            trained,
        )


def own_keywords(keywords: dict[str, Any]) -> list[str]:
    """The names a user may pass to a public function, from its ``locals()`` (its data and ``**`` left out)."""
    return [name for name in keywords if name not in ("sdata", "trainer_kwargs")]


def spot_groups(tables: list[AnnData], names: list[str], groupby: str | None) -> list[np.ndarray]:
    """The stage-1 group of every spot, slide by slide: its slide's name, or its ``groupby`` column."""
    if groupby is None:
        return [np.full(len(table), name) for table, name in zip(tables, names, strict=True)]
    return [table.obs[groupby].to_numpy() for table in tables]


def labelled_tables(slides: list[_Slide], names: list[str]) -> list[tuple[str, AnnData]]:
    """The slides' tables as messages name them: by their sample, else (a slide named after its shapes) by key."""
    labelled = []
    for slide, name in zip(slides, names, strict=True):
        geometry = slide.patches.geometry
        unnamed = slide.name == geometry.shapes_key
        labelled.append((f"{geometry.table_key}[shapes={name!r}]" if unnamed else name, slide.table))
    return labelled


def as_list(sdata: SpatialData | Sequence[SpatialData], tool: str = "tl.pretrain") -> list[SpatialData]:
    sdatas = [sdata] if isinstance(sdata, SpatialData | AnnData) else list(sdata)
    sdatas = [legacy_to_spatialdata(s, tool) if is_legacy_anndata(s) else s for s in sdatas]
    if not sdatas or not all(isinstance(s, SpatialData) for s in sdatas):
        raise TypeError(
            f"Expected a SpatialData (or scanpy's legacy spatial AnnData) or a non-empty list of them; found "
            f"{type(sdata).__name__} "
            f"holding {sorted({type(s).__name__ for s in sdatas})}."
        )
    return sdatas


def unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def pretrain(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    image_key: str | Sequence[str] | None = None,
    shapes_key: str | Sequence[str] | None = None,
    table_key: str | Sequence[str] | None = None,
    backbone=None,
    n_experts: int = ClusteringConfig.n_experts,
    n_fine: int | Literal["elbow"] = ClusteringConfig.n_fine,
    groupby: str | None = ClusteringConfig.groupby,
    standardize: Literal["slide", "global"] = ClusteringConfig.standardize,
    warm_start: bool = TrainingConfig.warm_start,
    expert_lr_factor: float = TrainingConfig.expert_lr_factor,
    layer: str | None = PanelConfig.layer,
    n_top_genes: int = PanelConfig.n_top_genes,
    panel_flavor: Literal["union", "global"] = PanelConfig.flavor,
    panel=None,
    smoothing: float = PanelConfig.smoothing,
    loss: Literal["soft_target", "clip"] = TrainingConfig.loss,
    temperature: float = TrainingConfig.temperature,
    out_dim: int = TrainingConfig.out_dim,
    n_comps: int | None = TrainingConfig.n_comps,
    expression_comps: int | None = TrainingConfig.expression_comps,
    representation: Literal["backbone+readout", "heads"] = TrainingConfig.representation,
    readout_weight: float = TrainingConfig.readout_weight,
    readout_lift: float = TrainingConfig.readout_lift,
    readout_emphasis: float = TrainingConfig.readout_emphasis,
    output: Literal["aligned", "joint"] = TrainingConfig.output,
    backbone_comps: int | None = TrainingConfig.backbone_comps,
    backbone_weight: float = TrainingConfig.backbone_weight,
    reconstruction: float = TrainingConfig.reconstruction,
    head_init: str = TrainingConfig.head_init,
    dropout: float = TrainingConfig.dropout,
    batch_size: int = TrainingConfig.batch_size,
    max_epochs: int = TrainingConfig.max_epochs,
    lr: float = TrainingConfig.lr,
    weight_decay: float = TrainingConfig.weight_decay,
    patience: int = TrainingConfig.patience,
    warmup_steps: int = TrainingConfig.warmup_steps,
    val_slides: Sequence[str] | None = TrainingConfig.val_slides,
    val_fraction: float = TrainingConfig.val_fraction,
    tau_scale: float = ClusteringConfig.tau_scale,
    size_um: float = PatchConfig.size_um,
    size_px: int = PatchConfig.size_px,
    mpp: float | Sequence[float] | None = None,
    feature_batch_size: int = 64,
    feature_num_workers: int = 0,
    cache: bool = True,
    seed: int = TrainingConfig.seed,
    train_threads: int | None = TrainingConfig.train_threads,
    reference_size: int = TrainingConfig.reference_size,
    reference_genes: int = TrainingConfig.reference_genes,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    num_nodes: int = 1,
    strategy: str | Any = "auto",
    quiet: bool = False,
    **trainer_kwargs: Any,
):
    """Train SPADE's mixture of contrastive data experts on one or several slides.

    Every spot's H&E patch is encoded once by the frozen backbone (cached); features are standardized and
    clustered in two stages (k-means within each group, then over all fine centroids → ``n_experts``); each
    expert's image and gene heads are trained contrastively on its own spots, all experts in one Lightning run,
    validating on held-out slides with early stopping.

    Every argument, every key and every table (raw counts without NaN or negative values, unique gene names, genes
    shared by all slides or covering ``panel``, enough spots per slide and group) is checked, and the gene panel
    selected, before the first patch is read: bad input fails at once, with a message naming what was expected and
    what was found.

    From 65,536 spots on (:data:`~spade_sd.config.SCALE_SPOTS`), training runs in bounded memory: every slide's
    features are read from the feature cache as memory maps (``cache=True``; held in memory without the cache;
    ``sd.settings.feature_cache_dtype = "float16"`` stores them in half the disk) and the expression is held sparse
    (``docs/scale.md``, "Training on many spots").

    The keywords that configure the model are the fields of :class:`~spade_sd.config.PatchConfig`,
    :class:`~spade_sd.config.PanelConfig` (``panel_flavor`` is its ``flavor``), :class:`~spade_sd.config.ClusteringConfig`
    and :class:`~spade_sd.config.TrainingConfig`, with the same defaults; the model records them in
    :attr:`SpadeModel.config <spade_sd.SpadeModel.config>`. How the defaults were chosen, and what changing them did
    on real data, is measured in ``docs/quality.md``.

    Parameters
    ----------
    sdata
        One SpatialData or a list; slides may have different gene sets (the shared gene panel handles it). Scanpy's
        legacy spatial AnnData (``uns['spatial']``) is converted with spatialdata-io (logged), and the model is
        attached to it as to a SpatialData.
    image_key, shapes_key, table_key
        Element names (one for all, or one per SpatialData); inferred when unambiguous.
    backbone
        A :class:`~spade_sd.Backbone` or its constructor input; ``None``: the offline default EfficientNet-Lite0.
    n_experts
        Number of data experts (stage-2 clusters); ``1`` gives a single BLEEP-style expert. Fewer experts suit
        few spots: every expert is trained only on its own.
    n_fine
        Stage-1 k-means clusters per group, or ``"elbow"``.
    groupby
        Table ``obs`` column defining the stage-1 groups (e.g. organ); default: one group per slide.
    standardize
        ``"slide"``: standardize every slide's backbone features by that slide's own mean and standard deviation
        before clustering, training and embedding, which removes what shifts a whole slide's features (stain,
        scanner, thickness); :func:`spade_sd.tl.embed` then uses the statistics of all the patches it embeds on a
        slide (at least 30). ``"global"``: one standardization learnt on the training spots, for slides with
        fewer than 30 spots or to embed a few patches of a slide at a time.
    warm_start
        With several experts, first train one generalist expert on all spots and start every expert from its
        weights. The experts then share one coordinate system, so the routed mixture of their outputs and
        distances between spots of different experts stay meaningful; after training, experts get the
        generalist's heads back, one at a time, where that does not raise the contrastive loss of the whole
        validation set.
    expert_lr_factor
        Warm-started experts are trained at ``lr * expert_lr_factor``, so they specialize without leaving the
        generalist's space; raise it when experts have many spots each.
    layer
        Layer of the tables holding raw counts; ``None`` uses ``X``.
    n_top_genes, panel_flavor, smoothing
        Gene panel: highly variable genes per sample (``"union"``) or over all samples (``"global"``), and the
        weight of spot-context smoothing of expression (see :class:`~spade_sd.GenePanel`).
    panel
        A fitted :class:`~spade_sd.GenePanel` to use instead of selecting one.
    loss, temperature
        ``"clip"`` (InfoNCE on normalized embeddings, learnable temperature) or ``"soft_target"`` (the SPADE/BLEEP
        reference's symmetric loss with temperature ``T``); ``"soft_target"`` reproduces the reference.
    out_dim, dropout
        Embedding dimension and head dropout.
    n_comps
        After training, keep every embedding (image and gene side) in the span of the ``n_comps`` leading
        principal directions of the training spots' image embeddings, in the ``out_dim`` coordinates
        (:attr:`~spade_sd.SpadeModel.subspace`); ``None`` (the default) keeps every direction of the heads'
        outputs, so ``X_spade`` keeps what the backbone knew about slides unlike the training data (with a
        subspace it fell below the backbone's features there; ``docs/quality.md``).
    expression_comps
        The expression tools (:func:`~spade_sd.tl.predict_expression`, :func:`~spade_sd.tl.query`) compare
        embeddings within the span of this many leading principal directions of the training spots' image
        embeddings (:attr:`SpadeModel.expression_subspace <spade_sd.SpadeModel.expression_subspace>`), and
        :func:`~spade_sd.tl.embed` writes that projection as ``.obsm['X_spade_expr']``: the trailing directions
        add little to expression retrieval, and a linear probe of expression fitted with little regularization or
        on few spots overfits them. ``None``: the tools compare whole embeddings.
    representation, readout_weight, readout_lift, readout_emphasis
        What :func:`~spade_sd.tl.embed` writes as ``X_spade``, the representation to cluster and transfer labels
        on. ``"backbone+readout"`` (the default): the backbone's features followed by the expression the model reads
        from the image (the ridge read-out of the expression subspace, fitted on the reference bank as
        ``predict_expression(method="ridge")`` fits it, in the principal coordinates of its predictions;
        :class:`~spade_sd.model.readout.ExpressionReadout`), whose total spread is ``readout_weight`` times the
        features'. The part of the features the read-out predicts counts ``1 + readout_lift`` times, the rest once
        (``readout_lift=0``: the features unchanged, as 0.3.0 wrote them). Within the block, each column is
        weighted by its spread to the power ``readout_emphasis``, so that the leading components of the predicted
        expression weigh more (``0``: as 0.4.0 wrote it). Nothing the backbone knew is lost; Leiden
        on it follows a held-out section's expression domains better than on the backbone, and few-shot
        classifiers of H&E labels score above the backbone within and across data sets (``docs/quality.md``).
        ``"heads"``: the heads' output, what spade_sd 0.2 wrote. Needs a reference bank (``reference_size > 0``).
    output, backbone_comps, backbone_weight
        ``"aligned"``: the embedding is the aligned coordinates only. ``"joint"``: they are followed by a block of
        the standardized backbone features (the heads' input), or of their ``backbone_comps`` leading principal
        components over the training spots (``None``: every feature), scaled so that the block's total variance is
        ``backbone_weight`` times the aligned coordinates'; the gene side's block is zero. The joint embedding keeps
        what the backbone knew about morphology next to what was learnt about expression
        (:attr:`SpadeModel.block <spade_sd.SpadeModel.block>`; measured in ``docs/quality.md``).
    reconstruction
        Weight of a term added to the contrastive loss: the mean squared error of a linear decoder (one per expert,
        kept in the model) from the image embedding back to the standardized backbone features, so that the
        embedding keeps what recovers them; 0 trains with the contrastive loss alone.
    head_init
        ``"backbone"`` (the default): every image head starts at the training spots' ``out_dim`` leading principal
        components of the standardized features, its residual branch at zero
        (:meth:`ExpertMixture.start_at_components <spade_sd.model.heads.ExpertMixture.start_at_components>`), so
        training starts from the backbone's own geometry; ``"random"``: PyTorch's initialization.
    batch_size, max_epochs, lr, weight_decay, patience, warmup_steps
        Training (AdamW with ``warmup_steps`` of linear warm-up, then a cosine schedule; early stopping after
        ``patience`` epochs without improvement).
    val_slides, val_fraction
        Slide names to validate on; by default a seeded draw of ``val_fraction`` of the slides (with fewer than 4
        slides, the last ``val_fraction`` of every slide along its longer axis; ``TrainingConfig.min_val_slides``
        sets that number, for :func:`~spade_sd.training.fit.fit_model` only). ``val_fraction=0``: no validation.
    tau_scale
        Softness of routing relative to the training features' typical margin between experts; larger blends
        neighboring experts more.
    size_um, size_px, mpp
        Patch geometry, as in :func:`spade_sd.pp.spot_patches`.
    feature_batch_size, feature_num_workers, cache
        Feature extraction batch size, processes reading patches (0: a reader thread; see
        :func:`spade_sd.tl.embed`) and on-disk cache.
    seed
        Seed of clustering, initialization, batching and the validation draw: the same seed gives the same model.
    train_threads
        Torch CPU threads while training the (small) heads; ``None`` leaves torch's setting. On a CPU one thread is
        usually fastest: the heads are too small to gain from more.
    reference_size
        Training spots the model keeps as its reference bank (:attr:`SpadeModel.reference
        <spade_sd.SpadeModel.reference>`) for :func:`spade_sd.tl.predict_expression` and :func:`spade_sd.tl.query`:
        their image embeddings and measured expression, drawn per expert in proportion to its spots with ``seed``.
        0 keeps none. 2000 spots over 2000 genes take about 10 MB in the saved model.
    reference_genes
        Genes of the reference bank: the panel's, then the training slides' shared highly variable genes, up to this
        many in all; predictions can cover any of them.
    accelerator, devices, num_nodes, strategy, **trainer_kwargs
        Passed to :class:`lightning.pytorch.Trainer`, and only there (e.g. ``strategy="ddp"``, ``devices=4``);
        a training option given among ``trainer_kwargs`` (e.g. ``warmup_steps``) is refused with a TypeError
        naming the keyword to use, and so is, before any work, a name the Trainer does not take (``max_epoch``),
        with the closest keyword.
    quiet
        No progress bar for this call (for every call: ``sd.settings.progress = False``). Lightning's own messages
        and model summary are shown only at ``sd.settings.verbosity = "debug"``, and never with ``quiet``.

    Returns
    -------
    The trained :class:`~spade_sd.SpadeModel`; it is also attached to every SpatialData given, so
    :func:`spade_sd.tl.embed` uses it when called without a model.
    """
    config, trainer = _checked_arguments(dict(locals()))  # first: locals() holds exactly the arguments
    import torch

    from spade_sd.encoders.features import extract_features, mapped_features
    from spade_sd.model.clustering import check_group_sizes
    from spade_sd.training.fit import check_sizes, fit_model, fit_panel

    sdatas = as_list(sdata)
    backbone = as_backbone(backbone)
    slides = resolve_slides(
        sdatas, image_key, shapes_key, table_key, mpp, patches=config.patches, groupby=config.clustering.groupby
    )
    names = unique_names([slide.name for slide in slides])
    check_val_slides(config.training.val_slides, names)
    tables = [slide.table for slide in slides]
    check_expression_tables(labelled_tables(slides, names), layer=config.panel.layer, panel=panel)
    check_sizes([len(table) for table in tables], names, config, backbone.dim)
    groups = spot_groups(tables, names, config.clustering.groupby)
    check_group_sizes(np.concatenate(groups))
    if panel is None:  # selected before any patch is encoded, so that what stops the selection stops that too
        threads = torch.get_num_threads()
        panel = fit_panel(tables, config.panel)
        torch.set_num_threads(threads)  # scanpy's HVG selection resets torch's threads to every core
    options = {"batch_size": feature_batch_size, "cache": cache, "num_workers": feature_num_workers}
    n_spots = sum(len(slide.patches) for slide in slides)
    scalable = n_spots >= SCALE_SPOTS
    # at scale, every slide's features stay on disk: memory maps of the feature cache, read in blocks of rows
    read_features = mapped_features if scalable else extract_features
    with timed("Pretraining on %d slides (%s), %d spots", len(slides), ", ".join(names), n_spots) as timer:
        features = [read_features(slide.patches, backbone, **options) for slide in slides]
        model = fit_model(
            features,
            tables,
            names,
            groups,
            backbone,
            config=config,
            panel=panel,
            coords=np.concatenate([slide.patches.geometry.centers for slide in slides]),  # validation blocks
            quiet=quiet,
            trainer_kwargs=trainer,
            scalable=scalable,
        )
        timer.add("%d experts, %d panel genes; keep the model with model.save(path)", model.n_experts, len(model.panel))
    _say_fewer_experts(model.n_experts, config.clustering.n_experts, n_spots)
    for data in sdatas:
        attach_model(data, model)
    return model
