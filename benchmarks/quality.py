"""Quality benchmark: does the SPADE embedding know more about expression than the features it was trained from?

Leave-one-section-out on the mouse olfactory bulb (MOB1–3) and on her2st (C2–C5). For each held-out section a
SPADE model is trained on the other sections (``sd.tl.pretrain``), every section is embedded with it
(``sd.tl.embed``), and the held-out section is scored with the array-level evaluations of
:mod:`spade_sd.metrics`:

- ``probe (hest α)`` / ``probe (cv α)``: HEST ridge probe trained on the training sections, tested on the
  held-out one (α = 100 / (d · n_genes), or tuned by inner leave-one-section-out CV);
- ``few-shot probe 20%``: the same probe trained on 20 % of the held-out section's spots (repeated draws);
- ``kNN retrieval``: expression predicted from the 50 training-section spots whose image representations are
  most similar (cosine; the same for every encoder);
- ``kNN retrieval (joint)``: BLEEP's retrieval in SPADE's joint space, the held-out image embeddings against the
  training spots' gene-side embeddings (SPADE only);
- ``recall@k``: gene → image retrieval within the held-out section (SPADE only: it has a gene side; not scored
  where the held-out table lacks a panel gene);
- ``balanced_accuracy@k``: few-shot classification of Leiden expression domains of the held-out section.

Targets are the log1p-normalised top-50 HVGs shared by the data set's sections (``GenePanel``, ``"global"``).
Raw encoders (frozen backbone features, a randomly initialised CNN, classical morphology descriptors) need no
training, so their fold "model" is the identity.

Run ``python benchmarks/quality.py --out benchmarks/results`` (about 10–20 min on 2 CPU cores, first run
longer while features are cached). Variants are named on the command line: ``backbone``, ``random_cnn``,
``morphology`` or ``spade`` followed by pretrain keyword overrides, e.g. ``spade:n_experts=4,loss=clip``;
``backbone_slide`` is the backbone's features standardised per section, which is what SPADE's heads see with
``standardize="slide"``.

``--engine`` runs the default backbone with another engine for every variant that uses it (its features and the
SPADE models trained on them), e.g. ``--engine int8``: a low-precision engine is calibrated as the tools calibrate
``engine="auto"``, on 64 patches spread evenly over the data set's first section
(:func:`~spade_sd.encoders.auto_calibration.spread_patches`), and its features are cached under their own identity.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("SPADE_SD_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache"))
os.environ.setdefault("SPADE_SD_DATA_DIR", "/work/shared/data")

import spade_sd as sd
from spade_sd import metrics
from spade_sd.encoders.auto_calibration import spread_patches
from spade_sd.encoders.morphology import MorphologyFeatures
from spade_sd.model.standardization import FeatureScaler
from spade_sd.spots.genes import GenePanel

log = logging.getLogger("quality")

DATASETS = {
    "mob": (sd.datasets.mouse_olfactory_bulb, ("MOB1", "MOB2", "MOB3")),
    "her2st": (sd.datasets.her2st, ("C2", "C3", "C4", "C5")),
}
RAW_ENCODERS = ("backbone", "backbone_slide", "random_cnn", "morphology")
DEFAULT_VARIANTS = (
    "backbone",
    "backbone_slide",
    "random_cnn",
    "morphology",
    "spade:n_experts=1",
    "spade:n_experts=2",
    "spade:n_experts=4",
    "spade:n_experts=8",
    "spade:n_experts=1,loss=clip",
    "spade:n_experts=4,loss=clip",
)
METRIC_ORDER = (
    "probe (hest α)",
    "probe (cv α)",
    "few-shot probe 20%",
    "kNN retrieval",
    "kNN retrieval (joint)",
    "recall@10",
    "balanced_accuracy@5",
)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"spade:n_experts=4,loss=clip"`` → ``("spade", {"n_experts": 4, "loss": "clip"})``."""
    kind, _, args = spec.partition(":")
    if kind not in (*RAW_ENCODERS, "spade"):
        raise ValueError(f"Unknown variant {spec!r}; start it with one of {[*RAW_ENCODERS, 'spade']}.")
    kwargs = dict(item.split("=", 1) for item in args.split(",") if item)
    return kind, {key: _value(value) for key, value in kwargs.items()}


def default_backbone(engine: str | None, dataset: str, patch: dict, module=None) -> sd.Backbone | None:
    """The backbone run by ``engine``, calibrated on ``dataset``'s first section; ``None`` for the tools' own default.

    ``module``: a :class:`torch.nn.Module` to run instead of the default backbone (EfficientNet-Lite0), or a
    :class:`~spade_sd.Backbone` to use as it is.
    """
    if engine is None and module is None:
        return None
    if isinstance(module, sd.Backbone):
        return module
    calibration = None
    if engine in ("auto", "int8"):
        loader, names = DATASETS[dataset]
        calibration = spread_patches(sd.pp.spot_patches(loader(names[0]), **patch))
    return sd.Backbone(module, engine=engine or "auto", calibration=calibration)


