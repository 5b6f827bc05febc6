"""500,000 Visium HD 8 µm bins embedded through the patch grid, against one patch per bin.

A synthetic slide built lazily (an H&E-like image rendered block by block as dask reads it, a 4-level pyramid) with
500,000 square 8 µm bins laid out as spatialdata-io's ``visium_hd`` reader writes them (shapes
``bench_square_008um`` of square polygons in full-resolution pixels, table ``square_008um``, the bin size only in the
names). :func:`spade_sd.tl.features` with the default backbone (EfficientNet-Lite0, onnxruntime on CPU), the feature
cache off, runs in its own process per case, so that each peak RSS is its own:

``grid``
    Every bin: the default ``grid=None`` chooses the patch grid (8 µm < 112 µm / 4); one 112 µm patch per occupied
    grid cell is encoded and each bin takes its nearest patch's features.
``one_each``
    ``grid=False`` on a seeded draw of ``--subset`` bins of the same slide (1,000 by default): one patch per bin.
    Encoding 500,000 patches on 2 CPU cores takes hours, so the time for 500,000 is extrapolated linearly from the
    subset's (the per-patch cost does not depend on how many patches there are) and says so.

In both, the backbone encodes one batch before the timing starts (its onnxruntime session is made then, timed
apart), so the extrapolation scales the per-patch cost, not a one-off start.

Also measured: making the 500,000 square polygons (``shapely.box``) and the table, ``ShapesModel.parse`` and
``TableModel.parse``, and resolving the bins' geometry (the shapes classified as square bins of one size).

Run ``python benchmarks/bins_grid.py`` (about 5–10 minutes on 2 busy cores); results go to
``benchmarks/results/bins_grid.json`` and ``.md``. ``--rows``/``--cols``/``--subset`` make a smaller run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BIN_UM = 8
MPP = 0.5  # µm per full-resolution pixel: a 112 µm patch is read at 224 px from level 0
MARGIN_UM = 100.0  # glass around the bins
BATCH_SIZE = 64
DATASET = "bench"


def _rss_mb() -> float:
    """Resident memory of this process now, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _he_block(block_info=None) -> np.ndarray:
    """Pink stroma with purple nuclei on a jittered 14 px lattice: H&E-like enough for the content checks, cheap."""
    (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
    yy, xx = np.mgrid[y0:y1, x0:x1]
    cell_y, cell_x = yy // 14, xx // 14
    jitter = (cell_y * 73856093 ^ cell_x * 19349663) % 1000 / 1000.0  # a hash of the lattice cell
    centre_y, centre_x = cell_y * 14 + 3 + 8 * jitter, cell_x * 14 + 3 + 8 * ((jitter * 7.0) % 1.0)
    nucleus = (yy - centre_y) ** 2 + (xx - centre_x) ** 2 < (2.5 + 2.0 * jitter) ** 2
    stroma = 0.5 + 0.5 * np.sin(xx / 23.0 + np.sin(yy / 41.0))
    rgb = np.empty((3, *yy.shape), dtype=np.uint8)
    rgb[0] = np.where(nucleus, 95, 225 - 20 * stroma)
    rgb[1] = np.where(nucleus, 65, 160 - 40 * stroma)
    rgb[2] = np.where(nucleus, 150, 200 - 15 * stroma)
    return rgb


def lazy_image(height: int, width: int, chunk: int = 512):
    """The slide's image element: rendered block by block when dask reads it, 4 pyramid levels."""
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    def blocks(n: int) -> tuple[int, ...]:
        return (chunk,) * (n // chunk) + ((n % chunk,) if n % chunk else ())

    lazy = da.map_blocks(_he_block, dtype=np.uint8, chunks=((3,), blocks(height), blocks(width)))
    return Image2DModel.parse(
        lazy,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2, 2, 2],
        chunks=(3, chunk, chunk),
        transformations={DATASET: Identity()},
    )


def visium_hd_bins(n_rows: int, n_cols: int, subset: int | None = None, seed: int = 0):
    """The slide with ``n_rows × n_cols`` 8 µm bins (or a seeded draw of ``subset`` of them), and build timings (s)."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    import shapely
    from scipy import sparse
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    timings = {}
    start = time.perf_counter()
    rows, cols = (a.ravel() for a in np.mgrid[0:n_rows, 0:n_cols])
    if subset is not None:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), subset, replace=False))
        rows, cols = rows[keep], cols[keep]
    side_px = BIN_UM / MPP
    x0 = (MARGIN_UM / MPP) + cols * side_px
    y0 = (MARGIN_UM / MPP) + rows * side_px
    squares = shapely.box(x0, y0, x0 + side_px, y0 + side_px)
    timings["make_polygons_s"] = time.perf_counter() - start

    start = time.perf_counter()
    ids = np.arange(len(rows))
    frame = gpd.GeoDataFrame(geometry=squares, index=ids)
    shapes_key = f"{DATASET}_square_{BIN_UM:03}um"
    shapes = ShapesModel.parse(frame, transformations={DATASET: Identity()})
    timings["parse_shapes_s"] = time.perf_counter() - start

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    counts = sparse.random(len(rows), 20, density=0.1, format="csr", dtype=np.float32, random_state=rng)
    counts.data[:] = rng.integers(1, 5, len(counts.data))
    obs = pd.DataFrame(
        {"in_tissue": 1, "array_row": rows, "array_col": cols, "location_id": ids},
        index=[f"s_008um_{r:05}_{c:05}-1" for r, c in zip(rows, cols, strict=True)],
    )
    obs["region"] = pd.Categorical([shapes_key] * len(obs))
    table = ad.AnnData(counts, obs=obs, obsm={"spatial": np.c_[x0 + side_px / 2, y0 + side_px / 2]})
    table = TableModel.parse(table, region=shapes_key, region_key="region", instance_key="location_id")
    timings["make_table_s"] = time.perf_counter() - start

    height = math.ceil((2 * MARGIN_UM + n_rows * BIN_UM) / MPP)
    width = math.ceil((2 * MARGIN_UM + n_cols * BIN_UM) / MPP)
    sdata = SpatialData(
        images={f"{DATASET}_full_image": lazy_image(height, width)},
        shapes={shapes_key: shapes},
        tables={f"square_{BIN_UM:03}um": table},
    )
    sdata.attrs["spatialdata_io_reader"] = "visium_hd"
    return sdata, timings


def run_case(case: str, n_rows: int, n_cols: int, subset: int) -> dict:
    """One case, in this process: build the slide, then tl.features; what it measured."""
    import spade_sd as sd
    from spade_sd.spots.geometry import resolve_geometry

    sdata, timings = visium_hd_bins(n_rows, n_cols, subset=None if case == "grid" else subset)
    start = time.perf_counter()
    geometry = resolve_geometry(sdata)
    timings["resolve_geometry_s"] = time.perf_counter() - start
    backbone = sd.Backbone()
    counted = {"calls": 0, "patches": 0}
    encode = type(backbone).__call__

    def counting(self, batch):
        counted["calls"] += 1
        counted["patches"] += len(batch)
        return encode(self, batch)

    start = time.perf_counter()
    backbone(np.full((1, 224, 224, 3), 255, dtype=np.uint8))  # the engine's one-off start, kept out of the timing
    timings["backbone_start_s"] = time.perf_counter() - start
    type(backbone).__call__ = counting  # this process only: counts what the backbone encodes
    rss_before, peak_before = _rss_mb(), _peak_rss_mb()
    start = time.perf_counter()
    sd.tl.features(sdata, backbone=backbone, cache=False, batch_size=BATCH_SIZE, grid=None if case == "grid" else False)
    wall = time.perf_counter() - start
    table = sdata.tables[geometry.table_key]
    features = np.asarray(table.obsm["X_backbone"])
    assert features.shape == (geometry.n_spots, backbone.dim) and np.isfinite(features).all()
    return {
        "case": case,
        "n_bins": geometry.n_spots,
        "kind": geometry.kind,
        "mpp": geometry.mpp,
        "mpp_source": geometry.mpp_source,
        "backbone": backbone.name,
        "backbone_dim": backbone.dim,
        "backbone_calls": counted["calls"],
        "patches_encoded": counted["patches"],
        "features_wall_s": wall,
        "rss_before_features_mb": rss_before,
        "peak_rss_before_features_mb": peak_before,
        "peak_rss_mb": _peak_rss_mb(),
        "params": {k: v for k, v in table.uns["X_backbone"]["params"].items() if k != "mpp"},
        **timings,
    }


def _in_subprocess(case: str, args) -> dict:
    command = [sys.executable, __file__, "--case", case, "--rows", str(args.rows), "--cols", str(args.cols)]
    command += ["--subset", str(args.subset)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return f"{commit}{' (with uncommitted changes)' if dirty.strip() else ''}"


def summarise(grid: dict, one_each: dict, args) -> dict:
    n = grid["n_bins"]
    per_patch_s = one_each["features_wall_s"] / one_each["n_bins"]
    extrapolated = {
        "n_bins": n,
        "backbone_calls": math.ceil(n / BATCH_SIZE),
        "patches_encoded": n,
        "features_wall_s": per_patch_s * n,
        "how": f"linear from the measured {one_each['n_bins']:,} bins: {per_patch_s:.4f} s per bin × {n:,} bins",
    }
    return {
        "benchmark": "bins_grid",
        "command": f"python benchmarks/bins_grid.py --rows {args.rows} --cols {args.cols} --subset {args.subset}",
        "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_before_after": [args.load_before, list(os.getloadavg())],
        "grid": grid,
        "one_each_measured": one_each,
        "one_each_extrapolated": extrapolated,
        "speed_up": extrapolated["features_wall_s"] / grid["features_wall_s"],
        "patches_ratio": n / grid["patches_encoded"],
    }


def markdown(result: dict) -> str:
    grid, measured, extra = result["grid"], result["one_each_measured"], result["one_each_extrapolated"]
    mb = "MB"
    lines = [
        "# Bins embedded through the patch grid vs one patch per bin",
        "",
        f"`{result['command']}` at {result['commit']}, {result['date']}; {result['machine']}; load average "
        f"before/after {result['load_average_before_after'][0]} / "
        f"{[round(v, 2) for v in result['load_average_before_after'][1]]}.",
        "",
        f"{grid['n_bins']:,} Visium HD {BIN_UM} µm bins (square polygons, spatialdata-io's `visium_hd` layout) on a "
        f"lazily rendered synthetic slide at {MPP} µm per pixel (scale from {grid['mpp_source']}); "
        f"`sd.tl.features` with `{grid['backbone']}` ({grid['backbone_dim']}-d, onnxruntime on CPU), batches of "
        f"{BATCH_SIZE}, no feature cache; each case in its own process, timed after the backbone's start "
        f"({grid['backbone_start_s']:.1f} s, once per process).",
        "",
        "| case | bins | patches encoded | backbone calls | tl.features wall (s) | peak RSS |",
        "|---|---|---|---|---|---|",
        f"| patch grid (`grid=None`: {grid['params']['stride_um']:g} µm apart), measured | {grid['n_bins']:,} | "
        f"{grid['patches_encoded']:,} | {grid['backbone_calls']:,} | {grid['features_wall_s']:.1f} | "
        f"{grid['peak_rss_mb']:,.0f} {mb} |",
        f"| one patch per bin (`grid=False`), measured | {measured['n_bins']:,} | {measured['patches_encoded']:,} | "
        f"{measured['backbone_calls']:,} | {measured['features_wall_s']:.1f} | {measured['peak_rss_mb']:,.0f} {mb} |",
        f"| one patch per bin, **extrapolated** to {extra['n_bins']:,} | {extra['n_bins']:,} | "
        f"{extra['patches_encoded']:,} | {extra['backbone_calls']:,} | {extra['features_wall_s']:,.0f} "
        f"({extra['features_wall_s'] / 3600:.1f} h) | not measured |",
        "",
        f"The grid encodes {result['patches_ratio']:,.0f}× fewer patches and runs **{result['speed_up']:,.0f}× "
        f"faster** than one patch per bin would. The per-bin row is extrapolated ({extra['how']}); "
        f"encoding {extra['n_bins']:,} patches one by one was not run.",
        "",
        f"Peak RSS: the grid case's {grid['peak_rss_mb']:,.0f} MB includes the {grid['n_bins']:,} bins themselves "
        f"({grid['peak_rss_before_features_mb']:,.0f} MB peak before tl.features) and the output "
        f"`.obsm['X_backbone']`, {grid['n_bins']:,} × {grid['backbone_dim']} float32 = "
        f"{grid['n_bins'] * grid['backbone_dim'] * 4 / 2**20:,.0f} MB, which one patch per bin writes too.",
        "",
        f"Building the {grid['n_bins']:,} bins (grid case):",
        "",
        "| step | s |",
        "|---|---|",
        f"| {grid['n_bins']:,} square polygons (`shapely.box`) | {grid['make_polygons_s']:.2f} |",
        f"| `ShapesModel.parse` | {grid['parse_shapes_s']:.2f} |",
        f"| the table (`TableModel.parse`, sparse counts, obs) | {grid['make_table_s']:.2f} |",
        f"| resolving the geometry (classified as {grid['kind']}, scale from the name) | "
        f"{grid['resolve_geometry_s']:.2f} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["grid", "one_each"], help="run one case in this process (internal)")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--cols", type=int, default=1000)
    parser.add_argument("--subset", type=int, default=1_000, help="bins of the one-patch-per-bin case")
    parser.add_argument("--out", type=Path, default=RESULTS / "bins_grid")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.rows, args.cols, args.subset)))
        return
    args.load_before = [round(v, 2) for v in os.getloadavg()]
    grid = _in_subprocess("grid", args)
    one_each = _in_subprocess("one_each", args)
    result = summarise(grid, one_each, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
