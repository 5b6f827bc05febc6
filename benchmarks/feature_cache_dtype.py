"""The feature cache in float32 against float16 (``sd.settings.feature_cache_dtype``) under ``tl.pretrain``.

The three mouse olfactory bulb sections (MOB1–3, real H&E and counts) are trained on with ``tl.pretrain`` forced onto
its bounded-memory path (``SCALE_SPOTS`` set to 1, so every slide's features are read from the cache as memory
maps), once per cache precision, with the default EfficientNet-Lite0 backbone (1,280-d; ``engine="onnxruntime"``,
float32, so no engine is chosen by measuring). Each precision's cache files are written first, in a process of
their own (the encoding time is reported apart); then every measured run is a fresh process (so its peak resident
memory is its own), the two precisions alternating, reading the cache.

Measured per run: the cache files' size on disk, ``tl.pretrain``'s time (wall, and CPU of the calling thread,
which does all of the work on one thread), the process's resident memory before it
(imports and the three sections loaded) and its peak (``getrusage``'s ``ru_maxrss``), and the peak of file-backed
resident memory (``RssFile``, where memory-mapped features count; sampled every 0.05 s). Downstream, between the
two precisions' models: each spot's cosine between their ``X_spade_expr`` (and ``X_spade``, over the columns both
have), the share of spots routed to the same expert, and leave-one-section-out kNN expression retrieval (mean
Pearson over the panel genes, :func:`spade_sd.metrics.knn_expression_cv`) on ``X_spade`` of each.

Run ``python benchmarks/feature_cache_dtype.py`` (``--max-epochs``, ``--repeats``); results go to
``benchmarks/results/feature_cache_dtype.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("MOB1", "MOB2", "MOB3")
DTYPES = ("float32", "float16")
# BLAS and OpenMP threads spinning on a shared machine made the CPU time of a run vary 2× between runs
ONE_THREAD = dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1")


class _FilePagesPeak(threading.Thread):
    """Peak ``RssFile`` (MB) of this process, sampled every 0.05 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _status_mb("RssFile"))
            time.sleep(0.05)


def _status_mb(key: str) -> int:
    with Path("/proc/self/status").open() as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith(f"{key}:"))


def _setup(dtype: str):
    """spade_sd on one thread (torch, BLAS and OpenMP), the cache in ``dtype``, the sections and the backbone."""
    import torch
    from threadpoolctl import threadpool_limits

    import spade_sd as sd

    torch.set_num_threads(1)
    threadpool_limits(1)  # and the libraries loaded later, by the environment _run gives: see ONE_THREAD
    sd.settings.n_jobs = 1
    sd.settings.progress = False
    sd.settings.verbosity = "warning"
    sd.settings.feature_cache_dtype = dtype
    sections = [sd.datasets.mouse_olfactory_bulb(name) for name in SECTIONS]
    return sd, sections, sd.Backbone(engine="onnxruntime")


def prepare(dtype: str) -> dict:
    """Write (or check) every section's cache file in ``dtype``; their paths and sizes, and the time it took."""
    sd, sections, backbone = _setup(dtype)
    from spade_sd.encoders.features import cache_key, mapped_features
    from spade_sd.spots.patches import resolve_patches

    start, files = time.perf_counter(), []
    for sdata in sections:
        patches = resolve_patches(sdata)[1]
        features = mapped_features(patches, backbone)
        path = sd.settings.cache_dir / "features" / f"{cache_key(patches, backbone)}.npy"
        files.append({"path": str(path), "bytes": path.stat().st_size, "shape": list(features.shape)})
        assert features.dtype == np.dtype(dtype), (features.dtype, dtype)
    return {"dtype": dtype, "files": files, "prepare_s": time.perf_counter() - start}


def measure(dtype: str, max_epochs: int, out: Path) -> dict:
    """One ``tl.pretrain`` on the bounded-memory path with the cache in ``dtype``; the embeddings saved to ``out``."""
    sampler = _FilePagesPeak()
    sampler.start()
    sd, sections, backbone = _setup(dtype)
    from spade_sd.tl import _pretrain

    _pretrain.SCALE_SPOTS = 1  # every run reads its features as memory maps of the cache
    rss_before = _status_mb("VmRSS")
    file_pages_before = sampler.peak
    start, cpu = time.perf_counter(), time.thread_time()
    model = sd.tl.pretrain(sections, backbone=backbone, max_epochs=max_epochs, seed=0, quiet=True)
    seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    sampler.running = False
    embedded = {}
    for name, sdata in zip(SECTIONS, sections, strict=True):
        sd.tl.embed(sdata, model)
        table = sdata.tables["table"]
        embedded[f"{name}/X_spade"] = table.obsm["X_spade"]
        embedded[f"{name}/X_spade_expr"] = table.obsm["X_spade_expr"]
        embedded[f"{name}/expert"] = table.obs["spade_expert"].astype(int).to_numpy()
        embedded[f"{name}/expression"] = model.panel.transform(table, layer=model.config.panel.layer)
    np.savez(out, **embedded)
    return {
        "dtype": dtype,
        "pretrain_s": seconds,
        "pretrain_cpu_s": cpu,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
        "rss_file_peak_mb": sampler.peak,
        "rss_file_before_mb": file_pages_before,
        "n_experts": model.n_experts,
        "epochs": model.history.get("epochs"),
        "n_spots": model.config.n_spots,
    }