def _backbone(kind: str, default: sd.Backbone | None) -> sd.Backbone:
    if kind in ("backbone", "backbone_slide"):
        return sd.Backbone() if default is None else default
    if kind == "random_cnn":
        return sd.Backbone(None, pretrained=False)
    return sd.Backbone(MorphologyFeatures())


def _gene_side(section: Section, model) -> np.ndarray:
    """The section's gene-side embedding; NaN where its table lacks panel genes (then it is not scored)."""
    if "X_spade_gene" in section.table.obsm:
        return section.rep("X_spade_gene")
    return np.full((section.rows.sum(), model.dim), np.nan)


def _spots(table) -> np.ndarray:
    return np.isfinite(np.asarray(table.obsm["X_backbone"])).all(axis=1)


class Section:
    """One section: its SpatialData, the spots with a patch, their targets and expression domains."""

    def __init__(self, name: str, sdata, patch: dict, backbone: sd.Backbone | None = None) -> None:
        self.name, self.sdata = name, sdata
        self.table = sdata.tables["table"]
        sd.tl.features(sdata, backbone=backbone, **patch)
        self.rows = _spots(self.table)

    def rep(self, key: str) -> np.ndarray:
        return np.asarray(self.table.obsm[key], dtype=np.float64)[self.rows]


def load(
    dataset: str, patch: dict, backbone: sd.Backbone | None = None
) -> tuple[list[Section], np.ndarray, np.ndarray, list[str]]:
    loader, names = DATASETS[dataset]
    sections = []
    for name in names:
        start = time.perf_counter()
        sections.append(Section(name, loader(name), patch, backbone))
        log.info("%s: %d spots, default features in %.0f s", name, sections[-1].rows.sum(), time.perf_counter() - start)
    panel = GenePanel.fit([s.table[s.rows] for s in sections], n_top_genes=50, flavor="global")
    Y = np.concatenate([panel.transform(s.table[s.rows]) for s in sections])
    section = np.concatenate([np.full(s.rows.sum(), s.name) for s in sections])
    return sections, Y, section, list(panel.genes)


def _named(df: pd.DataFrame, metric: str | None, **columns) -> pd.DataFrame:
    df = df.assign(**columns)
    if metric is not None:
        df["metric"] = metric
    return df


def held_out_probe(X, Y, section, held_out, *, alpha, genes, label, seed) -> pd.DataFrame:
    """The fold ``held_out`` of :func:`~spade_sd.metrics.ridge_probe`, without fitting the other folds.

    Same fit as ``ridge_probe(X, Y, section, ...)`` restricted to that fold (scaler → PCA → ridge on the other
    sections; ``alpha="cv"`` tuned by inner leave-one-section-out CV over them). The other folds' probes would be
    fitted on sections the fold's model was trained on, so they are not wanted; skipping them saves 2/3 of the
    probe time on MOB.
    """
    test = section == held_out
    prediction, alpha_used = metrics._fit_predict(
        X[~test], Y[~test], X[test], groups=section[~test], alpha=alpha, n_components=256, alphas=None, seed=seed
    )
    r = metrics._pearson_per_gene(Y[test], prediction)
    sizes = {"n_train": int((~test).sum()), "n_test": int(test.sum()), "alpha": alpha_used}
    return metrics._gene_frame(label, np.asarray(genes), r, replicate={"fold": held_out}, **sizes)


