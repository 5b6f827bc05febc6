"""sd.tl.evaluate: embeddings of several slides compared with the probes, retrieval, few-shot and domain tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

from spade_sd.spots.genes import GenePanel
from spade_sd.utils.logging import logger
from spade_sd.utils.validation import check_int, check_key, check_number, check_seed

Task = Literal["probe", "probe_cv", "few_shot", "knn", "gene_to_image", "classification", "domains"]
TASKS: tuple[Task, ...] = get_args(Task)
# Tasks that hold out whole slides, so they need at least two.
_FOLD_TASKS = {"probe", "probe_cv", "knn"}
# Tasks that read the labels column, and those that read the slides' shared expression targets.
_LABEL_TASKS = {"classification", "domains"}
_TARGET_TASKS = {"probe", "probe_cv", "few_shot", "knn", "classification"}


def _checked_tasks(tasks: str | Sequence[str]) -> list[str]:
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"Unknown tasks {unknown or tasks}; choose from {list(TASKS)}.")
    return tasks


def _checked_reps(use_rep: str | Sequence[str]) -> list[str]:
    return [check_key("use_rep", use_rep)] if isinstance(use_rep, str) else [check_key("use_rep", r) for r in use_rep]


def _tables(data, table_key: str | None) -> list[AnnData]:
    items = [data] if isinstance(data, SpatialData | AnnData) else list(data)
    tables = []
    for item in items:
        if isinstance(item, AnnData):
            tables.append(item)
            continue
        if not isinstance(item, SpatialData):
            raise TypeError(f"Expected SpatialData or AnnData objects, found {type(item).__name__}.")
        names = [table_key] if table_key is not None else list(item.tables)
        if len(names) != 1 or names[0] not in item.tables:
            raise ValueError(f"Pass table_key= to choose one of the tables {list(item.tables)}.")
        tables.append(item.tables[names[0]])
    return tables


def _check_labels(tables: list[AnnData], labels: str | None, tasks: list[str]) -> None:
    if labels is None or not _LABEL_TASKS & set(tasks):
        return
    lacking = [i for i, t in enumerate(tables) if check_key("labels", labels) not in t.obs]
    if lacking:
        raise KeyError(f"labels column {labels!r} is not in .obs of tables {lacking}.")


def _stack(tables: list[AnnData], key: str) -> np.ndarray:
    missing = [i for i, t in enumerate(tables) if key not in t.obsm]
    if missing:
        raise KeyError(f"{key!r} is missing from .obsm of tables {missing}; compute it first (tl.features, tl.embed).")
    return np.concatenate([np.asarray(t.obsm[key], dtype=np.float32) for t in tables])


def _slides(tables: list[AnnData], slide_key: str) -> np.ndarray:
    labels = []
    for i, table in enumerate(tables):
        values = table.obs[slide_key].astype(str).to_numpy() if slide_key in table.obs else None
        labels.append(values if values is not None else np.full(table.n_obs, f"slide_{i}"))
    return np.concatenate(labels)


def _check_folds(slide: np.ndarray, tasks: list[str]) -> None:
    needs_folds = _FOLD_TASKS & set(tasks)
    if needs_folds and len(np.unique(slide)) < 2:
        raise ValueError(
            f"Tasks {sorted(needs_folds)} hold out whole slides and need at least 2; found {np.unique(slide)}."
        )


def _classes(tables: list[AnnData], labels: str | None, Y: np.ndarray, seed: int) -> np.ndarray:
    from spade_sd.metrics import expression_domains

    if labels:
        return np.concatenate([t.obs[labels].astype(str) for t in tables])
    return expression_domains(Y, seed=seed)


def _finite_rows(rep: str, X: np.ndarray) -> np.ndarray:
    keep = np.isfinite(X).all(axis=1)
    if not keep.all():
        logger.info("%s: %d rows without values are left out", rep, int((~keep).sum()))
    return keep


def _gene_side(
    tables: list[AnnData], rep: str, X: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """The gene side and the image side it is compared with, or ``None`` for a representation without a gene side.

    Only representations with a gene side (the SPADE embedding's ``f"{rep}_gene"``) are scored on gene → image
    recall. The image side is ``rep`` itself where it has the gene side's width (the heads' output), else
    ``f"{rep}_expr"`` (the default ``X_spade`` is the backbone's features next to a read-out; the heads' image side
    is in ``X_spade_expr``, projected onto the expression subspace).
    """
    gene_rep, expr_rep = f"{rep}_gene", f"{rep}_expr"
    lacking = [i for i, t in enumerate(tables) if gene_rep not in t.obsm]
    if lacking and len(lacking) < len(tables):
        logger.warning(
            "gene → image retrieval of %r skipped: tables %s of %d lack .obsm[%r] (tl.embed writes it for spots "
            "with expression, unless genes=False); embed them with their expression to score it",
            rep,
            lacking,
            len(tables),
            gene_rep,
        )
    if lacking:
        return None
    G = _stack(tables, gene_rep)[keep]
    if G.shape[1] == X.shape[1]:
        return G, X[keep]
    if all(expr_rep in t.obsm for t in tables) and _width(tables, expr_rep) == G.shape[1]:
        return G, _stack(tables, expr_rep)[keep]
    return None


def _width(tables: list[AnnData], key: str) -> int:
    """Columns of ``.obsm[key]`` (the first table's)."""
    return np.shape(tables[0].obsm[key])[1]


def _domain_scores(
    tables: list[AnnData], representations: dict[str, np.ndarray], slide: np.ndarray, labels: str | None, seed: int
) -> list[pd.DataFrame]:
    """Agreement of each representation's Leiden clusters with every section's own expression domains and labels.

    Each section is scored alone (sections clustered together split by section); its expression domains come from
    its own expression (all genes, log1p-normalised), at each of the reference resolutions.
    """
    from spade_sd.metrics import domain_agreement, expression_domains
    from spade_sd.metrics._domains import REFERENCE_HVGS, REFERENCE_PCS, REFERENCE_RESOLUTIONS

    frames, offset = [], 0
    for table in tables:
        rows = np.arange(offset, offset + table.n_obs)
        offset += table.n_obs
        expression = GenePanel(genes=list(table.var_names)).transform(table)
        for section in np.unique(slide[rows]):
            members = slide[rows] == section
            references = {
                f"expression@{r:g}": expression_domains(
                    expression[members], resolution=r, n_top_genes=REFERENCE_HVGS, n_pcs=REFERENCE_PCS, seed=seed
                )
                for r in REFERENCE_RESOLUTIONS
            }
            if labels is not None:
                references[labels] = table.obs[labels].to_numpy()[members]
            for rep, X in representations.items():
                x = X[rows][members]
                for reference, truth in references.items():
                    keep = np.isfinite(x).all(axis=1) & pd.notna(truth)
                    if np.unique(truth[keep].astype(str)).size < 2:
                        logger.warning("%s: %r has fewer than 2 domains on %s; not scored", section, reference, rep)
                        continue
                    df = domain_agreement(x[keep], truth[keep].astype(str), reference=reference, label=rep)
                    against = "expression domains" if reference.startswith("expression@") else reference
                    frames.append(df.assign(metric=df["metric"] + f" vs {against}", fold=section, group=reference))
    return frames


def evaluate(
    data: SpatialData | AnnData | Sequence[SpatialData | AnnData],
    *,
    use_rep: str | Sequence[str] = ("X_backbone", "X_spade"),
    tasks: Sequence[Task] = TASKS,
    table_key: str | None = None,
    slide_key: str = "sample",
    labels: str | None = None,
    n_top_genes: int = 50,
    fraction: float = 0.2,
    k_neighbors: int = 50,
    k_shots: Sequence[int] = (1, 5, 10),
    n_repeats: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Compare embeddings on expression prediction, retrieval, few-shot classification and domains.

    Targets are the log1p-normalised ``n_top_genes`` most variable genes shared by the slides; folds are whole
    slides (leave-one-slide-out), never spots. Each task is one function of :mod:`spade_sd.metrics`, which also
    scores plain arrays.

    Parameters
    ----------
    data
        Tables (or SpatialData holding them) of one or more slides, with the embeddings in ``.obsm``.
    use_rep
        ``.obsm`` keys to compare, e.g. backbone features and the SPADE embedding.
    tasks
        ``"probe"``: the HEST-Benchmark ridge probe (StandardScaler → PCA(256) → Ridge with α = 100/(d·n_genes);
        :func:`~spade_sd.metrics.ridge_probe`); ``"probe_cv"``: the same with α tuned by inner cross-validation;
        ``"few_shot"``: the probe trained on a ``fraction`` of each held-out slide
        (:func:`~spade_sd.metrics.few_shot_probe`); ``"knn"``: BLEEP-style expression prediction from the
        ``k_neighbors`` most similar spots of the other slides (:func:`~spade_sd.metrics.knn_expression_cv`);
        ``"gene_to_image"``: recall@k of the true spot when ranking a slide's patches by similarity to the
        gene-side embedding ``f"{rep}_gene"``, skipped for representations without one
        (:func:`~spade_sd.metrics.gene_to_image_recall`); ``"classification"``: balanced accuracy of logistic
        regression on ``k_shots`` labelled spots per class (:func:`~spade_sd.metrics.few_shot_classification`);
        ``"domains"``: whether Leiden clusters of the representation, as ``sc.pp.neighbors(use_rep=...)`` and
        ``sc.tl.leiden`` give them, follow each slide's own expression domains (Leiden on its 1,000 most variable
        genes, 20 PCs, at resolutions 0.5 and 1.0) and ``labels``: ARI and NMI over 5 Leiden seeds at the
        resolution (0.1 to 1.5) whose cluster count is nearest the reference's
        (:func:`~spade_sd.metrics.domain_agreement`; metrics ``"ari vs expression domains"``,
        ``"ari vs <labels>"``, …, with the reference in ``group``).
    table_key
        Table of each SpatialData (default: its only table).
    slide_key
        ``obs`` column naming the slide (or patient) of each spot; default one slide per table.
    labels
        ``obs`` column of classes (e.g. pathologist regions) for ``"classification"`` (default: Leiden domains of
        the expression, :func:`~spade_sd.metrics.expression_domains`), and a second reference of ``"domains"``;
        spots without a label are left out of both.
    n_top_genes, fraction, k_neighbors, k_shots, n_repeats, seed
        Task settings.

    Returns
    -------
    A tidy DataFrame with one row per encoder, task, fold or repeat and gene or metric (columns ``encoder``,
    ``task``, ``metric``, ``value`` and task-specific ones); summarise with
    :func:`spade_sd.metrics.summarize` or plot with :func:`spade_sd.pl.benchmark`.
    """
    # Imported here so that `sd.tl` does not import scikit-learn until an evaluation runs.
    from spade_sd.metrics import (
        few_shot_classification,
        few_shot_probe,
        gene_to_image_recall,
        knn_expression_cv,
        ridge_probe,
    )

    tasks = _checked_tasks(tasks)
    check_int("n_top_genes", n_top_genes, minimum=1)
    check_number("fraction", fraction, minimum=0, maximum=1, exclusive_minimum=True, exclusive_maximum=True)
    check_int("k_neighbors", k_neighbors, minimum=1)
    k_shots = [check_int("k_shots", k, minimum=1) for k in ([k_shots] if isinstance(k_shots, int) else k_shots)]
    check_int("n_repeats", n_repeats, minimum=1)
    check_seed(seed)
    check_key("slide_key", slide_key)
    reps = _checked_reps(use_rep)
    tables = _tables(data, table_key)
    _check_labels(tables, labels, tasks)
    representations = {rep: _stack(tables, rep) for rep in reps}
    slide = _slides(tables, slide_key)
    _check_folds(slide, tasks)
    # the domains task reads each slide's own expression, and gene → image retrieval none
    panel = GenePanel.fit(tables, n_top_genes=n_top_genes, flavor="global") if _TARGET_TASKS & set(tasks) else None
    Y = np.concatenate([panel.transform(t) for t in tables]) if panel is not None else None
    classes = _classes(tables, labels, Y, seed) if "classification" in tasks else None

    results = []
    for rep, X in representations.items():
        keep = _finite_rows(rep, X)
        x, s, sides = X[keep], slide[keep], _gene_side(tables, rep, X, keep)
        y = Y[keep] if Y is not None else None
        for task in tasks:
            if task == "domains" or (task == "gene_to_image" and sides is None):
                continue
            if task in ("probe", "probe_cv"):
                alpha = "hest" if task == "probe" else "cv"
                result = ridge_probe(x, y, s, alpha=alpha, genes=panel.genes, label=rep, seed=seed)
            elif task == "few_shot":
                result = few_shot_probe(
                    x, y, s, fraction=fraction, n_repeats=n_repeats, genes=panel.genes, label=rep, seed=seed
                )
            elif task == "knn":
                result = knn_expression_cv(x, y, s, k=k_neighbors, genes=panel.genes, label=rep)
            elif task == "classification":
                result = few_shot_classification(
                    x, classes[keep], k=tuple(k_shots), n_repeats=n_repeats, label=rep, seed=seed
                )
            else:
                result = gene_to_image_recall(*sides, groups=s, label=rep)
            results.append(result.assign(task=task))
    if "domains" in tasks:
        results += [df.assign(task="domains") for df in _domain_scores(tables, representations, slide, labels, seed)]
    return (
        pd.concat(results, ignore_index=True)
        if results
        else pd.DataFrame(columns=["encoder", "task", "metric", "value"])
    )
