"""User tools benchmark: predicting expression, querying marker genes and transferring labels with a SPADE model.

Leave-one-section-out on the mouse olfactory bulb (MOB1–3, 200-µm patches, as ``quality.py --size-um 200``) and on
her2st (C2–C5, the default 112-µm patches): for each held-out section a SPADE model is trained on the other
sections (``sd.tl.pretrain``, whose reference bank then holds training spots), every section is embedded with it,
and the held-out section is scored on what a user would ask of it:

- ``predict_expression`` (``method="knn"`` and ``"ridge"``): per-gene Pearson r on the held-out spots over the
  evaluation's targets (log1p-normalised top-50 HVGs shared by the sections, as ``sd.tl.evaluate``), with
  ``reference=`` the training sections' spots (every target) and with the model's own bank (the default; only the
  targets the bank holds). Against the same kNN (:func:`spade_sd.metrics.knn_predict`, k = 50, cosine) on the
  frozen backbone's features, raw and standardised per section (``quality.py``'s ``backbone_slide``). The row
  ``knn_expression_cv (X_spade)`` is :func:`spade_sd.metrics.knn_expression_cv`'s fold for the held-out section,
  which ``predict_expression(method="knn")`` should reproduce (checked gene by gene).
- H&E only: the held-out section is tiled with ``sd.pp.tile_image`` (tiles of the patch size over tissue, on the
  default grid and at half stride), the tiles' expression is predicted from the image alone, and each spot gets
  the tile covering its center: Pearson r of the tiles' and the spots' own predictions, on the covered spots.
- ``query``: expression domains shared by the sections (Leiden on the targets, centred per section,
  :func:`spade_sd.metrics.expression_domains`); each domain's markers are the panel genes (those the query reads)
  with the largest mean difference, domain vs rest, on the training sections' spots; ``sd.tl.query`` scores the
  held-out spots for them (and for the domain's training mean profile), AUROC of the domain's held-out spots vs the
  rest. For reference the same markers' mean z-score on the held-out spots' measured expression (a ceiling) and on
  kNN-predicted expression (SPADE, backbone).
- ``transfer_labels``: 5 / 10 / 20 labelled spots per expression domain of the held-out section (Leiden on that
  section, as ``quality.py``'s classification task), drawn from the held-out section itself (several draws);
  balanced accuracy on its other spots, ``use_rep="X_spade"`` vs ``"X_backbone"``, kNN (k = min(15, labelled
  spots per class)) and logistic regression.

Run ``python benchmarks/tools.py --out benchmarks/results --datasets mob her2st --seeds 0 1 2 --tag main`` (about
4 min on 2 CPU cores with features cached; the first run extracts the tiles' features, ~6 min more); results go to
``benchmarks/results/tools_<tag>.{csv.gz,json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

os.environ.setdefault("SPADE_SD_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache"))
os.environ.setdefault("SPADE_SD_DATA_DIR", "/work/shared/data")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import Section, _markdown, load  # the benchmark this one shares its protocol with
from scipy.spatial import cKDTree
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

import spade_sd as sd
from spade_sd import metrics
from spade_sd.model.standardization import FeatureScaler
from spade_sd.spots.genes import GenePanel

log = logging.getLogger("tools")

PATCHES = {"mob": 200.0, "her2st": 112.0}
# Leiden resolution of the expression domains: 0.5 (quality.py's) finds the bulb's 3 layers in every MOB section, but
# a single domain in 3 of the 4 her2st sections; 1.0 gives them 4–6.
RESOLUTION = {"mob": 0.5, "her2st": 1.0}
K_NEIGHBORS = 50
SHOTS = (5, 10, 20)
TRANSFER_K = 15
TILES = "tiles"
STRIDES = (1.0, 0.5)  # tile strides, in tile sides: the grid tile_image makes by default, and half-overlapping tiles
MIN_DOMAIN_SPOTS = 10


def _pearson_frame(label: str, y_true: np.ndarray, y_pred: np.ndarray, genes: list[str], **extra) -> pd.DataFrame:
    r = metrics._pearson_per_gene(y_true, y_pred)
    return metrics._gene_frame(label, np.asarray(genes), r, **extra)


def _spot_table(s: Section):
    return s.table[s.rows]


def _predicted(sdata, key: str, obs_names, genes: list[str]) -> np.ndarray:
    """The predicted table's values for ``obs_names`` × ``genes`` (the table is then removed from ``sdata``)."""
    table = sdata.tables[key]
    values = table[list(obs_names), list(genes)].X
    values = np.asarray(values.toarray() if hasattr(values, "toarray") else values, dtype=np.float64)
    del sdata.tables[key]
    return values


