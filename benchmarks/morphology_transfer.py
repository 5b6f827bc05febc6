"""Morphology on tissue the model never saw: train on one data set, score the H&E labels of the other.

The issue's own measurement (a patient the model never saw, another image resolution) cannot be run offline: the
local her2st sections are all from patient C. The hardest held-out setting the local data allow is another data
set: a model trained on every her2st section (human breast cancer, ~0.69 µm/px) embeds the mouse olfactory bulb
sections (~4.6 µm/px), and the other way round. Every target section is then scored as in
``benchmarks/morphology.py``: few-shot classification (logistic regression on 5 / 10 / 20 labelled spots per
class, balanced accuracy on the section's other spots, repeated draws) of the labels made from the H&E alone
(hematoxylin density, tissue fraction of the surrounding window, hematoxylin density that expression does not
explain). The expression metrics cannot cross data sets (other species, other genes); ``morphology_v1`` has them.

Run ``python benchmarks/morphology_transfer.py --out benchmarks/results --tag transfer`` (about 10 min on 2 CPU
cores, features cached).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import morphology
import quality

import spade_sd as sd

log = logging.getLogger("morphology_transfer")

DIRECTIONS = {"her2st→mob": ("her2st", "mob"), "mob→her2st": ("mob", "her2st")}
DEFAULT_VARIANTS = (
    "backbone",
    "spade",
    "spade:n_comps=8",
    "spade:n_comps=32",
    "spade:n_comps=None",
    "spade:output=joint",
    "spade:output=joint,backbone_comps=None",
    "spade:reconstruction=1",
)
LABELS = morphology.LABELS[:3]


def score_sections(label: str, X: np.ndarray, section: np.ndarray, labels: dict, n_repeats: int) -> pd.DataFrame:
    """Few-shot classification of every target section's H&E labels from ``X`` (rows of every target section)."""
    frames = [
        frame
        for name, classes in labels.items()
        for frame in morphology.label_scores(label, X[section == name], classes, name, n_repeats)
    ]
    return pd.concat(frames, ignore_index=True)


def run_direction(direction: str, variants: list[str], *, patch: dict, seeds: list[int], n_repeats: int):
    source, target = DIRECTIONS[direction]
    train, _, _, _ = quality.load(source, patch)
    sections, Y, section, _ = quality.load(target, patch)
    labels = morphology.image_labels(sections, Y, section)
    frames = [score_sections("expression", Y, section, labels, n_repeats)]
    timings = {}
    for spec in variants:
        kind, kwargs = quality.parse_variant(spec)
        start = time.perf_counter()
        if kind == "backbone":
            X = np.concatenate([s.rep("X_backbone") for s in sections])
            frames.append(score_sections(spec, X, section, labels, n_repeats))
        elif kind == "spade":
            for seed in seeds:
                model = sd.tl.pretrain([s.sdata for s in train], quiet=True, seed=seed, **patch, **kwargs)
                for s in sections:
                    sd.tl.embed(s.sdata, model, genes=None)
                X = np.concatenate([s.rep("X_spade") for s in sections])
                frames.append(score_sections(spec, X, section, labels, n_repeats).assign(seed=seed))
        else:
            raise ValueError(f"Unknown variant {spec!r}; use 'backbone' or 'spade[:options]'.")
        timings[spec] = time.perf_counter() - start
        log.info("%s / %s done in %.0f s", direction, spec, timings[spec])
    df = pd.concat(frames, ignore_index=True).assign(dataset=direction)
    df.attrs["timings"] = timings
    return df


def table(df: pd.DataFrame) -> pd.DataFrame:
    """variant × (labels averaged @k, each label @10) of ``mean ± std`` over target sections and draws."""
    df = df.assign(seed=df.get("seed", np.nan))  # raw encoders have no training seed
    df["label_name"] = df["metric"].str.split(" ", n=1).str[0]
    averaged = df.groupby(["encoder", "fold", "repeat", "k", "seed"], dropna=False)["value"].mean().reset_index()
    averaged["metric"] = "H&E labels @" + averaged["k"].astype(str)
    columns = [f"H&E labels @{k}" for k in morphology.SHOTS] + [f"{name} bacc@10" for name in LABELS]
    both = pd.concat([averaged, df[df["metric"].isin(columns)]], ignore_index=True)
    stats = both.groupby(["encoder", "metric"])["value"].agg(["mean", "std"]).reset_index()
    stats["cell"] = stats.apply(lambda r: f"{r['mean']:.3f} ± {r['std']:.3f}", axis=1)
    pivot = stats.pivot(index="encoder", columns="metric", values="cell")
    order = list(dict.fromkeys(df["encoder"]))
    return pivot.reindex(index=order, columns=columns)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=list(DIRECTIONS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--tag", default="transfer", help="results are written as morphology_<tag>.{csv.gz,json,md}")
    quality.add_patch_arguments(parser, size_um=200.0)
    parser.add_argument("--label-repeats", type=int, default=10, help="draws of the few-shot tasks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SPADE training seeds (pooled)")
    args = parser.parse_args(argv)
    patch = quality.start_run(args)
    start = time.perf_counter()
    frames, timings = [], {}
    for direction in args.directions:
        df = run_direction(direction, args.variants, patch=patch, seeds=args.seeds, n_repeats=args.label_repeats)
        timings[direction] = df.attrs["timings"]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    config = {**vars(args), "out": str(args.out), "timings_s": timings, "total_s": time.perf_counter() - start}
    quality.write_raw(df, args.out, f"morphology_{args.tag}", config)
    lines = [
        f"# Morphology on another data set ({args.tag})",
        "",
        "Train on every section of one data set, embed the other's sections, few-shot classification of their "
        "H&E labels (`benchmarks/morphology_transfer.py`); mean ± std over target sections, draws and (SPADE) "
        "3 training seeds. Chance 0.333. Config: `" + json.dumps(config) + "`",
        "",
    ]
    for direction, part in df.groupby("dataset", sort=False):
        lines += [f"## {direction}", "", quality._markdown(table(part)), ""]
    text = "\n".join(lines)
    (args.out / f"morphology_{args.tag}.md").write_text(text)
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
