"""Clustering benchmark: do Leiden clusters of an embedding follow the expression domains of a held-out section?

Leave-one-section-out on the mouse olfactory bulb (MOB1–3) and on her2st (C2–C5), the protocol of
``benchmarks/quality.py`` (whose sections, feature cache, variants and result helpers this script reuses): for each
held-out section a SPADE model is trained on the other sections (``sd.tl.pretrain``, defaults unless the variant
says otherwise) and the held-out section is embedded with it (``sd.tl.embed``). What a new user does next,
``sc.pp.neighbors(table, use_rep="X_spade"); sc.tl.leiden(table)``, is scored by ``sd.tl.evaluate(...,
tasks=("domains",))``:

- reference: the held-out section's **expression domains**, Leiden clusters of its own expression (normalize_total
  10⁴, log1p, 1,000 HVGs, 20 PCs, scanpy neighbours) at resolution 0.5 and again at 1.0: 2 cases per section, 14 in
  all (:func:`spade_sd.metrics.expression_domains`);
- score: scanpy neighbours on the representation, Leiden at resolutions 0.1–1.5 with 5 seeds each; at the resolution
  whose mean cluster count is nearest the number of domains, ARI and NMI with the domains, per seed
  (:func:`spade_sd.metrics.domain_agreement`).

Representations (``--variants``): ``backbone`` (the frozen features), ``spade`` followed by ``sd.tl.pretrain``
keyword overrides as in ``quality.py`` (e.g. ``spade:representation=heads``), and ``predicted`` (the same
overrides allowed) for ``sd.tl.predict_expression(method="ridge")`` of the fold's model → 30 PCs. Each of them is
also scored **through** ``sd.tl.domains``: the representation augmented with its spatial neighbourhood at each
``--spatial-weights`` λ (the functions ``tl.domains`` clusters, :mod:`spade_sd.spots.neighbourhood`), the same
resolution sweep. ``cases below backbone`` counts the cases (section × reference resolution) where a representation's
mean ARI over seeds is below the plain backbone's.

Figures (``clustering_<tag>_<section>.png``, one section per data set): the expression domains, the backbone's and
the default ``X_spade``'s plain Leiden and ``sd.tl.domains`` clusters at the matched resolution (seed 0), drawn with
``sd.pl.domains``; with ``--tiles``, also ``sd.tl.domains`` on ``sd.pp.tile_image`` tiles of that section embedded
with the fold's default model: domains from the H&E alone.

Run ``python benchmarks/clustering.py --out benchmarks/results --tag main --tiles`` (9 to 19 min on 2 busy CPU cores
with features cached); results go to ``benchmarks/results/clustering_<tag>.{csv.gz,json,md}`` and the figures beside
them; the measured results are on ``docs/quality.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # the benchmark whose sections, variants and result helpers this one shares

import spade_sd as sd
from spade_sd import metrics
from spade_sd.config import DomainsConfig, PatchConfig
from spade_sd.metrics._domains import REFERENCE_HVGS, REFERENCE_PCS, leiden_partitions
from spade_sd.spots.genes import GenePanel
from spade_sd.spots.neighbourhood import neighbourhood_features, spatial_graph

log = logging.getLogger("clustering")

# "spade" is the default model (X_spade: the backbone's features next to the expression read-out);
# "spade:representation=heads" the default of spade_sd 0.2 (X_spade: the heads' full-rank output)
DEFAULT_VARIANTS = ("backbone", "spade", "spade:representation=heads", "predicted")
SPATIAL_WEIGHTS = (0.5, 0.8)
FIGURE_SECTIONS = {"mob": "MOB3", "her2st": "C5"}
FIGURE_REFERENCE = "expression@0.5"
PREDICTED_COMPS = 30
THROUGH = " + tl.domains λ="
ARI, NMI = "ari vs expression domains", "nmi vs expression domains"


def parse(spec: str) -> tuple[str, dict]:
    """``"predicted:n_experts=4"`` → ``("predicted", {"n_experts": 4})``; other kinds as ``quality.parse_variant``."""
    kind, _, args = spec.partition(":")
    if kind == "predicted":
        return kind, quality.parse_variant(f"spade:{args}")[1]
    if kind not in ("backbone", "spade"):
        raise ValueError(f"Unknown variant {spec!r}; start it with backbone, spade or predicted.")
    return quality.parse_variant(spec)


def representation(spec: str, s_out: quality.Section, train: list, patch: dict, seed: int, models: dict) -> np.ndarray:
    """The held-out section's representation by ``spec`` (its spots with a patch); models are trained once per fold."""
    from sklearn.decomposition import PCA

    kind, kwargs = parse(spec)
    if kind == "backbone":
        return s_out.rep("X_backbone")
    key = json.dumps(kwargs, sort_keys=True)
    if key not in models:
        models[key] = sd.tl.pretrain(train, quiet=True, seed=seed, **{**patch, **kwargs})
    model = models[key]
    if kind == "spade":
        sd.tl.embed(s_out.sdata, model, table_key="table", genes=False)
        return s_out.rep("X_spade")
    sd.tl.predict_expression(s_out.sdata, model, method="ridge", key_added="bench_predicted", table_key="table")
    predicted = s_out.sdata.tables["bench_predicted"]
    values = predicted[s_out.table.obs_names[s_out.rows]].X
    del s_out.sdata.tables["bench_predicted"]
    values = np.asarray(values.toarray() if hasattr(values, "toarray") else values, dtype=np.float64)
    return PCA(n_components=PREDICTED_COMPS, random_state=0).fit_transform(values)