def predict(s: Section, model, genes: list[str], method: str, reference=None) -> np.ndarray:
    key = f"spade_predicted_{method}"
    sd.tl.predict_expression(
        s.sdata, model, reference=reference, genes=genes, method=method, k=K_NEIGHBORS, key_added=key,
        table_key="table",
    )  # fmt: skip
    return _predicted(s.sdata, key, _spot_table(s).obs_names, genes)


def training_reference(sections: list[Section], s_out: Section) -> ad.AnnData:
    """The training sections' spots as one reference table: raw counts of their shared genes, and ``X_spade``.

    What a user passes as ``reference=`` to predict genes the model's bank lacks; its ``X_spade`` come from
    ``tl.embed`` with the fold's model, whose identity ``predict_expression`` checks.
    """
    train = [s for s in sections if s is not s_out]
    tables = {s.name: _spot_table(s) for s in train}
    reference = ad.concat(tables, join="inner", label="section", index_unique="-")
    reference.uns["spade"] = train[0].table.uns["spade"]
    return reference


def tile(s: Section, size_um: float, stride: float = 1.0):
    """The section's SpatialData with tiles of ``size_um`` every ``stride · size_um``, over tissue (a shared copy)."""
    return sd.pp.tile_image(s.sdata, size_um=size_um, stride_um=stride * size_um, key_added=TILES, copy=True)


def spot_tiles(s: Section, tiled) -> np.ndarray:
    """Index (in the tiles' table) of the tile whose center is nearest each spot's center, if that tile covers it.

    Nearest in the max-norm, so with overlapping tiles the spot gets the tile it is most central to; -1 where no
    kept tile covers the spot's center.
    """
    tiles = tiled.tables[f"{TILES}_table"]
    info = tiles.uns["spade_sd"]
    half = info["size_um"] / info["mpp"] / 2
    centers = np.asarray(_spot_table(s).obsm["spatial"], dtype=np.float64)
    distance, index = cKDTree(np.asarray(tiles.obsm["spatial"], dtype=np.float64)).query(centers, p=np.inf)
    return np.where(distance <= half * (1 + 1e-9), index, -1)


def predict_tiles(tiled, model, genes: list[str], match: np.ndarray, reference) -> np.ndarray:
    """Image-only prediction of each matched spot: its tile's predicted expression."""
    key = "spade_predicted_tiles"
    sd.tl.predict_expression(
        tiled, model, reference=reference, genes=genes, method="knn", k=K_NEIGHBORS, key_added=key,
        shapes_key=TILES, table_key=f"{TILES}_table",
    )  # fmt: skip
    names = tiled.tables[f"{TILES}_table"].obs_names
    return _predicted(tiled, key, names[match[match >= 0]], genes)


def tiles_frames(s_out: Section, model, tiled: dict, y: np.ndarray, spots: np.ndarray, genes: list, reference) -> list:
    """H&E only: each tiling's predictions at the spots it covers, against the spots' own predictions there."""
    frames = []
    for stride, sdata in tiled.items():
        match = spot_tiles(s_out, sdata)
        covered = match >= 0
        tiles = predict_tiles(sdata, model, genes, match, reference)
        extra = {"fold": s_out.name, "coverage": float(covered.mean()), "n_tiles": sdata.tables[f"{TILES}_table"].n_obs}
        name = f"stride {stride:g}×"
        frames.append(_pearson_frame(f"H&E, {name}: spots (covered)", y[covered], spots[covered], genes, **extra))
        frames.append(_pearson_frame(f"H&E, {name}: tiles", y[covered], tiles, genes, **extra))
        agreement = _pearson_frame(f"H&E, {name}: tiles vs spots' prediction", spots[covered], tiles, genes, **extra)
        frames.append(agreement.assign(metric="pearson_agreement"))
    return frames


