"""sd.pl.experts: the experts of :func:`spade_sd.tl.embed` (or any categorical column) over the H&E, and a UMAP."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from spatialdata import SpatialData

from spade_sd.pl._common import as_slides, check_save, finish, panel_grid, per_slide
from spade_sd.pl._shapes import draw_categories, legend, palette, slide_names
from spade_sd.spots.geometry import resolve_geometry
from spade_sd.utils.constants import EMBEDDING_KEY, NEIGHBORS_KEY, UMAP_KEY
from spade_sd.utils.logging import logger


def _stored_umap(table, use_rep: str) -> str | None:
    """How to title the table's own ``X_umap`` if it can stand for a UMAP of ``use_rep``; ``None`` if it cannot.

    scanpy's neighbours record the representation they were built on (``uns['neighbors']['params']['use_rep']``,
    when given): a UMAP of another one is not reused. Without a record the stored UMAP is reused as the table's own.
    """
    if UMAP_KEY not in table.obsm:
        return None
    neighbors = table.uns.get(NEIGHBORS_KEY)
    recorded = neighbors.get("params", {}).get("use_rep") if isinstance(neighbors, dict) else None
    if recorded is None:
        return f"the table's {UMAP_KEY}"
    return f"UMAP of {use_rep}" if recorded == use_rep else None


def _umap(table, use_rep: str, known: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """UMAP coordinates of the rows drawn, which rows those are, and the panel's title.

    The table's own ``X_umap`` when it can stand for a UMAP of ``use_rep``; else one computed on the ``known`` rows.
    """
    stored = _stored_umap(table, use_rep)
    if stored is not None:
        logger.info(f"Drawing the table's stored {UMAP_KEY!r} ({stored}), not computing another.")
        xy = np.asarray(table.obsm[UMAP_KEY], dtype=float)
        drawn = known & np.isfinite(xy).all(axis=1)
        return xy[drawn], drawn, stored
    import scanpy as sc

    drawn = known & np.isfinite(table.obsm[use_rep]).all(axis=1)
    view = sc.AnnData(obsm={use_rep: np.asarray(table.obsm[use_rep])[drawn]})
    sc.pp.neighbors(view, use_rep=use_rep, random_state=seed)
    sc.tl.umap(view, random_state=seed)
    return view.obsm[UMAP_KEY], drawn, f"UMAP of {use_rep}"


def _draw_umap(ax: Axes, table, use_rep: str, labels: pd.Series, colors: dict[str, str], seed: int) -> None:
    xy, drawn, title = _umap(table, use_rep, labels.notna().to_numpy(), seed)
    ax.scatter(xy[:, 0], xy[:, 1], c=[colors[str(v)] for v in labels[drawn]], s=8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    ax.set_title(title)


def experts(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    color: str = "spade_expert",
    image_key: str | Sequence[str] | None = None,
    shapes_key: str | Sequence[str] | None = None,
    table_key: str | Sequence[str] | None = None,
    umap: bool = False,
    use_rep: str = EMBEDDING_KEY,
    alpha: float = 0.8,
    seed: int = 0,
    title: str | Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Axes | list[Axes] | Figure | None:
    """Expert assignment (or any categorical ``obs`` column) drawn over the H&E, one panel per slide.

    Spots are drawn as circles, Visium HD bins as squares and cells as their polygons, semi-transparent over the
    tissue; more than 50,000 of them in a panel become one image at the panel's resolution (a few seconds for
    500,000 bins, ``benchmarks/results/plots.md``).

    Parameters
    ----------
    sdata
        SpatialData embedded with :func:`spade_sd.tl.embed`, or a list of them: one panel each, in a row, with one
        legend of the categories of all.
    color
        Categorical ``obs`` column of the table to colour spots by.
    image_key, shapes_key, table_key
        Element names; inferred when unambiguous. A list draws several slides held in one SpatialData (e.g.
        ``shapes_key=["slide1_spots", "slide2_spots"]``), one panel each.
    umap
        Add a UMAP of ``use_rep`` coloured the same way (one per slide, below its H&E when there are several). The
        table's own ``.obsm['X_umap']`` is drawn when scanpy's neighbours were built on ``use_rep`` (or record
        nothing); otherwise one is computed.
    use_rep
        Embedding for the UMAP panel.
    alpha
        Opacity of the spots.
    seed
        Seed of the UMAP.
    title
        Title of the H&E panel, or one per slide (default: the image name and ``color``).
    figsize
        Figure size when a new figure is made.
    ax
        Axes to draw the H&E panel into (one slide, without ``umap``).
    show
        Show the figure; by default when matplotlib is interactive.
    save
        Write the figure to this file (the format from its suffix, e.g. ``"experts.png"`` or ``".pdf"``).
    return_fig
        Return the figure.

    Returns
    -------
    As scanpy's plots: the :class:`~matplotlib.figure.Figure` if ``return_fig``; else, when not shown
    (``show=False``), the H&E panel's :class:`~matplotlib.axes.Axes`, or a list: ``[H&E, UMAP]`` with ``umap``, one
    H&E panel per slide (then their UMAPs) with several slides; ``None`` when shown.
    """
    save = check_save(save)
    slides = as_slides(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key)
    titles = per_slide(title, len(slides), "title")
    # one slide: [H&E, UMAP] side by side; several: their H&E panels in a row, their UMAPs below
    rows, columns = (2 if umap and len(slides) > 1 else 1), (2 if umap and len(slides) == 1 else len(slides))
    if ax is not None and rows * columns > 1:
        raise ValueError(f"ax holds one panel, but this call draws {rows * columns} (slides and UMAPs); pass ax=None.")
    drawn = []
    for data, keys in slides:
        geometry = resolve_geometry(data, **keys, require_scale=False)
        table = data.tables[geometry.table_key]
        if color not in table.obs:
            raise KeyError(
                f"{color!r} is not a column of table {geometry.table_key!r} (columns: {list(table.obs)}); "
                "run spade_sd.tl.embed first or pass color=."
            )
        if umap and use_rep not in table.obsm and _stored_umap(table, use_rep) is None:
            raise KeyError(
                f"{use_rep!r} is not in table {geometry.table_key!r}.obsm ({list(table.obsm)}), and no "
                f"{UMAP_KEY!r} of it is stored; run spade_sd.tl.embed first or pass use_rep=."
            )
        drawn.append((data, geometry, table, table.obs[color].iloc[geometry.table_rows].astype("category")))
    categories = list(dict.fromkeys(str(c) for *_, labels in drawn for c in labels.cat.categories))
    colors = palette(drawn[0][2], color, categories)

    panel = (11 / columns, 5) if umap and rows == 1 else (6, 6)
    fig, axes, created = panel_grid(rows, columns, ax=ax, figsize=figsize, panel=panel)
    names = slide_names([geometry for _, geometry, _, _ in drawn])
    for i, (data, geometry, table, labels) in enumerate(drawn):
        draw_categories(axes[i], data, geometry, labels, colors, alpha)
        axes[i].set_title(titles[i] or f"{names[i]}: {color}")
        if umap:
            _draw_umap(axes[len(drawn) + i], table[geometry.table_rows], use_rep, labels, colors, seed)
    legend(axes[len(drawn) - 1], colors, color)
    return finish(
        fig, axes[0] if len(axes) == 1 else axes, show=show, save=save, return_fig=return_fig, created=created
    )
