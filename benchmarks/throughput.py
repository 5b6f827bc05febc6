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
``peers`` (not in the default run)
    LazySlide's and sopa's feature extraction next to spade_sd's on her2st C2 (features/s, peak RSS, feature
    equality, tissue tiles found), each tool in its own process: ``benchmarks/peers.py``, whose results
    (``peers.{md,json}``) this section runs and copies in. It needs the peers in their own virtual environment
    (``--peers-python``, see ``peers.py``).
``precision`` (not in the default run)
    The int8 and bf16 engines (:mod:`spade_sd.encoders.precision`) against float32 onnxruntime and PyTorch on real
    MOB patches (``SPADE_SD_DATA_DIR``): patches/s as fractions of the fp32 matmul ceiling and of fp32 onnxruntime,
    the bf16/fp32 matmul ratio, median per-patch cosine to fp32, peak RSS per engine (one subprocess each), kNN
    retrieval and the tuned-α ridge probe leaving one MOB section out, what ``engine="auto"`` chose, and the issue's
    targets. ``python benchmarks/throughput.py --sections precision --out throughput_precision`` (~20 min on 2 busy
    cores), in a fresh cache folder so that first-use costs (export, quantization, gate) are measured.

Run ``python benchmarks/throughput.py`` (all sections but ``precision``, ~15 min on 2 busy cores) or pick sections
with ``--sections``; results go to ``benchmarks/results/throughput.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
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

    Its pixels are computed per chunk when read: pink to purple bands with a fine grain, so that every tile passes the
    tools' check for blank tiles.

    The tiles are 112 µm (224 px) squares on a grid, as ``pp.tile_image`` makes without a tissue mask; the same
    grid that ``sopa.patches`` lays with ``patch_width=224`` when ``side_px`` is a multiple of 224.
    """
    import dask.array as da
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
        y = np.arange(y0, y1, dtype=np.int32)[:, None]
        x = np.arange(x0, x1, dtype=np.int32)[None, :]
        value = ((y // 97 + x // 89) % 200 + 30).astype(np.uint8)
        # pink to purple bands with a fine grain: the tools refuse tiles of one flat colour as blank and warn about
        # colours unlike H&E (spade_sd.spots.content)
        grain = ((7 * y + 3 * x) % 23).astype(np.uint8)
        return np.stack([255 - value // 4, 90 + value // 2, 170 + value // 4]) - grain

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
    """tl.embed of ``n_tiles`` consecutive tiles of a lazily generated slide; peak RSS of this process.

    The model is built by hand with random parameters and the default representation: ``X_spade`` holds the features
    followed by a 16-column expression block (:class:`~spade_sd.model.readout.ExpressionReadout`).
    """
    import resource
    import tempfile

    import torch
    from spatialdata import SpatialData

    import spade_sd as sd
    from spade_sd.model.clustering import ExpertClustering
    from spade_sd.model.heads import ExpertMixture
    from spade_sd.model.readout import ExpressionReadout
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
    mixture = ExpertMixture(4, dim, 1)
    out_dim = mixture.config["out_dim"]
    readout = ExpressionReadout(
        mean=np.zeros(out_dim, dtype=np.float32),
        projection=rng.normal(size=(out_dim, 16)).astype(np.float32),
        weight=1.0,
        alpha=1.0,
    )
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
        mixture=mixture,
        tau=1.0,
        config={"patches": {"size_um": TILE_UM, "size_px": TILE_PX}},
        readout=readout,
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
        "x_spade_width": int(sdata.tables["table"].obsm["X_spade"].shape[1]),
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


# ---------------------------------------------------------------------------------------------------------------
# precision: int8 and bf16 engines against float32, speed and fidelity on real MOB patches (issue 25)

MOB_SECTIONS = ("MOB1", "MOB2", "MOB3")
PRECISION_ENGINES = ("onnxruntime", "int8", "bf16", "torch")


def bf16_matmul(n: int = 2048, repeats: int = 5) -> dict:
    """bfloat16 against float32 torch matmul GFLOP/s (2048², all cores): a ratio near 1 or below means emulation."""
    import torch

    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        rates[str(dtype).removeprefix("torch.")] = (
            best_rate(lambda a=a, b=b: torch.mm(a, b), 2 * n**3, repeats=repeats) / 1e9
        )
    from spade_sd.encoders.precision import bf16_native

    return {
        "n": n,
        "float32_gflops": round(rates["float32"], 1),
        "bfloat16_gflops": round(rates["bfloat16"], 1),
        "ratio": round(rates["bfloat16"] / rates["float32"], 2),
        "bf16_native": bf16_native(),
    }


def mob_sections() -> dict:
    """The MOB sections (SpatialData) from ``SPADE_SD_DATA_DIR``."""
    import spade_sd as sd

    return {name: sd.datasets.mouse_olfactory_bulb(name) for name in MOB_SECTIONS}


def calibration_patches(sections: dict, n: int = 64) -> np.ndarray:
    """A seeded draw of ``n`` real patches from MOB1: the calibration set (MOB2 and MOB3 stay held out)."""
    import spade_sd as sd

    patches = sd.pp.spot_patches(sections["MOB1"])
    return patches.read(np.sort(np.random.default_rng(0).choice(len(patches), n, replace=False)))


def _mean_r(frame) -> float:
    """Mean Pearson r over genes, then over held-out sections (HEST's averaging)."""
    return float(frame.groupby("fold")["value"].mean().mean())


def downstream(features: dict[str, np.ndarray], Y: np.ndarray, section: np.ndarray, genes: list[str]) -> dict:
    """kNN retrieval (k=50) and the tuned-α ridge probe, leaving one MOB section out, per engine's features."""
    from spade_sd import metrics

    rows = {}
    for engine, X in features.items():
        knn = metrics.knn_expression_cv(X, Y, section, genes=genes, label=engine)
        probe = metrics.ridge_probe(X, Y, section, alpha="cv", genes=genes, label=engine, seed=0)
        rows[engine] = {"knn_retrieval_r": round(_mean_r(knn), 4), "probe_cv_alpha_r": round(_mean_r(probe), 4)}
        print(f"  downstream {engine}: {rows[engine]}", flush=True)
    return rows


def precision_child(name: str, engine: str, patches_file: str, calibration_file: str) -> dict:
    """Peak RSS of a process that builds one engine (its exports already cached) and encodes the patches twice.

    Read as ``VmHWM``, which belongs to this process's address space: ``ru_maxrss`` survives ``execve`` on Linux, so
    a child started from a large parent would report the parent's peak.
    """
    patches, calibration = np.load(patches_file), np.load(calibration_file)
    backbone = backbones()[name](engine=engine, calibration=calibration)
    for _ in range(2):
        backbone(patches)
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    return {"peak_rss_mb": round(peak_kb / 1024)}


def _child_rss(name: str, engine: str, patches: np.ndarray, calibration: np.ndarray) -> int | str:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        files = [str(Path(folder) / "patches.npy"), str(Path(folder) / "calibration.npy")]
        np.save(files[0], patches)
        np.save(files[1], calibration)
        command = [sys.executable, __file__, "--precision-child", name, engine, *files]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        return f"failed: {done.stderr[-300:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def other_int8_scheme(backbone, patches: np.ndarray, expected: np.ndarray) -> dict:
    """The int8 scheme the engine does not use for this backbone (dynamic ↔ static), session only, for the record."""
    import tempfile

    import onnxruntime as ort

    from spade_sd.encoders import precision as low

    used = low.int8_scheme(backbone.module)
    other = "static" if used == "dynamic" else "dynamic"
    engine = backbone._int8_engine()
    with tempfile.TemporaryDirectory() as folder:
        fixed, quantized = Path(folder) / "fixed.onnx", Path(folder) / "int8.onnx"
        batch = 1 if other == "dynamic" else engine.max_batch  # as the engine would run it
        engine._export(fixed, batch=batch)
        x = backbone._preprocess(low.split_calibration(backbone.calibration)[0]).contiguous().numpy()
        low.quantize_int8(fixed, quantized, scheme=other, calibration=x[: len(x) // 8 * 8])
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = low.int8_session(quantized, options)
    inputs = backbone._preprocess(patches).contiguous().numpy()

    def run():
        return np.concatenate(
            [session.run(None, {"images": inputs[s : s + batch]})[0] for s in range(0, len(inputs), batch)]
        )

    return {
        "scheme": other,
        "patches_per_s": round(best_rate(run, len(inputs), repeats=2), 2),
        "median_cosine": round(low.median_cosine(run(), expected), 5),
    }


def precision_section(name: str, make, flops: float, sections: dict, *, n: int, spots, Y, section, genes) -> dict:
    """Each engine of one backbone: speed against the fp32 ceiling and onnxruntime, fidelity, memory, downstream."""
    import spade_sd as sd
    from spade_sd.encoders import precision as low

    calibration = calibration_patches(sections)
    timed = sd.pp.spot_patches(sections["MOB2"]).read(np.arange(n))
    engines, first_use = {}, {}
    for engine in PRECISION_ENGINES:
        start = time.perf_counter()
        engines[engine] = make(engine=engine, calibration=calibration)
        engines[engine](timed[:2])  # export, quantize, check: the one-off cost on first use
        first_use[engine] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    auto = make(engine="auto", calibration=calibration)
    auto(timed[:2])
    chosen, auto_s = auto._engine_in_use, round(time.perf_counter() - start, 1)
    print(f"  {name}: first use (s) {first_use}, auto chose {chosen} in {auto_s} s", flush=True)

    rows = {engine: {"first_use_s": first_use[engine]} for engine in PRECISION_ENGINES}
    ceiling = sustained_matmul()
    for engine, backbone in engines.items():
        rate = best_rate(lambda b=backbone: b(timed), n, repeats=2)
        after = sustained_matmul()
        rows[engine] |= {
            "patches_per_s": round(rate, 2),
            "ceiling_gflops": max(ceiling, after),
            "fraction_of_fp32_ceiling": round(rate * flops / max(ceiling, after), 3),
        }
        ceiling = after
        print(f"  {name} {engine}: {rows[engine]}", flush=True)
    for engine in PRECISION_ENGINES:
        rows[engine]["ratio_to_fp32_onnxruntime"] = round(
            rows[engine]["patches_per_s"] / rows["onnxruntime"]["patches_per_s"], 2
        )
        rows[engine]["peak_rss_mb"] = _child_rss(name, engine, timed, calibration)

    # fidelity and downstream on the drawn MOB spots; eager PyTorch float32 is timed only (its features equal
    # onnxruntime's to 1e-3 of their scale, checked on export)
    features = {}
    for engine, backbone in engines.items():
        if engine == "torch":
            continue
        features[engine] = np.concatenate([backbone(patches.read(index)) for patches, index in spots])
    rows_ok = np.isfinite(features["onnxruntime"]).all(axis=1)
    held_out = rows_ok & (section != "MOB1")
    for engine in features:
        X, E = features[engine], features["onnxruntime"]
        rows[engine]["median_cosine_mob_all"] = round(low.median_cosine(X[rows_ok], E[rows_ok]), 5)
        rows[engine]["median_cosine_mob2_3"] = round(low.median_cosine(X[held_out], E[held_out]), 5)
        rows[engine]["min_cosine_mob_all"] = round(
            float(
                np.min(
                    np.sum(X[rows_ok] * E[rows_ok], 1)
                    / np.linalg.norm(X[rows_ok], axis=1)
                    / np.linalg.norm(E[rows_ok], axis=1)
                )
            ),
            5,
        )
    scores = downstream({e: f[rows_ok] for e, f in features.items()}, Y[rows_ok], section[rows_ok], genes)
    for engine in features:
        rows[engine] |= scores[engine]
        for metric in ("knn_retrieval_r", "probe_cv_alpha_r"):
            rows[engine][f"{metric}_minus_fp32"] = round(scores[engine][metric] - scores["onnxruntime"][metric], 4)
    other = other_int8_scheme(engines["int8"], timed[:32], engines["onnxruntime"](timed[:32]))
    other["ratio_to_fp32_onnxruntime_same_32_patches"] = round(
        other["patches_per_s"] / best_rate(lambda: engines["onnxruntime"](timed[:32]), 32, repeats=2), 2
    )
    return {
        "backbone": name,
        "gflop_per_patch": round(flops, 3),
        "n_timed": n,
        "n_spots": int(rows_ok.sum()),
        "int8_scheme": low.int8_scheme(engines["int8"].module),
        "auto_chose": chosen,
        "auto_first_use_s": auto_s,
        "engines": rows,
        "other_int8_scheme": other,
    }


def mob_spots(sections: dict, per_section: int | None) -> tuple[list, np.ndarray, np.ndarray, list[str]]:
    """A seeded draw of up to ``per_section`` spots of each MOB section (all when ``None``): their patch readers
    and patch indices, the 50-gene global panel's log-normalised expression of those spots, and their section."""
    import spade_sd as sd
    from spade_sd.spots.genes import GenePanel
    from spade_sd.spots.geometry import resolve_geometry

    tables = [sdata.tables["table"] for sdata in sections.values()]
    panel = GenePanel.fit(tables, n_top_genes=50, flavor="global")
    spots, Y, section = [], [], []
    for (name, sdata), table in zip(sections.items(), tables, strict=True):
        patches, rows = sd.pp.spot_patches(sdata), np.asarray(resolve_geometry(sdata).table_rows)
        index = np.arange(len(patches))
        if per_section is not None and per_section < len(index):
            index = np.sort(np.random.default_rng(0).choice(len(index), per_section, replace=False))
        spots.append((patches, index))
        Y.append(np.asarray(panel.transform(table))[rows[index]])
        section.append(np.full(len(index), name))
    return spots, np.concatenate(Y), np.concatenate(section), list(panel.genes)


def precision_markdown(results: dict) -> list[str]:
    """The precision section as markdown."""
    p = results["precision"]
    mm = p["bf16_matmul"]
    lines = [
        "## Precision: int8 and bf16 engines against float32 (real MOB patches)",
        "",
        f"bf16 vs fp32 torch matmul ({mm['n']}², all cores): {mm['bfloat16_gflops']} vs {mm['float32_gflops']} "
        f"GFLOP/s, ratio **{mm['ratio']}** (native bf16: {mm['bf16_native']}).",
        "",
        "Speed on the first patches of MOB2 in memory (best of 2), each timing between two sustained fp32 matmul "
        f"ceilings (the larger used). Cosine: median per-patch cosine to fp32 onnxruntime over {p['n_spots']} MOB "
        "spots (a seeded draw of at most "
        f"{p.get('spots_per_section') or 'all'} per section), and over "
        "MOB2–3 (the 64 calibration patches come from MOB1: 32 calibrate int8, 32 judge the engines for "
        "`engine='auto'`). Downstream: mean Pearson r over 50 genes, leaving "
        "one MOB section out (kNN retrieval k=50; ridge probe with α tuned by inner CV), and its difference to fp32.",
        "",
        "| backbone | engine | patches/s | × fp32 ceiling | × fp32 onnxruntime | median cos (all / MOB2–3) | min cos "
        "| kNN r (Δ) | probe r (Δ) | peak RSS MB | first use s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in p["backbones"]:
        for engine, r in run["engines"].items():
            if "median_cosine_mob_all" not in r:  # timed only
                r = {**r, **dict.fromkeys(("median_cosine_mob_all", "median_cosine_mob2_3", "min_cosine_mob_all"), "–")}
                r |= {"knn_retrieval_r": "–", "probe_cv_alpha_r": "–"}
                r |= {"knn_retrieval_r_minus_fp32": "", "probe_cv_alpha_r_minus_fp32": ""}
            lines.append(
                f"| {run['backbone']} | {engine}{' (auto)' if engine == run['auto_chose'] else ''} | "
                f"{r['patches_per_s']} | {r['fraction_of_fp32_ceiling']} | {r['ratio_to_fp32_onnxruntime']} | "
                f"{r['median_cosine_mob_all']} / {r['median_cosine_mob2_3']} | {r['min_cosine_mob_all']} | "
                f"{r['knn_retrieval_r']} ({_signed(r['knn_retrieval_r_minus_fp32'])}) | "
                f"{r['probe_cv_alpha_r']} ({_signed(r['probe_cv_alpha_r_minus_fp32'])}) | {r['peak_rss_mb']} | "
                f"{r['first_use_s']} |"
            )
    lines.append("")
    for run in p["backbones"]:
        o = run["other_int8_scheme"]
        lines.append(
            f"- {run['backbone']}: int8 scheme used **{run['int8_scheme']}**; the other ({o['scheme']}, session only, "
            f"32 patches): {o['patches_per_s']} patches/s ({o['ratio_to_fp32_onnxruntime_same_32_patches']}× fp32 "
            f"onnxruntime), median cosine {o['median_cosine']}. `engine='auto'` with the calibration patches chose "
            f"**{run['auto_chose']}** (gate measured in {run['auto_first_use_s']} s on first use)."
        )
    if "followup" in p:
        lines += ["", f"Follow-up: {p['followup']}."]
    lines += ["", "Targets (issue 25):", ""]
    lines += [
        f"- {t['target']}: measured {t['measured']} → **{'met' if t['met'] else 'not met'}**" for t in p["targets"]
    ]
    return [*lines, ""]


def _signed(value) -> str:
    return f"{value:+}" if isinstance(value, float | int) else str(value)


# The targets for the default engine (auto, given calibration patches): backbone → (measure, threshold, text)
TARGETS = {
    "vit_small_patch16_224": (
        "fraction_of_fp32_ceiling",
        1.6,
        "ViT-S/16 default engine (engine='auto' given calibration patches) ≥ 1.6× the rate the fp32 matmul ceiling "
        "allows",
    ),
    "efficientnet_lite0": (
        "ratio_to_fp32_onnxruntime",
        1.5,
        "EfficientNet-Lite0 default engine (engine='auto' given calibration patches) ≥ 1.5× today's rate (fp32 "
        "onnxruntime)",
    ),
}


def targets(runs: list[dict]) -> list[dict]:
    """The issue's targets, from what the default engine (auto, given calibration patches) ran."""
    found = []
    for run in (run for run in runs if run["backbone"] in TARGETS):
        measure, threshold, target = TARGETS[run["backbone"]]
        value = run["engines"][run["auto_chose"]][measure]
        found.append({"target": target, "measured": f"{value}× ({run['auto_chose']})", "met": value >= threshold})
    return found


def markdown(results: dict) -> str:
    lines = [f"# spade_sd throughput ({results['date']})", "", f"Machine: {results['machine']}", ""]
    lines += [f"Load average before/after: {results['load_before']} / {results['load_after']}", ""]
    if "peers" in results:
        lines += ["Next to LazySlide and sopa: [`peers.md`](peers.md) (this run's `benchmarks/peers.py`).", ""]
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
    if "precision" in results:
        lines += precision_markdown(results)
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
    parser.add_argument("--peers-python", default="/tmp/peers-venv/bin/python", help="python with LazySlide and sopa")
    parser.add_argument(
        "--memory-runs",
        nargs="+",
        default=["efficientnet_lite0:256", "pixel_means:256", "pixel_means:2048"],
        help="BACKBONE:N_TILES runs of the memory section (198916 = every tile of the 100k slide)",
    )
    parser.add_argument("--memory-child", nargs=2, metavar=("BACKBONE", "N_TILES"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--precision-spots", type=int, default=None, help="spots drawn per MOB section for fidelity (default all)"
    )
    parser.add_argument("--precision-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument(
        "--threads", type=int, default=None, help="threads of torch and onnxruntime (sd.settings.n_jobs; default all)"
    )
    args = parser.parse_args()
    if args.threads:
        import torch

        import spade_sd

        spade_sd.settings.n_jobs = args.threads
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]), args.side)))
        return
    if args.precision_child:
        print(json.dumps(precision_child(*args.precision_child)))
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
    if "peers" in args.sections:
        command = [sys.executable, str(Path(__file__).with_name("peers.py")), "--peers-python", args.peers_python]
        subprocess.run(command, check=True)
        results["peers"] = json.loads((RESULTS / "peers.json").read_text())
    if "precision" in args.sections:
        results["precision"] = {"bf16_matmul": bf16_matmul(), "backbones": []}
        print("bf16 matmul", results["precision"]["bf16_matmul"], flush=True)
        sections = mob_sections()
        spots, Y, section, genes = mob_spots(sections, args.precision_spots)
        results["precision"] |= {"spots_per_section": args.precision_spots, "n_spots": len(Y)}
        for name, make in makers.items():
            flops = count_gflops(make(engine="torch"))
            n = _patches_per_measurement(name, args.n)
            run = precision_section(name, make, flops, sections, n=n, spots=spots, Y=Y, section=section, genes=genes)
            results["precision"]["backbones"].append(run)
        results["precision"]["targets"] = targets(results["precision"]["backbones"])
    results["load_after"] = load()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"{args.out}.md").write_text(markdown(results))
    print(f"wrote {RESULTS / args.out}.json and .md")


if __name__ == "__main__":
    main()
