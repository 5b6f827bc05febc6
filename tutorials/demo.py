"""spade_sd demo: ST-informed H&E embeddings on real sections.

Pretrains one SPADE model on the her2st breast cancer sections C2–C5 (human gene symbols) and one on the mouse
olfactory bulb sections MOB1–3 (mouse Ensembl ids) — the two species share no gene names, so each data set gets
its own model — then embeds every spot, clusters the embedding with Leiden, and writes figures, the models and
the SpatialData objects to the output folder, with a short summary.

Run with ``python tutorials/demo.py --out demo_output`` (data from ``SPADE_SD_DATA_DIR`` or downloaded).
``--quick`` runs the same pipeline on a smaller workload — her2st C2–C3 and MOB1–2, at most 3 epochs — to check
the demo's code path in a few minutes (as CI does); its numbers are not the demo's results.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import scanpy as sc
from sklearn.metrics import adjusted_rand_score

import spade_sd as sd
from spade_sd.metrics import expression_domains, gene_to_image_recall

DATASETS = {
    "her2st": (sd.datasets.her2st, ["C2", "C3", "C4", "C5"]),
    "mouse_olfactory_bulb": (sd.datasets.mouse_olfactory_bulb, ["MOB1", "MOB2", "MOB3"]),
}
# --quick: the same pipeline on fewer sections and epochs, a check of the code path rather than a result
QUICK_SECTIONS = {"her2st": ["C2", "C3"], "mouse_olfactory_bulb": ["MOB1", "MOB2"]}
QUICK_MAX_EPOCHS = 3


def run(name: str, out: Path, seed: int, quick: bool = False) -> dict:
    """Pretrain on one data set's sections, embed and cluster them, write outputs and return a summary."""
    loader, sections = DATASETS[name]
    training = {}
    if quick:
        sections = QUICK_SECTIONS[name]
        training["max_epochs"] = QUICK_MAX_EPOCHS
    start = time.perf_counter()
    slides = [loader(section) for section in sections]
    model = sd.tl.pretrain(slides, n_experts=4, seed=seed, quiet=True, **training)
    model.save(out / f"{name}_model", overwrite=True)
    summary = {"model": repr(model), "epochs": model.history.get("epochs"), "slides": {}}
    for section, sdata in zip(sections, slides, strict=True):
        sd.tl.embed(sdata, model)
        table = sdata.tables["table"]
        sc.pp.neighbors(table, use_rep="X_spade", random_state=seed)
        sc.tl.leiden(
            table, key_added="spade_leiden", resolution=0.5, random_state=seed, flavor="igraph", n_iterations=2
        )
        sc.tl.umap(table, random_state=seed)
        expression = model.panel.transform(table)
        domains = expression_domains(expression, seed=seed)
        # the heads' image side, which the gene side is aligned with (X_spade is the backbone next to a read-out)
        recall = gene_to_image_recall(table.obsm["X_spade_gene"], table.obsm["X_spade_expr"], ks=(5,))
        fig = sd.pl.experts(sdata, umap=True, return_fig=True)
        fig.savefig(out / f"{name}_{section}_experts.png", dpi=110)
        fig = sd.pl.experts(sdata, color="spade_leiden", return_fig=True)
        fig.savefig(out / f"{name}_{section}_leiden.png", dpi=110)
        plt.close("all")
        sdata.write(out / f"{name}_{section}.zarr", overwrite=True)
        validating = set(model.history.get("val_slides") or [])
        if validating == set(sections):  # few slides: a spatial block of every slide validates
            role = "training, with a spatial block held out for validation"
        else:
            role = "validation: its spots trained no head" if section in validating else "training"
        summary["slides"][section] = {
            "role": role,
            "spots": int(table.n_obs),
            "spots_per_expert": table.obs["spade_expert"].value_counts().sort_index().tolist(),
            "leiden_clusters": int(table.obs["spade_leiden"].nunique()),
            "ari_embedding_leiden_vs_expression_domains": round(
                float(adjusted_rand_score(domains, table.obs["spade_leiden"])), 3
            ),
            "gene_to_image_recall@5": round(float(recall.query("metric == 'recall@5'")["value"].mean()), 3),
            "chance@5": round(float(recall.query("metric == 'chance@5'")["value"].mean()), 3),
        }
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary


def main() -> None:
    """Run the demo on both data sets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smaller workload (her2st C2–C3, MOB1–2, at most {QUICK_MAX_EPOCHS} epochs): checks the code path in "
        "a few minutes; the numbers are not the demo's results",
    )
    args = parser.parse_args()
    matplotlib.use("Agg")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = {name: run(name, args.out, args.seed, quick=args.quick) for name in DATASETS}
    summary["quick"] = args.quick
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"Figures, models and SpatialData written to {args.out.resolve()}")


if __name__ == "__main__":
    main()