def evaluate_fold(
    label: str,
    X: np.ndarray,
    G: np.ndarray | None,
    Y: np.ndarray,
    section: np.ndarray,
    held_out: str,
    domains: np.ndarray,
    genes: list[str],
    *,
    n_repeats: int,
    seed: int,
    probes: dict | None = None,
) -> list[pd.DataFrame]:
    """Score the held-out section given every section's representation by the fold's model.

    ``probes`` memoises the leave-one-section-out ridge probes of representations that do not depend on the
    fold (raw features): their single LOSO run already holds every fold.
    """
    test = section == held_out
    frames = []
    for alpha, metric in (("hest", "probe (hest α)"), ("cv", "probe (cv α)")):
        key = (label, alpha)
        if probes is not None:
            if key not in probes:  # fold-independent features: one LOSO run holds every fold
                probes[key] = metrics.ridge_probe(X, Y, section, alpha=alpha, genes=genes, label=label, seed=seed)
            probe = probes[key][probes[key]["fold"] == held_out]
        else:
            probe = held_out_probe(X, Y, section, held_out, alpha=alpha, genes=genes, label=label, seed=seed)
        frames.append(_named(probe, metric, task=f"probe_{alpha}"))
    few = metrics.few_shot_probe(
        X, Y, section, test_slide=held_out, fraction=0.2, n_repeats=n_repeats, genes=genes, label=label, seed=seed
    )
    frames.append(_named(few, "few-shot probe 20%", task="few_shot"))
    knn = metrics.knn_expression(X[test], X[~test], Y[~test], Y[test], k=50, genes=genes, label=label)
    frames.append(_named(knn, "kNN retrieval", task="knn", fold=held_out))
    # the gene side is compared with the heads' image side: X_spade_expr, or X_spade for representation="heads"
    if G is not None and G.shape[1] != X.shape[1]:
        G = None
    if G is not None and np.isfinite(G[~test]).all():
        joint = metrics.knn_expression(X[test], G[~test], Y[~test], Y[test], k=50, genes=genes, label=label)
        frames.append(_named(joint, "kNN retrieval (joint)", task="knn_joint", fold=held_out))
    if G is not None and np.isfinite(G[test]).all():
        recall = metrics.gene_to_image_recall(G[test], X[test], ks=(1, 5, 10, 50), label=label)
        frames.append(_named(recall, None, task="gene_to_image", fold=held_out))
    classes = metrics.few_shot_classification(
        X[test], domains, k=(1, 5, 10), n_repeats=n_repeats, label=label, seed=seed
    )
    frames.append(_named(classes, None, task="classification", fold=held_out))
    return frames


def run_dataset(
    dataset: str,
    variants: list[str],
    *,
    patch: dict,
    n_repeats: int,
    seeds: list[int],
    extra=None,
    engine: str | None = None,
    module=None,
) -> pd.DataFrame:
    """Every variant's scores on every held-out section of ``dataset``.

    ``extra`` (used by ``benchmarks/morphology.py``) is called once with the loaded sections, targets and section
    names and returns a scorer ``(label, X, held_out) -> list of frames`` run on every fold next to
    :func:`evaluate_fold`. ``engine`` runs the default backbone, or ``module``, with that engine
    (:func:`default_backbone`).
    """
    backbone = default_backbone(engine, dataset, patch, module)
    sections, Y, section, genes = load(dataset, patch, backbone)
    score_extra = None if extra is None else extra(sections, Y, section)
    domains = {s.name: metrics.expression_domains(Y[section == s.name], seed=0) for s in sections}
    log.info(
        "%s: %d spots, %d genes, domains per section %s",
        dataset,
        len(Y),
        len(genes),
        {k: int(v.max() + 1) for k, v in domains.items()},
    )
    frames, probes, timings = [], {}, {}
    for spec in variants:
        kind, kwargs = parse_variant(spec)
        start = time.perf_counter()
        if kind in RAW_ENCODERS:
            key = "X_backbone" if kind == "backbone_slide" else f"X_{kind}"
            for s in sections:
                if key not in s.table.obsm:
                    sd.tl.features(s.sdata, backbone=_backbone(kind, backbone), key_added=key, **patch)
            X = np.concatenate([s.rep(key) for s in sections])
            if kind == "backbone_slide":  # each section standardised by its own statistics, as SPADE's input
                X = np.concatenate([FeatureScaler().fit(s.rep(key)).transform(s.rep(key)) for s in sections])
            for held_out in (s.name for s in sections):
                frames += evaluate_fold(
                    spec,
                    X,
                    None,
                    Y,
                    section,
                    held_out,
                    domains[held_out],
                    genes,
                    n_repeats=n_repeats,
                    seed=0,
                    probes=probes,
                )
                if score_extra is not None:
                    frames += score_extra(spec, X, held_out)
        else:
            for seed in seeds:
                label = spec  # seeds are pooled in the summary (the ``seed`` column keeps them apart)
                for s_out in sections:
                    train = [s.sdata for s in sections if s is not s_out]
                    options = {"quiet": True, "seed": seed, "backbone": backbone, **patch, **kwargs}
                    model = sd.tl.pretrain(train, **options)
                    for s in sections:
                        s.table.obsm.pop("X_spade_gene", None)  # never score an earlier fold's gene side
                        sd.tl.embed(s.sdata, model)
                    G = np.concatenate([_gene_side(s, model) for s in sections])
                    fold = []
                    # the embedding, and (models with an expression subspace) the projection the tools compare
                    for key, name in (("X_spade", label), ("X_spade_expr", f"{label} [expr]")):
                        if key not in sections[0].table.obsm:
                            continue
                        X = np.concatenate([s.rep(key) for s in sections])
                        fold += evaluate_fold(
                            name, X, G, Y, section, s_out.name, domains[s_out.name], genes, n_repeats=n_repeats, seed=0
                        )
                        if score_extra is not None:
                            fold += score_extra(name, X, s_out.name)
                    epochs = model.history.get("epochs")
                    frames += [f.assign(seed=seed, epochs=epochs) for f in fold]
        timings[spec] = time.perf_counter() - start
        log.info("%s / %s done in %.0f s", dataset, spec, timings[spec])
    df = pd.concat(frames, ignore_index=True).assign(dataset=dataset)
    df.attrs["timings"] = timings
    return df


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """encoder × metric table of ``mean ± std`` (over folds, and over repeats where there are some)."""
    rows = []
    for dataset, part in df.groupby("dataset", sort=False):
        summary = metrics.summarize(part.drop(columns=["group"], errors="ignore"))
        summary = summary[summary["metric"].isin(METRIC_ORDER)]
        summary["cell"] = summary.apply(lambda r: f"{r['mean']:.3f} ± {r['std']:.3f}", axis=1)
        table = summary.pivot(index="encoder", columns="metric", values="cell")
        table = table.reindex(
            index=list(dict.fromkeys(part["encoder"])), columns=[m for m in METRIC_ORDER if m in table.columns]
        )
        table.insert(0, "dataset", dataset)
        rows.append(table.fillna("–"))
    return pd.concat(rows)


