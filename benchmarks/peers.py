"""spade_sd next to LazySlide and sopa: tile features per second, peak memory, feature equality and tissue tiles.

On one her2st section (``SPADE_SD_DATA_DIR``), each tool runs in its own subprocess, one after another, with the same
random-weight timm ResNet-18 (weights drawn once and saved), the same batch size and the same number of threads:

1. its own tissue detection and tiling, at the same tile size (``--tile-px`` full-resolution pixels; no resampling),
   counted;
2. features of the same squares: the tiles spade_sd's ``pp.tile_image`` keeps that lie wholly inside the image,
   given to each peer as its tiles (LazySlide) or as its region of interest (sopa), timed from the first to the
   last feature;
3. its peak resident memory (``getrusage`` ``ru_maxrss`` of the subprocess: everything from the imports on).

The peers cannot read a JPEG; they read the same pixels from a tiled, uncompressed pyramidal TIFF written once from
spade_sd's decoded levels (``tifffile``, the section's µm per pixel in its resolution tags) through OpenSlide.
spade_sd reads its own decoded copy of the JPEG in the cache, decoded before the measured runs (a ``cold`` row
decodes it inside the measured process too). Its ONNX export of the backbone, cached on disk and reused, is made
before the measured runs as well. Features are compared by 1 − cosine on each square.

The peers live in their own virtual environment (their dependencies differ from spade_sd's)::

    PYENV_VERSION=3.12.1 python3.12 -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip install lazyslide sopa
    SPADE_SD_DATA_DIR=../shared/data .venv/bin/python benchmarks/peers.py --peers-python /tmp/peers-venv/bin/python

Results go to ``benchmarks/results/peers.json`` and ``.md``. This file runs under both interpreters: the children
of the peers import nothing of spade_sd.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOOLS = ("spade_sd", "spade_sd_torch", "spade_sd_cold", "lazyslide", "sopa")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far: ``ru_maxrss``.

    Linux carries ``ru_maxrss`` across ``exec`` from the forked copy of the parent, so a child reports at least the
    parent's size at the fork: the parent of the measured runs stays small (it prepares in a subprocess too).
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU seconds of this process so far, every thread: the work done, whatever other jobs share the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def vm_hwm_mb() -> float:
    """Peak resident memory of this process's own address space (``VmHWM``; Linux), which ``exec`` starts afresh."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _resnet18(weights: Path):
    """The benchmark's ResNet-18 (timm, pooled 512-d output) with the weights drawn once by :func:`prepare`."""
    import timm
    import torch

    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def _normalised(model):
    """A module taking float (B, 3, Y, X) patches in [0, 1], normalised as spade_sd normalises timm's ResNet-18."""
    import torch

    class Normalised(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

        def forward(self, x):
            return self.model((x - self.mean) / self.std)

    return Normalised().eval()


# ------------------------------------------------------------------------------------------------ preparation


def _write_tiff(levels: list, mpp: float, target: Path) -> None:
    """A tiled, uncompressed pyramidal RGB TIFF of the given (y, x, 3) levels, OpenSlide's generic TIFF layout."""
    import tifffile

    partial = target.with_suffix(".partial.tif")
    per_cm = 1e4 / mpp
    with tifffile.TiffWriter(partial, bigtiff=True) as tif:
        for i, level in enumerate(levels):
            factor = 2**i
            tif.write(
                np.load(level.path, mmap_mode="r"),
                tile=(256, 256),
                photometric="rgb",
                compression=None,
                resolution=(per_cm / factor, per_cm / factor),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
            )
    partial.replace(target)


def prepare(section: str, workdir: Path, tile_px: int, batch_size: int) -> dict:
    """The section decoded, its TIFF for the peers, the random weights and their ONNX export; the same squares."""
    import timm
    import torch

    import spade_sd as sd
    from spade_sd.datasets._images import _decoded_levels
    from spade_sd.datasets._registry import fetch, registry

    workdir.mkdir(parents=True, exist_ok=True)
    sdata = sd.datasets.her2st(section)
    image_key = next(iter(sdata.images))
    mpp = float(sd.pp.spot_patches(sdata).geometry.mpp)
    (jpeg,) = [k for k in registry() if k.startswith("her2st/data/ST-imgs/") and f"/{section}/" in k]
    tiff = workdir / f"{section}.tif"
    if not tiff.is_file():
        _write_tiff(_decoded_levels(fetch(jpeg), registry()[jpeg].sha256), mpp, tiff)
    weights = workdir / "resnet18_random.pt"
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), weights)
    backbone = sd.Backbone(_resnet18(weights), batch_size=batch_size)
    backbone(np.zeros((2, tile_px, tile_px, 3), np.uint8))  # the one-off ONNX export, cached on disk
    height, width = next(iter(sdata.images[image_key]["scale0"].values())).shape[1:]
    return {
        "section": section,
        "mpp": mpp,
        "tiff": str(tiff),
        "weights": str(weights),
        "height": height,
        "width": width,
        "onnx_dir": str(sd.settings.cache_dir / "onnx"),
    }