def read_rows(prepared: list[dict], rounds: int = 7) -> dict:
    """Seconds to read every cached row once through ``StandardizedRows`` (in blocks, then in scattered batches).

    The part of ``tl.pretrain``'s time the cache's precision changes, timed apart from the rest (median of
    ``rounds``, the precisions alternating), as the runs above vary with the load on the machine.
    """
    from spade_sd.training.data import StandardizedRows

    maps = {p["dtype"]: [np.load(f["path"], mmap_mode="r") for f in p["files"]] for p in prepared}
    batches = np.random.default_rng(0).permutation(sum(len(f) for f in maps["float32"])).reshape(-1, 8)
    times: dict[str, dict[str, list[float]]] = {dtype: {"blocks": [], "batches": []} for dtype in maps}
    for _ in range(rounds):
        for dtype, features in maps.items():
            rows = StandardizedRows(features)
            start = time.perf_counter()
            for _ in rows.blocks():
                pass
            middle = time.perf_counter()
            for batch in batches:
                rows[batch]
            times[dtype]["blocks"].append(middle - start)
            times[dtype]["batches"].append(time.perf_counter() - middle)
    return {dtype: {way: float(np.median(t)) for way, t in ways.items()} for dtype, ways in times.items()}


def _run(arguments: list[str]) -> dict:
    command = [sys.executable, __file__, *arguments]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, **ONE_THREAD})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def downstream(paths: dict[str, Path]) -> dict:
    """How far the float16 model's embeddings lie from the float32 one's, and kNN retrieval on each."""
    from spade_sd.metrics import knn_expression_cv

    runs = {dtype: np.load(path) for dtype, path in paths.items()}
    joined = {
        dtype: {key: np.concatenate([run[f"{s}/{key}"] for s in SECTIONS]) for key in ("X_spade_expr", "expert")}
        for dtype, run in runs.items()
    }
    spade = {dtype: np.concatenate([run[f"{s}/X_spade"] for s in SECTIONS]) for dtype, run in runs.items()}
    width = min(x.shape[1] for x in spade.values())
    expression = np.concatenate([runs["float32"][f"{s}/expression"] for s in SECTIONS])
    slide = np.concatenate([np.full(len(runs["float32"][f"{s}/expert"]), s) for s in SECTIONS])
    knn = {
        dtype: float(knn_expression_cv(x, expression, slide, label=dtype)["value"].mean()) for dtype, x in spade.items()
    }
    expr_cos = _cosine(joined["float16"]["X_spade_expr"], joined["float32"]["X_spade_expr"])
    spade_cos = _cosine(spade["float16"][:, :width], spade["float32"][:, :width])
    return {
        "X_spade_expr_one_minus_cosine": {"median": float(np.median(1 - expr_cos)), "max": float((1 - expr_cos).max())},
        "X_spade_one_minus_cosine": {"median": float(np.median(1 - spade_cos)), "max": float((1 - spade_cos).max())},
        "X_spade_widths": {dtype: int(x.shape[1]) for dtype, x in spade.items()},
        "same_expert": float(np.mean(joined["float16"]["expert"] == joined["float32"]["expert"])),
        "knn_mean_pearson": knn,
    }


