"""Does a low-precision engine of the default backbone leave a user worse off, on every metric of the quality benchmark?

The fidelity gate of ``engine="auto"`` (``spade_sd.encoders.precision``) judges an engine by the median per-patch
cosine of its features to float32's. This benchmark judges it by what users compute from them: the quality benchmark
(``benchmarks/quality.py``: leave one section out on MOB1–3 and her2st C2–C5; ridge probes, few-shot probe, kNN
retrieval, gene → image recall, few-shot classification of expression domains) run in one process, once with
the backbone in float32 onnxruntime (for the default EfficientNet-Lite0, what the tools run) and once with
``--engine`` (calibrated as ``quality.py --engine`` calibrates it: 64 patches spread over the data set's first
section). ``--backbone`` names a timm architecture to run instead, with random weights drawn once from a seed
(offline there are no other pretrained weights), e.g. ``vit_small_patch16_224``, whose int8 engine
``engine="auto"`` takes by default on the CPU. Raw features
(``backbone``) and SPADE models trained on them (``spade``, every seed) are scored on the same folds, seeds and
repeated draws, so each score is compared in pairs.

Two references tell what a move means. The spread of the float32 score over SPADE training seeds is the noise a user
meets by retraining. And the same runs with the float32 features plus random Gaussian noise of the engine's own size
(per dimension, the standard deviation of the engine's error over the data set's spots; drawn per patch from its
pixels, ``--noise-seeds`` draws) show how far each metric moves for *any* perturbation that small: a metric that
moves as far for random noise as for the engine cannot tell the engine's error from noise, and one that moves down
for the engine beyond every noise draw is one the engine makes worse.

For each data set, representation and metric the results give both means, their difference, how many of the paired
(fold, seed) scores moved up, the largest paired move, each noise draw's move, and the seed spread.

Run ``python benchmarks/engine_quality.py --engine int8`` (about 10 min on 2 CPU cores once features are cached;
``--backbone vit_small_patch16_224`` about 20 min more on first use). Results:
``benchmarks/results/engine_quality_<engine>[_<backbone>].{md,json}`` and ``…_folds.csv`` (every run's score per
fold and seed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import quality  # the benchmark whose data sets, variants and scores this one runs again
import timm
import torch

import spade_sd as sd

METRICS = quality.METRIC_ORDER  # the scores of the quality benchmark's summary


KEY = ["dataset", "encoder", "metric", "seed", "fold"]


def fold_means(scores: pd.DataFrame) -> pd.Series:
    """A :func:`quality.run_dataset` frame's scores averaged over genes and repeated draws, per :data:`KEY`.

    A representation without seeds (raw features) counts as seed -1. Scores that are not defined (e.g. few-shot
    classification of a section with a single expression domain) are left out.
    """
    scores = scores[scores["metric"].isin(METRICS) & scores["value"].notna()]
    scores = scores.assign(seed=scores["seed"].fillna(-1) if "seed" in scores else -1)
    return scores.groupby(KEY)["value"].mean()


def paired(reference: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Scores of ``other`` against ``reference`` (:func:`quality.run_dataset` frames), paired per :func:`fold_means`."""
    pairs = pd.concat({"reference": fold_means(reference), "other": fold_means(other)}, axis=1)
    if pairs.isna().any().any():
        missing = pairs[pairs.isna().any(axis=1)].index.tolist()[:5]
        raise ValueError(f"expected both runs to score the same folds and seeds; unpaired, e.g. {missing}")
    pairs["move"] = pairs["other"] - pairs["reference"]
    per_seed = pairs.groupby(KEY[:-1]).mean()
    group = KEY[:-2]
    table = per_seed.groupby(group).agg(
        reference=("reference", "mean"), other=("other", "mean"), move=("move", "mean"), seed_sd=("reference", "std")
    )
    by_pair = pairs.groupby(group)["move"]
    table["largest_move"] = by_pair.agg(lambda m: m.iloc[np.argmax(np.abs(m.to_numpy()))])
    table["pairs_up"] = by_pair.agg(lambda m: int((m > 0).sum()))
    table["pairs"] = by_pair.size()
    order = {metric: i for i, metric in enumerate(METRICS)}
    table = table.reset_index()
    table["order"] = table["metric"].map(order)
    return table.sort_values(["dataset", "encoder", "order"]).drop(columns="order").reset_index(drop=True)