# ------------------------------------------------------------------------------------------------ the children


def child_spade(meta: dict, args, *, engine: str) -> dict:
    import torch

    import spade_sd as sd

    torch.set_num_threads(args.threads)
    sd.settings.n_jobs = args.threads
    sd.settings.progress = False
    stages = {}
    start = time.perf_counter()
    sdata = sd.datasets.her2st(meta["section"])
    stages["load_s"] = time.perf_counter() - start
    stages["rss_after_load_mb"] = vm_hwm_mb()
    size_um = args.tile_px * meta["mpp"]
    start = time.perf_counter()
    sd.pp.tile_image(sdata, size_um=size_um)
    stages["tissue_and_tiles_s"] = time.perf_counter() - start
    stages["rss_after_tiles_mb"] = vm_hwm_mb()
    squares = _tile_squares(sdata, args.tile_px, meta)
    backbone = sd.Backbone(_resnet18(Path(meta["weights"])), engine=engine, batch_size=args.batch_size)
    backbone(np.zeros((2, args.tile_px, args.tile_px, 3), np.uint8))  # loads the cached ONNX export; warms up
    start, cpu = time.perf_counter(), cpu_s()
    sd.tl.features(
        sdata,
        backbone=backbone,
        shapes_key="tiles",
        size_um=size_um,
        size_px=args.tile_px,
        batch_size=args.batch_size,
        cache=False,
    )
    features_s, features_cpu_s = time.perf_counter() - start, cpu_s() - cpu
    if not squares["inside"].all():  # the peers pad tiles beyond the image differently: compare inside ones only
        raise RuntimeError(f"{(~squares['inside']).sum()} tiles reach beyond the image; pick another --tile-px")
    features = np.asarray(sdata.tables["tiles_table"].obsm["X_backbone"], dtype=np.float32)
    return {
        "own_tiles": int(len(squares["xy"])),
        "features": features,
        "squares": squares["xy"],
        "features_s": features_s,
        "features_cpu_s": features_cpu_s,
        "engine": backbone._engine_in_use,  # what engine="auto" chose
        **stages,
    }


def _tile_squares(sdata, tile_px: int, meta: dict) -> dict:
    """Top-left corners of the tiles in full-resolution pixels (rounded), in the order of their table's rows."""
    table = sdata.tables["tiles_table"]
    instance_key = table.uns["spatialdata_attrs"]["instance_key"]
    bounds = sdata.shapes["tiles"].loc[table.obs[instance_key].to_numpy()].bounds.to_numpy()
    xy = np.rint(bounds[:, :2]).astype(np.int64)
    if not np.allclose(bounds[:, 2:] - bounds[:, :2], tile_px, atol=1e-3):
        raise RuntimeError(f"spade_sd's tiles are not {tile_px} px squares: {bounds[:3]}")
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] + tile_px <= meta["width"])
    inside &= xy[:, 1] + tile_px <= meta["height"]
    return {"xy": xy, "inside": inside}


