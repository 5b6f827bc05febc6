"""Time ``sd.pl.experts`` on 500,000 Visium HD bins (squares) and ~100,000 Xenium cells (polygons), against
spatialdata-plot's ``render_images`` + ``render_shapes`` on the same slides (both of its methods).

The slides are laid out as spatialdata-io's ``visium_hd`` and ``xenium`` readers write them (``tests/layouts.py``),
8 µm bins over 5.7 mm and 12-vertex cells about 12.5 µm apart over 4 mm, each on a synthetic H&E; the categories
are blocks of the tissue. Every timing is one call that draws and saves a 6 × 6 inch PNG at 100 dpi (the elements'
resolution included: ``resolve_geometry`` reads every shape). Run ``python benchmarks/plots.py``
(about 5 min on 2 busy cores); results go to ``benchmarks/results/plots.md`` and ``.json``, the PNGs to
``--figures`` (default a temporary folder) to look at.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import spade_sd as sd

ROOT = Path(__file__).resolve().parents[1]
# The readers' layouts are written once, for the tests; the benchmark draws the same slides
sys.path.insert(0, str(ROOT / "tests"))
from layouts import visium_hd_like, xenium_like  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _blocks(sdata, table_key: str, block_px: float) -> None:
    table = sdata.tables[table_key]
    attrs = table.uns["spatialdata_attrs"]
    shapes = sdata.shapes[attrs["region"]].geometry.loc[table.obs[attrs["instance_key"]].to_numpy()]
    centroids = shapes.centroid
    block = (np.floor(centroids.x.to_numpy() / block_px) + np.floor(centroids.y.to_numpy() / block_px)) % 6
    table.obs["spade_expert"] = pd.Categorical([f"expert {int(b)}" for b in block])


def _in_memory(sdata, image_key: str) -> None:
    """The synthetic H&E rendered once, so that no renderer is timed generating it (a scan is read from disk)."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    from spade_sd.spots.geometry import image_levels

    level0 = image_levels(sdata.images[image_key])[0]
    sdata.images[image_key] = Image2DModel.parse(
        level0.values,
        dims=("c", "y", "x"),
        scale_factors=[2, 2],
        transformations=get_transformation(level0, get_all=True),
    )


def _slides() -> dict[str, dict]:
    bins = visium_hd_like(bin_sizes=(8,), grid=(57, 57), mpp=8.0, n_genes=5, downscaled_images=False)
    _blocks(bins, "square_008um", 100.0)
    _in_memory(bins, "hd_full_image")
    cells = xenium_like(grid=(40, 40), he_mpp=8.0, cell_spacing_um=12.5, n_genes=5, morphology=False)
    _blocks(cells, "table", 600.0)
    _in_memory(cells, "he_image")
    return {
        "bins": {
            "sdata": bins,
            "keys": {"image_key": "hd_full_image", "shapes_key": "hd_square_008um", "table_key": "square_008um"},
            "system": "hd",
        },
        "cells": {
            "sdata": cells,
            "keys": {"image_key": "he_image", "shapes_key": "cell_boundaries", "table_key": "table"},
            "system": "global",
        },
    }


def _spade_sd(slide: dict, path: Path) -> float:
    start = time.perf_counter()
    sd.pl.experts(slide["sdata"], **slide["keys"], figsize=(6, 6), show=False, save=path)
    return time.perf_counter() - start


def _spatialdata_plot(slide: dict, path: Path, method: str) -> float:
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)

    keys = slide["keys"]
    start = time.perf_counter()
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    (
        slide["sdata"]
        .pl.render_images(element=keys["image_key"])
        .pl.render_shapes(
            element=keys["shapes_key"],
            color="spade_expert",
            table_name=keys["table_key"],
            fill_alpha=0.8,
            method=method,
        )
        .pl.show(coordinate_systems=slide["system"], ax=ax, show=False)
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figures", type=Path, default=None, help="folder for the PNGs (default: a temporary one)")
    parser.add_argument(
        "--methods", default="datashader,matplotlib", help="spatialdata-plot's methods, comma-separated; '' for none"
    )
    args = parser.parse_args()
    figures = args.figures or Path(tempfile.mkdtemp(prefix="spade_sd_plots_"))
    figures.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    slides = _slides()
    rows = []
    for name, slide in slides.items():
        n = slide["sdata"].tables[slide["keys"]["table_key"]].n_obs
        seconds = _spade_sd(slide, figures / f"spade_sd_{name}.png")
        rows.append({"shapes": name, "n": n, "renderer": "sd.pl.experts", "seconds": round(seconds, 2)})
        print(rows[-1], flush=True)
        for method in filter(None, args.methods.split(",")):
            seconds = _spatialdata_plot(slide, figures / f"spatialdata_plot_{method}_{name}.png", method)
            rows.append(
                {"shapes": name, "n": n, "renderer": f"spatialdata-plot ({method})", "seconds": round(seconds, 2)}
            )
            print(rows[-1], flush=True)
    _write(rows, load, figures)


def _write(rows: list[dict], load_before: float, figures: Path) -> None:
    import spatialdata_plot

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    meta = {
        "command": "python benchmarks/plots.py",
        "commit": commit.strip(),
        "spade_sd": sd.__version__,
        "spatialdata_plot": spatialdata_plot.__version__,
        "matplotlib": matplotlib.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    (RESULTS / "plots.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = pd.DataFrame(rows).to_markdown(index=False)
    (RESULTS / "plots.md").write_text(
        "# Spatial plots at Visium HD and Xenium scale\n\n"
        "Seconds for one call that draws and saves a 6 × 6 inch PNG (100 dpi) of the H&E and the shapes coloured by "
        "6 categories: `sd.pl.experts` (circles, squares or polygons; above 50,000 shapes one image at the panel's "
        "resolution) and spatialdata-plot's `render_images` + `render_shapes` on the same SpatialData. One run; "
        f"the load average was {meta['load_average'][0]} before and {meta['load_average'][1]} after, on "
        f"{meta['machine']}.\n\n{table}\n\n"
        f"`{meta['command']}` at commit {meta['commit']} (spade_sd {meta['spade_sd']}, spatialdata-plot "
        f"{meta['spatialdata_plot']}, matplotlib {meta['matplotlib']}); the figures were written to `{figures}`.\n"
    )


if __name__ == "__main__":
    main()
