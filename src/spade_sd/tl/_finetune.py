from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from spatialdata import SpatialData

from spade_sd.config import PatchConfig, SealConfig, check_trainer_kwargs
from spade_sd.spots.genes import GenePanel, check_expression_tables
from spade_sd.tl._common import as_backbone
from spade_sd.tl._pretrain import (
    as_list,
    check_val_slides,
    labelled_tables,
    own_keywords,
    resolve_slides,
    unique_names,
)
from spade_sd.utils.constants import SEAL_ATTACHMENT, SPATIAL_KEY
from spade_sd.utils.logging import logger, timed
from spade_sd.utils.validation import check_bool, check_int


def _checked_config(keywords: dict[str, Any]) -> tuple[SealConfig, PatchConfig, dict[str, Any]]:
    from spade_sd.encoders.features import check_num_workers
    from spade_sd.training.lightning_loop import check_trainer_arguments

    check_num_workers(keywords["feature_num_workers"])
    check_int("feature_batch_size", keywords["feature_batch_size"], minimum=1)
    for name in ("cache", "quiet"):
        check_bool(name, keywords[name])
    config = SealConfig(**{name: keywords[name] for name in SealConfig.__dataclass_fields__})
    patches = PatchConfig(size_um=keywords["size_um"], size_px=keywords["size_px"])
    lightning = {name: keywords[name] for name in ("accelerator", "devices", "num_nodes", "strategy")}
    trainer = check_trainer_kwargs(keywords["trainer_kwargs"], keywords)
    for name in trainer:
        if name in SealConfig.__dataclass_fields__:
            raise TypeError(f"{name!r} is a fine-tuning option, not a lightning.Trainer argument; pass it as {name}=.")
    check_trainer_arguments(trainer, caller="finetune", keywords=own_keywords(keywords))
    return config, patches, {**lightning, **trainer}


def _tuned_backbone(backbone, config: SealConfig):
    from spade_sd.encoders.finetuned import FineTunedBackbone

    return FineTunedBackbone(
        as_backbone(backbone),
        n_blocks=config.n_blocks,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.lora_dropout,
        seed=config.seed,
    )


def _coords(tables) -> np.ndarray | None:
    if all(SPATIAL_KEY in table.obsm for table in tables):
        return np.concatenate([np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2] for table in tables])
    return None