def _table(result: dict) -> str:
    rows = result["runs"]
    disk = {p["dtype"]: sum(f["bytes"] for f in p["files"]) for p in result["prepared"]}
    lines = [
        "| cache | repeat | disk (MB) | tl.pretrain (s) | its CPU time, main thread (s) | RSS before (MB) | peak RSS (MB) "
        "| peak − before (MB) | RssFile peak (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in rows:
        lines.append(
            f"| {run['dtype']} | {run['repeat']} | {disk[run['dtype']] / 2**20:.2f} | {run['pretrain_s']:.1f} "
            f"| {run['pretrain_cpu_s']:.1f} "
            f"| {run['rss_before_mb']:,} | {run['peak_rss_mb']:,} | {run['peak_rss_mb'] - run['rss_before_mb']:,} "
            f"| {run['rss_file_peak_mb']:,} |"
        )
    return "\n".join(lines)


def _medians(result: dict) -> dict:
    out = {}
    for dtype in DTYPES:
        runs = [r for r in result["runs"] if r["dtype"] == dtype]
        out[dtype] = {
            key: float(np.median([r[key] for r in runs]))
            for key in ("pretrain_s", "pretrain_cpu_s", "peak_rss_mb", "rss_before_mb", "rss_file_peak_mb")
        }
        out[dtype]["disk_bytes"] = sum(
            f["bytes"] for p in result["prepared"] if p["dtype"] == dtype for f in p["files"]
        )
    ratios = {key: out["float16"][key] / out["float32"][key] for key in out["float32"]}
    return {"medians": out, "float16_over_float32": ratios}


def write(result: dict, command: str) -> None:
    summary = result["summary"]
    ratio, down = summary["float16_over_float32"], result["downstream"]
    medians, reads = summary["medians"], result["read_rows_s"]
    text = f"""# Feature cache: float32 against float16 under tl.pretrain's bounded-memory path

`{command}` at commit `{result["commit"]}`; {result["machine"]}, load average {result["load_average"]} at the
start (a 2-core machine shared with other work: compare rows within this table). MOB1–3
({result["runs"][0]["n_spots"]:,} spots), EfficientNet-Lite0 features (1,280-d, `engine="onnxruntime"`),
`tl.pretrain(max_epochs={result["max_epochs"]}, seed=0)` with `SCALE_SPOTS` set to 1, so that every slide's features
are read as memory maps of the cache; one thread (torch, BLAS and OpenMP). Each run is a fresh process reading a cache written beforehand
(writing or checking it took {result["prepared"][0]["prepare_s"]:.1f} s in float32 and
{result["prepared"][1]["prepare_s"]:.1f} s in float16, encoding included where nothing was cached yet).

{_table(result)}

Medians, float16 / float32: disk **{ratio["disk_bytes"]:.3f}×** ({medians["float16"]["disk_bytes"] / 2**20:.2f} MB
against {medians["float32"]["disk_bytes"] / 2**20:.2f} MB); `tl.pretrain` wall time {ratio["pretrain_s"]:.2f}×, CPU
time {ratio["pretrain_cpu_s"]:.2f}×; peak RSS {ratio["peak_rss_mb"]:.3f}×; RssFile peak {ratio["rss_file_peak_mb"]:.3f}×.

Reading every cached row once through `StandardizedRows`, the only step whose work depends on the precision (median
of 7 rounds, alternating): in blocks of 4,096 rows {reads["float32"]["blocks"] * 1e3:.1f} ms (float32) against
{reads["float16"]["blocks"] * 1e3:.1f} ms (float16); in scattered batches of 8 rows
{reads["float32"]["batches"] * 1e3:.1f} ms against {reads["float16"]["batches"] * 1e3:.1f} ms.

Downstream, the float16 model against the float32 one:

- 1 − cosine per spot, `X_spade_expr`: median {down["X_spade_expr_one_minus_cosine"]["median"]:.2e}, max
  {down["X_spade_expr_one_minus_cosine"]["max"]:.2e}; `X_spade` (over the columns both have; widths
  {down["X_spade_widths"]}): median {down["X_spade_one_minus_cosine"]["median"]:.2e}, max
  {down["X_spade_one_minus_cosine"]["max"]:.2e}
- spots routed to the same expert: {100 * down["same_expert"]:.1f} %
- leave-one-section-out kNN expression retrieval on `X_spade` (k = 50, mean Pearson over the panel genes): float32
  {down["knn_mean_pearson"]["float32"]:.4f}, float16 {down["knn_mean_pearson"]["float16"]:.4f}
"""
    (RESULTS / "feature_cache_dtype.md").write_text(text)
    (RESULTS / "feature_cache_dtype.json").write_text(json.dumps({**result, "command": command}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prepare", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        print(json.dumps(prepare(args.prepare)))
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.max_epochs, args.out)))
        return
    command = "python benchmarks/feature_cache_dtype.py " + " ".join(sys.argv[1:])
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    result = {
        "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "max_epochs": args.max_epochs,
        "prepared": [_run(["--prepare", dtype]) for dtype in DTYPES],
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="feature_cache_dtype-") as folder:
        paths = {}
        for repeat in range(args.repeats):
            for dtype in DTYPES if repeat % 2 == 0 else DTYPES[::-1]:
                out = Path(folder) / f"{dtype}_{repeat}.npz"
                run = _run(["--measure", dtype, "--max-epochs", str(args.max_epochs), "--out", str(out)])
                result["runs"].append({**run, "repeat": repeat})
                print(json.dumps(result["runs"][-1]), file=sys.stderr, flush=True)
                paths.setdefault(dtype, out)
        result["downstream"] = downstream(paths)
    result["read_rows_s"] = read_rows(result["prepared"])
    result["summary"] = _medians(result)
    write(result, command)
    print((RESULTS / "feature_cache_dtype.md").read_text())


if __name__ == "__main__":
    main()