def score_fold(s_out: quality.Section, reps: dict[str, np.ndarray], weights: list[float]) -> pd.DataFrame:
    """``sd.tl.evaluate(tasks=("domains",))`` of every representation, plain and through tl.domains, on one section."""
    view = s_out.table[s_out.rows].copy()
    graph = spatial_graph(view.obsm["spatial"], n_neighbors=DomainsConfig.spatial_neighbors)
    scored = {}  # obsm key → (variant, spatial weight; 0: plain)
    for i, (label, X) in enumerate(reps.items()):
        view.obsm[f"rep{i}"], scored[f"rep{i}"] = X, (label, 0.0)
        for weight in weights:
            key = f"rep{i}_lambda{weight:g}"
            view.obsm[key], scored[key] = neighbourhood_features(X, graph, weight), (label, weight)
    df = sd.tl.evaluate(view, use_rep=list(scored), tasks=("domains",))
    df["variant"] = df["encoder"].map(lambda key: scored[key][0])
    df["spatial_weight"] = df["encoder"].map(lambda key: scored[key][1])
    df["encoder"] = [f"{v}{THROUGH}{w:g}" if w else v for v, w in zip(df["variant"], df["spatial_weight"], strict=True)]
    return df


def _full(table, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    full = np.full((table.n_obs, *values.shape[1:]), np.nan)
    full[rows] = values
    return full


def figure(s_out: quality.Section, reps: dict, df: pd.DataFrame, model, weight: float, tiles: bool, path: Path):
    """Expression domains, then each of backbone and default SPADE plain and through tl.domains, over the H&E."""
    import matplotlib.pyplot as plt

    table, rows = s_out.table, s_out.rows
    chosen = df[(df["reference"] == FIGURE_REFERENCE) & (df["repeat"] == 0) & (df["metric"] == ARI)]
    chosen = chosen.set_index("encoder")
    expression = GenePanel(genes=list(table.var_names)).transform(table[rows])
    domains = metrics.expression_domains(expression, resolution=0.5, n_top_genes=REFERENCE_HVGS, n_pcs=REFERENCE_PCS)
    columns = {"expression_domains": ("expression domains (resolution 0.5)", _full(table, rows, domains))}
    for label in ("backbone", "spade"):
        if label not in reps:
            continue
        plain = chosen.loc[label]
        clusters = leiden_partitions(reps[label], resolutions=[plain["resolution"]], seeds=[0])[plain["resolution"], 0]
        columns[f"plain_{label}"] = (f"{label}: Leiden, ARI {plain['value']:.2f}", _full(table, rows, clusters))
        through = chosen.loc[f"{label}{THROUGH}{weight:g}"]
        table.obsm[f"bench_{label}"] = _full(table, rows, reps[label])
        key = f"domains_{label}"
        sd.tl.domains(
            s_out.sdata, use_rep=f"bench_{label}", spatial_weight=weight, resolution=through["resolution"],
            table_key="table", key_added=key,
        )  # fmt: skip
        columns[key] = (f"{label}: tl.domains λ={weight:g}, ARI {through['value']:.2f}", None)
    panels = len(columns) + (tiles and model is not None)
    n_rows, cols = -(-panels // 3), min(panels, 3)
    fig, axes = plt.subplots(n_rows, cols, figsize=(5 * cols, 4.6 * n_rows), layout="constrained", squeeze=False)
    axes = axes.ravel()
    for ax in axes[panels:]:
        ax.set_axis_off()
    for ax, (key, (title, values)) in zip(axes, columns.items(), strict=False):
        if values is not None:
            labels = pd.Series(values).map(lambda v: np.nan if np.isnan(v) else str(int(v)))
            table.obs[key] = pd.Categorical(labels, categories=sorted(labels.dropna().unique(), key=int))
        sd.pl.domains(s_out.sdata, key, table_key="table", ax=ax, title=title, show=False)
    if tiles and model is not None:
        tiled = sd.pp.tile_image(s_out.sdata, size_um=model.config.patches.size_um, key_added="tiles", copy=True)
        sd.tl.embed(tiled, model, shapes_key="tiles", table_key="tiles_table", genes=False)
        resolution = chosen.loc[f"spade{THROUGH}{weight:g}"]["resolution"]
        sd.tl.domains(tiled, use_rep="X_spade", spatial_weight=weight, resolution=resolution, table_key="tiles_table")
        n_tiles = tiled.tables["tiles_table"].n_obs
        title = f"H&E only: {n_tiles} tiles, tl.domains λ={weight:g}"
        sd.pl.domains(tiled, table_key="tiles_table", ax=axes[panels - 1], title=title, show=False)
    fig.suptitle(f"{s_out.name}: domains at the resolution matched to the expression domains (seed 0)")
    fig.savefig(path, dpi=40)
    plt.close(fig)
    for key in columns:  # the section's table is scored again in later folds: leave it as it was
        del table.obs[key]
        table.uns.pop(key, None)
    for label in ("backbone", "spade"):
        table.obsm.pop(f"bench_{label}", None)


def run_dataset(dataset: str, args, patch: dict, out: Path) -> pd.DataFrame:
    sections, *_ = quality.load(dataset, patch)
    frames = []
    for seed in args.seeds:
        for s_out in sections:
            start = time.perf_counter()
            train = [s.sdata for s in sections if s is not s_out]
            models: dict = {}
            reps = {spec: representation(spec, s_out, train, patch, seed, models) for spec in args.variants}
            df = score_fold(s_out, reps, args.spatial_weights).assign(dataset=dataset, seed=seed)
            frames.append(df)
            if seed == args.seeds[0] and s_out.name == FIGURE_SECTIONS.get(dataset):
                default = models.get(json.dumps({}))
                path = out / f"clustering_{args.tag}_{s_out.name}.png"
                figure(s_out, reps, df, default, max(args.spatial_weights), args.tiles, path)
            counts = df[df["metric"] == ARI].groupby("reference")["n_domains"].first().to_dict()
            log.info(
                "%s / seed %d / %s: %s domains, %.0f s", dataset, seed, s_out.name, counts, time.perf_counter() - start
            )
    return pd.concat(frames, ignore_index=True)


def cases(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over Leiden seeds per (encoder, metric, case): a case is a section × reference resolution × seed."""
    keys = ["dataset", "encoder", "variant", "spatial_weight", "metric", "seed", "fold", "reference"]
    return df.groupby(keys, sort=False).agg(value=("value", "mean"), seed_std=("value", "std")).reset_index()


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per representation: ARI and NMI over the cases, per data set, ratio to and cases below the backbone."""
    per_case = cases(df)
    ari, nmi = per_case[per_case["metric"] == ARI], per_case[per_case["metric"] == NMI]
    backbone = ari[ari["encoder"] == "backbone"].set_index(["dataset", "seed", "fold", "reference"])["value"]
    rows = []
    for encoder, part in ari.groupby("encoder", sort=False):
        case_values = part.set_index(["dataset", "seed", "fold", "reference"])["value"]
        row = {
            "representation": encoder,
            "ARI": f"{part['value'].mean():.3f} ± {part['value'].std(ddof=0):.3f}",
            "NMI": f"{nmi[nmi['encoder'] == encoder]['value'].mean():.3f}",
            "× backbone ARI": f"{part['value'].mean() / backbone.mean():.2f}",
            "cases below backbone": f"{int((case_values < backbone.reindex(case_values.index)).sum())} of {len(part)}",
            "Leiden seed spread (ARI std)": f"{part['seed_std'].mean():.3f}",
        }
        for dataset, by_dataset in part.groupby("dataset", sort=False):
            row[f"ARI {dataset}"] = f"{by_dataset['value'].mean():.3f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("representation")


def write(df: pd.DataFrame, out: Path, tag: str, config: dict) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    name = f"clustering_{tag}"
    df.to_csv(out / f"{name}.csv.gz", index=False)  # compressed: results stay small in the repository
    table = summary(df)
    per_case = cases(df)
    ari = per_case[per_case["metric"] == ARI]
    by_case = ari.pivot_table(index="encoder", columns=["fold", "reference"], values="value", sort=False)
    domains = df[df["metric"] == ARI].groupby(["fold", "reference"], sort=False)["n_domains"]
    n_domains = {f"{fold} {reference}": int(n) for (fold, reference), n in domains.first().items()}
    with (out / f"{name}.json").open("w") as fh:
        summary_rows = table.reset_index().to_dict(orient="records")
        json.dump({"config": config, "summary": summary_rows, "n_domains": n_domains}, fh, indent=1, default=str)
    case_table = by_case.map("{:.3f}".format)
    case_table.columns = [f"{fold} @{reference.split('@')[1]}" for fold, reference in case_table.columns]
    counts = ", ".join(f"{fold} @{ref.split('@')[1]}: {n}" for (fold, ref), n in domains.first().items())
    lines = [
        f"# Clustering benchmark ({tag})",
        "",
        f"`{config['command']}` (commit {config['commit']})",
        "",
        "Leave-one-section-out; a case is a held-out section × expression-domain resolution (0.5, 1.0): "
        f"{ari.groupby(['dataset', 'seed', 'fold', 'reference']).ngroups} cases. ARI / NMI with the section's "
        "expression domains at the Leiden resolution (0.1–1.5) whose mean cluster count (5 seeds) is nearest the "
        "number of domains; mean ± std over cases of the mean over Leiden seeds. `+ tl.domains λ=w`: the "
        "representation next to its 6 nearest spots' mean, as `sd.tl.domains(spatial_weight=w)` clusters it.",
        "",
        quality._markdown(table, "representation"),
        "",
        f"Expression domains per case: {counts}.",
        "",
        "## ARI per case",
        "",
        quality._markdown(case_table, "representation"),
        "",
        "Timings (s): `" + json.dumps(config.get("timings_s", {})) + "`",
        "",
    ]
    (out / f"{name}.md").write_text("\n".join(lines))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--datasets", nargs="+", default=["mob", "her2st"], choices=["mob", "her2st"])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--spatial-weights", type=float, nargs="+", default=list(SPATIAL_WEIGHTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="SPADE training seeds (pooled)")
    parser.add_argument("--tiles", action="store_true", help="add tl.domains on H&E-only tiles to the figures")
    parser.add_argument("--tag", default="main", help="results are written as clustering_<tag>.{csv.gz,json,md}")
    quality.add_patch_arguments(parser, size_um=PatchConfig.size_um)
    args = parser.parse_args(argv)
    if "backbone" not in args.variants:
        parser.error("--variants must include backbone: every representation is compared with it")
    patch = quality.start_run(args)
    command = "python benchmarks/clustering.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    start = time.perf_counter()
    frames, timings = [], {}
    for dataset in args.datasets:
        t0 = time.perf_counter()
        frames.append(run_dataset(dataset, args, patch, args.out))
        timings[dataset] = round(time.perf_counter() - t0)
    df = pd.concat(frames, ignore_index=True)
    config = {**vars(args), "out": str(args.out), "command": command, "commit": commit, "timings_s": timings}
    table = write(df, args.out, args.tag, config)
    print(quality._markdown(table, "representation"))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