def finetune(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    backbone=None,
    n_blocks: int = SealConfig.n_blocks,
    rank: int = SealConfig.rank,
    alpha: float = SealConfig.alpha,
    lora_dropout: float = SealConfig.lora_dropout,
    n_genes: int = SealConfig.n_genes,
    layer: str | None = None,
    embed_dim: int = SealConfig.embed_dim,
    temperature: float = SealConfig.temperature,
    contrastive_weight: float = SealConfig.contrastive_weight,
    gene_weight: float = SealConfig.gene_weight,
    image_gene_weight: float = SealConfig.image_gene_weight,
    mse_weight: float = SealConfig.mse_weight,
    kl_weight: float = SealConfig.kl_weight,
    lr: float = SealConfig.lr,
    weight_decay: float = SealConfig.weight_decay,
    batch_size: int = SealConfig.batch_size,
    max_epochs: int = SealConfig.max_epochs,
    patience: int = SealConfig.patience,
    val_slides: Sequence[str] | None = SealConfig.val_slides,
    val_fraction: float = SealConfig.val_fraction,
    min_val_slides: int = SealConfig.min_val_slides,
    min_spots: int = SealConfig.min_spots,
    augment: bool = SealConfig.augment,
    seed: int = SealConfig.seed,
    train_threads: int | None = SealConfig.train_threads,
    image_key: str | Sequence[str] | None = None,
    shapes_key: str | Sequence[str] | None = None,
    table_key: str | Sequence[str] | None = None,
    mpp: float | Sequence[float] | None = None,
    size_um: float = PatchConfig.size_um,
    size_px: int = PatchConfig.size_px,
    cache: bool = True,
    feature_batch_size: int = 64,
    feature_num_workers: int = 0,
    quiet: bool = False,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    num_nodes: int = 1,
    strategy: str = "auto",
    **trainer_kwargs: Any,
):
    """Fine-tune the image encoder itself with spatial transcriptomics (SEAL): LoRA on its last blocks.

    A copy of ``backbone`` gets LoRA adapters (``peft``) on the linear layers of its last ``n_blocks``
    transformer blocks (Vision Transformers) or the non-depthwise convolutions of its last ``n_blocks`` blocks and
    its head convolution (EfficientNets); everything else stays frozen, BatchNorm statistics included. The
    adapters are trained with SEAL's heads (an image projection, a VAE over a global panel of ``n_genes`` highly
    variable genes keyed by name, an image → gene decoder) on CLIP InfoNCE (``τ = temperature``) + the VAE's gene
    reconstruction + the image → gene reconstruction, each a per-gene correlation term plus ``mse_weight`` × MSE
    on z-scored genes. AdamW with a cosine schedule; early stopping on held-out slides (or blocks of each slide
    when there are fewer than ``min_val_slides``), the best epoch's weights kept.

    The activations entering the first adapted block do not change during training: they are computed once per
    patch and cached on disk like features (``cache``), and every training step runs only the adapted blocks.

    Parameters
    ----------
    sdata
        One SpatialData or a list, each with an H&E image, spot shapes and a table of raw counts annotating them.
    backbone
        The encoder to adapt: ``None`` (the offline default EfficientNet-Lite0), a :class:`~spade_sd.Backbone` of
        a timm model (e.g. a pathology foundation model), or a timm name. Plain callables cannot be adapted.
    n_blocks, rank, alpha, lora_dropout
        Blocks adapted, LoRA rank, scale numerator (updates scaled by ``alpha / rank``) and dropout.
    n_genes
        Size of the global highly variable gene panel (Seurat flavour over all slides, genes shared by every
        slide); fewer when the slides share fewer eligible genes.
    layer
        Layer holding raw counts; ``None`` uses ``X``.
    embed_dim, temperature, contrastive_weight, gene_weight, image_gene_weight, mse_weight, kl_weight
        The shared space and the losses (see :class:`~spade_sd.config.SealConfig`).
    lr, weight_decay, batch_size, max_epochs, patience, val_slides, val_fraction, min_val_slides
        Training and validation (see :class:`~spade_sd.config.SealConfig`).
    min_spots
        Fewest spots to fine-tune on; fewer is refused before any patch is read.
    augment
        Flip and rotate every training patch at random (multiples of 90°) at every step. The activations entering
        the first adapted block then change at every step, so nothing can be cached: every step runs the whole
        backbone on patches read from the image, several times slower (see ``benchmarks/finetune.py``).
    seed
        Seed of the adapters' and heads' initialisation, the batches, the VAE's noise and the validation draw:
        the same seed gives the same adapters.
    train_threads
        Torch CPU threads while training; ``None`` leaves torch's setting.
    image_key, shapes_key, table_key, mpp
        Elements and scale of each SpatialData (one value, or one per SpatialData), as in
        :func:`spade_sd.tl.pretrain`.
    size_um, size_px
        Patch geometry.
    cache
        Cache the frozen prefix activations on disk (``$SPADE_SD_CACHE_DIR/features``). They are computed once,
        in onnxruntime on the CPU (:class:`~spade_sd.encoders.finetuned.PrefixEncoder`).
    feature_batch_size, feature_num_workers
        Patches per forward pass and reader processes while computing the prefix activations.
    quiet
        No progress bar for this call (for every call: ``sd.settings.progress = False``). Lightning's own messages
        are shown only at ``sd.settings.verbosity = "debug"``, and never with ``quiet``.
    accelerator, devices, num_nodes, strategy, **trainer_kwargs
        Passed to :class:`lightning.pytorch.Trainer`; under DDP the contrastive negatives are gathered across
        processes. ``precision`` defaults to ``"bf16-mixed"`` where bfloat16 is fast. A name the Trainer does not
        take (``max_epoch``) is refused before any work, with the closest keyword.

    Returns
    -------
    A :class:`~spade_sd.FineTunedBackbone`: use it wherever a backbone is accepted (``tl.features``,
    ``tl.pretrain(backbone=...)``); save its adapters with :meth:`~spade_sd.FineTunedBackbone.save`, merge them
    with :meth:`~spade_sd.FineTunedBackbone.merge`. SEAL's heads, panel and training history travel with it
    (:meth:`SealAlignment.from_backbone <spade_sd.model.seal_heads.SealAlignment.from_backbone>`).

    Examples
    --------
    >>> import spade_sd as sd
    >>> sections = [sd.datasets.mouse_olfactory_bulb(s) for s in ("MOB1", "MOB2")]
    >>> tuned = sd.tl.finetune(sections, max_epochs=2)  # doctest: +SKIP
    >>> sd.tl.features(sections[0], backbone=tuned)  # doctest: +SKIP
    """
    config, patch_config, trainer = _checked_config(dict(locals()))
    import torch

    from spade_sd.encoders.features import mapped_features
    from spade_sd.encoders.finetuned import PrefixEncoder
    from spade_sd.model.seal_heads import SealAlignment
    from spade_sd.training.data import ExpressionRows, ZScoredRows
    from spade_sd.training.seal import train_seal, zscore_stats

    sdatas = as_list(sdata, "tl.finetune")
    tuned = _tuned_backbone(backbone, config)
    slides = resolve_slides(sdatas, image_key, shapes_key, table_key, mpp, patches=patch_config, groupby=None)
    names = unique_names([slide.name for slide in slides])
    check_val_slides(config.val_slides, names)
    tables = [slide.table for slide in slides]
    check_expression_tables(labelled_tables(slides, names), layer=layer)
    n_spots = sum(len(table) for table in tables)
    if n_spots < config.min_spots:
        raise ValueError(
            f"Fine-tuning needs at least min_spots={config.min_spots} spots; the slides {names} have {n_spots}."
        )
    threads = torch.get_num_threads()
    panel = GenePanel.fit(tables, n_top_genes=config.n_genes, flavor="global", layer=layer, smoothing=0.0)
    torch.set_num_threads(threads)  # scanpy's HVG selection resets torch's threads to every core (oversubscribing)
    # held sparse, slide by slide, and z-scored a batch at a time: standardized, it would be dense
    counts = ExpressionRows(panel.transform(table, layer=layer, as_sparse=True) for table in tables)
    mean, std = zscore_stats(counts)
    expression = ZScoredRows(counts, mean, std)
    if config.augment:
        logger.warning(
            "augment=True: augmented patches change the activations entering the adapted blocks at every step, so "
            "they cannot be cached; every step runs the full forward pass on patches read from the image."
        )
        sources = [slide.patches for slide in slides]
    else:
        encoder = PrefixEncoder(tuned)
        options = {"batch_size": feature_batch_size, "cache": cache, "num_workers": feature_num_workers}
        sources = [mapped_features(slide.patches, encoder, **options).reshape(-1, *encoder.shape) for slide in slides]
    slide = np.repeat(names, [len(table) for table in tables])
    with timed(
        "Fine-tuning %s on %d slides (%s), %d spots, %d genes", tuned, len(names), ", ".join(names), n_spots, len(panel)
    ) as timer:
        heads, history = train_seal(
            tuned,
            sources,
            expression,
            slide,
            config=config,
            coords=_coords(tables),
            quiet=quiet,
            trainer_kwargs=trainer,
        )
        timer.add("keep the adapters with tuned.save(path)")
    SealAlignment(heads, panel, mean, std, config, history).attach_to(tuned, SEAL_ATTACHMENT)
    return tuned
