"""Morphology and expression on a held-out section imaged differently: the closest offline stand-in for a new patient.

The issue's held-out patient differed from the training sections in patient, staining and image resolution; the local
her2st sections are all from patient C. This benchmark keeps the tissue and changes the imaging: leave one section
out within a data set (MOB1–3, her2st C2–C5), train on the other sections (as they are, or imaged as
``--train-shift`` says) and embed the held-out section from every copy of its H&E:

- ``stain``: another staining, in the colour-deconvolution space of ``skimage.color.rgb2hed``: hematoxylin optical
  density × 0.75 and eosin × 1.25 (``STAIN``), lazily on every pyramid level;
- ``scanner``: half the resolution: the pyramid without its full-resolution level, placed at twice the pixel size
  (the same physical extent, the pixels a scanner at half the magnification would give);
- ``stain+scanner``: both.

Scored on the held-out section, as ``benchmarks/morphology.py`` and ``quality.py`` do: few-shot classification of the
image labels (made from the *unshifted* H&E, so a label is the same tissue property whatever the imaging) and the
HEST probe (fitted on the training sections' embeddings, tested on the held-out copy), next to the share
of the section's embedding variance the model's subspace keeps (``.uns['spade']['subspace']``, the value
``tl.embed`` warns on). SPADE rows: the default, ``model.full_rank()`` (bit for bit the ``n_comps=None`` model of the
same training), the model trained with ``head_init="backbone"`` and its full-rank model; beside the backbone's
features as they are and standardized per section (the per-slide standardisation SPADE applies to its input).

Run ``python benchmarks/morphology_shift.py --out benchmarks/results`` (about 15 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import morphology
import quality

import spade_sd as sd
from spade_sd.model.standardization import FeatureScaler
from spade_sd.model.subspace import UNLIKE_TRAINING

log = logging.getLogger("morphology_shift")

SHIFTS = ("none", "stain", "scanner", "stain+scanner")
STAIN = (0.75, 1.25, 1.0)  # hematoxylin, eosin, DAB optical density factors
MODELS = {"default": {}, "head_init=backbone": {"head_init": "backbone"}}


def _restained(block: np.ndarray) -> np.ndarray:
    """A ``(c, y, x)`` uint8 RGB block with its H, E and D optical densities scaled by ``STAIN``."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(np.moveaxis(block, 0, -1)) * np.asarray(STAIN)
    rgb = np.clip(hed2rgb(hed), 0, 1) * 255
    return np.moveaxis(np.round(rgb).astype(np.uint8), -1, 0)


def shifted(sdata, shift: str):
    """A copy of a one-image section whose H&E is imaged differently (``SHIFTS``); its table is a copy too."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence, get_transformation

    (key,) = sdata.images
    levels = [next(iter(sdata.images[key][scale].values())) for scale in sdata.images[key]]
    coarser = "scanner" in shift
    level = levels[1] if coarser else levels[0]
    pixels = level.data
    if "stain" in shift:
        pixels = da.map_blocks(_restained, pixels.rechunk({0: 3}), dtype=np.uint8)
    transformations = get_transformation(sdata.images[key], get_all=True)
    if coarser:
        half = Scale([2.0, 2.0], axes=("y", "x"))
        transformations = {cs: Sequence([half, t]) for cs, t in transformations.items()}
    image = Image2DModel.parse(
        pixels,
        dims=("c", "y", "x"),
        c_coords=list(level.coords["c"].values),
        scale_factors=[2] * (len(levels) - 1 - int(coarser)),
        transformations=transformations,
        chunks=(3, 1024, 1024),
    )
    return SpatialData(images={key: image}, shapes=dict(sdata.shapes), tables={"table": sdata.tables["table"].copy()})


def _shifted_section(section: quality.Section, shift: str, patch: dict) -> quality.Section:
    """``section`` imaged as ``shift``, with its backbone features; the same spots must have a patch."""
    copy = quality.Section(section.name, shifted(section.sdata, shift), patch)
    if not np.array_equal(copy.rows, section.rows):
        raise RuntimeError(f"{section.name} ({shift}): other spots have a patch than unshifted")
    return copy


def run_dataset(
    dataset: str, *, patch: dict, seeds: list[int], n_repeats: int, train_shift: str = "none"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every fold of ``dataset``: train on the other sections (imaged as ``train_shift``), embed every shift."""
    sections, Y, section, genes = quality.load(dataset, patch)
    labels = morphology.image_labels(sections, Y, section)
    splits = np.cumsum([s.rows.sum() for s in sections])[:-1]
    imaged = {s.name: s if train_shift == "none" else _shifted_section(s, train_shift, patch) for s in sections}
    frames, shares = [], []
    for held_out in sections:
        copies = {shift: _shifted_section(held_out, shift, patch) for shift in SHIFTS if shift != "none"}
        copies["none"] = held_out
        train = [imaged[s.name] for s in sections if s is not held_out]

        def rows(key: str, target, held_out=held_out) -> np.ndarray:
            return np.concatenate([target.rep(key) if s is held_out else imaged[s.name].rep(key) for s in sections])

        def scores(variant: str, shift: str, X: np.ndarray, seed: int, held_out=held_out) -> list[pd.DataFrame]:
            name = f"{variant} | {shift}"
            frames = morphology.label_scores(name, X[section == held_out.name], labels[held_out.name], "", n_repeats)
            probe = quality.held_out_probe(
                X, Y, section, held_out.name, alpha="hest", genes=genes, label=name, seed=seed
            )
            frames.append(probe.assign(metric="HEST probe"))
            return [f.assign(variant=variant, shift=shift, seed=seed, fold=held_out.name) for f in frames]

        for shift in SHIFTS:
            X = rows("X_backbone", copies[shift])
            frames += scores("backbone", shift, X, 0)
            X = np.concatenate([FeatureScaler().fit(part).transform(part) for part in np.split(X, splits)])
            frames += scores("backbone, per slide", shift, X, 0)
        for seed in seeds:
            for model_name, kwargs in MODELS.items():
                model = sd.tl.pretrain([s.sdata for s in train], quiet=True, seed=seed, **patch, **kwargs)
                full = model.full_rank()
                for s in train:
                    sd.tl.embed(s.sdata, model, genes=None)
                    sd.tl.embed(s.sdata, full, genes=None, key_added="X_full")
                for shift in SHIFTS:
                    target = copies[shift]
                    sd.tl.embed(target.sdata, model, genes=None)
                    report = target.table.uns["spade"]["subspace"]
                    ratio = report["kept_variance"] / report["training_kept_variance"]
                    shares.append(
                        {"fold": held_out.name, "seed": seed, "model": model_name, "shift": shift, "ratio": ratio}
                    )
                    sd.tl.embed(target.sdata, full, genes=None, key_added="X_full")
                    frames += scores(model_name, shift, rows("X_spade", target), seed)
                    frames += scores(f"{model_name}, full rank", shift, rows("X_full", target), seed)
            log.info("%s: fold %s seed %d done", dataset, held_out.name, seed)
    df = pd.concat(frames, ignore_index=True).assign(dataset=dataset)
    return df, pd.DataFrame(shares).assign(dataset=dataset)


