"""SEAL fine-tuning (``tl.finetune``) at HEST-1k scale: prefix cache on disk, time per step and epoch, memory.

``tl.finetune`` computes the frozen prefix of every spot's patch once (a forward pass up to the first adapted
block, cached on disk), then trains the adapters and SEAL's heads on batches of cached prefixes. This benchmark
measures the second part at the issue's scale through the same internal path (:func:`~spade_sd.training.seal.
train_seal` on memory-mapped per-slide prefix files and the sparse expression, z-scored as it is read), with
synthetic values in place of real activations and counts, since 2.1 million real patches are not at hand:

- the prefix cache of ``--spots`` spots (4,096 per slide), float16 as ``sd.settings.feature_cache_dtype =
  "float16"`` writes it, in the shape the default backbone and SEAL configuration give; its pages are dropped from
  the page cache after writing, so training reads them from disk as a cold cohort would;
- the sparse expression over SEAL's 256-gene panel (``--density`` of the values non-zero);
- ``--steps`` training steps and ``--val-steps`` validation batches of one epoch (Lightning's
  ``limit_train_batches``/``limit_val_batches``), each step timed; the epoch's time is projected from the median
  step and the epoch's number of steps;
- the same steps with the prefixes of 8 slides held in memory (an array, no disk), the reading's share;
- peak resident memory, RssAnon and RssFile (a memory map's pages count as the process's until released).

The prefix pass itself (``benchmarks/finetune.py``'s ``prefix`` time per patch) is projected, not run: it needs
the patches of 2.1 million real spots.

Run ``python benchmarks/finetune_scale.py --workdir /tmp/ftbench`` (about 40 GB of disk at 2,097,152 spots,
removed afterwards); results go to ``benchmarks/results/finetune_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from scipy import sparse

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_scale import _MemorySampler, _peak_rss_mb, _rss_mb

RESULTS = Path(__file__).parent / "results"
SPOTS_PER_SLIDE = 4_096


class StepTimes(L.Callback):
    """The wall time of every training step and validation batch, and RSS after each step."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []
        self.rss: list[dict[str, int]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.train.append(time.perf_counter() - self._t)
        self.rss.append(_rss_mb())

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self._v = time.perf_counter()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append(time.perf_counter() - self._v)


def _write_prefixes(folder: Path, n_slides: int, shape: tuple[int, ...], seed: int) -> list[Path]:
    """One float16 ``.npy`` per slide, its pages then dropped from the page cache (a cold cohort)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((SPOTS_PER_SLIDE, *shape), dtype=np.float32).astype(np.float16)
    paths = []
    for s in range(n_slides):
        path = folder / f"slide{s:04d}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=base.shape)
        out[:] = base[rng.permutation(SPOTS_PER_SLIDE)]
        out[:, 0] += np.float16(s % 7)  # slides differ
        out.flush()
        del out
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        paths.append(path)
    return paths


def _expression(n_slides: int, n_genes: int, density: float, seed: int):
    from spade_sd.training.data import ExpressionRows

    rng = np.random.default_rng(seed)
    parts = (
        sparse.random(SPOTS_PER_SLIDE, n_genes, density=density, format="csr", random_state=rng, dtype=np.float32) * 4
        for _ in range(n_slides)
    )
    return ExpressionRows(parts)


def run(args: argparse.Namespace) -> dict:
    import spade_sd as sd
    from spade_sd.config import SealConfig
    from spade_sd.encoders.finetuned import FineTunedBackbone, PrefixEncoder
    from spade_sd.training.data import ZScoredRows
    from spade_sd.training.seal import train_seal, zscore_stats

    torch.set_num_threads(args.threads)
    config = SealConfig(max_epochs=1, seed=args.seed)
    n_slides = args.spots // SPOTS_PER_SLIDE
    n = n_slides * SPOTS_PER_SLIDE

    def tuned_backbone():
        return FineTunedBackbone(
            sd.Backbone(), n_blocks=config.n_blocks, rank=config.rank, alpha=config.alpha, seed=config.seed
        )

    shape = tuple(PrefixEncoder(tuned_backbone()).shape)
    sampler = _MemorySampler()
    sampler.start()
    rss_start = _rss_mb()
    folder = Path(tempfile.mkdtemp(prefix="spade_sd-finetune-scale-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        paths = _write_prefixes(folder, n_slides, shape, args.seed)
        written_s = time.perf_counter() - t0
        disk_gb = sum(p.stat().st_size for p in paths) / 1e9
        t0 = time.perf_counter()
        counts = _expression(n_slides, config.n_genes, args.density, args.seed)
        mean, std = zscore_stats(counts)
        expression = ZScoredRows(counts, mean, std)
        expression_s = time.perf_counter() - t0
        rss_data = _rss_mb()
        slide = np.repeat([f"slide{s:04d}" for s in range(n_slides)], SPOTS_PER_SLIDE)
        results = {}
        for where in ("disk", "memory"):
            sources = [np.load(p, mmap_mode="r") for p in paths]
            if where == "memory":  # the first 8 slides' prefixes held as arrays: no reading from disk
                held = [np.array(s) for s in sources[:8]]  # copies: no memory map under them
                sources = [held[s % 8] for s in range(n_slides)]
            times = StepTimes()
            trainer_kwargs = {
                "callbacks": [times],
                "limit_train_batches": args.steps,
                "limit_val_batches": args.val_steps,
            }
            sampler.enter(where)
            t0 = time.perf_counter()
            _, history = train_seal(
                tuned_backbone(), sources, expression, slide, config=config, trainer_kwargs=trainer_kwargs
            )
            seconds = time.perf_counter() - t0
            sampler.leave(where, seconds)
            steady = times.train[args.warmup :]
            n_train, n_val = history["train_spots"], history["val_spots"]
            step = statistics.median(steady)
            results[where] = {
                "steps": len(times.train),
                "step_s_median": round(step, 4),
                "step_s_first": [round(t, 3) for t in times.train[: args.warmup]],
                "step_s_p90": round(float(np.percentile(steady, 90)), 4),
                "val_batch_s_median": round(statistics.median(times.val), 4) if times.val else None,
                "seconds": round(seconds, 1),
                "train_spots": n_train,
                "val_spots": n_val,
                "steps_per_epoch": n_train // config.batch_size,
                "epoch_s_projected": round(n_train // config.batch_size * step, 1),
                "validation_s_projected": (
                    round(-(-n_val // config.batch_size) * statistics.median(times.val), 1) if times.val else None
                ),
                "precision": history["precision"],
                "rss_after_steps_mb": times.rss[-1] if times.rss else None,
                "peak_sampled_mb": sampler.phase_peak.get(where),
                "peak_kind_mb": sampler.phase_peak_kind.get(where),
            }
            print(f"{where}: {results[where]}", file=sys.stderr, flush=True)
        reading = results["disk"]["step_s_median"] / results["memory"]["step_s_median"]
    finally:
        for p in folder.glob("*.npy"):
            p.unlink()
        folder.rmdir()
    return {
        "n_spots": n,
        "slides": n_slides,
        "threads": args.threads,
        "batch_size": config.batch_size,
        "n_blocks": config.n_blocks,
        "n_genes": config.n_genes,
        "prefix_shape": list(shape),
        "prefix_cache_gb": {"float16": round(disk_gb, 1), "float32": round(2 * disk_gb, 1)},
        "prefix_kb_per_spot": {"float16": round(disk_gb * 1e6 / n, 1), "float32": round(2 * disk_gb * 1e6 / n, 1)},
        "prefix_write_s": round(written_s, 1),
        "expression_held_mb": round(counts.nbytes / 2**20, 1),
        "expression_dense_zscored_mb": round(n * config.n_genes * 4 / 2**20, 1),
        "expression_s": round(expression_s, 1),
        "rss_start_mb": rss_start,
        "rss_after_data_mb": rss_data,
        "runs": results,
        "disk_over_memory_step": round(reading, 2),
        "peak_rss_mb": _peak_rss_mb(),
        "peak_sampled_mb": sampler.peak,
    }


def _prefix_pass(result: dict) -> str:
    """The prefix pass over every spot, projected from ``finetune.json``'s measured time per batch of patches."""
    measured = RESULTS / "finetune.json"
    if not measured.is_file():
        return "not projected (run benchmarks/finetune.py first)"
    rows = json.loads(measured.read_text())["results"]
    row = next((r for r in rows if r["backbone"] == "efficientnet_lite0" and r["n_blocks"] == result["n_blocks"]), None)
    if row is None:
        return "not projected (finetune.json has no matching row)"
    per_patch = (row["prefix_pass_s"] + row["read_batch_s"]) / row["batch"]
    return (
        f"{result['n_spots'] * per_patch / 3600:.1f} h once on this machine, projected from `finetune.md` "
        f"({row['prefix_pass_s']:.3f} s to compute and {row['read_batch_s']:.3f} s to read {row['batch']} patches, "
        f"{row['batch'] / (row['prefix_pass_s'] + row['read_batch_s']):.0f} patches/s)"
    )


def _markdown(result: dict, args: argparse.Namespace, commit: str) -> str:
    disk, memory = result["runs"]["disk"], result["runs"]["memory"]
    hours = disk["epoch_s_projected"] / 3600
    lines = [
        "# SEAL fine-tuning at HEST-1k scale: prefix cache, step and epoch time, memory",
        "",
        f"`python {' '.join(result['command'])}` at commit `{commit}`: "
        f"{result['n_spots']:,} spots over {result['slides']} slides, the default backbone (EfficientNet-Lite0) and "
        f"SEAL configuration ({result['n_blocks']} adapted blocks, batch {result['batch_size']}, "
        f"{result['n_genes']} genes), {result['threads']} torch thread(s), synthetic float16 prefixes "
        f"{result['prefix_shape']} (pages dropped after writing: read cold) and sparse expression "
        f"({args.density:.0%} non-zero) through `train_seal`; {args.steps} training steps and {args.val_steps} "
        f"validation batches timed (median after {args.warmup}), the epoch projected from them.",
        "",
        "| prefixes read from | median step (s) | p90 step (s) | first steps (s) | steps per epoch | epoch, projected "
        "| validation, projected | peak RSS in the run (MB) | RssAnon / RssFile at it (MB) | precision |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for where, row in (("disk (memory maps)", disk), ("memory (8 slides' arrays)", memory)):
        kind = row["peak_kind_mb"] or {}
        lines.append(
            f"| {where} | {row['step_s_median']} | {row['step_s_p90']} | {row['step_s_first']} | "
            f"{row['steps_per_epoch']:,} | {row['epoch_s_projected'] / 60:,.0f} min | "
            f"{(row['validation_s_projected'] or 0) / 60:,.0f} min | {row['peak_sampled_mb']:,} | "
            f"{kind.get('RssAnon', '–'):,} / {kind.get('RssFile', '–'):,} | {row['precision']} |"
        )
    lines += [
        "",
        f"- **Prefix cache on disk:** {result['prefix_cache_gb']['float16']} GB in float16 "
        f"({result['prefix_kb_per_spot']['float16']} KB per spot; float32: {result['prefix_cache_gb']['float32']} "
        f"GB), written in {result['prefix_write_s']} s.",
        f"- **Prefix pass** (computing the cache from the patches): {_prefix_pass(result)}.",
        f"- **Epoch:** {hours:.1f} h projected on this machine ({disk['steps_per_epoch']:,} steps × "
        f"{disk['step_s_median']} s), reading the prefixes from disk {result['disk_over_memory_step']}× the step "
        "time with them in memory.",
        f"- **Expression:** held sparse, {result['expression_held_mb']:,} MB (z-scored dense it would be "
        f"{result['expression_dense_zscored_mb']:,} MB), z-scored a batch at a time.",
        f"- **Memory:** peak RSS {result['peak_rss_mb']:,} MB (high-water), sampled peak "
        f"{result['peak_sampled_mb']['VmRSS']:,} MB (RssAnon {result['peak_sampled_mb']['RssAnon']:,}, RssFile "
        f"{result['peak_sampled_mb']['RssFile']:,}); {result['rss_after_data_mb']['VmRSS']:,} MB before training.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spots", type=int, default=2_097_152)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the prefix files are written (default: the temp dir)")
    parser.add_argument("--out", default="finetune_scale")
    args = parser.parse_args()
    root = Path(__file__).parents[1]
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=root
    ).stdout.strip()
    result = {"command": sys.argv, "commit": commit, **run(args)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.out}.md").write_text(_markdown(result, args, commit))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
