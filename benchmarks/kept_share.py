"""How much of a slide's embedding variance the principal subspace keeps: within the training data set and across.

For every leave-one-section-out fold of MOB1–3 and her2st C2–C5, a default model is trained on the other sections
of the data set; ``sd.tl.embed`` then records the share of each section's embedding variance the model's subspace
keeps (``.uns['spade']['subspace']``) for the held-out section and for every section of the other data set, next
to the training spots' share saved with the model. ``tl.embed`` warns below ``UNLIKE_TRAINING`` (0.85) of the
training share; this run is where that threshold comes from. Run
``python benchmarks/kept_share.py --out benchmarks/results`` (about 3 min on 2 CPU cores, features cached).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality

import spade_sd as sd
from spade_sd.model.subspace import UNLIKE_TRAINING


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    quality.add_patch_arguments(parser, size_um=200.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="results are written as kept_share[_<tag>].{csv.gz,json,md}")
    args = parser.parse_args(argv)
    patch = quality.start_run(args, package_level=logging.ERROR)  # its warnings are measured here
    start = time.perf_counter()
    data = {name: quality.load(name, patch)[0] for name in ("mob", "her2st")}
    rows = []
    for dataset, sections in data.items():
        other = data["her2st" if dataset == "mob" else "mob"]
        for held_out in sections:
            model = sd.tl.pretrain(
                [s.sdata for s in sections if s is not held_out], quiet=True, seed=args.seed, **patch
            )
            for kind, targets in (("held out", [held_out]), ("other data set", other)):
                for target in targets:
                    sd.tl.embed(target.sdata, model, genes=None)
                    report = target.table.uns["spade"]["subspace"]
                    rows.append(
                        {
                            "trained on": dataset,
                            "fold": held_out.name,
                            "section": target.name,
                            "kind": kind,
                            "kept": report["kept_variance"],
                            "training kept": report["training_kept_variance"],
                        }
                    )
    df = pd.DataFrame(rows)
    df["ratio"] = df["kept"] / df["training kept"]
    df["warned"] = df["ratio"] < UNLIKE_TRAINING
    args.out.mkdir(parents=True, exist_ok=True)
    name = "kept_share" + (f"_{args.tag}" if args.tag else "")
    df.to_csv(args.out / f"{name}.csv.gz", index=False)  # compressed: results stay small in the repository
    summary = df.groupby(["trained on", "kind"]).agg(
        kept_min=("kept", "min"),
        kept_max=("kept", "max"),
        training_min=("training kept", "min"),
        training_max=("training kept", "max"),
        ratio_min=("ratio", "min"),
        ratio_max=("ratio", "max"),
        warned=("warned", "sum"),
        n=("warned", "size"),
    )
    config = {**vars(args), "out": str(args.out), "threshold": UNLIKE_TRAINING, "total_s": time.perf_counter() - start}
    (args.out / f"{name}.json").write_text(json.dumps(config, indent=1))
    table = summary.round(3).reset_index()
    text = "\n".join(
        [
            "# Share of a slide's embedding variance the principal subspace keeps",
            "",
            f"Default models (4 experts, n_comps=16, {args.size_um:g} µm patches), leave one section out within "
            "each data set; `kept` is the embedded section's share, `training` the training spots' share, `warned` "
            "the sections below "
            f"{UNLIKE_TRAINING} × the training share (`benchmarks/kept_share.py`). Config: `{json.dumps(config)}`",
            "",
            "| " + " | ".join(table.columns) + " |",
            "|" + "---|" * len(table.columns),
            *("| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)),
            "",
        ]
    )
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
