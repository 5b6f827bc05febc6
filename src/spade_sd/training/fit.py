"""From per-slide features and tables to a trained SpadeModel: gene panel, standardisation, experts, training."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Literal

import numpy as np
from anndata import AnnData

from spade_sd.model.clustering import MIN_SLIDE_PATCHES, FeatureScaler, fit_slide_scaler, two_stage_kmeans
from spade_sd.model.routing import default_tau, expert_weights
from spade_sd.model.spade_model import SpadeModel
from spade_sd.model.subspace import EmbeddingSubspace, check_n_comps
from spade_sd.spots.genes import GenePanel
from spade_sd.training.experts import train_experts
from spade_sd.utils.logging import logger


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads, restoring the previous number afterwards."""
    import torch

    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
    panel: GenePanel | None = None,
    layer: str | None = None,
    n_top_genes: int = 50,
    panel_flavor: str = "union",
    smoothing: float = 0.0,
    n_experts: int = 4,
    n_fine: int | str = 16,
    tau_scale: float = 0.25,
    seed: int = 0,
    patch_config: dict[str, Any] | None = None,
    train_threads: int | None = 1,
    standardize: Literal["slide", "global"] = "slide",
    warm_start: bool = True,
    expert_lr_factor: float = 0.1,
    lr: float = 1e-3,
    out_dim: int = 256,
    n_comps: int | None = 16,
    **training: Any,
) -> SpadeModel:
    """Train a SpadeModel on the spots of several slides.

    Parameters
    ----------
    features
        Backbone features of each slide's spots.
    tables
        Each slide's table restricted to those spots (raw counts), same row order.
    slides
        A unique name per slide (validation holds out whole slides).
    groups
        Stage-1 clustering group of each spot, per slide.
    backbone
        The backbone that computed the features.
    panel
        A fitted gene panel to reuse; otherwise one is fitted (``n_top_genes``, ``panel_flavor``, ``smoothing``).
    layer
        Layer of the tables holding raw counts; ``None`` uses ``X``.
    n_experts, n_fine, tau_scale, seed
        Clustering and routing (see :func:`~spade_sd.model.clustering.two_stage_kmeans`,
        :func:`~spade_sd.model.routing.default_tau`).
    patch_config
        Patch geometry the features were computed with, recorded in the model.
    train_threads
        Torch CPU threads while training the heads (``None``: unchanged). The heads are small (a batch is a few
        dozen MFLOP), so on a CPU extra threads cost more in synchronisation than they gain: measured on this
        project's 2-core machines under load, 40 epochs took 2.2 s with one thread and 48 s with two.
    standardize
        ``"slide"``: standardise each slide's features by its own mean and standard deviation first (see
        :func:`spade_sd.tl.pretrain`); ``"global"``: only by the training set's.
    warm_start
        With several experts, first train one generalist expert on every spot and start each expert from it.
    expert_lr_factor
        Experts started from the generalist are trained at ``lr * expert_lr_factor``.
    lr
        Peak learning rate (of the generalist, and of experts trained from scratch).
    out_dim
        Embedding dimension of the heads.
    n_comps
        Keep every embedding in the span of the ``n_comps`` leading principal directions of the training spots'
        image embeddings (:class:`~spade_sd.model.subspace.EmbeddingSubspace`); ``None`` keeps all ``out_dim``.
    **training
        Passed to :func:`~spade_sd.training.experts.train_experts`.

    Returns
    -------
    The trained model.
    """
    start = time.perf_counter()
    if standardize not in ("slide", "global"):
        raise ValueError(f'standardize must be "slide" or "global"; found {standardize!r}.')
    if standardize == "slide":
        small = {name: len(f) for f, name in zip(features, slides, strict=True) if len(f) < MIN_SLIDE_PATCHES}
        if small:
            raise ValueError(
                f"standardize='slide' needs at least {MIN_SLIDE_PATCHES} spots per slide; found {small}. "
                "Pass standardize='global' or leave these slides out."
            )
    check_n_comps(n_comps, out_dim, sum(len(f) for f in features))
    if panel is None:
        panel = GenePanel.fit(
            list(tables), n_top_genes=n_top_genes, flavor=panel_flavor, smoothing=smoothing, layer=layer
        )
    logger.info("Expression from %s", "X" if layer is None else f"layers[{layer!r}]")
    expression = np.concatenate([panel.transform(table, layer=layer) for table in tables])
    if standardize == "slide":
        features = [fit_slide_scaler([np.asarray(f, dtype=np.float32)]).transform(f) for f in features]
    X = np.concatenate(features).astype(np.float32)
    slide = np.concatenate([np.full(len(f), name, dtype=object) for f, name in zip(features, slides, strict=True)])
    group = np.concatenate([np.asarray(g).astype(str) for g in groups])

    scaler = FeatureScaler().fit(X)
    X_std = scaler.transform(X)
    clustering = two_stage_kmeans(X_std, group, n_fine=n_fine, n_experts=n_experts, seed=seed)
    _, expert = clustering.assign(X_std)
    logger.info(
        "Two-stage clustering: %d fine centroids over %d groups → %d experts with %s spots",
        clustering.n_fine,
        len(np.unique(group)),
        clustering.n_experts,
        np.bincount(expert, minlength=clustering.n_experts).tolist(),
    )
    with _torch_threads(train_threads):
        init, generalist = None, None
        if warm_start and clustering.n_experts > 1:
            logger.info("Warm start: training one generalist expert on all %d spots", len(X_std))
            everyone = np.zeros(len(X_std), dtype=np.int64)
            init, generalist = train_experts(
                X_std,
                expression,
                everyone,
                slide.astype(str),
                n_experts=1,
                seed=seed,
                out_dim=out_dim,
                lr=lr,
                **training,
            )
        mixture, history = train_experts(
            X_std,
            expression,
            expert,
            slide.astype(str),
            n_experts=clustering.n_experts,
            seed=seed,
            init=init,
            out_dim=out_dim,
            lr=lr if init is None else lr * expert_lr_factor,
            **training,
        )
    if generalist is not None:
        history["generalist"] = {key: generalist[key] for key in ("epochs", "best_epoch", "best_loss")}
    tau = default_tau(X_std, clustering, scale=tau_scale)
    config = {
        "patches": patch_config or {},
        "n_experts": clustering.n_experts,
        "n_experts_requested": n_experts,
        "n_fine": n_fine,
        "tau_scale": tau_scale,
        "standardize": standardize,
        "warm_start": warm_start,
        "expert_lr_factor": expert_lr_factor,
        "lr": lr,
        "n_comps": n_comps,
        "layer": layer,
        "seed": seed,
        "slides": list(slides),
        "n_spots": int(len(X)),
        "training": {k: v for k, v in training.items() if isinstance(v, str | int | float | bool | type(None))},
        "versions": _versions(),
    }
    model = SpadeModel(
        backbone=backbone,
        panel=panel,
        scaler=scaler,
        clustering=clustering,
        mixture=mixture,
        tau=tau,
        config=config,
        history=_json_safe(history),
    )
    # the heads' own outputs (the model has no subspace yet) on every training spot, routed as embed routes them
    weights = expert_weights(X_std, clustering, tau=tau)
    heads = model._heads(X_std, weights, "image")
    _check_finite(heads, model._heads(expression, weights, "gene"), tau)
    if n_comps is not None:
        model = replace(model, subspace=EmbeddingSubspace.fit(heads, n_comps))
    logger.info("Trained %d experts on %d spots in %.1f s", clustering.n_experts, len(X), time.perf_counter() - start)
    return model


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