def child_lazyslide(meta: dict, args, squares: np.ndarray) -> dict:
    import lazyslide as zs
    import torch
    import wsidata
    from wsidata import TileSpec
    from wsidata.io import add_tiles

    torch.set_num_threads(args.threads)
    stages = {}
    start = time.perf_counter()
    wsi = wsidata.open_wsi(meta["tiff"], store=None, reader="openslide")
    stages["load_s"] = time.perf_counter() - start
    stages["rss_after_load_mb"] = vm_hwm_mb()
    start = time.perf_counter()
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, args.tile_px)
    stages["tissue_and_tiles_s"] = time.perf_counter() - start
    stages["rss_after_tiles_mb"] = vm_hwm_mb()
    own_tiles = len(wsi.shapes["tiles"])
    spec = TileSpec.from_wsidata(wsi, tile_px=args.tile_px)
    add_tiles(wsi, "same_squares", squares.astype(float), spec, tissue_ids=np.zeros(len(squares), dtype=int))
    model = _resnet18(Path(meta["weights"]))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def transform(tile):
        return (torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1).float() / 255 - mean) / std

    with torch.inference_mode():
        model(torch.zeros(2, 3, args.tile_px, args.tile_px))
    start, cpu = time.perf_counter(), cpu_s()
    features = zs.tl.feature_extraction(
        wsi,
        model,
        tile_key="same_squares",
        transform=transform,
        batch_size=args.batch_size,
        num_workers=0,
        device="cpu",
        pbar=False,
        return_features=True,
    )
    features_s, features_cpu_s = time.perf_counter() - start, cpu_s() - cpu
    features = np.asarray(features, np.float32)
    return {
        "own_tiles": own_tiles,
        "features": features,
        "features_s": features_s,
        "features_cpu_s": features_cpu_s,
    } | stages


def child_sopa(meta: dict, args, squares: np.ndarray) -> dict:
    import geopandas as gpd
    import shapely
    import sopa
    import torch
    from sopa.patches import Patches2D, compute_embeddings
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    torch.set_num_threads(args.threads)
    stages = {}
    start = time.perf_counter()
    sdata = sopa.io.wsi(meta["tiff"], backend="openslide")
    stages["load_s"] = time.perf_counter() - start
    stages["rss_after_load_mb"] = vm_hwm_mb()
    start = time.perf_counter()
    sopa.segmentation.tissue(sdata)
    own_tiles = len(Patches2D(sdata, "wsi", args.tile_px, patch_overlap=0, roi_key="region_of_interest"))
    stages["tissue_and_tiles_s"] = time.perf_counter() - start
    stages["rss_after_tiles_mb"] = vm_hwm_mb()
    # the squares, shrunk by a pixel so that they touch no neighbouring patch of sopa's grid
    x, y = squares[:, 0].astype(float), squares[:, 1].astype(float)
    boxes = shapely.box(x + 1, y + 1, x + args.tile_px - 1, y + args.tile_px - 1)
    sdata.shapes["same_squares"] = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=boxes), transformations={"global": Identity()}
    )
    model = _normalised(_resnet18(Path(meta["weights"])))
    with torch.inference_mode():
        model(torch.zeros(2, 3, args.tile_px, args.tile_px))
    start, cpu = time.perf_counter(), cpu_s()
    key = compute_embeddings(
        sdata,
        model,
        patch_width=args.tile_px,
        level=0,
        roi_key="same_squares",
        batch_size=args.batch_size,
        key_added="same_squares_embeddings",
    )
    features_s, features_cpu_s = time.perf_counter() - start, cpu_s() - cpu
    table = sdata.tables[key]
    corners = np.rint(np.asarray(table.obsm["spatial"]) - args.tile_px / 2).astype(np.int64)
    order = {tuple(c): i for i, c in enumerate(corners)}
    missing = [tuple(s) for s in squares if tuple(s) not in order]
    if missing or len(corners) != len(squares):
        raise RuntimeError(f"sopa embedded {len(corners)} patches for {len(squares)} squares; missing {missing[:3]}")
    features = np.asarray(table.X, np.float32)[[order[tuple(s)] for s in squares]]
    return {
        "own_tiles": own_tiles,
        "features": features,
        "features_s": features_s,
        "features_cpu_s": features_cpu_s,
        "version": sopa.__version__,
        **stages,
    }


def run_child(tool: str, args) -> None:
    """Run one tool in this process; write its features to ``--child-out`` and print its measurements as JSON."""
    meta = json.loads(Path(args.meta).read_text())
    out = Path(args.child_out)
    if tool.startswith("spade_sd"):
        result = child_spade(meta, args, engine="torch" if tool == "spade_sd_torch" else "auto")
        np.save(out.with_suffix(".squares.npy"), result.pop("squares"))
    else:
        squares = np.load(Path(args.meta).with_name("squares.npy"))
        result = (child_lazyslide if tool == "lazyslide" else child_sopa)(meta, args, squares)
    features = result.pop("features")
    np.save(out, features)
    result |= {
        "tool": tool,
        "n": len(features),
        "features_per_s": round(len(features) / result["features_s"], 2),
        "features_per_cpu_s": round(len(features) / result["features_cpu_s"], 2),
        "peak_rss_mb": round(peak_rss_mb()),
        "vm_hwm_mb": round(vm_hwm_mb()),
        "versions": _versions(tool),
    }
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))


