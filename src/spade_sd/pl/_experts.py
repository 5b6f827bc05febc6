from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Patch
from spatialdata import SpatialData

from spade_sd.pl._common import check_save, finish
from spade_sd.spots.geometry import image_levels, resolve_geometry

MAX_DISPLAY_SIDE = 2000


def _display_level(levels, max_side: int) -> int:
    """The finest pyramid level whose long side fits ``max_side`` pixels (else the coarsest)."""
    fitting = [i for i, level in enumerate(levels) if max(level.sizes["y"], level.sizes["x"]) <= max_side]
    return fitting[0] if fitting else len(levels) - 1


def _palette(table, key: str, categories: list[str]) -> dict[str, str]:
    stored = table.uns.get(f"{key}_colors")
    if stored is not None and len(stored) >= len(categories):
        return dict(zip(categories, stored, strict=False))
    from scanpy.plotting.palettes import default_20, default_102

    colors = default_20 if len(categories) <= 20 else default_102
    return {c: colors[i % len(colors)] for i, c in enumerate(categories)}


def draw_spots(ax: Axes, sdata: SpatialData, geometry, facecolors: Sequence, known: np.ndarray, alpha: float) -> None:
    """The H&E (at a level of at most ``MAX_DISPLAY_SIDE`` pixels) with the ``known`` spots drawn as circles over it.

    ``facecolors`` holds one matplotlib colour per known spot, in the geometry's order; the view frames the spots.
    """
    levels = image_levels(sdata.images[geometry.image_key])
    level = _display_level(levels, MAX_DISPLAY_SIDE)
    pixels = levels[level].transpose("y", "x", "c").values
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    height, width = geometry.level_shapes[0]
    ax.imshow(pixels[..., :3], extent=(0, width, height, 0), interpolation="antialiased")
    circles = [Circle(tuple(c), r) for c, r in zip(geometry.centers[known], geometry.radius[known], strict=True)]
    ax.add_collection(PatchCollection(circles, facecolors=facecolors, edgecolors="none", alpha=alpha))
    # frame the spots, not the whole slide (glass and margins take most of many scans)
    low, high = geometry.centers.min(axis=0), geometry.centers.max(axis=0)
    margin = 0.05 * (high - low).max() + 2 * geometry.radius.max()
    ax.set_xlim(max(low[0] - margin, 0), min(high[0] + margin, width))
    ax.set_ylim(min(high[1] + margin, height), max(low[1] - margin, 0))
    ax.set_axis_off()
    ax.set_aspect("equal")


def _draw_umap(ax: Axes, table, use_rep: str, labels: pd.Series, colors: dict[str, str], seed: int):
    import scanpy as sc

    known = labels.notna().to_numpy() & np.isfinite(table.obsm[use_rep]).all(axis=1)
    view = sc.AnnData(obsm={use_rep: np.asarray(table.obsm[use_rep])[known]})
    sc.pp.neighbors(view, use_rep=use_rep, random_state=seed)
    sc.tl.umap(view, random_state=seed)
    xy = view.obsm["X_umap"]
    ax.scatter(xy[:, 0], xy[:, 1], c=[colors[str(v)] for v in labels[known]], s=8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    ax.set_title(f"UMAP of {use_rep}")


def experts(
    sdata: SpatialData,
    *,
    color: str = "spade_expert",
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    umap: bool = False,
    use_rep: str = "X_spade",
    alpha: float = 0.8,
    seed: int = 0,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Axes | list[Axes] | Figure | None:
    """Expert assignment (or any categorical ``obs`` column) drawn as spots over the H&E.

    Parameters
    ----------
    sdata
        SpatialData embedded with :func:`spade_sd.tl.embed`.
    color
        Categorical ``obs`` column of the table to colour spots by.
    image_key, shapes_key, table_key
        Element names; inferred when unambiguous.
    umap
        Add a panel with a UMAP of ``use_rep`` coloured the same way.
    use_rep
        Embedding for the UMAP panel.
    alpha
        Opacity of the spots.
    seed
        Seed of the UMAP.
    title
        Title of the H&E panel (default: the image name).
    figsize
        Figure size when a new figure is made.
    ax
        Axes to draw the H&E panel into (only without ``umap``).
    show
        Show the figure; by default when matplotlib is interactive.
    save
        Write the figure to this file (the format from its suffix, e.g. ``"experts.png"`` or ``".pdf"``).
    return_fig
        Return the figure.

    Returns
    -------
    As scanpy's plots: the :class:`~matplotlib.figure.Figure` if ``return_fig``; else, when not shown
    (``show=False``), the H&E panel's :class:`~matplotlib.axes.Axes`, or ``[H&E, UMAP]`` with ``umap``; ``None``
    when shown.
    """
    save = check_save(save)
    geometry = resolve_geometry(
        sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key, require_scale=False
    )
    table = sdata.tables[geometry.table_key]
    if color not in table.obs:
        raise KeyError(
            f"{color!r} is not a column of table {geometry.table_key!r} (columns: {list(table.obs)}); "
            "run spade_sd.tl.embed first or pass color=."
        )
    if umap and use_rep not in table.obsm:
        raise KeyError(f"{use_rep!r} is not in table {geometry.table_key!r}.obsm ({list(table.obsm)}).")
    if ax is not None and umap:
        raise ValueError("ax holds one panel, but umap=True draws two; pass ax=None.")
    labels = table.obs[color].iloc[geometry.table_rows].astype("category")
    categories = [str(c) for c in labels.cat.categories]
    colors = _palette(table, color, categories)

    umap_ax, created = None, ax is None
    if ax is None:
        fig, axes = plt.subplots(
            1, 2 if umap else 1, figsize=figsize or ((11, 5) if umap else (6, 6)), squeeze=False, layout="constrained"
        )
        ax, umap_ax = axes[0, 0], (axes[0, 1] if umap else None)
    fig = ax.figure
    known = labels.notna().to_numpy()
    draw_spots(ax, sdata, geometry, [colors[str(v)] for v in labels[known]], known, alpha)
    ax.set_title(title or f"{geometry.image_key}: {color}")
    handles = [Patch(color=colors[c], label=c) for c in categories]
    ax.legend(handles=handles, title=color, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if umap_ax is not None:
        _draw_umap(umap_ax, table[geometry.table_rows], use_rep, labels, colors, seed)
    axes = ax if umap_ax is None else [ax, umap_ax]
    return finish(fig, axes, show=show, save=save, return_fig=return_fig, created=created)
