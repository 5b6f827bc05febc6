"""Morphology benchmark: does the embedding keep what the backbone knew about the image while it learns expression?

Leave-one-section-out on MOB1–3 and her2st C2–C5, the protocol of ``benchmarks/quality.py`` (whose
:func:`~quality.run_dataset` trains and embeds every fold and scores the expression metrics), plus few-shot
classification (logistic regression on 5 / 10 / 20 labelled spots per class, balanced accuracy on the other spots of
the held-out section, repeated draws) of labels that come from the H&E alone:

- ``hematoxylin``: tertiles, within the section, of the spot's mean hematoxylin optical density (colour
  deconvolution, ``skimage.color.rgb2hed``) over its own 100 µm patch (nuclear density and staining);
- ``tissue``: tertiles of the tissue fraction (pixels with mean RGB < 220) of a 400 µm window around the spot: the
  lowest tertile are the spots next to the background (tissue border, holes, tears);
- ``hematoxylin_residual``: tertiles of the hematoxylin density after removing what expression predicts linearly
  (a ridge regression on the section's 50 target genes, α by internal CV, cross-fitted over 5 folds): morphology
  that expression does not explain, by construction.

The row ``expression`` classifies the same labels from the 50 log1p target genes: how much of each label expression
explains. ``--datasets synthetic`` adds four slides of ``sd.datasets.synthetic(type_expression=0)``, whose planted
``tissue_type`` (a fourth label) differs in the image but shares one expression program. Run ``python benchmarks/morphology.py --out benchmarks/results --tag main`` (about 30–40 min on 2 CPU
cores, features cached). Variants as in ``quality.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality

import spade_sd as sd
from spade_sd import metrics
from spade_sd.spots.patches import resolve_patches

log = logging.getLogger("morphology")

LABELS = ("hematoxylin", "tissue", "hematoxylin_residual", "tissue_type")
SHOTS = (5, 10, 20)
DEFAULT_VARIANTS = (
    "backbone",
    "backbone_slide",
    "spade",
    "spade:n_comps=32",
    "spade:n_comps=None",
    "spade:output=joint,backbone_comps=16",
    "spade:output=joint",
    "spade:output=joint,backbone_comps=None",
)
EXPRESSION_METRICS = quality.METRIC_ORDER
MORPHOLOGY_METRICS = tuple(f"{name} bacc@{k}" for name in LABELS for k in SHOTS)
SPOT_WINDOW_UM, SPOT_WINDOW_PX = 100.0, 32
CONTEXT_WINDOW_UM, CONTEXT_WINDOW_PX = 400.0, 64
BACKGROUND_GREY = 220
SYNTHETIC = {"n_slides": 4, "grid": (16, 16), "mpp": 1.0, "n_genes": 200, "type_expression": 0.0, "seed": 0}


@lru_cache(maxsize=1)
def _synthetic_slides() -> tuple:
    return tuple(sd.datasets.synthetic(**SYNTHETIC))


def synthetic_section(name: str):
    """Slide ``synthetic_<i>`` of the synthetic data set with image-only tissue types."""
    return _synthetic_slides()[int(name.rsplit("_", 1)[1])]


quality.DATASETS.setdefault(
    "synthetic", (synthetic_section, tuple(f"synthetic_{i}" for i in range(SYNTHETIC["n_slides"])))
)


def tertiles(values: np.ndarray) -> np.ndarray:
    """0 / 1 / 2 for the lower, middle and upper third of ``values``."""
    return np.searchsorted(np.quantile(values, [1 / 3, 2 / 3]), values, side="right")


def image_measures(sdata) -> pd.DataFrame:
    """Per spot (table row order): mean hematoxylin density of its 100 µm patch, tissue fraction of a 400 µm window."""
    from skimage.color import rgb2hed

    _, spot = resolve_patches(sdata, size_um=SPOT_WINDOW_UM, size_px=SPOT_WINDOW_PX)
    pixels = spot.read(np.arange(len(spot)))
    hematoxylin = rgb2hed(pixels.reshape(-1, SPOT_WINDOW_PX, 3)).reshape(pixels.shape)[..., 0].mean(axis=(1, 2))
    _, context = resolve_patches(sdata, size_um=CONTEXT_WINDOW_UM, size_px=CONTEXT_WINDOW_PX)
    tissue = (context.read(np.arange(len(context))).mean(axis=3) < BACKGROUND_GREY).mean(axis=(1, 2))
    return pd.DataFrame({"hematoxylin": hematoxylin, "tissue": tissue})


def expression_residual(values: np.ndarray, Y: np.ndarray, seed: int = 0) -> np.ndarray:
    """``values`` minus their cross-fitted ridge prediction from expression ``Y`` (5 folds, α by internal CV)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    folds = KFold(5, shuffle=True, random_state=seed)
    return values - cross_val_predict(model, Y, values, cv=folds)