class NoisyFeatures:
    """Features of ``backbone`` plus Gaussian noise of standard deviation ``scale`` per dimension.

    The noise of a patch is drawn from ``seed`` and the patch's pixels, so a patch always gets the same features (they
    can be cached) and patches with different pixels get different noise.
    """

    def __init__(self, backbone: sd.Backbone, scale: np.ndarray, seed: int) -> None:
        self.backbone, self.scale, self.seed = backbone, np.asarray(scale, dtype=np.float32), seed
        self.dim = backbone.dim

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        features = np.array(self.backbone(patches), dtype=np.float32)
        for row, patch in zip(features, patches, strict=True):
            pixels = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(patch).tobytes(), digest_size=8).digest())
            row += np.random.default_rng([self.seed, pixels]).standard_normal(self.dim, dtype=np.float32) * self.scale
        return features


def error_scale(dataset: str, reference: sd.Backbone, engine: sd.Backbone, patch: dict) -> np.ndarray:
    """Per dimension, the standard deviation of ``engine``'s features minus ``reference``'s over ``dataset``'s spots."""
    loader, names = quality.DATASETS[dataset]
    errors = []
    for name in names:
        sdata = loader(name)
        for key, backbone in (("X_reference", reference), ("X_engine", engine)):
            sd.tl.features(sdata, backbone=backbone, key_added=key, **patch)
        obsm = sdata.tables["table"].obsm
        error = np.asarray(obsm["X_engine"], dtype=np.float64) - np.asarray(obsm["X_reference"], dtype=np.float64)
        errors.append(error[np.isfinite(error).all(axis=1)])
    return np.concatenate(errors).std(axis=0)


def noisy_backbone(reference: sd.Backbone, scale: np.ndarray, seed: int) -> sd.Backbone:
    """``reference`` plus noise of ``scale`` (:class:`NoisyFeatures`), cached under an identity of its own."""
    digest = hashlib.sha256(scale.astype(np.float32).tobytes()).hexdigest()[:16]
    version = f"{reference.feature_identity()} + gaussian noise {digest} seed {seed}"
    return sd.Backbone(NoisyFeatures(reference, scale, seed), version=version)


