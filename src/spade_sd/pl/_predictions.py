"""Maps of what the aligned space predicts: query scores and predicted expression over the H&E."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from spatialdata import SpatialData

from spade_sd.pl._common import check_save, finish
from spade_sd.pl._experts import draw_spots
from spade_sd.spots.geometry import choose_element, resolve_geometry
from spade_sd.utils.constants import PREDICTED_KEY, QUERY_KEY

# Colour limits default to these percentiles of the values drawn, so a few extreme spots do not wash out the map
_LIMITS = (1, 99)


def _draw_values(ax: Axes, sdata: SpatialData, geometry, values: np.ndarray, cmap, alpha: float, limits) -> None:
    """Spots coloured by ``values`` (NaN left out) over the H&E, with a colour bar."""
    known = np.isfinite(values)
    low, high = limits
    if known.any():
        percentiles = np.percentile(values[known], _LIMITS)
        low = percentiles[0] if low is None else low
        high = percentiles[1] if high is None else high
    norm = Normalize(vmin=low, vmax=high if high is None or low is None or high > low else low + 1e-9)
    colormap = plt.get_cmap(cmap)
    draw_spots(ax, sdata, geometry, colormap(norm(values[known])), known, alpha)
    ax.figure.colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=ax, shrink=0.7)


def query(
    sdata: SpatialData,
    key: str = QUERY_KEY,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.8,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """The score of :func:`spade_sd.tl.query` as a heat map of spots (or tiles) over the H&E.

    Parameters
    ----------
    sdata
        SpatialData queried with :func:`spade_sd.tl.query`.
    key
        The ``.obs`` column of the score (``key_added`` of the query).
    image_key, shapes_key, table_key
        Elements; by default the table holding ``.obs[key]`` and the shapes the query scored.
    cmap, alpha
        Colour map and opacity of the spots.
    vmin, vmax
        Colour limits; default the 1st and 99th percentiles of the scores.
    title
        Panel title; default the query's genes.
    figsize, ax
        Size of a new figure, or axes to draw into.
    show, return_fig
        Show the figure (default: when matplotlib is interactive); return it.
    save
        Write the figure to this file (the format from its suffix, e.g. ``"query.png"`` or ``".pdf"``).

    Returns
    -------
    As scanpy's plots: the :class:`~matplotlib.figure.Figure` if ``return_fig``; else the
    :class:`~matplotlib.axes.Axes` when not shown (``show=False``), ``None`` when shown.
    """
    save = check_save(save)
    holding = [n for n, t in sdata.tables.items() if key in t.obs] if table_key is None else [table_key]
    if table_key is None and not holding:
        raise KeyError(
            f"No table of this SpatialData has .obs[{key!r}] (tables: {list(sdata.tables)}); run sd.tl.query first "
            "or pass key=."
        )
    table_key = choose_element("tables", holding, "table_key", f"tables with .obs[{key!r}]")
    table = sdata.tables[table_key]
    if key not in table.obs:
        raise KeyError(f"Table {table_key!r} has no .obs[{key!r}] (columns: {list(table.obs)}); run sd.tl.query first.")
    params = table.uns.get(key, {}).get("params", {})
    geometry = resolve_geometry(
        sdata,
        image_key=image_key,
        shapes_key=shapes_key or params.get("shapes_key"),
        table_key=table_key,
        require_scale=False,
    )
    values = table.obs[key].to_numpy(dtype=float)[geometry.table_rows]
    created = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=figsize or (6.5, 6), layout="constrained")
    _draw_values(ax, sdata, geometry, values, cmap, alpha, (vmin, vmax))
    genes = params.get("genes")
    ax.set_title(title or f"query: {', '.join(map(str, genes)) if genes is not None else params.get('query', key)}")
    return finish(ax.figure, ax, show=show, save=save, return_fig=return_fig, created=created)


def expression(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    predicted_key: str = PREDICTED_KEY,
    image_key: str | None = None,
    layer: str | None = None,
    cmap: str = "viridis",
    alpha: float = 0.9,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Axes | list[Axes] | Figure | None:
    """Predicted expression of genes (:func:`spade_sd.tl.predict_expression`) beside the measured one, over the H&E.

    One row per gene: the prediction, and where the spots' own table measures the gene, its measured
    ``log1p``-normalized expression (normalized as the prediction is) on the same spots. Each map has its own
    colour scale (1st to 99th percentile): predictions are smoother than measurements, so a shared scale would hide
    the pattern of one of them.

    Parameters
    ----------
    sdata
        SpatialData holding the table of predictions.
    genes
        Genes to draw, among the predicted ones.
    predicted_key
        Name of the table of predictions (``key_added`` of :func:`spade_sd.tl.predict_expression`).
    image_key
        The image; inferred when unambiguous.
    layer
        Layer of the spots' own table holding raw counts; ``None`` uses ``X``. A table without raw counts is drawn
        as it stores them.
    cmap, alpha
        Colour map and opacity of the spots.
    figsize
        Figure size; default 5 × 4.5 inches per map.
    show, return_fig
        Show the figure (default: when matplotlib is interactive); return it.
    save
        Write the figure to this file (the format from its suffix, e.g. ``"expression.png"`` or ``".pdf"``).

    Returns
    -------
    As scanpy's plots: the :class:`~matplotlib.figure.Figure` if ``return_fig``; else, when not shown
    (``show=False``), the :class:`~matplotlib.axes.Axes` of the one map, or a list of them, row by row (each gene's
    prediction, then its measurement); ``None`` when shown.
    """
    save = check_save(save)
    if predicted_key not in sdata.tables:
        raise KeyError(
            f"No table {predicted_key!r} (tables: {list(sdata.tables)}); run sd.tl.predict_expression first or pass "
            "predicted_key=."
        )
    predicted = sdata.tables[predicted_key]
    genes = [genes] if isinstance(genes, str) else list(genes)
    unknown = [g for g in genes if g not in predicted.var_names]
    if unknown or not genes:
        raise KeyError(
            f"Genes {unknown or genes} are not among the {predicted.n_vars} predicted genes of table {predicted_key!r} "
            f"(e.g. {predicted.var_names[:5].tolist()})."
        )
    params = predicted.uns.get(predicted_key, {}).get("params", {})
    elements = {"image_key": image_key, "shapes_key": params.get("shapes_key"), "require_scale": False}
    geometry = resolve_geometry(sdata, **elements, table_key=predicted_key)
    values = np.asarray(predicted[geometry.table_rows, genes].X, dtype=float)
    measured = _measured(sdata, predicted.obs_names[geometry.table_rows], genes, params, layer)
    columns = 1 if measured is None else 2
    fig, axes = plt.subplots(
        len(genes), columns, figsize=figsize or (5 * columns, 4.5 * len(genes)), squeeze=False, layout="constrained"
    )
    for i, gene in enumerate(genes):
        _draw_values(axes[i, 0], sdata, geometry, values[:, i], cmap, alpha, (None, None))
        axes[i, 0].set_title(f"{gene} predicted")
        if measured is None:
            continue
        if gene in measured:
            _draw_values(axes[i, 1], sdata, geometry, measured[gene], cmap, alpha, (None, None))
            axes[i, 1].set_title(f"{gene} measured")
        else:
            axes[i, 1].set_axis_off()
            axes[i, 1].text(0.5, 0.5, f"{gene}: not measured", ha="center", va="center")
    panels = list(axes.ravel())
    return finish(
        fig, panels[0] if len(panels) == 1 else panels, show=show, save=save, return_fig=return_fig, created=True
    )


def _measured(sdata: SpatialData, names, genes: list[str], params: dict, layer: str | None) -> dict | None:
    """Measured log1p-normalized expression of the genes the spots' own table holds, by gene, in ``names``' order."""
    from spade_sd.spots.genes import GenePanel

    own = sdata.tables.get(params.get("table_key"))
    present = [] if own is None else [g for g in genes if g in own.var_names]
    if not present:
        return None
    rows = own.obs_names.get_indexer(names)
    if (rows < 0).any():
        return None
    spots = own[rows]
    try:
        values = GenePanel(present, target_sum=params.get("target_sum", 1e4)).transform(spots, layer=layer)
    except (KeyError, ValueError):  # not raw counts (or no such layer): draw what the table holds
        values = np.asarray(spots[:, present].X.todense() if hasattr(spots.X, "todense") else spots[:, present].X)
    return {g: np.asarray(values[:, i], dtype=float).ravel() for i, g in enumerate(present)}