def expression_task(ctx: dict, s_out: Section, model, tiled) -> tuple[list[pd.DataFrame], dict]:
    """Pearson r per target gene of every predictor on the held-out spots.

    ``predict_expression`` is scored twice: with ``reference=`` the training sections' spots (every target), and
    with the model's own bank (the default), on the targets the bank holds: its genes are the panel and the
    training slides' most variable genes, while the targets are the HVGs of all sections, held-out one included.
    """
    Y, genes, section, test = ctx["Y"], ctx["genes"], ctx["section"], ctx["section"] == s_out.name
    fold = {"fold": s_out.name}
    reference = training_reference(ctx["sections"], s_out)
    frames, predictions = [], {}
    for method in ("knn", "ridge"):
        predictions[method] = predict(s_out, model, genes, method, reference=reference)
        label = f"predict_expression {method} (reference=training spots)"
        frames.append(_pearson_frame(label, Y[test], predictions[method], genes, **fold))
    known = np.isin(genes, model.reference.genes)
    if not known.all():
        missing = [g for g, k in zip(genes, known, strict=True) if not k]
        log.info("%s: %d targets are not in the model's bank: %s", s_out.name, len(missing), missing)
    bank_genes = [g for g, k in zip(genes, known, strict=True) if k]
    for method in ("knn", "ridge"):
        prediction = predict(s_out, model, bank_genes, method)
        label = f"predict_expression {method} (model's bank)"
        frames.append(_pearson_frame(label, Y[test][:, known], prediction, bank_genes, **fold, n_genes=known.sum()))
    for label, X in (("backbone", ctx["X_backbone"]), ("backbone_slide", ctx["X_backbone_slide"])):
        prediction = metrics.knn_predict(X[test], X[~test], Y[~test], k=K_NEIGHBORS, metric="cosine")
        predictions[label] = prediction
        frames.append(_pearson_frame(f"{label} kNN", Y[test], prediction, genes, **fold))
    X_spade = np.concatenate([s.rep("X_spade") for s in ctx["sections"]])
    cv = metrics.knn_expression_cv(X_spade, Y, section, genes=genes, k=K_NEIGHBORS, label="knn_expression_cv (X_spade)")
    frames.append(cv[cv["fold"] == s_out.name].drop(columns=["k", "n_ref", "n_query"]))
    frames += tiles_frames(s_out, model, tiled, Y[test], predictions["knn"], genes, reference)
    return [f.assign(task="expression") for f in frames], predictions


def markers(Y_train: np.ndarray, in_domain: np.ndarray, genes: list[str], n: int) -> list[str]:
    """Top ``n`` genes by mean log1p expression in the domain minus outside it (training spots only)."""
    difference = Y_train[in_domain].mean(axis=0) - Y_train[~in_domain].mean(axis=0)
    return [genes[i] for i in np.argsort(-difference)[:n]]


def _zscore_mean(values: np.ndarray) -> np.ndarray:
    std = values.std(axis=0)
    return ((values - values.mean(axis=0)) / np.where(std > 0, std, 1)).mean(axis=1)


def panel_expression(ctx: dict, model) -> tuple[list[str], np.ndarray]:
    """log1p-normalised expression of every section's spots over the model's panel genes that all sections measure.

    The query reads the panel (the union of each training section's top HVGs), so the markers are chosen there.
    """
    sections = ctx["sections"]
    genes = [g for g in model.panel.genes if all(g in s.table.var_names for s in sections)]
    panel = GenePanel(genes=genes)
    return genes, np.concatenate([panel.transform(_spot_table(s)) for s in sections]).astype(np.float64)


