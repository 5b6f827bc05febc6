"""From per-slide features and tables to a trained SpadeModel: gene panel, standardization, experts, training.

Training ends with the reference bank: a bounded draw of the training spots, whose embeddings and expression the
model keeps for expression prediction and queries.

From :data:`~spade_sd.config.SCALE_SPOTS` spots on, training takes the bounded-memory path (``docs/scale.md``): the
features (memory maps of float16 or float32 allowed) are read in row blocks and standardized on the fly
(:class:`~spade_sd.training.data.StandardizedRows`), the expression over the gene panel is held sparse
(:class:`~spade_sd.training.data.ExpressionRows`), the clustering scales (:func:`two_stage_kmeans` with
``scalable=True``), every principal basis is fitted on a seeded draw of :data:`~spade_sd.config.FIT_SPOTS` spots, read
a block of rows at a time (the heads' start from the draw's covariance), and the reference bank embeds only the spots
it keeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from anndata import AnnData

from spade_sd.config import FIT_SPOTS, SCALE_SPOTS, PanelConfig, SpadeConfig, TrainingConfig, check_n_comps
from spade_sd.model.backbone_block import BackboneBlock
from spade_sd.model.clustering import fit_experts, sample_rows
from spade_sd.model.heads import ExpertMixture
from spade_sd.model.readout import ExpressionReadout, slide_variance
from spade_sd.model.reference import ReferenceBank, stratified_sample
from spade_sd.model.routing import default_tau, expert_weights
from spade_sd.model.spade_model import SpadeModel
from spade_sd.model.standardization import MIN_SLIDE_PATCHES, FeatureScaler, fit_slide_scaler
from spade_sd.model.subspace import EmbeddingSubspace
from spade_sd.spots.genes import GenePanel
from spade_sd.training.data import BLOCK_ROWS, ExpressionRows, StandardizedRows, drawn_blocks, release_pages
from spade_sd.training.experts import train_experts
from spade_sd.training.lightning_loop import torch_threads
from spade_sd.utils.logging import logger


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    packages = ("spade_sd", "torch", "timm", "lightning", "spatialdata", "anndata", "scikit-learn")
    return {name: version(name) for name in packages}


def fit_model(
    features: Sequence[np.ndarray],
    tables: Sequence[AnnData],
    slides: Sequence[str],
    groups: Sequence[np.ndarray],
    backbone,
    *,
    config: SpadeConfig,
    panel: GenePanel | None = None,
    coords: np.ndarray | None = None,
    quiet: bool = False,
    trainer_kwargs: Mapping[str, Any] | None = None,
    scalable: bool | None = None,
) -> SpadeModel:
    """Train a SpadeModel on the spots of several slides.

    Parameters
    ----------
    features
        Backbone features of each slide's spots: arrays, or memory maps (e.g. ``np.load(path, mmap_mode="r")``,
        float16 or float32), which the bounded-memory path (``scalable``) reads a block of rows at a time.
    tables
        Each slide's table restricted to those spots (raw counts), same row order.
    slides
        A unique name per slide (validation holds out whole slides).
    groups
        Stage-1 clustering group of each spot, per slide.
    backbone
        The backbone that computed the features.
    config
        Patch geometry (recorded: the features were computed with it), panel, clustering and training
        configuration; the model's :attr:`~spade_sd.SpadeModel.config` is this one with the provenance added.
    panel
        A fitted gene panel to reuse; otherwise one is fitted as ``config.panel`` says.
    coords
        Every spot's coordinates (slide after slide), for validation blocks when there are few slides.
    quiet
        No progress bar, and no Lightning output even at debug verbosity.
    trainer_kwargs
        :class:`lightning.pytorch.Trainer` arguments only (see :func:`~spade_sd.training.experts.train_experts`).
    scalable
        Train in memory bounded whatever the number of spots (the module's description says how; the model then
        differs from the in-memory path's by its sampled fits); ``None``: from :data:`~spade_sd.config.SCALE_SPOTS`
        spots on.

    Returns
    -------
    The trained model, with a reference bank of ``config.training.reference_size`` of the spots (see
    :func:`reference_bank`) unless that is 0.
    """
    start = time.perf_counter()
    n_spots = sum(len(f) for f in features)
    n_features = features[0].shape[1] if len(features) and np.ndim(features[0]) == 2 else None
    check_sizes([len(f) for f in features], slides, config, n_features)
    scalable = n_spots >= SCALE_SPOTS if scalable is None else scalable
    panel, expression = _panel_expression(tables, panel, config.panel, held_sparse=scalable)
    slide, group = _labels(features, slides, groups)
    if scalable:
        logger.info("Training on %d spots in bounded memory: features read in blocks of rows", n_spots)
        X_std = _streamed(features, config.clustering.standardize)
        scaler = X_std.scaler
    else:
        X = _pooled(features, config.clustering.standardize)
        scaler = FeatureScaler().fit(X)
        X_std = scaler.transform(X)
    clustering, expert = fit_experts(
        X_std,
        group,
        n_fine=config.clustering.n_fine,
        n_experts=config.clustering.n_experts,
        seed=config.training.seed,
        scalable=scalable,
    )
    options = {"coords": coords, "quiet": quiet, "trainer_kwargs": trainer_kwargs}
    with torch_threads(config.training.train_threads):
        mixture, history = _train(X_std, expression, expert, slide, clustering.n_experts, config.training, **options)
    model = SpadeModel(
        backbone=backbone,
        panel=panel,
        scaler=scaler,
        clustering=clustering,
        mixture=mixture,
        tau=default_tau(X_std, clustering, scale=config.clustering.tau_scale),
        config=replace(config, slides=tuple(slides), n_spots=n_spots, versions=_versions()),
        history=_json_safe(history),
    )
    # at scale, the bases are fitted on a seeded draw of the spots (read a block of rows at a time)
    fitted = sample_rows(n_spots, FIT_SPOTS, config.training.seed) if scalable else slice(None)
    model = _with_subspace(model, _row_blocks(X_std, expression, fitted), config.training)
    if config.training.output == "joint":
        model = _with_block(model, X_std, fitted, config.training)
    # at scale, the slides' own statistics were gathered once, in the chunks tl.embed reads: the bank and the
    # read-out's lift embed with them
    scalers = (X_std.slide_scalers or [None] * len(features)) if scalable else None
    if config.training.reference_size > 0:
        bank = reference_bank(model, features, tables, slides, scalable=scalable, slide_scalers=scalers)
        model = replace(model, reference=bank)
    if config.training.representation == "backbone+readout":
        model = replace(model, readout=expression_readout(model, features, scalable=scalable, slide_scalers=scalers))
    logger.debug("Fitted the SpadeModel in %.1f s", time.perf_counter() - start)
    return model


def reference_bank(
    model: SpadeModel,
    features: Sequence[np.ndarray],
    tables: Sequence[AnnData],
    slides: Sequence[str],
    *,
    scalable: bool = False,
    slide_scalers: Sequence[FeatureScaler | None] | None = None,
) -> ReferenceBank:
    """The reference bank of a trained model: a per-expert stratified draw of its training spots.

    Every training slide is embedded as :func:`spade_sd.tl.embed` embeds it (all of its spots, the features in the
    chunks the feature cache serves, so the per-slide statistics and the embeddings are the same); the draw is
    ``config.training.reference_size`` spots, each expert (largest routing weight) in proportion to its spots, with
    ``config.training.seed``. Their expression is ``log1p`` of counts normalized to the panel's ``target_sum`` over
    the bank's genes (:func:`reference_genes`).

    Parameters
    ----------
    model
        The trained model (with its subspace).
    features, tables, slides
        Backbone features, tables (raw counts, same rows) and names of the training slides, as given to
        :func:`fit_model`.
    scalable
        Bounded memory: the experts of all spots are found block by block, only the spots drawn are embedded, and
        the extra genes are the most variable over a seeded draw of :data:`~spade_sd.config.FIT_SPOTS` spots.
    slide_scalers
        With ``scalable``: each slide's :meth:`~spade_sd.SpadeModel.slide_scaler`, when the caller has them
        (``None``: gathered here, in a pass over every slide's features).
    """
    from spade_sd.encoders.features import CHUNK_SIZE

    training = model.config.training
    n_spots = sum(map(len, features))
    if scalable:
        scalers = _slide_scalers(model, features) if slide_scalers is None else slide_scalers
        expert = np.concatenate([_experts(model, f, scaler) for f, scaler in zip(features, scalers, strict=True)])
        chosen = stratified_sample(expert, training.reference_size, training.seed)
        rows = _per_slide(chosen, features)
        embedding = np.concatenate(
            [
                model.embed_features(_read_rows(f, r), slide_scaler=scaler)[0]
                for f, r, scaler in zip(features, rows, scalers, strict=True)
            ]
        )
        expert = expert[chosen]
        # every slide keeps a spot in the draw, so the genes chosen are shared by all of them
        drawn = _per_slide(sample_rows(n_spots, FIT_SPOTS, training.seed), features)
        gene_tables = [table[r if len(r) else [0]] for table, r in zip(tables, drawn, strict=True)]
    else:
        embedded = [model.embed_chunks(lambda f=f: _chunks(f, CHUNK_SIZE), len(f)) for f in features]
        embedding = np.concatenate([e for e, _ in embedded])
        expert = np.concatenate([w.argmax(axis=1) for _, w in embedded])
        chosen = stratified_sample(expert, training.reference_size, training.seed)
        embedding, expert = embedding[chosen], expert[chosen]
        rows, gene_tables = _per_slide(chosen, features), tables
    slide = np.concatenate([np.full(len(r), name) for r, name in zip(rows, slides, strict=True)])
    genes = reference_genes(model.panel, gene_tables, training.reference_genes, model.config.panel.layer)
    normalizer = GenePanel(genes, target_sum=model.panel.target_sum)
    expression = np.concatenate(
        [normalizer.transform(table[r], layer=model.config.panel.layer) for table, r in zip(tables, rows, strict=True)]
    )
    bank = ReferenceBank(
        embedding=embedding,
        expression=expression,
        genes=genes,
        expert=expert,
        slide=slide,
        obs_names=[name for table, r in zip(tables, rows, strict=True) for name in table.obs_names[r]],
        target_sum=model.panel.target_sum,
    )
    logger.info("Reference bank: %d of %d training spots, %d genes", len(bank), n_spots, len(genes))
    return bank


def _per_slide(chosen: np.ndarray, features: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Sorted positions among all slides' spots, as each slide's own row positions."""
    offsets = np.cumsum([0, *map(len, features)])
    return [
        chosen[(chosen >= start) & (chosen < stop)] - start
        for start, stop in zip(offsets[:-1], offsets[1:], strict=True)
    ]


def _slide_scalers(model: SpadeModel, features: Sequence[np.ndarray]) -> list[FeatureScaler | None]:
    """Each slide's :meth:`~spade_sd.SpadeModel.slide_scaler`, its features read in the chunks tl.embed reads."""
    from spade_sd.encoders.features import CHUNK_SIZE

    return [model.slide_scaler(block for _, block in _chunks(f, CHUNK_SIZE)) for f in features]


def _experts(model: SpadeModel, features: np.ndarray, slide_scaler: FeatureScaler | None) -> np.ndarray:
    """The expert (largest routing weight) of every spot of one slide, its features read block by block."""
    return np.concatenate(
        [
            expert_weights(model.standardize(block, slide_scaler), model.clustering, tau=model.tau).argmax(axis=1)
            for _, block in _chunks(features, BLOCK_ROWS)
        ]
        or [np.zeros(0, dtype=np.int64)]
    )


def expression_readout(
    model: SpadeModel,
    features: Sequence[np.ndarray],
    *,
    scalable: bool = False,
    slide_scalers: Sequence[FeatureScaler | None] | None = None,
) -> ExpressionReadout:
    """The read-out of ``X_spade``'s expression block, fitted on the model's reference bank.

    The block's scale is set against the backbone ``features`` of the training slides (raw, each slide around its
    own mean; read in blocks when ``scalable``), with ``config.training.readout_weight`` (and ``readout_emphasis``
    within the block); its lift (``config.training.readout_lift``) is fitted on every training spot embedded as
    :func:`spade_sd.tl.embed` embeds it (``scalable``: a seeded draw of :data:`~spade_sd.config.FIT_SPOTS` spots, each
    slide standardized by its own statistics: ``slide_scalers`` when given, as for :func:`reference_bank`).
    """
    bank = model.reference
    training = model.config.training
    readout = ExpressionReadout.fit(
        model.expression_space(bank.embedding),
        bank.expression,
        bank.slide,
        backbone_variance=streamed_slide_variance(features) if scalable else slide_variance(features),
        weight=training.readout_weight,
        emphasis=training.readout_emphasis,
    )
    if training.readout_lift > 0:
        if scalable:  # a seeded draw, each slide standardized by all of its spots' statistics
            rows = _per_slide(sample_rows(sum(map(len, features)), FIT_SPOTS, training.seed), features)
            drawn = [_read_rows(f, r) for f, r in zip(features, rows, strict=True)]
            scalers = _slide_scalers(model, features) if slide_scalers is None else slide_scalers
        else:  # every spot, as tl.embed embeds the slide
            drawn, scalers = list(features), [None] * len(features)
        spaces = [
            model.expression_space(model.embed_features(f, slide_scaler=scaler)[0])
            for f, scaler in zip(drawn, scalers, strict=True)
        ]
        readout = readout.lifted(drawn, spaces, training.readout_lift)
    logger.debug(
        "Expression read-out of X_spade: %d coordinates (ridge penalty %.3g) after the %d backbone features",
        readout.n_comps,
        readout.alpha,
        np.shape(features[0])[1],
    )
    return readout


def reference_genes(panel: GenePanel, tables: Sequence[AnnData], n_genes: int, layer: str | None) -> list[str]:
    """The panel's genes, then the others among the ``n_genes - len(panel)`` most variable genes shared by ``tables``.

    Genes are highly variable over all tables together; at most ``n_genes`` in all, the panel always whole.
    """
    n_more = n_genes - len(panel)
    if n_more <= 0:
        return list(panel.genes)
    in_panel = set(panel.genes)
    hvgs = GenePanel.fit(list(tables), n_top_genes=n_more, flavor="global", layer=layer).genes
    return list(panel.genes) + [g for g in hvgs if g not in in_panel]


def streamed_slide_variance(features: Sequence[np.ndarray]) -> float:
    """:func:`~spade_sd.model.readout.slide_variance` read in blocks of rows, a memory map's pages released as read.

    Each slide's total variance is ``Σ (Σ x² − (Σ x)² / n) / n`` over columns, accumulated in float64.
    """
    from spade_sd.encoders.features import CHUNK_SIZE

    totals = []
    for values in features:
        if not len(values):
            continue
        total, squares = np.zeros(values.shape[1]), np.zeros(values.shape[1])
        for _, block in _chunks(values, CHUNK_SIZE):
            block = np.asarray(block, dtype=np.float64)
            total += block.sum(axis=0)
            squares += np.square(block).sum(axis=0)
        totals.append(float((squares - total * total / len(values)).sum() / len(values)))
    return float(np.mean(totals)) if totals else 0.0


def _read_rows(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A copy of ``rows`` of one slide's features, a memory map's pages released after reading them.

    Scattered rows map whole large folios of the file, far more than the rows hold.
    """
    out = np.array(features[rows])
    release_pages(features)
    return out


def _chunks(features: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(features), size):
        yield start, features[start : start + size]
        release_pages(features)  # a memory map's pages, once read, would otherwise count as resident


def check_sizes(sizes: Sequence[int], slides: Sequence[str], config: SpadeConfig, n_features: int | None) -> None:
    """Refuse slides too small for per-slide standardization, and more components than spots or features.

    :func:`spade_sd.tl.pretrain` calls it before any patch is encoded, with the backbone's dimension.

    Parameters
    ----------
    sizes
        Spots of each slide.
    slides
        The slides' names, for the message.
    config
        The configuration to train with.
    n_features
        Dimension of the backbone features; ``None`` leaves ``backbone_comps`` unchecked.
    """
    n_spots = sum(sizes)
    if config.clustering.standardize == "slide":
        small = {name: n for n, name in zip(sizes, slides, strict=True) if n < MIN_SLIDE_PATCHES}
        if small:
            raise ValueError(
                f"standardize='slide' needs at least {MIN_SLIDE_PATCHES} spots per slide; found {small}. "
                "Pass standardize='global' or leave these slides out."
            )
    check_n_comps(config.training.n_comps, config.training.out_dim, n_spots)
    if config.training.representation == "backbone+readout" and config.training.reference_size == 0:
        raise ValueError(
            "representation='backbone+readout' fits X_spade's expression read-out on the reference bank; found "
            "reference_size=0. Pass reference_size > 0 or representation='heads'."
        )
    check_n_comps(config.training.expression_comps, config.training.out_dim, n_spots, name="expression_comps")
    comps = config.training.backbone_comps
    if config.training.output == "joint" and comps is not None and n_features is not None:
        if comps > min(n_spots, n_features):
            raise ValueError(
                f"backbone_comps must be at most min(training spots, backbone features) = "
                f"{min(n_spots, n_features)}; found {comps}."
            )


def fit_panel(tables: Sequence[AnnData], config: PanelConfig) -> GenePanel:
    """The gene panel ``config`` describes, selected on ``tables``."""
    options = {"n_top_genes": config.n_top_genes, "flavor": config.flavor, "smoothing": config.smoothing}
    return GenePanel.fit(list(tables), layer=config.layer, **options)


def _panel_expression(
    tables: Sequence[AnnData], panel: GenePanel | None, config: PanelConfig, *, held_sparse: bool = False
) -> tuple[GenePanel, np.ndarray | ExpressionRows]:
    """The gene panel (fitted unless given) and every spot's expression over it, all slides concatenated.

    ``held_sparse``: each slide's expression is kept as a sparse matrix (:class:`ExpressionRows`), never dense.
    """
    if panel is None:
        panel = fit_panel(tables, config)
    logger.info("Expression from %s", "X" if config.layer is None else f"layers[{config.layer!r}]")
    if held_sparse:
        expression = ExpressionRows(panel.transform(table, layer=config.layer, as_sparse=True) for table in tables)
        logger.info(
            "Expression held sparse: %.0f MB for %d spots × %d genes", expression.nbytes / 2**20, *expression.shape
        )
        return panel, expression
    return panel, np.concatenate([panel.transform(table, layer=config.layer) for table in tables])


def _pooled(features: Sequence[np.ndarray], standardize: str) -> np.ndarray:
    """All slides' features in memory (each slide standardized by its own statistics first, if asked)."""
    if standardize == "slide":
        features = [fit_slide_scaler([np.asarray(f, dtype=np.float32)]).transform(f) for f in features]
    return np.concatenate(features).astype(np.float32)


def _streamed(features: Sequence[np.ndarray], standardize: str) -> StandardizedRows:
    """All slides' standardized features, read on demand; the statistics are gathered in passes over row blocks."""
    from spade_sd.encoders.features import CHUNK_SIZE

    slide_scalers = None
    if standardize == "slide":  # in the chunks tl.embed reads, so that the bank and the read-out can reuse them
        slide_scalers = [fit_slide_scaler(block for _, block in _chunks(f, CHUNK_SIZE)) for f in features]
    rows = StandardizedRows(features, slide_scalers)
    return rows.with_scaler(FeatureScaler().fit_chunks(block for _, block in rows.blocks()))


def _labels(
    features: Sequence[np.ndarray], slides: Sequence[str], groups: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Every spot's slide and stage-1 group, slide after slide."""
    slide = np.concatenate([np.full(len(f), name, dtype=object) for f, name in zip(features, slides, strict=True)])
    group = np.concatenate([np.asarray(g).astype(str) for g in groups])
    return slide.astype(str), group


def _train(
    X_std: np.ndarray | StandardizedRows,
    expression: np.ndarray | ExpressionRows,
    expert: np.ndarray,
    slide: np.ndarray,
    n_experts: int,
    config: TrainingConfig,
    **options: Any,
) -> tuple[ExpertMixture, dict[str, Any]]:
    """The experts' heads; with ``warm_start`` and several experts, started from a generalist trained first."""
    if not (config.warm_start and n_experts > 1):
        return train_experts(X_std, expression, expert, slide, n_experts=n_experts, config=config, **options)
    logger.debug("Warm start: one generalist expert first, then every expert starts from it")
    everyone = np.zeros(len(X_std), dtype=np.int64)
    init, generalist = train_experts(X_std, expression, everyone, slide, n_experts=1, config=config, **options)
    experts = replace(config, lr=config.lr * config.expert_lr_factor)
    mixture, history = train_experts(
        X_std, expression, expert, slide, n_experts=n_experts, config=experts, init=init, **options
    )
    history["generalist"] = {key: generalist[key] for key in ("epochs", "best_epoch", "best_loss")}
    return mixture, history


def _row_blocks(
    X_std: np.ndarray | StandardizedRows, expression: np.ndarray | ExpressionRows, rows: slice | np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The features and expression of ``rows``: in one block for a slice, else :data:`BLOCK_ROWS` rows at a time."""
    if isinstance(rows, slice):
        yield X_std[rows], expression[rows]
        return
    yield from zip(drawn_blocks(X_std, rows, BLOCK_ROWS), drawn_blocks(expression, rows, BLOCK_ROWS), strict=True)


def _with_subspace(
    model: SpadeModel, blocks: Iterable[tuple[np.ndarray, np.ndarray]], config: TrainingConfig
) -> SpadeModel:
    """The model with the principal subspaces of its training spots' image embeddings, after checking them.

    ``blocks`` gives the training spots' standardized features and expression, a block of rows at a time.
    ``n_comps`` projects every embedding; ``expression_comps`` the expression tools' comparisons only, fitted on
    the embeddings as they are after the first projection (so with both equal, the tools see what embed writes).
    """
    # the heads' own outputs (the model has no subspace yet) on every training spot, routed as embed routes them
    heads = []
    for x, y in blocks:
        weights = expert_weights(x, model.clustering, tau=model.tau)
        heads.append(model._heads(x, weights, "image"))
        _check_finite(heads[-1], model._heads(y, weights, "gene"), model.tau)
    heads = np.concatenate(heads)
    if config.n_comps is not None:
        model = replace(model, subspace=EmbeddingSubspace.fit(heads, config.n_comps))
        heads = model.subspace.project(heads)
    if config.expression_comps is not None:
        model = replace(model, expression_subspace=EmbeddingSubspace.fit(heads, config.expression_comps))
    return model


def _with_block(
    model: SpadeModel, X_std: np.ndarray | StandardizedRows, rows: slice | np.ndarray, config: TrainingConfig
) -> SpadeModel:
    """The model with its backbone block for ``output="joint"`` (scaled against the training spots' aligned part).

    Fitted on ``rows`` of the standardized features: in memory for a slice, else :data:`BLOCK_ROWS` rows at a time
    from their scatter matrices (:meth:`BackboneBlock.fit_blocks`).
    """

    def aligned(x: np.ndarray) -> np.ndarray:
        return model._heads(x, expert_weights(x, model.clustering, tau=model.tau), "image")

    if isinstance(rows, slice):
        x = X_std[rows]
        block = BackboneBlock.fit(x, aligned(x), config.backbone_comps, config.backbone_weight)
    else:
        pairs = ((x, aligned(x)) for x in drawn_blocks(X_std, rows, BLOCK_ROWS))
        block = BackboneBlock.fit_blocks(pairs, config.backbone_comps, config.backbone_weight)
    return replace(model, block=block)


def _check_finite(image: np.ndarray, gene: np.ndarray, tau: float) -> None:
    """Refuse a model whose training spots' embeddings (or routing temperature) are not finite."""
    bad = {
        "image embeddings": int((~np.isfinite(image).all(axis=1)).sum()),
        "gene embeddings": int((~np.isfinite(gene).all(axis=1)).sum()),
    }
    if any(bad.values()) or not np.isfinite(tau):
        found = ", ".join(f"{n} of {len(image)} {what}" for what, n in bad.items() if n) or f"routing tau {tau}"
        raise FloatingPointError(
            f"Training diverged: the trained model gives non-finite values ({found}). Nothing was returned; "
            "lower lr, raise temperature, or check the input features and counts."
        )


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value