def _versions(tool: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = {"lazyslide": ["lazyslide", "wsidata", "openslide-python"], "sopa": ["sopa", "wsidata", "openslide-python"]}
    found = {}
    for name in names.get(tool, ["spade_sd", "onnxruntime"]) + ["torch", "timm", "numpy", "dask"]:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# ------------------------------------------------------------------------------------------------ the parent


def one_minus_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return 1 - (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def measure(tool: str, args, meta_path: Path, workdir: Path) -> tuple[dict, np.ndarray | None]:
    python = args.peers_python if tool in ("lazyslide", "sopa") else sys.executable
    out = workdir / f"{tool}.npy"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if tool == "spade_sd_cold":  # a fresh cache but for the ONNX export: the JPEG is decoded in the measured process
        env["SPADE_SD_CACHE_DIR"] = tempfile.mkdtemp(prefix="spade_sd-cold-")
        onnx_dir = json.loads(meta_path.read_text())["onnx_dir"]
        shutil.copytree(onnx_dir, Path(env["SPADE_SD_CACHE_DIR"]) / "onnx")
    command = [python, __file__, "--child", tool, "--meta", str(meta_path), "--child-out", str(out)]
    command += ["--tile-px", str(args.tile_px), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        return {"tool": tool, "error": done.stderr[-3000:]}, None
    row = json.loads(done.stdout.strip().splitlines()[-1]) | {"process_wall_s": round(wall, 1)}
    return row, np.load(out)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def summarise(runs: list[dict]) -> dict:
    """One tool's rounds: medians of the rates and times, the median and largest peak RSS."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    row = dict(runs[-1])
    for key in ("features_per_s", "features_per_cpu_s", "load_s", "tissue_and_tiles_s", "process_wall_s"):
        row[key] = float(np.median([run[key] for run in runs]))
    row["features_per_s_rounds"] = [run["features_per_s"] for run in runs]
    row["peak_rss_mb"] = float(np.median([run["peak_rss_mb"] for run in runs]))
    row["peak_rss_mb_max"] = max(run["peak_rss_mb"] for run in runs)
    row["vm_hwm_mb"] = float(np.median([run["vm_hwm_mb"] for run in runs]))
    if len({run["own_tiles"] for run in runs}) > 1:
        raise RuntimeError(f"{row['tool']} found different tiles in different rounds: {[r['own_tiles'] for r in runs]}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", default="C2")
    parser.add_argument("--peers-python", default="/tmp/peers-venv/bin/python")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--tile-px", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="every tool once per round, interleaved")
    parser.add_argument("--workdir", default=None, help="TIFF, weights, features (default: the cache's peers/)")
    parser.add_argument("--out", default="peers")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--meta", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args)
        return
    workdir = Path(args.workdir or Path(os.environ.get("SPADE_SD_CACHE_DIR", tempfile.gettempdir())) / "peers")
    meta_path = workdir / "meta.json"
    if args.prepare:
        meta_path.write_text(json.dumps(prepare(args.section, workdir, args.tile_px, args.batch_size)))
        return
    # this process stays small: a child's ru_maxrss starts from its parent's size at the fork
    command = [sys.executable, __file__, "--prepare", "--section", args.section, "--workdir", str(workdir)]
    subprocess.run(command + ["--tile-px", str(args.tile_px), "--batch-size", str(args.batch_size)], check=True)
    meta = json.loads(meta_path.read_text())
    parent_rss = peak_rss_mb()
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs, features = {}, {}
    # spade_sd first in every round: its tiles are the squares every tool encodes
    tools = sorted(args.tools, key=lambda t: not t.startswith("spade_sd"))
    for round_ in range(args.rounds):
        for tool in tools:
            row, found = measure(tool, args, meta_path, workdir)
            if tool == "spade_sd" and found is not None and round_ == 0:
                np.save(workdir / "squares.npy", np.load((workdir / "spade_sd.npy").with_suffix(".squares.npy")))
            runs.setdefault(tool, []).append(row)
            if found is not None:
                features.setdefault(tool, found)
            print(f"  round {round_ + 1}:", {k: v for k, v in row.items() if k != "versions"}, flush=True)
    rows = [summarise(tool_runs) for tool_runs in runs.values()]
    for row in rows:  # ratios within a round, when the load on the cores was alike, then their median
        for key in ("features_per_s", "features_per_cpu_s"):
            pairs = zip(runs[row["tool"]], runs.get("spade_sd", []), strict=False)
            ratios = [a[key] / b[key] for a, b in pairs if key in a and key in b]
            row[f"{key}_ratio_to_spade_sd"] = float(np.median(ratios)) if ratios else None
    reference = features.get("spade_sd")
    for row in rows:
        if reference is not None and row["tool"] in features and row["tool"] != "spade_sd":
            distance = one_minus_cos(reference, features[row["tool"]])
            row["one_minus_cos_to_spade_sd"] = {"max": float(distance.max()), "median": float(np.median(distance))}
            relative = np.linalg.norm(features[row["tool"]] - reference, axis=1) / np.linalg.norm(reference, axis=1)
            row["relative_l2_to_spade_sd_max"] = float(relative.max())
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "rounds": args.rounds,
        "parent_peak_rss_mb": round(parent_rss),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "setup": meta | {"tile_px": args.tile_px, "batch_size": args.batch_size, "threads": args.threads},
        "rows": rows,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"{args.out}.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = [
        f"# spade_sd next to LazySlide and sopa ({results['date']})",
        "",
        f"her2st {setup['section']} ({setup['width']} × {setup['height']} px, {setup['mpp']:.4f} µm/px), "
        f"{setup['tile_px']}-px tiles at full resolution, random-weight timm ResNet-18, batch {setup['batch_size']}, "
        f"{setup['threads']} threads, each tool in its own process.",
        "",
        f"Machine: {results['machine']}. Load average before/after: {results['load_before']} / "
        f"{results['load_after']}.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Medians of {results['rounds']} rounds (every tool once per round, interleaved); features/s of every round "
        "in brackets; × spade_sd: the median of the ratios within a round; CPU-s: user + system seconds of every thread of "
        "the process while it encoded (the work, whatever else ran on the cores); peak RSS: median of the processes' "
        "`ru_maxrss` (the largest; median `VmHWM`).",
        "",
        "| tool | own tissue tiles | same squares | features/s | × spade_sd | features per CPU-s (× spade_sd) | "
        "peak RSS (MB) | load (s) | "
        "tissue + tiles (s) | 1 − cos to spade_sd (max / median) | ‖Δ‖ / ‖spade_sd‖ (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['tool']} | error: {row['error'].strip().splitlines()[-1][:200]} |||||||")
            continue
        ratio, cpu_ratio = row["features_per_s_ratio_to_spade_sd"], row["features_per_cpu_s_ratio_to_spade_sd"]
        ratio = f"{ratio:.2f}" if ratio is not None else ""
        cpu = f"{row['features_per_cpu_s']:.1f}" + (f" ({cpu_ratio:.2f})" if cpu_ratio is not None else "")
        distance = row.get("one_minus_cos_to_spade_sd")
        distance = f"{distance['max']:.1e} / {distance['median']:.1e}" if distance else "(reference)"
        relative = f"{row['relative_l2_to_spade_sd_max']:.1e}" if "relative_l2_to_spade_sd_max" in row else ""
        lines.append(
            f"| {row['tool']} | {row['own_tiles']} | {row['n']} | {row['features_per_s']:.1f} "
            f"({', '.join(f'{r:.1f}' for r in row['features_per_s_rounds'])}) | {ratio} | {cpu} | "
            f"{row['peak_rss_mb']:.0f} ({row['peak_rss_mb_max']}; {row['vm_hwm_mb']:.0f}) | {row['load_s']:.1f} | "
            f"{row['tissue_and_tiles_s']:.1f} | {distance} | {relative} |"
        )
    lines += ["", "Versions:", ""]
    for row in results["rows"]:
        if "versions" in row:
            lines.append(f"- {row['tool']}: " + ", ".join(f"{k} {v}" for k, v in row["versions"].items() if v))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
