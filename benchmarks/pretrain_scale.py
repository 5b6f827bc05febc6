"""Pretraining at HEST-1k scale on one machine: time per epoch, clustering time and peak memory against spots.

Synthetic cached features stand in for a cohort: ``--dim`` (1,280) float16 features on disk, read through a memory
map, around one centre per planted tissue type (8) plus a shift per slide and noise; sparse counts over ``--genes``
(2,000) genes, about 20 background counts per spot plus 40 marker genes of the spot's type. Slides hold
``--spots-per-slide`` spots each (one stage-1 group per slide, as ``tl.pretrain`` groups by default). Every size runs
in a fresh process (so its peak resident memory is its own) through :func:`spade_sd.training.fit.fit_model`, the
function under ``tl.pretrain`` that takes cached features and tables, with the default configuration and one epoch
(the generalist's, then the experts'), after the gene panel is fitted as ``tl.pretrain`` fits it.

Measured per size: every phase's time (panel, feature statistics, two-stage clustering, each training epoch and its
validation, the choice of experts that keep the generalist's heads, routing temperature and bases, reference bank),
peak resident memory (``getrusage``'s ``ru_maxrss``; sampled ``RssAnon``/``RssFile`` from ``/proc/self/status``)
before and after training, and the FLOPs of one training step (``torch.utils.flop_counter``), which project an
epoch's time on one GPU at an assumed peak. ``--before N`` measures the path as it was before the bounded-memory
work (the ``HEAD`` commit's ``src``, or ``--before-src``) on N spots of in-memory float32 features, and the current
path on the same N.

Run ``python benchmarks/pretrain_scale.py`` (sizes 131,072, 524,288 and 2,097,152 spots; add ``--sizes`` to choose;
``--append`` keeps the results file's earlier runs). Results go to ``benchmarks/results/pretrain_scale.{json,md}``.
``--mapped-pages`` measures only the file pages each way of reading a float16 memory map leaves resident
(``pretrain_scale_pages.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
N_TYPES = 8
BACKGROUND_COUNTS = 20
MARKERS_PER_TYPE = 40
# Assumed GPU peak for the projection: NVIDIA H100/H200 SXM dense bf16 tensor-core throughput (FLOP/s)
GPU_PEAK = 989e12
GPU_UTILIZATION = 0.3


class _MemorySampler(threading.Thread):
    """Peak RssAnon and RssFile of this process, sampled every 0.2 s, overall and within each phase that is running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self.phase_peak: dict[str, int] = {}
        # RssAnon and RssFile at each phase's sampled VmRSS peak: which kind of memory the peak is
        self.phase_peak_kind: dict[str, dict[str, int]] = {}
        # the process's peak so far (ru_maxrss) when each phase ends: catches what the 0.2 s samples miss
        self.peak_at_end: dict[str, int] = {}
        self.active: list[str] = []
        self.running = True

    def enter(self, phase: str) -> None:
        """Start counting ``phase``'s peak VmRSS (phases nest; a phase run twice keeps its highest peak)."""
        self.active.append(phase)
        self.sample()

    def leave(self, phase: str, seconds: float) -> None:
        self.sample()
        self.active.remove(phase)
        self.peak_at_end[phase] = _peak_rss_mb()
        print(f"PHASE {phase} {seconds:.1f} s, peak {self.phase_peak[phase]:,} MB", file=sys.stderr, flush=True)

    def run(self) -> None:
        while self.running:
            self.sample()
            time.sleep(0.2)

    def sample(self) -> None:
        now = _rss_mb()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now[key])
        for phase in list(self.active):
            if now["VmRSS"] > self.phase_peak.get(phase, 0):
                self.phase_peak[phase] = now["VmRSS"]
                self.phase_peak_kind[phase] = {"RssAnon": now["RssAnon"], "RssFile": now["RssFile"]}


