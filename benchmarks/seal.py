"""SEAL quality benchmark: does the fine-tuned encoder know more about expression on sections it never saw?

Leave one section out on the mouse olfactory bulb (MOB1–3) and on her2st (C2–C5), with several seeds. For each
held-out section the default backbone is fine-tuned with ``sd.tl.finetune`` on the other sections, and every
section is scored with the protocols of ``benchmarks/quality.py`` (``evaluate_fold``: HEST probe with fixed and
CV-tuned α, few-shot probe, kNN expression retrieval, gene → image recall, few-shot classification of expression
domains) for

- (a) ``backbone``: the original backbone's features;
- (b) ``seal backbone``: the fine-tuned backbone's features;
- (c) ``spade``: SPADE heads (``sd.tl.pretrain``, defaults) on (a);
- (d) ``spade on seal``: SPADE heads on (b);
- (e) ``seal embedding``: SEAL's own image embedding (the projection head over (b)); its gene side is the VAE's μ.

Run ``python benchmarks/seal.py --tag seal_main`` (results ``benchmarks/results/quality_<tag>.{md,csv,json}``);
``--seal key=value,...`` overrides ``sd.tl.finetune``'s defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import quality
import torch  # benchmarks/quality.py: sections, targets and the per-fold evaluation

import spade_sd as sd
from spade_sd.model.seal_heads import SealAlignment

log = logging.getLogger("seal")
ENCODERS = ("backbone", "seal backbone", "spade", "spade on seal", "seal embedding")


def _rep(sections, key: str) -> np.ndarray:
    return np.concatenate([s.rep(key) for s in sections])


def _seal_gene_side(alignment: SealAlignment, section) -> np.ndarray:
    """SEAL's expression embedding of a section; NaN where its table lacks panel genes (then it is not scored)."""
    table = section.table[section.rows]
    if not set(alignment.panel.genes) <= set(table.var_names):
        return np.full((table.n_obs, alignment.config.embed_dim), np.nan)
    return alignment.embed_expression(table)


def _fold(sections, s_out, seed: int, patch: dict, seal: dict) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Every fold-dependent representation (and gene side) of every section for one held-out section."""
    train = [s.sdata for s in sections if s is not s_out]
    start = time.perf_counter()
    tuned = sd.tl.finetune(train, seed=seed, quiet=True, **patch, **seal)
    alignment = SealAlignment.from_backbone(tuned)
    log.info(
        "%s seed %d: fine-tuned in %.0f s, history %s",
        s_out.name,
        seed,
        time.perf_counter() - start,
        {k: alignment.history[k] for k in ("epochs", "best_epoch", "best_loss")},
    )
    for s in sections:
        sd.tl.features(s.sdata, backbone=tuned, key_added="X_seal_backbone", **patch)
    tuned_X = _rep(sections, "X_seal_backbone")
    reps = {"seal backbone": (tuned_X, None)}
    gene = [_seal_gene_side(alignment, s) for s in sections]
    reps["seal embedding"] = (alignment.embed_images(tuned_X), np.concatenate(gene))
    for label, backbone in (("spade", None), ("spade on seal", tuned)):
        model = sd.tl.pretrain(train, backbone=backbone, seed=seed, quiet=True, **patch)
        for s in sections:
            s.table.obsm.pop("X_spade_gene", None)
            sd.tl.embed(s.sdata, model)
        # the gene side pairs with the heads' image side (X_spade is the backbone's features next to the read-out)
        image = "X_spade" if model.readout is None else "X_spade_expr"
        reps[label] = (_rep(sections, image), np.concatenate([quality._gene_side(s, model) for s in sections]))
    return reps


def run(dataset: str, *, seeds: list[int], patch: dict, seal: dict, n_repeats: int, threads: int) -> pd.DataFrame:
    sections, Y, section, genes = quality.load(dataset, patch)
    torch.set_num_threads(threads)  # scanpy's HVG selection in load() resets torch to every core
    domains = {s.name: sd.metrics.expression_domains(Y[section == s.name], seed=0) for s in sections}
    X_backbone = _rep(sections, "X_backbone")
    frames, probes = [], {}
    options = {"n_repeats": n_repeats, "seed": 0}
    for s_out in sections:
        args = (Y, section, s_out.name, domains[s_out.name], genes)
        frames += quality.evaluate_fold("backbone", X_backbone, None, *args, probes=probes, **options)
        for seed in seeds:
            for label, (X, G) in _fold(sections, s_out, seed, patch, seal).items():
                frames += [f.assign(seed=seed) for f in quality.evaluate_fold(label, X, G, *args, **options)]
            log.info("%s: fold %s seed %d scored", dataset, s_out.name, seed)
    return pd.concat(frames, ignore_index=True).assign(dataset=dataset)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--datasets", nargs="+", default=list(quality.DATASETS), choices=list(quality.DATASETS))
    parser.add_argument("--tag", default="seal")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seal", default="", help="sd.tl.finetune overrides, e.g. lr=1e-3,max_epochs=20")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("spade_sd").setLevel(logging.WARNING)
    seal = quality.parse_variant(f"spade:{args.seal}")[1]
    patch = {"size_um": 112.0, "size_px": 224}
    start = time.perf_counter()
    df = pd.concat(
        [
            run(d, seeds=args.seeds, patch=patch, seal=seal, n_repeats=args.repeats, threads=args.threads)
            for d in args.datasets
        ],
        ignore_index=True,
    )
    config = {**vars(args), "out": str(args.out), "seal": seal, "total_s": time.perf_counter() - start}
    table = quality.write(df, args.out, args.tag, config)
    print(quality._markdown(table))
    print(json.dumps({"total_s": round(time.perf_counter() - start)}))


if __name__ == "__main__":
    main()