def table(df: pd.DataFrame, shares: pd.DataFrame) -> pd.DataFrame:
    """(variant, shift) rows of H&E labels @10, HEST probe and subspace share ratio: mean ± std over folds (and draws).

    Labels: the three labels averaged per fold, draw and seed, then seeds averaged per fold and draw; probe: the mean
    Pearson r over genes per fold and seed, seeds averaged per fold.
    """
    labels = df[df["task"] == "morphology"]
    labels = labels[labels["k"] == 10].groupby(["variant", "shift", "fold", "repeat", "seed"])["value"].mean()
    labels = labels.groupby(["variant", "shift", "fold", "repeat"]).mean()
    probe = df[df["metric"] == "HEST probe"].groupby(["variant", "shift", "fold", "seed"])["value"].mean()
    probe = probe.groupby(["variant", "shift", "fold"]).mean()
    ratio = shares.groupby(["model", "shift", "fold"])["ratio"].mean().rename_axis(["variant", "shift", "fold"])
    cells = {}
    for column, values in (("H&E labels @10", labels), ("HEST probe", probe), ("kept share / training", ratio)):
        stats = values.groupby(["variant", "shift"]).agg(["mean", "std"])
        cells[column] = stats.apply(lambda r: f"{r['mean']:.3f} ± {r['std']:.3f}", axis=1)
    out = pd.DataFrame(cells)
    index = [(v, s) for v in dict.fromkeys(df["variant"]) for s in SHIFTS if (v, s) in out.index]
    out = out.reindex(index).fillna("–")
    out.insert(0, "held-out imaging", [s for _, s in index])
    return out.set_axis([v for v, _ in index])


def report(df: pd.DataFrame, shares: pd.DataFrame, config: dict) -> str:
    """The markdown summary of a run."""
    lines = [
        f"# Held-out section imaged differently ({config['tag']})",
        "",
        "Leave one section out; the training sections are imaged as `train_shift`, the held-out section is "
        "embedded from copies of its H&E imaged every way (`benchmarks/morphology_shift.py`: `stain` restained, "
        "`scanner` at half the resolution). H&E labels: the three image labels of the unshifted H&E at 10 per class "
        "(chance 0.333); HEST probe: fitted on the training sections' embeddings, tested on the held-out copy; kept "
        "share: the subspace's share of the section's variance over the training share (`tl.embed` warns below "
        f"{UNLIKE_TRAINING}). Mean ± std over folds (× draws for the labels), seeds averaged. Config: "
        f"`{json.dumps(config)}`",
        "",
    ]
    for dataset, part in df.groupby("dataset", sort=False):
        shown = table(part, shares[shares["dataset"] == dataset])
        lines += [f"## {dataset}", "", quality._markdown(shown, "variant"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--datasets", nargs="+", default=["her2st", "mob"], choices=["her2st", "mob"])
    parser.add_argument("--tag", default="shift", help="results are written as morphology_<tag>.{csv.gz,json,md}")
    quality.add_patch_arguments(parser, size_um=200.0)
    parser.add_argument(
        "--train-shift",
        default="none",
        choices=SHIFTS,
        help="how the training sections are imaged (default as they are)",
    )
    parser.add_argument("--label-repeats", type=int, default=10, help="draws of the few-shot tasks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SPADE training seeds")
    args = parser.parse_args(argv)
    patch = quality.start_run(args, package_level=logging.ERROR)  # tl.embed's subspace warning is measured here
    start = time.perf_counter()
    results = [
        run_dataset(d, patch=patch, seeds=args.seeds, n_repeats=args.label_repeats, train_shift=args.train_shift)
        for d in args.datasets
    ]
    df = pd.concat([r[0] for r in results], ignore_index=True)
    shares = pd.concat([r[1] for r in results], ignore_index=True)
    config = {**vars(args), "out": str(args.out), "stain": STAIN, "total_s": time.perf_counter() - start}
    quality.write_raw(
        df.assign(encoder=df["variant"] + " | " + df["shift"]), args.out, f"morphology_{args.tag}", config
    )
    shares.to_csv(args.out / f"morphology_{args.tag}_shares.csv.gz", index=False)
    text = report(df, shares, config)
    (args.out / f"morphology_{args.tag}.md").write_text(text)
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