def query_task(ctx: dict, s_out: Section, model, predictions: dict, n_markers: int) -> list[pd.DataFrame]:
    """AUROC per expression domain of the query for the domain's markers (ranked on the training sections)."""
    test = ctx["section"] == s_out.name
    genes, Y = panel_expression(ctx, model)
    reference = training_reference(ctx["sections"], s_out)
    X = ctx["X_backbone_slide"]
    predicted = {
        "knn": predict(s_out, model, genes, "knn", reference=reference),
        "backbone_slide": metrics.knn_predict(X[test], X[~test], Y[~test], k=K_NEIGHBORS, metric="cosine"),
    }
    domains = ctx["domains_pooled"]
    rows = []
    for domain in np.unique(domains):
        truth = domains[test] == domain
        n_train = int((domains[~test] == domain).sum())
        if n_train < MIN_DOMAIN_SPOTS or min(truth.sum(), (~truth).sum()) < MIN_DOMAIN_SPOTS:
            continue
        in_domain = domains[~test] == domain
        chosen = markers(Y[~test], in_domain, genes, n_markers)
        columns = [genes.index(g) for g in chosen]
        profile = pd.Series(Y[~test][in_domain].mean(axis=0), index=genes)  # the domain's training mean
        scores = {}
        for label, query in (
            ("query: markers (spots)", {"genes": chosen, "markers": "spots"}),
            ("query: markers (raised)", {"genes": chosen, "markers": "raised"}),
            ("query: domain's mean profile", {"profile": profile}),
        ):
            sd.tl.query(s_out.sdata, model, **query, key_added="spade_query", table_key="table")
            scores[label] = _spot_table(s_out).obs["spade_query"].to_numpy(dtype=np.float64)
        scores |= {
            "markers on predict_expression knn": _zscore_mean(predicted["knn"][:, columns]),
            "markers on backbone_slide kNN": _zscore_mean(predicted["backbone_slide"][:, columns]),
            "markers on measured expression (ceiling)": _zscore_mean(Y[test][:, columns]),
        }
        common = {"fold": s_out.name, "domain": int(domain), "n_markers": n_markers, "markers": ",".join(chosen)}
        common["n_candidates"] = len(genes)
        sizes = {"n_domain": int(truth.sum()), "n_rest": int((~truth).sum()), "n_train_domain": n_train}
        for label, score in scores.items():
            value = float(roc_auc_score(truth, score)) if np.isfinite(score).all() else np.nan
            rows.append({"encoder": label, **common, "metric": f"auroc ({n_markers} markers)", "value": value, **sizes})
    del s_out.table.obs["spade_query"]
    s_out.table.uns.pop("spade_query", None)
    return [pd.DataFrame(rows).assign(task="query")]


def transfer_task(ctx: dict, s_out: Section, model, *, n_draws: int, seed: int) -> list[pd.DataFrame]:
    labels = ctx["domains_section"][s_out.name]
    table = s_out.table
    spots = _spot_table(s_out)
    classes, counts = np.unique(labels, return_counts=True)
    rows = []
    for shots in SHOTS:
        kept = classes[counts > shots]
        for draw in range(n_draws):
            rng = np.random.default_rng((seed, draw, shots))
            train, test = metrics._few_shot_split(labels, kept, shots, rng)
            reference = spots[train].copy()
            reference.obs["domain"] = pd.Categorical(labels[train].astype(str))
            for rep in ("X_spade", "X_backbone"):
                for method in ("knn", "logistic"):
                    sd.tl.transfer_labels(
                        s_out.sdata, model, reference=reference, label_key="domain", method=method,
                        k=min(TRANSFER_K, shots), use_rep=rep, key_added="spade_labels",
                    )  # fmt: skip
                    predicted = table.obs["spade_labels"].astype(str).to_numpy()[s_out.rows][test]
                    value = float(balanced_accuracy_score(labels[test].astype(str), predicted))
                    rows.append(
                        {
                            "encoder": f"{rep} {method}",
                            "fold": s_out.name,
                            "repeat": draw,
                            "k": shots,
                            "metric": f"balanced_accuracy@{shots}",
                            "value": value,
                            "n_classes": kept.size,
                            "n_train": train.size,
                            "n_test": test.size,
                        }
                    )
    del table.obs["spade_labels"]
    table.obsm.pop("spade_labels_probabilities", None)
    table.uns.pop("spade_labels", None)
    return [pd.DataFrame(rows).assign(task="transfer")]


