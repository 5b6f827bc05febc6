"""Does SEAL's fine-tuned encoder keep what the backbone knew about the image? (issues 13 and 15)

Leave one section out on MOB1–3 and her2st C2–C5, 3 seeds: the default backbone is fine-tuned with
``sd.tl.finetune`` on the other sections, and the held-out section's H&E-derived labels of
``benchmarks/morphology.py`` (hematoxylin and tissue-fraction tertiles, and the hematoxylin residual that expression
does not explain) are classified from 5 / 10 / 20 labelled spots per class (logistic regression, balanced accuracy,
repeated draws) with the original features, the fine-tuned features and SEAL's own image embedding.

Run ``cd benchmarks && python seal_morphology.py`` (about 5 min on 2 cores); results
``benchmarks/results/morphology_seal.{csv.gz,md}``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import morphology  # benchmarks/morphology.py: the labels
import numpy as np
import pandas as pd
import quality
import torch

import spade_sd as sd
from spade_sd import metrics
from spade_sd.model.seal_heads import SealAlignment


def run(dataset: str, seeds: list[int], n_repeats: int) -> pd.DataFrame:
    patch = {"size_um": 112.0, "size_px": 224}
    sections, Y, section, _ = quality.load(dataset, patch)
    torch.set_num_threads(1)  # scanpy's HVG selection in load() resets torch to every core
    labels = morphology.image_labels(sections, Y, section)
    X = {"backbone": np.concatenate([s.rep("X_backbone") for s in sections])}
    frames = []
    for s_out in sections:
        test = section == s_out.name
        train = [s.sdata for s in sections if s is not s_out]
        for seed in seeds:
            tuned = sd.tl.finetune(train, seed=seed, quiet=True, **patch)
            for s in sections:
                sd.tl.features(s.sdata, backbone=tuned, key_added="X_seal_backbone", **patch)
            X["seal backbone"] = np.concatenate([s.rep("X_seal_backbone") for s in sections])
            X["seal embedding"] = SealAlignment.from_backbone(tuned).embed_images(X["seal backbone"])
            for encoder, rep in X.items():
                if encoder == "backbone" and seed != seeds[0]:
                    continue  # fold-independent
                for name, classes in labels[s_out.name].items():
                    df = metrics.few_shot_classification(
                        rep[test], classes, k=morphology.SHOTS, n_repeats=n_repeats, label=encoder, seed=0
                    )
                    frames.append(df.assign(label=name, fold=s_out.name, seed=seed, dataset=dataset))
    return pd.concat(frames, ignore_index=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--datasets", nargs="+", default=["mob", "her2st"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("spade_sd").setLevel(logging.WARNING)
    df = pd.concat([run(d, args.seeds, args.repeats) for d in args.datasets], ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "morphology_seal.csv.gz", index=False)
    per_fold = df.groupby(["dataset", "encoder", "k", "fold", "seed"])["value"].mean().reset_index()
    table = per_fold.groupby(["dataset", "encoder", "k"])["value"].agg(["mean", "std"]).reset_index()
    lines = [
        "# H&E-derived labels: backbone vs SEAL's fine-tuned encoder",
        "",
        "Balanced accuracy (3 labels averaged, chance 0.333); mean ± std over folds × seeds.",
        "",
        "| dataset | encoder | 5 per class | 10 per class | 20 per class |",
        "|---|---|---|---|---|",
    ]
    for (dataset, encoder), part in table.groupby(["dataset", "encoder"], sort=False):
        cells = [f"{r['mean']:.3f} ± {r['std']:.3f}" for _, r in part.sort_values("k").iterrows()]
        lines.append(f"| {dataset} | {encoder} | " + " | ".join(cells) + " |")
    (args.out / "morphology_seal.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
