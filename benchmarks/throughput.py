"""Throughput of spade_sd feature extraction and embedding, as a fraction of this machine's matmul ceiling.

Every number in one results file comes from one run on one machine, so ratios between engines hold even when other
jobs share the cores (the load average is recorded before and after). Sections:

``ceiling``
    float32 matmul GFLOP/s on all cores (torch and numpy; the larger is the ceiling).
``flops``
    FLOPs per 224-px patch of each backbone, counted with :class:`torch.utils.flop_counter.FlopCounterMode`
    (one multiply-add = 2 FLOPs, the convention of the matmul ceiling), with attention unfused so that its
    matmuls are counted.
``engines``
    Patches/s of the backbone alone on patches already in memory: eager PyTorch (float32 channels-last,
    bfloat16 autocast), ``torch.compile``, onnxruntime (graph optimisation levels, intra-op threads, batch sizes).
``paired``
    Patches/s of the public ``Backbone()`` (default engine and eager PyTorch), each timing between two ceiling
    measurements: the fraction of the ceiling per round, robust to load that changes during a run.
``pipeline``
    Patches/s of :func:`spade_sd.encoders.features.extract_features` on tiles of a lazily generated slide, with the reader
    thread (reading overlaps encoding) and without it (read, then encode), per engine.
``sopa``
    :func:`sopa.patches.compute_embeddings` with the same backbone on the same slide and tiles.

Run ``python benchmarks/throughput.py`` (all sections, ~15 min on 2 busy cores) or pick sections with
``--sections``; results go to ``benchmarks/results/throughput.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
MPP = 0.5
TILE_UM = 112.0
TILE_PX = 224


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def best_rate(fn: Callable[[], object], items: int, *, repeats: int, warmup: int = 1) -> float:
    """Items per second of the fastest of ``repeats`` timed calls (the least disturbed by other jobs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return items / min(times)


def matmul_ceiling(n: int = 2048, repeats: int = 5) -> dict:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch_gflops = best_rate(lambda: torch.mm(a, b), 2 * n**3, repeats=repeats) / 1e9
    an, bn = a.numpy(), b.numpy()
    numpy_gflops = best_rate(lambda: an @ bn, 2 * n**3, repeats=repeats) / 1e9
    return {
        "n": n,
        "torch_threads": torch.get_num_threads(),
        "torch_gflops": round(torch_gflops, 1),
        "numpy_gflops": round(numpy_gflops, 1),
        "ceiling_gflops": round(max(torch_gflops, numpy_gflops), 1),
    }


def sustained_matmul(n: int = 2048, seconds: float = 2.0) -> float:
    """float32 matmul GFLOP/s kept up for ``seconds`` (torch and numpy in turn; the larger), on all cores.

    The sustained rate is the ceiling a backbone timing of a few seconds can be held to: the best single 2048²
    matmul (a ~0.1 s burst) runs 5–20 % above it on these shared machines.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    rates = []
    for matmul in (lambda: torch.mm(a, b), lambda an=a.numpy(), bn=b.numpy(): an @ bn):
        matmul()
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            matmul()
            count += 1
        rates.append(2 * n**3 * count / elapsed / 1e9)
    return round(max(rates), 1)


def backbones() -> dict:
    import torch

    from spade_sd import Backbone

    return {
        "efficientnet_lite0": lambda **kw: Backbone(**kw),
        # seeded, so every engine sees the same random weights
        "vit_small_patch16_224": lambda **kw: (
            torch.manual_seed(0),
            Backbone("vit_small_patch16_224", pretrained=False, **kw),
        )[1],
    }


def _patches_per_measurement(name: str, n: int) -> int:
    """``n`` for the cheap CNN, half of it (at least 16) for the ViT, ~12× as many FLOPs per patch."""
    return n if name == "efficientnet_lite0" else max(n // 2, 16)


def count_gflops(backbone) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # FlopCounterMode does not see the matmuls inside the CPU kernel of fused scaled-dot-product attention
    # (ViT-S/16: 8.48 GFLOP counted fused, 9.20 explicit), so timm's attention is counted unfused
    fused = [m for m in backbone.module.modules() if getattr(m, "fused_attn", False)]
    for module in fused:
        module.fused_attn = False
    x = torch.zeros(1, 3, backbone.input_size, backbone.input_size)
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            backbone._pooled(x)
    finally:
        for module in fused:
            module.fused_attn = True
    return counter.get_total_flops() / 1e9


def engines_section(name: str, make, *, n: int, batch_sizes: tuple[int, ...], compile_: bool) -> list[dict]:
    """Backbone-only patches/s for each engine and setting; the first rows are the public Backbone paths."""
    import onnxruntime as ort
    import torch

    from spade_sd.encoders.onnx_engine import onnx_path

    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (n, TILE_PX, TILE_PX, 3), dtype=np.uint8)
    repeats = 2
    rows = []

    def record(engine: str, setting: str, rate: float, **extra) -> None:
        rows.append({"backbone": name, "engine": engine, "setting": setting, "patches_per_s": round(rate, 2), **extra})
        print(f"  {name:24s} {engine:12s} {setting:40s} {rate:8.2f} patches/s", flush=True)

    reference = make(engine="torch")
    expected = reference(patches[:4])
    for batch in batch_sizes:
        torch_bb = make(engine="torch", batch_size=batch)
        record(
            "torch",
            f"Backbone(engine='torch'), fp32 channels-last, batch {batch}",
            best_rate(lambda b=torch_bb: b(patches), n, repeats=repeats),
        )
    x = reference._preprocess(patches[: batch_sizes[-1]])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        found = reference._pooled(x[:4]).float().numpy()  # emulated without AVX-512-BF16/AMX: time a few only
        rate = best_rate(lambda: reference._pooled(x[:8]), 8, repeats=1, warmup=0)
    record("torch", "bf16 autocast, batch 8", rate, max_rel_error=_rel_error(found, expected))

    onnx_bb = make(engine="onnxruntime", batch_size=batch_sizes[-1])
    onnx_bb(patches[:2])  # export, verify and build the session before timing
    record(
        "onnxruntime",
        f"Backbone(engine='onnxruntime') default, batch {batch_sizes[-1]}",
        best_rate(lambda: onnx_bb(patches), n, repeats=repeats),
        max_rel_error=_rel_error(onnx_bb(patches[:4]), expected),
    )
    path = onnx_path(onnx_bb.identity())
    levels = {
        "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    settings = [(level, 2, batch_sizes[-1], True) for level in levels] + [("all", 1, batch_sizes[-1], True)]
    settings += [("all", 2, batch_sizes[-1], False)] + [("all", 2, b, True) for b in batch_sizes[:-1]]
    inputs = reference._preprocess(patches).contiguous().numpy()
    for level, threads, batch, spinning in settings:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.graph_optimization_level = levels[level]
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(session=session, batch=batch):
            for start in range(0, n, batch):
                session.run(None, {"images": inputs[start : start + batch]})

        record(
            "onnxruntime",
            f"session only: opt={level}, intra={threads}{'' if spinning else ', no spinning'}, batch {batch}",
            best_rate(run, n, repeats=repeats),
        )

    if compile_:
        compiled = torch.compile(reference._pooled)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                found = compiled(x[:4]).numpy()
                compiled(x)
        except Exception as err:  # noqa: BLE001 - any compiler failure is a result to report
            rows.append({"backbone": name, "engine": "torch.compile", "error": f"{type(err).__name__}: {err}"[:300]})
        else:
            compile_s = time.perf_counter() - start
            with torch.inference_mode():
                rate = best_rate(lambda: compiled(x), len(x), repeats=repeats, warmup=0)
            record(
                "torch.compile",
                f"inductor, fp32, batch {len(x)}",
                rate,
                compile_s=round(compile_s, 1),
                max_rel_error=_rel_error(found, expected),
            )
    return rows


def paired_section(name: str, make, flops: float, *, n: int, rounds: int) -> list[dict]:
    """Backbone patches/s against the sustained matmul ceiling measured right before and after, round by round.

    Other jobs on the machine change both rates over minutes, so each round's fraction uses the larger of its two
    adjacent ceilings (the conservative choice) instead of one ceiling for the whole run.
    """
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (n, TILE_PX, TILE_PX, 3), dtype=np.uint8)
    engines = {"auto (default)": make(), "torch": make(engine="torch")}
    for backbone in engines.values():
        backbone(patches[:2])  # export, verify and build the session before timing
    rows = []
    ceiling = sustained_matmul()
    for round_ in range(rounds):
        for engine, backbone in engines.items():
            rate = best_rate(lambda b=backbone: b(patches), n, repeats=2)
            after = sustained_matmul()
            rows.append(
                {
                    "backbone": name,
                    "engine": engine,
                    "round": round_,
                    "patches_per_s": round(rate, 2),
                    "ceiling_before_gflops": ceiling,
                    "ceiling_after_gflops": after,
                    "fraction_of_ceiling": round(rate * flops / max(ceiling, after), 3),
                }
            )
            print(f"  {name:24s} {engine:16s} round {round_}: {rate:6.2f} patches/s, {rows[-1]}", flush=True)
            ceiling = after
    return rows


def _rel_error(found: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(found - expected).max() / max(np.abs(expected).max(), 1e-30))


def tile_elements(x0: np.ndarray, y0: np.ndarray, ids: np.ndarray):
    """Square 224-px tiles with top-left corners ``(x0, y0)`` as shapes, and the table annotating them."""
    import geopandas as gpd
    import pandas as pd
    import shapely
    from anndata import AnnData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=shapely.box(x0, y0, x0 + TILE_PX, y0 + TILE_PX), index=ids),
        transformations={"global": Identity()},
    )
    obs = pd.DataFrame({"tile_id": ids, "region": pd.Categorical(["tiles"] * len(ids))}, index=ids)
    table = TableModel.parse(AnnData(obs=obs), region="tiles", region_key="region", instance_key="tile_id")
    table.uns["spade_sd"] = {"mpp": MPP}
    return shapes, table


def lazy_slide(side_px: int, *, chunk: int = 1024, tiles: bool = True):
    """A lazily generated RGB slide (``side_px`` square at 0.5 µm/px, 4 pyramid levels) and square tiles over it.

    The tiles are 112 µm (224 px) squares on a grid, as ``pp.tile_image`` makes without a tissue mask; the same
    grid that ``sopa.patches`` lays with ``patch_width=224`` when ``side_px`` is a multiple of 224.
    """
    import dask.array as da
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
        y = (np.arange(y0, y1, dtype=np.int32) // 97)[:, None]
        x = (np.arange(x0, x1, dtype=np.int32) // 89)[None, :]
        value = ((y + x) % 200 + 30).astype(np.uint8)
        return np.stack([value, 255 - value, value // 2 + 100])

    blocks = (chunk,) * (side_px // chunk) + ((side_px % chunk,) if side_px % chunk else ())
    lazy = da.map_blocks(block, dtype=np.uint8, chunks=((3,), blocks, blocks))
    image = Image2DModel.parse(lazy, dims=("c", "y", "x"), scale_factors=[2, 2, 2], chunks=(3, chunk, chunk))
    elements = {"images": {"slide": image}}
    if tiles:
        starts = np.arange(0, side_px - TILE_PX + 1, TILE_PX, dtype=float)
        x0, y0 = (a.ravel() for a in np.meshgrid(starts, starts))
        ids = np.arange(len(x0)).astype(str)
        shapes, table = tile_elements(x0, y0, ids)
        elements |= {"shapes": {"tiles": shapes}, "tables": {"table": table}}
    return SpatialData(**elements)


def tile_patches(sdata):
    from spade_sd.spots.geometry import resolve_geometry
    from spade_sd.spots.patches import SpotPatches

    geometry = resolve_geometry(sdata)
    return SpotPatches(sdata.images[geometry.image_key], geometry, size_um=TILE_UM, size_px=TILE_PX)


def pipeline_section(side_px: int, *, batch_size: int) -> list[dict]:
    """extract_features on every tile of a slide: reader thread vs. read-then-encode, per engine."""
    from spade_sd import Backbone
    from spade_sd.encoders.features import extract_features

    patches = tile_patches(lazy_slide(side_px))
    n = len(patches)
    rows = []
    read_rate = best_rate(
        lambda: [patches.read(np.arange(s, min(s + batch_size, n))) for s in range(0, n, batch_size)],
        n,
        repeats=1,
        warmup=0,
    )
    rows.append({"stage": "read only (SpotPatches.read)", "n": n, "patches_per_s": round(read_rate, 1)})
    print(f"  read only {read_rate:.1f} patches/s over {n} tiles", flush=True)
    for engine in ("onnxruntime", "torch"):
        backbone = Backbone(engine=engine, batch_size=batch_size)
        backbone(patches.read(np.arange(2)))
        overlapped = best_rate(
            lambda b=backbone: extract_features(patches, b, batch_size=batch_size, cache=False), n, repeats=1, warmup=0
        )

        def sequential(b=backbone):
            for s in range(0, n, batch_size):
                b(patches.read(np.arange(s, min(s + batch_size, n))))

        serial = best_rate(sequential, n, repeats=1, warmup=0)
        rows.append(
            {
                "stage": f"extract_features, engine={engine}",
                "n": n,
                "reader_thread_patches_per_s": round(overlapped, 1),
                "read_then_encode_patches_per_s": round(serial, 1),
            }
        )
        print(f"  {engine}: reader thread {overlapped:.1f}, read-then-encode {serial:.1f} patches/s", flush=True)
    return rows


def sopa_section(side_px: int, *, batch_size: int) -> list[dict]:
    """sopa.patches.compute_embeddings vs. spade_sd on the same slide, tiles and EfficientNet-Lite0 weights."""
    try:
        import sopa
        from sopa.patches import compute_embeddings
    except ImportError as err:
        return [{"error": f"sopa not importable: {err}"}]
    import torch

    from spade_sd import Backbone
    from spade_sd.encoders.features import extract_features

    backbone = Backbone(engine="torch", batch_size=batch_size)

    class Normalised(torch.nn.Module):
        """sopa passes float (B, 3, Y, X) patches in [0, 1]; apply the backbone's own normalisation."""

        def __init__(self):
            super().__init__()
            self.pooled = backbone._pooled
            self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1))

        def forward(self, x):
            return self.pooled(((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last))

    sdata = lazy_slide(side_px)
    bare = lazy_slide(side_px, tiles=False)
    patches = tile_patches(sdata)
    n = len(patches)
    model = Normalised().eval()
    with torch.inference_mode():
        start = time.perf_counter()
        key = compute_embeddings(bare, model, patch_width=TILE_PX, level=0, roi_key=None, batch_size=batch_size)
        sopa_s = time.perf_counter() - start
    sopa_features = bare.tables[key].X
    rows = [
        {
            "tool": f"sopa {sopa.__version__} compute_embeddings (eager torch)",
            "n": len(sopa_features),
            "patches_per_s": round(len(sopa_features) / sopa_s, 1),
        }
    ]
    for engine in ("torch", "onnxruntime"):
        bb = backbone if engine == "torch" else Backbone(engine=engine, batch_size=batch_size)
        bb(patches.read(np.arange(2)))
        start = time.perf_counter()
        ours = extract_features(patches, bb, batch_size=batch_size, cache=False)
        rows.append(
            {
                "tool": f"spade_sd extract_features (engine={engine})",
                "n": n,
                "patches_per_s": round(n / (time.perf_counter() - start), 1),
            }
        )
    # same grid → same patches: check the features agree (sopa orders tiles its own way; compare sorted norms)
    if len(sopa_features) == n:
        a, b = np.sort(np.linalg.norm(sopa_features, axis=1)), np.sort(np.linalg.norm(ours, axis=1))
        rows.append({"check": "sorted feature norms, max relative difference", "value": _rel_error(a, b)})
    for row in rows:
        print("  ", row, flush=True)
    return rows


def memory_child(backbone_name: str, n_tiles: int, side_px: int) -> dict:
    """tl.embed of ``n_tiles`` consecutive tiles of a lazily generated slide; peak RSS of this process."""
    import resource
    import tempfile

    import torch
    from spatialdata import SpatialData

    import spade_sd as sd
    from spade_sd.model.clustering import ExpertClustering
    from spade_sd.model.heads import ExpertMixture
    from spade_sd.model.spade_model import SpadeModel
    from spade_sd.model.standardization import FeatureScaler
    from spade_sd.spots.genes import GenePanel

    os.environ.setdefault("SPADE_SD_CACHE_DIR", tempfile.mkdtemp(prefix="spade_sd-bench-"))
    slide = lazy_slide(side_px, tiles=False)
    per_row = side_px // TILE_PX
    # consecutive tiles from the middle row on (or all of them), row-major like tile_image
    first = max(0, min((per_row // 2) * per_row, per_row**2 - n_tiles))
    index = np.arange(first, first + n_tiles)
    x0, y0 = (index % per_row) * TILE_PX, (index // per_row) * TILE_PX
    ids = index.astype(str)
    shapes, table = tile_elements(x0, y0, ids)
    sdata = SpatialData(images=dict(slide.images), shapes={"tiles": shapes}, tables={"table": table})
    if backbone_name == "efficientnet_lite0":
        backbone = sd.Backbone()
    else:

        def pixel_means(patches):  # a near-free 1280-d stand-in, so reading and streaming dominate
            return np.repeat(patches.reshape(len(patches), -1, 3).mean(axis=1, dtype=np.float32), 427, axis=1)[:, :1280]

        backbone = sd.Backbone(pixel_means, dim=1280)
    dim, rng = backbone.dim, np.random.default_rng(0)
    torch.manual_seed(0)
    model = SpadeModel(
        backbone=backbone,
        panel=GenePanel(genes=["g0"]),
        scaler=FeatureScaler(np.zeros(dim), np.ones(dim)),
        clustering=ExpertClustering(
            centroids=rng.normal(size=(8, dim)).astype(np.float32),
            centroid_expert=np.arange(8) % 4,
            centroid_group=np.zeros(8, dtype=int),
            n_experts=4,
        ),
        mixture=ExpertMixture(4, dim, 1),
        tau=1.0,
        config={"patches": {"size_um": TILE_UM, "size_px": TILE_PX}},
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    sd.tl.embed(sdata, model, genes=False)
    elapsed = time.perf_counter() - start
    return {
        "backbone": backbone_name,
        "slide_px": side_px,
        "tiles_on_slide": per_row**2,
        "n_tiles": n_tiles,
        "seconds": round(elapsed, 1),
        "patches_per_s": round(n_tiles / elapsed, 1),
        "peak_rss_mb_before_embed": round(rss_before),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "features_if_held_mb": round(n_tiles * dim * 4 / 2**20, 1),
        "whole_slide_features_if_held_mb": round(per_row**2 * dim * 4 / 2**20),
    }


def memory_section(runs: list[tuple[str, int]], side_px: int) -> list[dict]:
    """One subprocess per run, sharing a fresh cache folder.

    The ONNX export is a one-off per backbone (later runs load the cached file), so a first small run per backbone
    exports it and is reported as such; the measured runs then compute every feature afresh.
    """
    import subprocess
    import tempfile

    env = {**os.environ, "SPADE_SD_CACHE_DIR": tempfile.mkdtemp(prefix="spade_sd-bench-")}
    first_use = [(name, 64, True) for name in dict.fromkeys(name for name, _ in runs) if name != "pixel_means"]
    rows = []
    for backbone_name, n_tiles, exports in first_use + [(name, n, False) for name, n in runs]:
        command = [sys.executable, __file__, "--memory-child", backbone_name, str(n_tiles), "--side", str(side_px)]
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode:
            rows.append({"backbone": backbone_name, "n_tiles": n_tiles, "error": done.stderr[-2000:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if exports:
            rows[-1]["note"] = "first use: includes the one-off ONNX export"
        print("  ", rows[-1], flush=True)
    return rows


def markdown(results: dict) -> str:
    lines = [f"# spade_sd throughput ({results['date']})", "", f"Machine: {results['machine']}", ""]
    lines += [f"Load average before/after: {results['load_before']} / {results['load_after']}", ""]
    if "ceiling" in results:
        c = results["ceiling"]
        lines += [
            f"Matmul ceiling (float32 {c['n']}², all cores): torch {c['torch_gflops']} GFLOP/s, numpy "
            f"{c['numpy_gflops']} GFLOP/s → **{c['ceiling_gflops']} GFLOP/s** (best of the measurements during the "
            f"run: {c.get('all_measurements_gflops', [c['ceiling_gflops']])})",
            "",
        ]
    if "flops" in results:
        lines += ["| backbone | GFLOP per 224-px patch (FlopCounterMode, attention unfused) |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in results["flops"].items()] + [""]
    if "engines" in results:
        lines += [
            "## Backbone only (patches in memory)",
            "",
            "| backbone | engine | setting | patches/s | fraction of ceiling | max rel. error vs torch |",
            "|---|---|---|---|---|---|",
        ]
        for row in results["engines"]:
            if "error" in row:
                lines.append(f"| {row['backbone']} | {row['engine']} | failed | {row['error']} | | |")
                continue
            lines.append(
                f"| {row['backbone']} | {row['engine']} | {row['setting']} | {row['patches_per_s']} | "
                f"{row.get('fraction_of_ceiling', '')} | {row.get('max_rel_error', '')} |"
            )
        lines.append("")
    if "paired" in results:
        lines += [
            "## Backbone() against the ceiling measured around it (paired rounds)",
            "",
            "Each timing (best of 2 passes over the patches) sits between two measurements of the sustained float32 "
            "2048² matmul rate (2 s each of torch and numpy, the larger); a round's fraction uses the larger of its "
            "two ceilings.",
            "",
            "| backbone | engine | rounds | patches/s (median) | fraction of adjacent ceiling: median (min–max) |",
            "|---|---|---|---|---|",
        ]
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in results["paired"]:
            groups.setdefault((row["backbone"], row["engine"]), []).append(row)
        for (backbone, engine), rows in groups.items():
            fractions = [r["fraction_of_ceiling"] for r in rows]
            lines.append(
                f"| {backbone} | {engine} | {len(rows)} | {np.median([r['patches_per_s'] for r in rows]):.2f} | "
                f"{np.median(fractions):.3f} ({min(fractions):.3f}–{max(fractions):.3f}) |"
            )
        lines.append("")
    sections = (
        ("pipeline", "Whole pipeline on a lazily generated slide"),
        ("sopa", "sopa comparison"),
        ("memory", "Peak RSS of tl.embed on a lazily generated 100,000 × 100,000 px slide (one subprocess each)"),
    )
    for section, title in sections:
        if section in results:
            lines += [f"## {title}", "", "```json", *(json.dumps(r) for r in results[section]), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["ceiling", "flops", "engines", "pipeline", "sopa", "memory"])
    parser.add_argument("--n", type=int, default=128, help="patches per engine measurement (ViT-S uses half)")
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "vit_small_patch16_224"])
    parser.add_argument("--side", type=int, default=224 * 24, help="slide side in px for pipeline and sopa")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the paired section")
    parser.add_argument("--compile", action="store_true", help="also try torch.compile (minutes of compiling)")
    parser.add_argument("--out", default="throughput")
    parser.add_argument("--memory-side", type=int, default=100_000)
    parser.add_argument(
        "--memory-runs",
        nargs="+",
        default=["efficientnet_lite0:256", "pixel_means:256", "pixel_means:2048"],
        help="BACKBONE:N_TILES runs of the memory section (198916 = every tile of the 100k slide)",
    )
    parser.add_argument("--memory-child", nargs=2, metavar=("BACKBONE", "N_TILES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]), args.side)))
        return

    import onnxruntime
    import torch

    import spade_sd

    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
        f"{onnxruntime.__version__}, spade_sd {spade_sd.__version__}",
        "load_before": load(),
    }
    ceilings = []
    if "ceiling" in args.sections:
        ceilings.append(matmul_ceiling())
        print("ceiling", ceilings[-1], flush=True)
    makers = {name: make for name, make in backbones().items() if name in args.backbones}
    if "flops" in args.sections or "engines" in args.sections:
        results["flops"] = {name: count_gflops(make(engine="torch")) for name, make in makers.items()}
        print("flops", results["flops"], flush=True)
    if "engines" in args.sections:
        rows = []
        for name, make in makers.items():
            n = _patches_per_measurement(name, args.n)
            sizes = (16, args.batch_size) if name == "efficientnet_lite0" else (8, 16)
            rows += engines_section(name, make, n=n, batch_sizes=sizes, compile_=args.compile)
            if "ceiling" in args.sections:  # measured between sections too: other jobs' load comes and goes
                ceilings.append(matmul_ceiling())
                print("ceiling", ceilings[-1], flush=True)
        if ceilings:
            results["ceiling"] = max(ceilings, key=lambda c: c["ceiling_gflops"])
            results["ceiling"]["all_measurements_gflops"] = [c["ceiling_gflops"] for c in ceilings]
        ceiling = results.get("ceiling", {}).get("ceiling_gflops")
        for row in rows:
            if ceiling and "patches_per_s" in row:
                row["fraction_of_ceiling"] = round(
                    row["patches_per_s"] * results["flops"][row["backbone"]] / ceiling, 3
                )
        results["engines"] = rows
    if "paired" in args.sections:
        flops = results.get("flops") or {name: count_gflops(make(engine="torch")) for name, make in makers.items()}
        results["flops"] = flops
        results["paired"] = []
        for name, make in makers.items():
            n = _patches_per_measurement(name, args.n)
            results["paired"] += paired_section(name, make, flops[name], n=n, rounds=args.rounds)
    if "pipeline" in args.sections:
        results["pipeline"] = pipeline_section(args.side, batch_size=args.batch_size)
    if "sopa" in args.sections:
        results["sopa"] = sopa_section(args.side, batch_size=args.batch_size)
    if "memory" in args.sections:
        runs = [(run.split(":")[0], int(run.split(":")[1])) for run in args.memory_runs]
        results["memory"] = memory_section(runs, args.memory_side)
    results["load_after"] = load()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"{args.out}.md").write_text(markdown(results))
    print(f"wrote {RESULTS / args.out}.json and .md")


if __name__ == "__main__":
    main()