def markdown(table: pd.DataFrame, engine: str, config: dict) -> str:
    lines = [
        f"# {config['backbone'] or 'The default backbone'} with engine={engine!r} against float32 onnxruntime, on the "
        "quality benchmark",
        "",
        "Paired by fold and SPADE seed (`benchmarks/engine_quality.py`). move: the engine's mean minus float32's; "
        "largest: the largest paired move; up: paired scores that rose, of all pairs; noise: the move of float32 "
        "features plus Gaussian noise of the engine's per-dimension error size, one per noise draw; seed sd: the "
        "float32 score's standard deviation over SPADE training seeds (blank for raw features, which have none); "
        "**below noise**: the engine's move is negative and below every noise draw's.",
        "",
        f"Config: `{json.dumps(config)}`",
        "",
    ]
    for dataset in config["datasets"]:
        part = table[table["dataset"] == dataset]
        lines += [
            f"## {dataset}",
            "",
            "| representation | metric | float32 | " + engine + " | move | largest | up | noise | seed sd | |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in part.itertuples():
            seed_sd = "" if np.isnan(row.seed_sd) else f"{row.seed_sd:.4f}"
            noise = ", ".join(f"{move:+.4f}" for move in row.noise_moves)
            flag = "**below noise**" if row.below_noise else ""
            lines.append(
                f"| {row.encoder} | {row.metric} | {row.reference:.4f} | {row.other:.4f} | {row.move:+.4f} | "
                f"{row.largest_move:+.4f} | {row.pairs_up}/{row.pairs} | {noise} | {seed_sd} | {flag} |"
            )
        chance = len(part) / (len(config["noise_seeds"]) + 1)
        lines += [
            "",
            f"Below noise: {int(part['below_noise'].sum())} of {len(part)} scores. If the engine's error did no more "
            f"harm than random noise of its size, its move would be the lowest of the {len(config['noise_seeds']) + 1} "
            f"moves by chance for about {chance:.1f} of the {len(part)} scores (a flag also needs the move to be "
            "negative, so fewer would be flagged).",
            "",
        ]
    return "\n".join(lines)


def with_noise(table: pd.DataFrame, noisy: list[pd.DataFrame]) -> pd.DataFrame:
    """``table`` with each noise draw's move (:func:`paired` of the same reference) and the below-noise flag."""
    key = ["dataset", "encoder", "metric"]
    moves = [draw.set_index(key)["move"] for draw in noisy]
    table = table.set_index(key)
    table["noise_moves"] = [tuple(float(move[index]) for move in moves) for index in table.index]
    table["below_noise"] = [row.move < 0 and row.move < min(row.noise_moves) for row in table.itertuples()]
    return table.reset_index()


def random_module(name: str, seed: int = 0) -> torch.nn.Module:
    """The timm architecture ``name`` as a feature extractor, with weights drawn from ``seed`` (the same every run)."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=0).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="int8", choices=["int8", "bf16", "auto", "torch"])
    parser.add_argument("--datasets", nargs="+", default=list(quality.DATASETS), choices=list(quality.DATASETS))
    parser.add_argument("--variants", nargs="+", default=["backbone", "spade"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="draws of the few-shot tasks per section")
    parser.add_argument("--backbone", default=None, help="a timm name, random weights (default: EfficientNet-Lite0)")
    parser.add_argument("--noise-seeds", type=int, nargs="+", default=[0, 1], help="draws of the noise reference")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    quality.add_patch_arguments(parser, size_um=112.0)
    args = parser.parse_args(argv)
    patch = quality.start_run(args)
    start = time.perf_counter()
    module = None if args.backbone is None else random_module(args.backbone)

    def run(dataset: str, backbone: sd.Backbone) -> pd.DataFrame:
        options = {"patch": patch, "n_repeats": args.repeats, "seeds": args.seeds, "module": backbone}
        return quality.run_dataset(dataset, args.variants, **options)

    runs = {"reference": [], "other": [], **{f"noise {seed}": [] for seed in args.noise_seeds}}
    for dataset in args.datasets:
        reference = quality.default_backbone("onnxruntime", dataset, patch, module)
        engine = quality.default_backbone(args.engine, dataset, patch, module)
        runs["reference"].append(run(dataset, reference))
        runs["other"].append(run(dataset, engine))
        scale = error_scale(dataset, reference, engine, patch)
        for seed in args.noise_seeds:
            runs[f"noise {seed}"].append(run(dataset, noisy_backbone(reference, scale, seed)))
    runs = {name: pd.concat(frames, ignore_index=True) for name, frames in runs.items()}
    table = paired(runs["reference"], runs["other"])
    noisy = [paired(runs["reference"], runs[f"noise {seed}"]) for seed in args.noise_seeds]
    table = with_noise(table, noisy)
    config = {**vars(args), "out": str(args.out), "total_s": round(time.perf_counter() - start, 1)}
    name = f"engine_quality_{args.engine}" + ("" if args.backbone is None else f"_{args.backbone}")
    args.out.mkdir(parents=True, exist_ok=True)
    # per fold and seed (the per-gene scores are several MB: rerun to get them)
    labels = {"reference": "float32", "other": args.engine}
    folds = pd.concat({labels.get(run, run): fold_means(frame) for run, frame in runs.items()}, axis=1)
    folds.reset_index().to_csv(args.out / f"{name}_folds.csv", index=False, float_format="%.6g")
    with (args.out / f"{name}.json").open("w") as fh:
        json.dump({"config": config, "paired": table.to_dict(orient="records")}, fh, indent=1, default=str)
    text = markdown(table, args.engine, config)
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
