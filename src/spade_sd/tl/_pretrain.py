from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from anndata import AnnData
from spatialdata import SpatialData

from spade_sd.spots.genes import check_expression_tables
from spade_sd.tl._common import ATTACHED_MODELS, as_backbone, slide_name
from spade_sd.utils.logging import logger
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
LOSSES = ("soft_target", "clip")


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


def _resolve_slides(
    sdatas: list[SpatialData],
    image_key,
    shapes_key,
    table_key,
    mpp,
    *,
    size_um: float,
    size_px: int,
    groupby: str | None,
) -> list[_Slide]:
    """Every slide's elements, scale and patches (nothing read yet), with a clear error for the first bad one."""
    from spade_sd.encoders.features import resolve_patches

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
        geometry, patches = resolve_patches(
            data, image_key=image, shapes_key=shapes, table_key=table_name, size_um=size_um, size_px=size_px, mpp=scale
        )
        table = data.tables[geometry.table_key][geometry.table_rows]
        if groupby is not None and groupby not in table.obs:
            raise KeyError(
                f"groupby column {groupby!r} is not in table {geometry.table_key!r}; it has {list(table.obs)}."
            )
        slides.append(_Slide(slide_name(table, geometry.shapes_key), table, patches))
    return slides


def _check_val_slides(val_slides: Sequence[str] | None, names: list[str]) -> None:
    if val_slides is None:
        return
    if isinstance(val_slides, str) or not isinstance(val_slides, Sequence):
        raise TypeError(f"val_slides must be a list of slide names or None; found {val_slides!r}.")
    unknown = sorted(set(map(str, val_slides)) - set(names))
    if unknown or not val_slides:
        raise ValueError(f"val_slides must name some of the slides {names}; found {list(val_slides)}.")
    if set(map(str, val_slides)) == set(names):
        raise ValueError(f"val_slides holds every slide ({names}): no slide would be left to train on.")


def _check_training_options(**options: Any) -> None:
    """Every scalar option of :func:`pretrain`: a clear error naming the first bad one, before any work."""
    from spade_sd.model.subspace import check_n_comps
    from spade_sd.spots.genes import GenePanel

    o = options
    check_int("n_experts", o["n_experts"], minimum=1)
    if o["n_fine"] != "elbow":
        if isinstance(o["n_fine"], str):
            raise ValueError(f"n_fine must be a positive integer or 'elbow'; found {o['n_fine']!r}.")
        check_int("n_fine", o["n_fine"], minimum=1)
    check_choice("standardize", o["standardize"], STANDARDIZE)
    check_choice("panel_flavor", o["panel_flavor"], PANEL_FLAVORS)
    check_choice("loss", o["loss"], LOSSES)
    for name in ("warm_start", "cache", "quiet"):
        check_bool(name, o[name])
    check_number("expert_lr_factor", o["expert_lr_factor"], minimum=0, exclusive_minimum=True)
    check_int("n_top_genes", o["n_top_genes"], minimum=1)
    if o["panel"] is not None and not isinstance(o["panel"], GenePanel):
        raise TypeError(f"panel must be a spade_sd.GenePanel or None; found {type(o['panel']).__name__}.")
    check_number("smoothing", o["smoothing"], minimum=0, maximum=1)
    check_number("temperature", o["temperature"], minimum=0, exclusive_minimum=True)
    check_int("out_dim", o["out_dim"], minimum=1)
    check_n_comps(o["n_comps"], o["out_dim"])
    check_number("dropout", o["dropout"], minimum=0, maximum=1, exclusive_maximum=True)
    check_int("batch_size", o["batch_size"], minimum=2)  # a contrastive batch needs negatives
    check_int("max_epochs", o["max_epochs"], minimum=1)
    check_number("lr", o["lr"], minimum=0, exclusive_minimum=True)
    check_number("weight_decay", o["weight_decay"], minimum=0)
    check_int("patience", o["patience"], minimum=0)
    check_number("tau_scale", o["tau_scale"], minimum=0, exclusive_minimum=True)
    check_int("feature_batch_size", o["feature_batch_size"], minimum=1)
    check_seed(o["seed"])
    if o["train_threads"] is not None:
        check_int("train_threads", o["train_threads"], minimum=1)