def _markdown(table: pd.DataFrame, index_name: str = "encoder") -> str:
    header = [index_name, *table.columns]
    rows = [[str(index), *map(str, values)] for index, values in zip(table.index, table.to_numpy(), strict=True)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_raw(df: pd.DataFrame, out: Path, name: str, config: dict) -> None:
    """``<name>.csv.gz`` (every score) and ``<name>.json`` (the config and a summary per data set and encoder)."""
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"{name}.csv.gz", index=False)  # compressed: results stay small in the repository
    numbers = metrics.summarize(
        df.drop(columns=["group"], errors="ignore").assign(encoder=df["dataset"] + " | " + df["encoder"])
    )
    with (out / f"{name}.json").open("w") as fh:
        json.dump({"config": config, "summary": numbers.to_dict(orient="records")}, fh, indent=1, default=str)


def write(df: pd.DataFrame, out: Path, tag: str, config: dict) -> pd.DataFrame:
    write_raw(df, out, f"quality_{tag}", config)
    table = summary_table(df)
    lines = [
        f"# SPADE quality benchmark ({tag})",
        "",
        "Leave-one-section-out; mean ± std over held-out sections (and over SPADE training seeds and repeated "
        "draws for the few-shot tasks). Config: `" + json.dumps(config) + "`",
        "",
    ]
    for dataset, part in table.groupby("dataset", sort=False):
        lines += [f"## {dataset}", "", _markdown(part.drop(columns="dataset")), ""]
    (out / f"quality_{tag}.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    for dataset, part in df.groupby("dataset", sort=False):
        shown = part[part["metric"].isin([*METRIC_ORDER, "chance@10"])]
        fig = sd.pl.benchmark(shown, return_fig=True, show=False)
        fig.savefig(out / f"quality_{tag}_{dataset}.png", dpi=120, bbox_inches="tight")
    return table


def add_patch_arguments(parser: argparse.ArgumentParser, *, size_um: float) -> None:
    """``--size-um`` (default ``size_um``) and ``--size-px``: the patch geometry of a benchmark's features and SPADE."""
    parser.add_argument("--size-um", type=float, default=size_um, help="patch side in µm (features and SPADE)")
    parser.add_argument("--size-px", type=int, default=224)


def start_run(args: argparse.Namespace, *, package_level: int = logging.WARNING) -> dict:
    """Log a benchmark's progress (``spade_sd`` itself at ``package_level``); returns the patch geometry of ``args``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("spade_sd").setLevel(package_level)
    return {"size_um": args.size_um, "size_px": args.size_px}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--tag", default="summary", help="results are written as quality_<tag>.{csv.gz,json,md,png}")
    add_patch_arguments(parser, size_um=112.0)
    parser.add_argument("--repeats", type=int, default=5, help="draws of the few-shot tasks per section")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="SPADE training seeds (pooled)")
    parser.add_argument(
        "--engine",
        default=None,
        choices=["auto", "onnxruntime", "torch", "int8", "bf16"],
        help="run the default backbone with this engine (calibrated on the first section); default: as the tools do",
    )
    args = parser.parse_args(argv)
    patch = start_run(args)
    start = time.perf_counter()
    frames, timings = [], {}
    for dataset in args.datasets:
        df = run_dataset(
            dataset, args.variants, patch=patch, n_repeats=args.repeats, seeds=args.seeds, engine=args.engine
        )
        timings[dataset] = df.attrs["timings"]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    config = {**vars(args), "out": str(args.out), "timings_s": timings, "total_s": time.perf_counter() - start}
    table = write(df, args.out, args.tag, config)
    print(_markdown(table))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