def image_labels(sections, Y: np.ndarray, section: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """``{section: {label: classes}}`` of the spots with a patch (the benchmark's rows), from the H&E alone."""
    labels = {}
    for s in sections:
        measures = image_measures(s.sdata)[s.rows].reset_index(drop=True)
        residual = expression_residual(measures["hematoxylin"].to_numpy(), Y[section == s.name])
        labels[s.name] = {
            "hematoxylin": tertiles(measures["hematoxylin"].to_numpy()),
            "tissue": tertiles(measures["tissue"].to_numpy()),
            "hematoxylin_residual": tertiles(residual),
        }
        if "tissue_type" in s.table.obs:  # synthetic: the planted types
            labels[s.name]["tissue_type"] = s.table.obs["tissue_type"].cat.codes.to_numpy()[s.rows]
        r2 = 1 - residual.var() / measures["hematoxylin"].var()
        log.info("%s: labels made; expression explains R² = %.2f of the hematoxylin density", s.name, r2)
    return labels


def label_scores(
    label: str, X: np.ndarray, classes: dict[str, np.ndarray], section: str, n_repeats: int
) -> list[pd.DataFrame]:
    """Few-shot classification (5 / 10 / 20 per class) of one section's image labels ``classes`` from its rows ``X``."""
    frames = []
    for name, values in classes.items():
        df = metrics.few_shot_classification(X, values, k=SHOTS, n_repeats=n_repeats, label=label, seed=0)
        df["metric"] = df["k"].map(lambda k, name=name: f"{name} bacc@{k}")
        frames.append(df.assign(task="morphology", fold=section))
    return frames


def morphology_scorer(n_repeats: int, store: dict):
    """The ``extra`` of :func:`quality.run_dataset`: scores the image labels, and the expression baseline once."""

    def factory(sections, Y, section):
        labels = image_labels(sections, Y, section)
        store["labels"] = labels

        def score(label: str, X: np.ndarray, held_out: str) -> list[pd.DataFrame]:
            return label_scores(label, X[section == held_out], labels[held_out], held_out, n_repeats)

        store["expression"] = [f for s in sections for f in score("expression", Y, s.name)]
        return score

    return factory


def summary(df: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """encoder × metric table of ``mean ± std`` for one data set."""
    table = metrics.summarize(df.drop(columns=["group"], errors="ignore"))
    table = table[table["metric"].isin(columns)]
    table["cell"] = table.apply(lambda r: f"{r['mean']:.3f} ± {r['std']:.3f}", axis=1)
    pivot = table.pivot(index="encoder", columns="metric", values="cell")
    order = list(dict.fromkeys(df["encoder"]))
    return pivot.reindex(index=[e for e in order if e in pivot.index], columns=[c for c in columns if c in pivot])


def write(df: pd.DataFrame, out: Path, tag: str, config: dict) -> str:
    quality.write_raw(df, out, f"morphology_{tag}", config)
    lines = [
        f"# Morphology benchmark ({tag})",
        "",
        "Leave-one-section-out; mean ± std over held-out sections and repeated draws (SPADE: 3 training seeds "
        "averaged per fold and draw). Image labels (tertiles within the section): see `benchmarks/morphology.py`. "
        "`expression` classifies them from the 50 log1p target genes. Chance 0.333 (`tissue_type`: 1 / types). "
        "Config: `" + json.dumps(config) + "`",
        "",
    ]
    for dataset, part in df.groupby("dataset", sort=False):
        for title, columns in (("morphology labels", MORPHOLOGY_METRICS), ("expression metrics", EXPRESSION_METRICS)):
            lines += [f"## {dataset}: {title}", "", quality._markdown(summary(part, columns)), ""]
    text = "\n".join(lines)
    (out / f"morphology_{tag}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--datasets", nargs="+", default=list(quality.DATASETS), choices=list(quality.DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--tag", default="summary", help="results are written as morphology_<tag>.{csv.gz,json,md}")
    quality.add_patch_arguments(parser, size_um=200.0)
    parser.add_argument("--repeats", type=int, default=3, help="draws of the expression few-shot tasks")
    parser.add_argument("--label-repeats", type=int, default=10, help="draws of the morphology few-shot tasks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SPADE training seeds (pooled)")
    args = parser.parse_args(argv)
    patch = quality.start_run(args)
    start = time.perf_counter()
    frames, timings = [], {}
    for dataset in args.datasets:
        store: dict = {}
        df = quality.run_dataset(
            dataset,
            args.variants,
            patch=patch,
            n_repeats=args.repeats,
            seeds=args.seeds,
            extra=morphology_scorer(args.label_repeats, store),
        )
        timings[dataset] = df.attrs["timings"]
        expression = pd.concat(store["expression"], ignore_index=True).assign(dataset=dataset)
        frames += [expression, df]
        config = {**vars(args), "out": str(args.out), "timings_s": timings, "total_s": time.perf_counter() - start}
        text = write(pd.concat(frames, ignore_index=True), args.out, args.tag, config)  # after every data set
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