def pooled_domains(Y: np.ndarray, section: np.ndarray, resolution: float) -> np.ndarray:
    """Domains shared by the sections: Leiden on the expression centered per section.

    Uncentered, the pooled clustering splits by section (on MOB two of its five domains are MOB3's alone);
    centering each section's genes on its own mean removes that shift and finds the per-section domains in all.
    """
    centered = Y.copy()
    for name in np.unique(section):
        centered[section == name] -= Y[section == name].mean(axis=0)
    return metrics.expression_domains(centered, seed=0, resolution=resolution)


def run_dataset(dataset: str, *, seeds: list[int], n_draws: int, n_markers: int) -> pd.DataFrame:
    size_um = PATCHES[dataset]
    patch = {"size_um": size_um, "size_px": 224}
    resolution = RESOLUTION[dataset]
    sections, Y, section, genes = load(dataset, patch)
    X_backbone = np.concatenate([s.rep("X_backbone") for s in sections])
    X_slide = np.concatenate(
        [FeatureScaler().fit(s.rep("X_backbone")).transform(s.rep("X_backbone")) for s in sections]
    )
    ctx = {
        "sections": sections,
        "Y": Y,
        "section": section,
        "genes": genes,
        "X_backbone": X_backbone,
        "X_backbone_slide": X_slide,
        "domains_pooled": pooled_domains(Y, section, resolution),
        "domains_section": {
            s.name: metrics.expression_domains(Y[section == s.name], seed=0, resolution=resolution) for s in sections
        },
    }
    tiled = {s.name: {stride: tile(s, size_um, stride) for stride in STRIDES} for s in sections}
    log.info(
        "%s: %d spots, %d genes, %d pooled domains, tiles per section %s",
        dataset,
        len(Y),
        len(genes),
        ctx["domains_pooled"].max() + 1,
        {name: [t.tables[f"{TILES}_table"].n_obs for t in tilings.values()] for name, tilings in tiled.items()},
    )
    frames, timings = [], {"pretrain": 0.0, "embed": 0.0, "expression": 0.0, "query": 0.0, "transfer": 0.0}
    for seed in seeds:
        for s_out in sections:
            start = time.perf_counter()
            model = sd.tl.pretrain([s.sdata for s in sections if s is not s_out], quiet=True, seed=seed, **patch)
            timings["pretrain"] += time.perf_counter() - start
            t0 = time.perf_counter()
            for s in sections:
                sd.tl.embed(s.sdata, model, table_key="table", genes=False)
            timings["embed"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            fold, predictions = expression_task(ctx, s_out, model, tiled[s_out.name])
            timings["expression"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            fold += query_task(ctx, s_out, model, predictions, n_markers)
            timings["query"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            fold += transfer_task(ctx, s_out, model, n_draws=n_draws, seed=seed)
            timings["transfer"] += time.perf_counter() - t0
            frames += [f.assign(seed=seed) for f in fold]
            log.info("%s / seed %d / %s done in %.0f s", dataset, seed, s_out.name, time.perf_counter() - start)
    df = pd.concat(frames, ignore_index=True).assign(dataset=dataset)
    df.attrs["timings"] = timings
    return df


def _cells(df: pd.DataFrame, columns: str = "dataset") -> pd.DataFrame:
    """encoder × ``columns`` table of ``mean ± std`` (:func:`spade_sd.metrics.summarize`: per fold, then over folds)."""
    parts = []
    for key, part in df.groupby(columns, sort=False):
        summary = metrics.summarize(part.dropna(axis=1, how="all").drop(columns=["group"], errors="ignore"))
        summary[columns] = key
        parts.append(summary)
    summary = pd.concat(parts)
    summary["cell"] = summary.apply(lambda r: f"{r['mean']:.3f} ± {r['std']:.3f}", axis=1)
    table = summary.pivot(index="encoder", columns=columns, values="cell")
    return table.reindex(index=list(dict.fromkeys(df["encoder"])), columns=list(dict.fromkeys(df[columns]))).fillna("–")


def agreement(df: pd.DataFrame) -> pd.DataFrame:
    """predict_expression(knn) vs metrics.knn_expression_cv per (dataset, seed, fold), on the genes both scored."""
    part = df[(df["task"] == "expression") & (df["metric"] == "pearson")]
    keys = ["dataset", "seed", "fold", "gene"]
    cv = part[part["encoder"] == "knn_expression_cv (X_spade)"].set_index(keys)["value"]
    rows = []
    for reference in ("reference=training spots", "model's bank"):
        tool = part[part["encoder"] == f"predict_expression knn ({reference})"].set_index(keys)["value"]
        both = pd.DataFrame({"tool": tool}).join(cv.rename("cv"), how="inner").reset_index()
        both["gap"] = (both["tool"] - both["cv"]).abs()
        summary = both.groupby(["dataset", "seed", "fold"], sort=False).agg(
            genes=("gene", "size"), tool=("tool", "mean"), cv=("cv", "mean"), max_gene_gap=("gap", "max")
        )
        rows.append(summary.assign(reference=reference).set_index("reference", append=True))
    return pd.concat(rows)


def tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    expression = df[(df["task"] == "expression") & df["metric"].isin(["pearson", "pearson_agreement"])]
    out = {"expression": _cells(expression)}
    tiles = expression[expression["encoder"].str.startswith("H&E")]
    tiling = tiles["encoder"].str.extract(r"(stride [\d.]+×)", expand=False)
    coverage = tiles.groupby([tiling, "dataset"], sort=False)[["coverage", "n_tiles"]].mean()
    coverage = coverage.rename(columns={"coverage": "spots covered", "n_tiles": "tiles per section"})
    coverage = coverage.stack().unstack("dataset")
    out["coverage"] = coverage.map(lambda v: f"{v:.3f}" if v <= 1 else f"{v:.0f}")
    out["query"] = _cells(df[df["task"] == "query"].drop(columns=["domain"]))
    query = df[df["task"] == "query"].astype({"domain": int})
    per_domain = query.groupby(["dataset", "domain", "encoder"], sort=False)["value"].mean().unstack("encoder")
    per_domain = per_domain[list(dict.fromkeys(query["encoder"]))]
    first = query.drop_duplicates(["dataset", "domain"]).set_index(["dataset", "domain"])
    top = first["markers"].str.split(",").str[:5].str.join(" ")
    per_domain.insert(0, "top-5 markers (first fold)", top)
    spade = query[query["encoder"] == "query: markers (spots)"].groupby(["dataset", "domain"], sort=False)
    per_domain.insert(0, "folds", spade["fold"].nunique())
    per_domain.insert(0, "held-out spots", spade["n_domain"].mean().round(0))
    per_domain = per_domain.astype({"held-out spots": int, "folds": int})
    out["query_domains"] = per_domain.map(lambda v: f"{v:.3f}" if isinstance(v, float) else str(v))
    transfer = df[df["task"] == "transfer"]
    out["transfer"] = _cells(transfer.assign(column=transfer["dataset"] + " " + transfer["metric"]), "column")
    folds = agreement(df).groupby(["dataset", "reference"], sort=False)
    out["agreement"] = pd.DataFrame(
        {
            "folds × seeds": folds.size().astype(str),
            "genes": folds["genes"].agg(lambda g: f"{g.min()}–{g.max()}" if g.min() < g.max() else str(g.min())),
            "tool": folds["tool"].mean().map("{:.4f}".format),
            "knn_expression_cv": folds["cv"].mean().map("{:.4f}".format),
            "largest per-gene gap": folds["max_gene_gap"].max().map("{:.1e}".format),
        }
    )
    return out


def classes(df: pd.DataFrame) -> str:
    """Domains per held-out section (at 5 labelled spots per class), e.g. ``"MOB1 3, MOB2 3"``."""
    transfer = df[(df["task"] == "transfer") & (df["k"] == min(SHOTS))]
    counts = transfer.groupby("fold", sort=False)["n_classes"].first()
    return ", ".join(f"{fold} {int(n)}" for fold, n in counts.items())


def _frame_markdown(table: pd.DataFrame, index_name: str) -> str:
    flat = table.copy()
    if isinstance(flat.index, pd.MultiIndex):
        flat.index = [" / ".join(map(str, i)) for i in flat.index]
    return _markdown(flat, index_name)


def write(df: pd.DataFrame, out: Path, tag: str, config: dict, command: str) -> dict[str, pd.DataFrame]:
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"tools_{tag}.csv.gz", index=False)  # compressed: results stay small in the repository
    result = tables(df)
    numbers = {
        task: metrics.summarize(
            part.dropna(axis=1, how="all")
            .drop(columns=["domain"], errors="ignore")
            .assign(encoder=part["dataset"] + " | " + part["encoder"])
        ).to_dict(orient="records")
        for task, part in df.groupby("task", sort=False)
    }
    agree = agreement(df).reset_index().to_dict(orient="records")
    with (out / f"tools_{tag}.json").open("w") as fh:
        json.dump({"config": config, "summary": numbers, "agreement": agree}, fh, indent=1, default=str)
    lines = [
        f"# SPADE user tools benchmark ({tag})",
        "",
        f"`{command}`",
        "",
        "Leave-one-section-out (model and reference bank from the other sections); mean ± std over held-out "
        "sections (seeds pooled within a section, then per-gene / per-domain / per-draw values averaged within it). "
        "Config: `" + json.dumps({k: v for k, v in config.items() if k != "timings_s"}) + "`",
        "",
        "## Expression prediction: Pearson r per gene on the held-out spots (top-50 shared HVGs)",
        "",
        _frame_markdown(result["expression"], "predictor"),
        "",
        "H&E rows: the spots whose center lies in a kept tile (`spots covered`, below), scored on their own "
        "prediction and on their tile's image-only prediction (both with the training spots as reference); "
        "`tiles vs spots' prediction` is the correlation of the two predictions.",
        "",
        _frame_markdown(result["coverage"], "tiles"),
        "",
        "predict_expression(knn) vs metrics.knn_expression_cv on X_spade, on the genes both score (mean r over "
        "genes and folds; the largest gap of a gene's r in any fold; every fold is in the .json):",
        "",
        _frame_markdown(result["agreement"], "dataset / reference"),
        "",
        "## Query: AUROC of each expression domain's held-out spots vs the rest, for its training-section markers",
        "",
        _frame_markdown(result["query"], "score"),
        "",
        "Per domain (mean over held-out sections and seeds):",
        "",
        _frame_markdown(result["query_domains"], "dataset / domain"),
        "",
        "## Label transfer: balanced accuracy on the held-out section's other spots, k labelled spots per domain",
        "",
        _frame_markdown(result["transfer"], "representation / method"),
        "",
        "Domains per held-out section (chance = 1 / domains): " + classes(df) + ".",
        "",
        "Timings (s): `" + json.dumps(config.get("timings_s", {})) + "`",
        "",
    ]
    (out / f"tools_{tag}.md").write_text("\n".join(lines))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--datasets", nargs="+", default=list(PATCHES), choices=list(PATCHES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="SPADE training seeds (pooled)")
    parser.add_argument("--draws", type=int, default=5, help="draws of the labelled spots per k and section")
    parser.add_argument("--markers", type=int, default=10, help="marker genes per domain for the query")
    parser.add_argument("--tag", default="main", help="results are written as tools_<tag>.{csv.gz,json,md}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("spade_sd").setLevel(logging.WARNING)
    command = "python benchmarks/tools.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    frames, timings = [], {}
    for dataset in args.datasets:
        t0 = time.perf_counter()
        df = run_dataset(dataset, seeds=args.seeds, n_draws=args.draws, n_markers=args.markers)
        timings[dataset] = {**{k: round(v, 1) for k, v in df.attrs["timings"].items()}}
        timings[dataset]["total"] = round(time.perf_counter() - t0, 1)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    config = {
        **vars(args),
        "out": str(args.out),
        "patch_um": {d: PATCHES[d] for d in args.datasets},
        "k_neighbors": K_NEIGHBORS,
        "transfer_k": TRANSFER_K,
        "timings_s": timings,
        "total_s": round(time.perf_counter() - start, 1),
    }
    result = write(df, args.out, args.tag, config, command)
    for name in ("expression", "query", "transfer"):
        print(_frame_markdown(result[name], name), end="\n\n")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