def _unique(names: list[str]) -> list[str]:
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
    n_experts: int = 4,
    n_fine: int | Literal["elbow"] = 16,
    groupby: str | None = None,
    standardize: Literal["slide", "global"] = "slide",
    warm_start: bool = True,
    expert_lr_factor: float = 0.1,
    layer: str | None = None,
    n_top_genes: int = 50,
    panel_flavor: Literal["union", "global"] = "union",
    panel=None,
    smoothing: float = 0.0,
    loss: Literal["soft_target", "clip"] = "clip",
    temperature: float = 1.0,
    out_dim: int = 256,
    n_comps: int | None = 16,
    dropout: float = 0.1,
    batch_size: int = 128,
    max_epochs: int = 50,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    patience: int = 10,
    val_slides: Sequence[str] | None = None,
    tau_scale: float = 0.25,
    size_um: float = 112.0,
    size_px: int = 224,
    mpp: float | Sequence[float] | None = None,
    feature_batch_size: int = 64,
    feature_num_workers: int = 0,
    cache: bool = True,
    seed: int = 0,
    train_threads: int | None = 1,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    num_nodes: int = 1,
    strategy: str | Any = "auto",
    quiet: bool = False,
    **trainer_kwargs: Any,
):
    """Train SPADE's mixture of contrastive data experts on one or several slides.

    Every spot's H&E patch is encoded once by the frozen backbone (cached); features are standardised and
    clustered in two stages (k-means within each group, then over all fine centroids → ``n_experts``); each
    expert's image and gene heads are trained contrastively on its own spots, all experts in one Lightning run,
    validating on held-out slides with early stopping.

    Every argument, every key and every table (raw counts without NaN or negative values, unique gene names, genes
    shared by all slides or covering ``panel``) is checked before the first patch is read: bad input fails at once,
    with a message naming what was expected and what was found.

    Parameters
    ----------
    sdata
        One SpatialData or a list; slides may have different gene sets (the shared gene panel handles it).
    image_key, shapes_key, table_key
        Element names (one for all, or one per SpatialData); inferred when unambiguous.
    backbone
        A :class:`~spade_sd.Backbone` or its constructor input; ``None``: the offline default EfficientNet-Lite0.
    n_experts
        Number of data experts (stage-2 clusters); ``1`` gives a single BLEEP-style expert.
    n_fine
        Stage-1 k-means clusters per group, or ``"elbow"``.
    groupby
        Table ``obs`` column defining the stage-1 groups (e.g. organ); default: one group per slide.
    standardize
        ``"slide"`` (default): standardise every slide's backbone features by that slide's own mean and standard
        deviation before clustering, training and embedding (:func:`spade_sd.tl.embed` then uses the statistics
        of all the patches it embeds on a slide; at least 30). This removes what shifts a whole slide's features
        (stain, scanner, thickness): on the olfactory bulb, leave one section out over 3 seeds, it raised the
        SPADE embedding's kNN expression retrieval from 0.339 to 0.371 and the tuned-α probe from 0.350 to 0.369
        (``docs/quality.md``). ``"global"``: one standardisation learnt on the training spots.
    warm_start
        With several experts, first train one generalist expert on all spots and start every expert from its
        weights. The experts then share one coordinate system, so the routed mixture of their outputs and
        distances between spots of different experts stay meaningful. Experts get the generalist's heads back,
        one at a time, where that does not raise the contrastive loss of the whole validation set. On the
        olfactory bulb 4 experts went from below 1 expert (kNN 0.363 vs 0.371, tuned-α probe 0.357 vs 0.369) to
        level with it (0.372, 0.368; ``docs/quality.md``).
    expert_lr_factor
        Warm-started experts are trained at ``lr * expert_lr_factor``, so they specialise without leaving the
        generalist's space on little data. With it (and the whole-validation reset to the generalist), 4 experts
        went from below 1 expert on her2st (~110 spots per expert; tuned-α probe −0.006, kNN −0.004, paired over
        4 folds × 3 seeds) to level (+0.000, +0.000), and above it on the olfactory bulb (kNN +0.005, joint kNN
        +0.012) (``docs/quality.md``).
    loss, temperature
        ``"clip"`` (InfoNCE on normalised embeddings, learnable temperature) or ``"soft_target"`` (the SPADE/BLEEP
        reference's symmetric loss with temperature ``T``). CLIP is the default: in leave-one-section-out on the
        olfactory bulb (4 experts, 3 seeds) it beat the soft-target loss on the probes (HEST 0.245 vs 0.224, tuned
        α 0.368 vs 0.331), few-shot (0.199 vs 0.153) and kNN retrieval (0.372 vs 0.347) (``docs/quality.md``).
    out_dim, dropout
        Embedding dimension and head dropout.
    n_comps
        After training, keep every embedding (image and gene side) in the span of the ``n_comps`` leading
        principal directions of the training spots' image embeddings, in the ``out_dim`` coordinates
        (:attr:`~spade_sd.SpadeModel.subspace`); ``None`` keeps the heads' outputs. The trailing directions add
        nothing to expression retrieval, but a linear probe fitted with little regularisation or on few spots
        overfits them. Leave one section out, 3 seeds, 1 expert, ``n_comps=16`` vs ``None`` (``docs/quality.md``):
        olfactory bulb HEST probe 0.364 vs 0.244, few-shot probe 0.287 vs 0.198, tuned-α probe 0.373 vs 0.369,
        kNN retrieval 0.371 vs 0.371; her2st HEST probe 0.104 vs 0.029. Gene → image recall on held-out sections
        is unchanged (recall@10 0.093 vs 0.094), but within the *training* slides it falls (demo, recall@5: her2st
        0.50 vs 0.88, olfactory bulb 0.20 vs 0.44): the trailing directions memorise the training spots. Pass
        ``None`` to retrieve the training spots themselves.
    batch_size, max_epochs, lr, weight_decay, patience
        Training (AdamW with a cosine schedule; early stopping after ``patience`` epochs without improvement).
    val_slides
        Slide names to validate on (default: a seeded draw of whole slides).
    tau_scale
        Softness of routing relative to the training features' typical margin between experts.
    size_um, size_px, mpp
        Patch geometry, as in :func:`spade_sd.pp.spot_patches`.
    feature_batch_size, feature_num_workers, cache
        Feature extraction batch size, processes reading patches (0: a reader thread; see
        :func:`spade_sd.tl.embed`) and on-disk cache.
    seed
        Seed of clustering, initialisation and batching: the same seed gives the same model.
    train_threads
        Torch CPU threads while training the (small) heads; ``None`` leaves torch's setting.
    accelerator, devices, num_nodes, strategy, **trainer_kwargs
        Passed to :class:`lightning.pytorch.Trainer` (e.g. ``strategy="ddp"``, ``devices=4``).
    quiet
        Silence Lightning's banners and progress bar.

    Returns
    -------
    The trained :class:`~spade_sd.SpadeModel`; it is also attached to every SpatialData given, so
    :func:`spade_sd.tl.embed` uses it when called without a model.
    """
    from spade_sd.encoders.features import check_num_workers, extract_features
    from spade_sd.training.fit import fit_model

    check_num_workers(feature_num_workers)
    _check_training_options(
        n_experts=n_experts,
        n_fine=n_fine,
        standardize=standardize,
        warm_start=warm_start,
        expert_lr_factor=expert_lr_factor,
        n_top_genes=n_top_genes,
        panel_flavor=panel_flavor,
        panel=panel,
        smoothing=smoothing,
        loss=loss,
        temperature=temperature,
        out_dim=out_dim,
        n_comps=n_comps,
        dropout=dropout,
        batch_size=batch_size,
        max_epochs=max_epochs,
        lr=lr,
        weight_decay=weight_decay,
        patience=patience,
        tau_scale=tau_scale,
        feature_batch_size=feature_batch_size,
        cache=cache,
        seed=seed,
        train_threads=train_threads,
        quiet=quiet,
    )
    size_um, size_px = check_patch_geometry(size_um, size_px)
    if groupby is not None:
        check_key("groupby", groupby)
    if layer is not None:
        check_key("layer", layer)
    sdatas = [sdata] if isinstance(sdata, SpatialData) else list(sdata)
    if not sdatas or not all(isinstance(s, SpatialData) for s in sdatas):
        raise TypeError(
            f"Expected a SpatialData or a non-empty list of them; found {type(sdata).__name__} "
            f"holding {sorted({type(s).__name__ for s in sdatas})}."
        )
    backbone = as_backbone(backbone)
    slides = _resolve_slides(
        sdatas, image_key, shapes_key, table_key, mpp, size_um=size_um, size_px=size_px, groupby=groupby
    )
    names = _unique([slide.name for slide in slides])
    _check_val_slides(val_slides, names)
    check_expression_tables(
        [(name, slide.table) for name, slide in zip(names, slides, strict=True)], layer=layer, panel=panel
    )
    features = [
        extract_features(
            slide.patches, backbone, batch_size=feature_batch_size, cache=cache, num_workers=feature_num_workers
        )
        for slide in slides
    ]
    if groupby is None:
        groups = [np.full(len(slide.table), name) for slide, name in zip(slides, names, strict=True)]
    else:
        groups = [slide.table.obs[groupby].to_numpy() for slide in slides]
    logger.info("Pretraining on %d slides (%s), %d spots", len(slides), ", ".join(names), sum(map(len, features)))
    model = fit_model(
        features,
        [slide.table for slide in slides],
        names,
        groups,
        backbone,
        panel=panel,
        layer=layer,
        n_top_genes=n_top_genes,
        panel_flavor=panel_flavor,
        smoothing=smoothing,
        n_experts=n_experts,
        n_fine=n_fine,
        tau_scale=tau_scale,
        standardize=standardize,
        warm_start=warm_start,
        expert_lr_factor=expert_lr_factor,
        seed=seed,
        train_threads=train_threads,
        patch_config={"size_um": size_um, "size_px": size_px},
        out_dim=out_dim,
        n_comps=n_comps,
        loss=loss,
        temperature=temperature,
        dropout=dropout,
        batch_size=batch_size,
        max_epochs=max_epochs,
        lr=lr,
        weight_decay=weight_decay,
        patience=patience,
        val_slides=val_slides,
        coords=np.concatenate(
            [slide.patches.geometry.centers for slide in slides]
        ),  # a single slide validates on a spatial block of itself
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        quiet=quiet,
        **trainer_kwargs,
    )
    for data in sdatas:
        ATTACHED_MODELS[data] = model
    return model
