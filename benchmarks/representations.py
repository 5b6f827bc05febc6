"""What ``X_spade`` could be, scored beside the results on every metric a user relies on (issues 22 and 27).

One default model per fold is trained (leave one section out on MOB1–3 and her2st C2–C5; and every section of one
data set → the other's sections), every section embedded, and the parts of ``X_spade`` saved: the backbone's features
``B``, the read-out block ``Z`` (0.3.0's ``X_spade`` is ``[B, Z]``) and the heads' expression subspace. Variants are
then built from these arrays, so that every candidate is scored on the same models:

- ``lift{g}``: ``[B + g·P(B), c·Z]``, where ``P(B) = (Z − z̄)·A`` is the part of the features the block predicts
  (``A`` the least-squares map from the block to the features on the training spots) and ``c`` keeps the block's
  spread 0.7 of the lifted features' (here on the scored section; the package sets it on the training slides):
  what ``readout_lift=g`` writes. ``lift{g}w{w}``: the same with the block's spread ``w`` (not 0.7) times the
  lifted features' (``readout_weight=w``); ``lift{g}e{e}``: each block column first multiplied by its spread on the
  training spots to the power ``e`` (the block's total spread kept), so that the read-out's leading components weigh
  more. ``lift{g}_only``: the lifted features alone.
- ``spade_0.3``: ``[B, Z]``; ``heads``: the heads' output (0.2's ``X_spade``); ``backbone``: ``B``.

Scores (mean over the folds): H&E-derived labels (``morphology.image_labels``: hematoxylin, tissue, hematoxylin
residual tertiles), few-shot logistic regression on standardized features @10, within a data set and across; label
transfer of the held-out section's expression domains @10 (logistic on standardized features, and cosine kNN as
``tl.transfer_labels`` does); Leiden ARI against the expression domains (``sd.metrics.domain_agreement``, the
protocol of ``benchmarks/clustering.py``).

Run ``python benchmarks/representations.py collect`` (about 6 min) then
``python benchmarks/representations.py score --variants backbone spade_0.3 heads lift0.5 lift1`` (about 10 min per
variant on 2 busy cores) and ``python benchmarks/representations.py report``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORK = Path(".cache/representations")
METRICS = ("morph", "transfer", "ari")
READOUT_WEIGHT = 0.7  # the block's spread relative to the features' in the saved ``Z`` (0.3.0's readout_weight)


def collect(out: Path) -> None:
    """Train the folds' default models and save every section's arrays."""
    import morphology
    import quality

    import spade_sd as sd
    from spade_sd import metrics
    from spade_sd.config import PatchConfig
    from spade_sd.metrics._domains import REFERENCE_HVGS, REFERENCE_PCS
    from spade_sd.spots.genes import GenePanel

    out.mkdir(parents=True, exist_ok=True)
    patch = {"size_um": PatchConfig.size_um, "size_px": 224}

    def parts(model, s):
        sd.tl.embed(s.sdata, model, table_key="table", genes=False)
        B = s.rep("X_backbone")
        return B, s.rep("X_spade")[:, B.shape[1] :]

    def save(name, model, train, s, extra):
        trained = [parts(model, t) for t in train]
        B, Z = parts(model, s)
        np.savez(
            out / f"{name}.npz",
            B=B,
            Z=Z,
            E=s.rep("X_spade_expr"),
            Btr=np.vstack([t[0] for t in trained]),
            Ztr=np.vstack([t[1] for t in trained]),
            **extra,
        )

    for dataset in ("mob", "her2st"):
        sections, Y, section, _ = quality.load(dataset, patch)
        labels = morphology.image_labels(sections, Y, section)
        for s_out in sections:
            train = [s for s in sections if s is not s_out]
            model = sd.tl.pretrain([s.sdata for s in train], quiet=True, seed=0, readout_lift=0.0, **patch)
            expression = GenePanel(genes=list(s_out.table.var_names)).transform(s_out.table[s_out.rows])
            domains = {
                f"dom{int(r * 10):02d}": metrics.expression_domains(
                    expression, resolution=r, n_top_genes=REFERENCE_HVGS, n_pcs=REFERENCE_PCS
                )
                for r in (0.5, 1.0)
            }
            lab = {f"lab_{k}": v for k, v in labels[s_out.name].items()}
            save(f"loo_{s_out.name}", model, train, s_out, {**domains, **lab})
    for source, target in (("mob", "her2st"), ("her2st", "mob")):
        train, *_ = quality.load(source, patch)
        sections, Y, section, _ = quality.load(target, patch)
        labels = morphology.image_labels(sections, Y, section)
        model = sd.tl.pretrain([s.sdata for s in train], quiet=True, seed=0, readout_lift=0.0, **patch)
        for s in sections:
            save(f"x_{source}_{s.name}", model, train, s, {f"lab_{k}": v for k, v in labels[s.name].items()})


def lifted(d, g: float, block: bool, weight: float = READOUT_WEIGHT, emphasis: float = 0.0) -> np.ndarray:
    B, Z = d["B"], d["Z"]
    Ztr, Btr = d["Ztr"], d["Btr"]
    A = np.linalg.lstsq(Ztr - Ztr.mean(0), Btr - Btr.mean(0), rcond=None)[0]
    S = B + g * (Z - Ztr.mean(0)) @ A
    if not block:
        return S
    if emphasis:  # each column times its training spread ** emphasis, the block's total spread kept
        Ze = Z * Ztr.std(0) ** emphasis
        Z = Ze * np.sqrt(np.square(Z - Z.mean(0)).sum() / np.square(Ze - Ze.mean(0)).sum())
    c = np.sqrt(np.square(S - S.mean(0)).sum() / np.square(B - B.mean(0)).sum())
    return np.hstack([S, c * weight / READOUT_WEIGHT * Z])


def variant(d, name: str) -> np.ndarray:
    if name == "backbone":
        return d["B"]
    if name == "spade_0.3":
        return np.hstack([d["B"], d["Z"]])
    if name == "heads":
        return d["E"]
    if name.startswith("lift"):
        g, _, only = name[4:].partition("_")
        g, _, emphasis = g.partition("e")
        g, _, weight = g.partition("w")
        return lifted(
            d, float(g), block=only != "only", weight=float(weight or READOUT_WEIGHT), emphasis=float(emphasis or 0)
        )
    raise ValueError(f"unknown variant {name!r}")


def knn_transfer(X: np.ndarray, y: np.ndarray, k_shot: int, repeats: int = 10, k: int = 15) -> float:
    from sklearn.metrics import balanced_accuracy_score

    from spade_sd.metrics import knn_predict

    rng = np.random.default_rng(0)
    classes, scores = np.unique(y), []
    for _ in range(repeats):
        picks = [rng.choice(np.flatnonzero(y == c), min(k_shot, (y == c).sum() - 1), replace=False) for c in classes]
        idx = np.concatenate(picks)
        rest = np.setdiff1d(np.arange(len(y)), idx)
        one_hot = (y[idx][:, None] == classes[None]).astype(float)
        p = knn_predict(X[rest], X[idx], one_hot, k=min(k, len(idx)), metric="cosine")
        scores.append(balanced_accuracy_score(y[rest], classes[p.argmax(1)]))
    return float(np.mean(scores))


def score(work: Path, variants: list[str], which: list[str], out: Path) -> None:
    from spade_sd import metrics

    rows = []
    for f in sorted(work.glob("*.npz")):
        d = np.load(f)
        loo = f.stem.startswith("loo_")
        for name in variants:
            X = variant(d, name)
            row = {"file": f.stem, "variant": name}
            if "morph" in which:
                for lab in ("hematoxylin", "tissue", "hematoxylin_residual"):
                    df = metrics.few_shot_classification(X, d[f"lab_{lab}"], k=(10,), n_repeats=6, seed=0)
                    rows.append({**row, "metric": f"morph_{lab}", "value": df["value"].mean()})
            if loo and "transfer" in which:
                df = metrics.few_shot_classification(X, d["dom05"], k=(10,), n_repeats=6, seed=0)
                rows.append({**row, "metric": "transfer_logistic", "value": df["value"].mean()})
                rows.append({**row, "metric": "transfer_knn", "value": knn_transfer(X, d["dom05"], 10)})
            if loo and "ari" in which:
                for ref in ("dom05", "dom10"):
                    df = metrics.domain_agreement(X, d[ref], reference=ref, label=name)
                    ari = df[df["metric"] == "ari"]["value"]
                    rows.append({**row, "metric": f"ari_{ref}", "value": ari.mean(), "std": ari.std()})
        pd.DataFrame(rows).to_csv(out, index=False)


def report(tables: list[Path], out: Path) -> None:
    r = pd.concat([pd.read_csv(t) for t in tables], ignore_index=True)
    r["group"] = np.where(
        r.file.str.startswith("loo_"), "within", np.where(r.file.str.startswith("x_mob"), "mob→her2st", "her2st→mob")
    )
    r["m"] = r.metric.str.replace(r"morph_.*", "morph", regex=True).str.replace(r"_dom\d+", "", regex=True)
    mean = r.groupby(["variant", "group", "m"])["value"].mean().unstack(["group", "m"])
    morph = r[r.m == "morph"].groupby(["file", "variant"])["value"].mean().unstack("variant")
    below = (morph.sub(morph["backbone"], axis=0) < -0.005).sum()
    ari = r[r.m == "ari"].groupby(["file", "metric", "variant"])["value"].mean().unstack("variant")
    spread = r[r.m == "ari"].groupby(["file", "metric", "variant"])["std"].mean().unstack("variant")
    lines = [
        "# X_spade candidates on every metric (issues 22, 27)",
        "",
        "`python benchmarks/representations.py collect|score|report` (see its docstring); seed 0, one model per fold.",
        "",
        "| variant | H&E labels within | her2st→MOB | MOB→her2st | morphology folds below backbone − 0.005 | "
        "transfer logistic | transfer kNN | Leiden ARI | × backbone | ARI cases below backbone − spread |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = ari["backbone"].mean()

    def folds(name: str) -> str:
        return f"{int(below[name])} of {morph[name].notna().sum()}" if name in morph else "–"

    for name in r["variant"].unique():
        m = mean.loc[name] if name in mean.index else pd.Series(dtype=float)
        cases = int((ari[name] < ari["backbone"] - spread["backbone"]).sum()) if name in ari else "–"
        value = ari[name].mean() if name in ari else np.nan
        lines.append(
            f"| {name} | {m.get(('within', 'morph'), np.nan):.3f} | {m.get(('her2st→mob', 'morph'), np.nan):.3f} | "
            f"{m.get(('mob→her2st', 'morph'), np.nan):.3f} | {folds(name)} | "
            f"{m.get(('within', 'transfer_logistic'), np.nan):.3f} | {m.get(('within', 'transfer_knn'), np.nan):.3f} | "
            f"{value:.3f} | {value / base:.2f} | {cases} |"
        )
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["collect", "score", "report"])
    parser.add_argument("--work", type=Path, default=WORK, help="where the sections' arrays are kept")
    parser.add_argument("--variants", nargs="+", default=["backbone", "spade_0.3", "heads", "lift0.5", "lift1"])
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    parser.add_argument("--scores", type=Path, nargs="+", default=[Path("benchmarks/results/representations.csv.gz")])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/representations.md"))
    args = parser.parse_args(argv)
    if args.step == "collect":
        collect(args.work)
    elif args.step == "score":
        score(args.work, args.variants, args.metrics, args.scores[0])
    else:
        report(args.scores, args.out)


if __name__ == "__main__":
    main()