def _peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _write_features(path: Path, sizes: list[int], dim: int, dtype: str, seed: int) -> list[np.ndarray]:
    """Every slide's features written to one .npy file (plain writes: no page of it mapped); the types per slide."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(N_TYPES, dim)).astype(np.float32)
    types = []
    with path.open("wb") as file:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(file, {**header, "shape": (sum(sizes), dim)})
        for n in sizes:
            kind = rng.integers(N_TYPES, size=n)
            shift = 0.3 * rng.normal(size=dim).astype(np.float32)
            noise = rng.standard_normal(size=(n, dim), dtype=np.float32)
            file.write((centres[kind] + shift + noise).astype(dtype).tobytes())
            types.append(kind)
    return types


def _tables(types: list[np.ndarray], n_genes: int, seed: int) -> list:
    """Sparse raw counts per slide: background counts on random genes plus the spot's type's marker genes."""
    from anndata import AnnData
    from scipy import sparse

    rng = np.random.default_rng(seed + 1)
    markers = rng.permutation(n_genes)[: N_TYPES * MARKERS_PER_TYPE].reshape(N_TYPES, MARKERS_PER_TYPE)
    genes = [f"gene{i}" for i in range(n_genes)]
    tables = []
    for s, kind in enumerate(types):
        n = len(kind)
        rows = np.repeat(np.arange(n), BACKGROUND_COUNTS + MARKERS_PER_TYPE)
        columns = np.concatenate([rng.integers(n_genes, size=(n, BACKGROUND_COUNTS)), markers[kind]], axis=1).ravel()
        values = np.concatenate(
            [np.ones((n, BACKGROUND_COUNTS)), rng.poisson(2.0, size=(n, MARKERS_PER_TYPE))], axis=1
        ).ravel()
        counts = sparse.csr_matrix((values.astype(np.float32), (rows, columns)), shape=(n, n_genes))
        counts.eliminate_zeros()
        table = AnnData(counts)
        table.var_names = genes
        table.obs_names = [f"s{s}_{i}" for i in range(n)]
        tables.append(table)
    return tables


def _step_flops(dim: int, n_genes: int, config) -> dict:
    """FLOPs of one training step (forward, backward) and of one validation batch, as torch counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from spade_sd.model.heads import ExpertMixture
    from spade_sd.training.losses import contrastive_loss

    mixture = ExpertMixture(1, dim, n_genes, out_dim=config.out_dim, dropout=config.dropout)
    x, y = torch.randn(config.batch_size, dim), torch.randn(config.batch_size, n_genes)

    def loss() -> torch.Tensor:
        image, gene = mixture.expert_embeddings(x, y, 0)
        return contrastive_loss(image, gene, loss=config.loss, logit_scale=mixture.logit_scale)

    with FlopCounterMode(display=False) as train:
        loss().backward()
    with FlopCounterMode(display=False) as validation, torch.no_grad():
        loss()
    return {"train_step": train.get_total_flops(), "val_batch": validation.get_total_flops()}


def worker(n: int, args: argparse.Namespace) -> dict:
    """Generate ``n`` spots, train one epoch through fit_model, return the measurements."""
    sampler = _MemorySampler()
    sampler.start()
    import lightning as L
    import torch
    from threadpoolctl import threadpool_limits

    # one thread for BLAS, OpenMP (k-means) and torch: on a shared CPU, threads that spin-wait for each other made
    # k-means ten times slower than one thread
    threadpool_limits(args.threads)
    torch.set_num_threads(args.threads)

    import spade_sd.training.experts as experts
    import spade_sd.training.fit as fit
    from spade_sd.config import ClusteringConfig, PanelConfig, SpadeConfig, TrainingConfig

    start = time.perf_counter()
    sizes = [args.spots_per_slide] * (n // args.spots_per_slide) + (
        [n % args.spots_per_slide] if n % args.spots_per_slide else []
    )
    folder = Path(tempfile.mkdtemp(prefix="spade_sd-scale-", dir=args.workdir))
    path = folder / "features.npy"
    dtype = "float32" if args.mode == "before" else args.dtype
    types = _write_features(path, sizes, args.dim, dtype, args.seed)
    tables = _tables(types, args.genes, args.seed)
    on_disk = np.load(path, mmap_mode="r")
    offsets = np.cumsum([0, *sizes])
    features = [on_disk[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    if args.mode != "scalable":  # tl.pretrain's features as extract_features returns them: float32, in memory
        features = [np.array(f, dtype=np.float32) for f in features]
    names = [f"s{s}" for s in range(len(sizes))]
    groups = [np.full(len(f), name) for f, name in zip(features, names, strict=True)]
    generated_s = time.perf_counter() - start
    sampler.sample()
    rss_data = {"ru_maxrss_mb": _peak_rss_mb(), **sampler.peak}

    timings: dict[str, float | list[float]] = {}

    def timed(module, name: str, key: str) -> None:
        original = getattr(module, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            sampler.enter(key)
            try:
                return original(*a, **k)
            finally:
                elapsed = time.perf_counter() - t0
                sampler.leave(key, elapsed)
                timings[key] = timings[key] + [elapsed] if isinstance(timings.get(key), list) else elapsed

        setattr(module, name, wrapper)

    for module, name, key in (
        (fit, "_panel_expression", "expression_s"),
        (fit, "_streamed", "feature_statistics_s"),
        (fit, "_pooled", "feature_statistics_s"),
        (fit, "fit_experts", "clustering_s"),
        (fit, "two_stage_kmeans", "clustering_s"),
        (fit, "default_tau", "routing_tau_s"),
        (fit, "_with_subspace", "subspaces_s"),
        (fit, "reference_bank", "reference_bank_s"),
        (experts, "_keep_generalist_where_better", "expert_choice_s"),
        (experts.ExpertMixture, "start_at_components", "heads_start_s"),
    ):
        if hasattr(module, name):
            timed(module, name, key)

    class EpochTimes(L.Callback):
        def __init__(self) -> None:
            self.train, self.validation = [], []

        def on_train_epoch_start(self, trainer, module) -> None:
            self._t = time.perf_counter()
            sampler.enter("train_epoch")

        def on_train_epoch_end(self, trainer, module) -> None:
            self.train.append(time.perf_counter() - self._t)
            sampler.leave("train_epoch", self.train[-1])

        def on_validation_epoch_start(self, trainer, module) -> None:
            self._v = time.perf_counter()
            sampler.enter("validation")

        def on_validation_epoch_end(self, trainer, module) -> None:
            self.validation.append(time.perf_counter() - self._v)
            sampler.leave("validation", self.validation[-1])

    held: dict[str, float] = {}
    panel_expression = fit._panel_expression

    def measured_expression(*a, **k):
        panel, expression = panel_expression(*a, **k)
        held["mb"] = round(getattr(expression, "nbytes", 0) / 2**20, 1)
        return panel, expression

    fit._panel_expression = measured_expression
    epochs = EpochTimes()
    config = SpadeConfig(
        clustering=ClusteringConfig(),
        training=TrainingConfig(max_epochs=args.epochs),
    )
    t0 = time.perf_counter()
    sampler.enter("panel_s")
    panel = fit.fit_panel(tables, PanelConfig())
    timings["panel_s"] = time.perf_counter() - t0
    sampler.leave("panel_s", timings["panel_s"])
    trainer_kwargs = {"callbacks": [epochs]} | ({"precision": args.precision} if args.precision else {})
    options = {"config": config, "panel": panel, "quiet": True, "trainer_kwargs": trainer_kwargs}
    if args.mode != "before":
        options["scalable"] = args.mode == "scalable"
    t0 = time.perf_counter()
    model = fit.fit_model(features, tables, names, groups, None, **options)
    fit_s = time.perf_counter() - t0
    sampler.sample()
    sampler.running = False
    flops = _step_flops(args.dim, len(panel), config.training)
    n_val = sum(model.history["val_spots_per_expert"])
    n_train = sum(model.history["train_spots_per_expert"])
    steps = n_train // config.training.batch_size
    val_batches = n_val // config.training.batch_size
    epoch_flops = steps * flops["train_step"] + val_batches * flops["val_batch"]
    disk_gb = path.stat().st_size / 1e9
    for f in (path,):
        f.unlink()
    folder.rmdir()
    return {
        "n_spots": n,
        "mode": args.mode,
        "precision": args.precision or "default",
        "slides": len(sizes),
        "features_dtype": dtype,
        "features_on_disk_gb": round(disk_gb, 2),
        "fine_centroids": int(model.clustering.n_fine),
        "experts": int(model.clustering.n_experts),
        "train_spots": n_train,
        "val_spots": n_val,
        "data_generation_s": round(generated_s, 1),
        "fit_model_s": round(fit_s, 1),
        "train_epoch_s": [round(t, 1) for t in epochs.train],
        "validation_epoch_s": [round(t, 1) for t in epochs.validation],
        "timings_s": {k: [round(x, 1) for x in v] if isinstance(v, list) else round(v, 1) for k, v in timings.items()},
        "rss_after_data_mb": rss_data,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_sampled_mb": sampler.peak,
        "phase_peak_rss_mb": sampler.phase_peak,
        "phase_peak_anon_file_mb": sampler.phase_peak_kind,
        "peak_rss_at_phase_end_mb": sampler.peak_at_end,
        "flops": {
            **flops,
            "epoch": epoch_flops,
            "gpu_epoch_s_projected": epoch_flops / (GPU_PEAK * GPU_UTILIZATION),
        },
        "experts_from_generalist": model.history.get("experts_from_generalist"),
        "expression_held_mb": held.get("mb"),
    }


def _rss_mb() -> dict[str, int]:
    with Path("/proc/self/status").open() as status:
        return {
            line.split(":")[0]: int(line.split()[1]) // 1024 for line in status if line.startswith(("Rss", "VmRSS"))
        }


def mapped_pages(args: argparse.Namespace) -> dict:
    """Resident file pages (RssFile) a read of a float16 memory map leaves mapped, by how it reads, in one process."""
    from spade_sd.model.readout import slide_variance
    from spade_sd.training.data import StandardizedRows, release_pages

    n = 32 * args.spots_per_slide
    folder = Path(tempfile.mkdtemp(prefix="spade_sd-pages-", dir=args.workdir))
    path = folder / "features.npy"
    _write_features(path, [args.spots_per_slide] * 32, args.dim, "float16", args.seed)
    mapped = np.load(path, mmap_mode="r")
    views = [mapped[a : a + args.spots_per_slide] for a in range(0, n, args.spots_per_slide)]
    drawn = np.sort(np.random.default_rng(args.seed).permutation(n)[:32_768])
    reads = {
        "every slide whole (slide_variance)": lambda: slide_variance(views),
        "32,768 scattered rows, plain fancy indexing": lambda: np.asarray(mapped[drawn]),
        "32,768 scattered rows through StandardizedRows": lambda: StandardizedRows(views)[drawn],
    }
    results = {"file_mb": path.stat().st_size >> 20, "rssfile_mb_added": {}}
    for name, read in reads.items():
        release_pages(mapped)
        before = _rss_mb()["RssFile"]
        read()
        results["rssfile_mb_added"][name] = _rss_mb()["RssFile"] - before
    path.unlink()
    folder.rmdir()
    return results


def _before_src(args: argparse.Namespace) -> Path:
    if args.before_src:
        return Path(args.before_src)
    folder = Path(tempfile.mkdtemp(prefix="spade_sd-before-"))
    archive = subprocess.run(
        ["git", "archive", "HEAD", "src"], capture_output=True, check=True, cwd=Path(__file__).parents[1]
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder / "src"


def _markdown(runs: list[dict], args: argparse.Namespace, commit: str) -> str:
    lines = [
        "# Pretraining at scale: time per epoch, clustering and peak memory",
        "",
        f"`python benchmarks/pretrain_scale.py {' '.join(sys.argv[1:])}` at commit `{commit}`; one process per row, "
        f"2-core CPU shared with other work, {args.threads} thread(s), {args.dim}-d synthetic features ({args.spots_per_slide} spots per slide, one stage-1 "
        f"group per slide), sparse counts over {args.genes} genes, default configuration, {args.epochs} epoch "
        "(generalist, then experts). `before`: the path before the bounded-memory work (HEAD's src), float32 "
        "features in memory; `in-memory`: this path below its threshold, float32 features in memory (from the float16 "
        "file); `scalable`: the bounded-memory path, float16 features through a memory map. "
        f"GPU projection: the epoch's FLOPs at {GPU_UTILIZATION:.0%} of {GPU_PEAK / 1e12:.0f} TFLOP/s (H100/H200 dense "
        "bf16); with 128-spot batches a step is launch-bound on a GPU, so this is a lower bound.",
        "",
        "| spots | path | commit | slides | fine centroids | clustering (s) | epoch: generalist / experts (s) | validation (s) "
        "| choice of experts (s) | bank (s) | fit_model (s) | peak RSS (MB) | RSS with data only (MB) | RssAnon / RssFile "
        "peak (MB) | GPU epoch, projected (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        t = r["timings_s"]
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(
            f"| {r['n_spots']:,} | {r['mode']}{note} | `{r.get('commit') or commit}` | {r['slides']} | {r['fine_centroids']} | {t.get('clustering_s')} | "
            f"{' / '.join(map(str, r['train_epoch_s']))} | {' / '.join(map(str, r['validation_epoch_s']))} | "
            f"{t.get('expert_choice_s')} | {t.get('reference_bank_s')} | {r['fit_model_s']} | {r['peak_rss_mb']:,} | "
            f"{r['rss_after_data_mb']['ru_maxrss_mb']:,} | {r['peak_sampled_mb']['RssAnon']:,} / "
            f"{r['peak_sampled_mb']['RssFile']:,} | {r['flops']['gpu_epoch_s_projected']:.3f} |"
        )
    lines += ["", "Every phase's time, per run:", ""]
    lines += [f"- {r['n_spots']:,} {r['mode']}: {json.dumps(r['timings_s'])}" for r in runs]
    phased = [r for r in runs if r.get("phase_peak_rss_mb")]
    lines += (
        ["", "Peak resident memory (VmRSS, sampled every 0.2 s) within each phase, per run (MB):", ""] if phased else []
    )
    lines += [f"- {r['n_spots']:,} {r['mode']}: {json.dumps(r['phase_peak_rss_mb'])}" for r in phased]
    kinds = [r for r in runs if r.get("phase_peak_anon_file_mb")]
    lines += ["", "RssAnon / RssFile at each phase's sampled peak, per run (MB):", ""] if kinds else []
    lines += [f"- {r['n_spots']:,} {r['mode']}: {json.dumps(r['phase_peak_anon_file_mb'])}" for r in kinds]
    ended = [r for r in runs if r.get("peak_rss_at_phase_end_mb")]
    lines += ["", "The process's peak so far (ru_maxrss) as each phase ended, per run (MB):", ""] if ended else []
    lines += [f"- {r['n_spots']:,} {r['mode']}: {json.dumps(r['peak_rss_at_phase_end_mb'])}" for r in ended]
    held = [r for r in runs if r.get("expression_held_mb") is not None]
    lines += ["", "Expression over the panel as held in training (MB):", ""] if held else []
    lines += [f"- {r['n_spots']:,} {r['mode']}: {r['expression_held_mb']}" for r in held]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[131_072, 524_288, 2_097_152])
    parser.add_argument("--before", type=int, nargs="*", default=[32_768], help="sizes for before/after")
    parser.add_argument("--before-src", help="src folder of the path before (default: HEAD's)")
    parser.add_argument("--spots-per-slide", type=int, default=4_096)
    parser.add_argument("--dim", type=int, default=1_280)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="BLAS, OpenMP and torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default=None, help="the experts' training precision (Trainer's precision=)")
    parser.add_argument("--workdir", default=None, help="where the features file is written (default: the temp dir)")
    parser.add_argument("--out", default="pretrain_scale")
    parser.add_argument(
        "--append", action="store_true", help="keep the results file's earlier runs (each with its commit) as history"
    )
    parser.add_argument(
        "--mapped-pages", action="store_true", help="only measure the file pages each way of reading leaves resident"
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--mode", default="scalable", choices=["scalable", "in-memory", "before"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.mapped_pages:
        pages = mapped_pages(args)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "pretrain_scale_pages.json").write_text(json.dumps({"command": sys.argv, **pages}, indent=1))
        rows = [f"| {name} | {mb:,} |" for name, mb in pages["rssfile_mb_added"].items()]
        (RESULTS / "pretrain_scale_pages.md").write_text(
            "# Memory-map pages left resident, by how the features are read\n\n"
            f"`python benchmarks/pretrain_scale.py {' '.join(sys.argv[1:])}`: a {pages['file_mb']} MB float16 "
            "features file (32 slides) read through a memory map, pages released before each read; RssFile added.\n\n"
            "| read | RssFile added (MB) |\n|---|---|\n" + "\n".join(rows) + "\n"
        )
        print(json.dumps(pages))
        return
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return
    root = Path(__file__).parents[1]
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=root
    ).stdout.strip()
    plan = [(n, mode) for n in args.before for mode in ("before", "in-memory", "scalable")]
    plan += [(n, "scalable") for n in args.sizes]
    earlier = RESULTS / f"{args.out}.json"
    runs = []
    if args.append and earlier.is_file():
        previous = json.loads(earlier.read_text())
        runs = [{"commit": previous.get("commit"), **run} for run in previous["runs"]]
    for n, mode in plan:
        env = dict(os.environ)
        if mode == "before":
            env["PYTHONPATH"] = str(_before_src(args))
        command = [sys.executable, __file__, "--worker", str(n), "--mode", mode]
        for name in ("spots_per_slide", "dim", "genes", "dtype", "epochs", "threads", "seed", "workdir", "precision"):
            if getattr(args, name) is not None:
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        print(f"{n:,} spots, {mode} ...", flush=True)
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)  # phases go to stderr as they end
        result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not result:
            print(done.stdout[-3000:], file=sys.stderr)
            raise SystemExit(f"The run on {n} spots ({mode}) failed.")
        runs.append({"commit": commit, **json.loads(result[0][len("RESULT ") :])})
        print(json.dumps(runs[-1]), flush=True)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.out}.json").write_text(
            json.dumps({"command": sys.argv, "commit": commit, "runs": runs}, indent=1)
        )
        (RESULTS / f"{args.out}.md").write_text(_markdown(runs, args, commit))


if __name__ == "__main__":
    main()
