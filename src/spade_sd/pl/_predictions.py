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

from spade_sd.pl._common import as_slides, check_save, finish, panel_grid, per_slide
from spade_sd.pl._shapes import draw_shapes, slide_names
from spade_sd.spots.geometry import choose_element, resolve_geometry
from spade_sd.utils.constants import PREDICTED_KEY, QUERY_KEY

# Colour limits default to these percentiles of the values drawn, so a few extreme spots do not wash out the map
_LIMITS = (1, 99)


def _norm(values: list[np.ndarray], limits) -> Normalize:
    """Colour limits shared by the maps of ``values``: the given ones, else percentiles of their finite values."""
    low, high = limits
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    if finite.size:
        percentiles = np.percentile(finite, _LIMITS)
        low = percentiles[0] if low is None else low
        high = percentiles[1] if high is None else high
    return Normalize(vmin=low, vmax=high if high is None or low is None or high > low else low + 1e-9)


def _draw_values(ax: Axes, sdata: SpatialData, geometry, values: np.ndarray, cmap, alpha: float, norm) -> None:
    """Spots coloured by ``values`` (NaN left out) over the H&E."""
    known = np.isfinite(values)
    draw_shapes(ax, sdata, geometry, plt.get_cmap(cmap)(norm(values[known])), known, alpha)


def _colorbar(axes: Axes | list[Axes], cmap, norm) -> None:
    panels = axes if isinstance(axes, list) else [axes]
    panels[0].figure.colorbar(ScalarMappable(norm=norm, cmap=plt.get_cmap(cmap)), ax=axes, shrink=0.7)


def query(
    sdata: SpatialData | Sequence[SpatialData],
    key: str = QUERY_KEY,
    *,
    image_key: str | Sequence[str] | None = None,
    shapes_key: str | Sequence[str] | None = None,
    table_key: str | Sequence[str] | None = None,
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.8,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    title: str | Sequence[str] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Axes | list[Axes] | Figure | None:
    """The score of :func:`spade_sd.tl.query` as a heat map of spots, bins, cells or tiles over the H&E.

    Parameters
    ----------
    sdata
        SpatialData queried with :func:`spade_sd.tl.query`, or a list of them: one panel each, in a row, on one
        colour scale.
    key
        The ``.obs`` column of the score (``key_added`` of the query).
    image_key, shapes_key, table_key
        Elements; by default the table holding ``.obs[key]`` and the shapes the query scored. A list draws several
        slides held in one SpatialData, one panel each.
    cmap, alpha
        Colour map and opacity of the spots.
    vmin, vmax
        Colour limits; default the 1st and 99th percentiles of the scores (of all slides drawn).
    title
        Panel title, or one per slide; default the query's genes.
    figsize, ax
        Size of a new figure, or axes to draw into (one slide).
    show, return_fig
        Show the figure (default: when matplotlib is interactive); return it.
    save
        Write the figure to this file (the format from its suffix, e.g. ``"query.png"`` or ``".pdf"``).

    Returns
    -------
    As scanpy's plots: the :class:`~matplotlib.figure.Figure` if ``return_fig``; else the
    :class:`~matplotlib.axes.Axes` when not shown (``show=False``), a list of them with several slides; ``None``
    when shown.
    """
    save = check_save(save)
    slides = as_slides(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key)
    titles = per_slide(title, len(slides), "title")
    drawn = []
    for data, keys in slides:
        given = keys["table_key"]
        holding = [n for n, t in data.tables.items() if key in t.obs] if given is None else [given]
        if not holding:
            raise KeyError(
                f"No table of this SpatialData has .obs[{key!r}] (tables: {list(data.tables)}); run sd.tl.query "
                "first or pass key=."
            )
        table_name = choose_element("tables", holding, "table_key", f"tables with .obs[{key!r}]")
        table = data.tables[table_name]
        if key not in table.obs:
            raise KeyError(
                f"Table {table_name!r} has no .obs[{key!r}] (columns: {list(table.obs)}); run sd.tl.query first."
            )
        params = table.uns.get(key, {}).get("params", {})
        geometry = resolve_geometry(
            data,
            image_key=keys["image_key"],
            shapes_key=keys["shapes_key"] or params.get("shapes_key"),
            table_key=table_name,
            require_scale=False,
        )
        drawn.append((data, geometry, params, table.obs[key].to_numpy(dtype=float)[geometry.table_rows]))
    norm = _norm([values for *_, values in drawn], (vmin, vmax))
    fig, axes, created = panel_grid(1, len(drawn), ax=ax, figsize=figsize, panel=(6.5, 6))
    names = slide_names([geometry for _, geometry, _, _ in drawn])
    for panel, (data, geometry, params, values), name, given in zip(axes, drawn, names, titles, strict=True):
        _draw_values(panel, data, geometry, values, cmap, alpha, norm)
        genes = params.get("genes")
        default = f"query: {', '.join(map(str, genes)) if genes is not None else params.get('query', key)}"
        panel.set_title(given or (default if len(drawn) == 1 else f"{name}: {default}"))
    returned = axes[0] if len(axes) == 1 else axes
    _colorbar(returned, cmap, norm)
    return finish(fig, returned, show=show, save=save, return_fig=return_fig, created=created)


def expression(
    sdata: SpatialData | Sequence[SpatialData],
    genes: str | Sequence[str],
    *,
    predicted_key: str = PREDICTED_KEY,
    image_key: str | Sequence[str] | None = None,
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
        SpatialData holding the table of predictions, or a list of them: their maps side by side, slide by slide.
    genes
        Genes to draw, among the predicted ones.
    predicted_key
        Name of the table of predictions (``key_added`` of :func:`spade_sd.tl.predict_expression`).
    image_key
        The image, or one per slide; inferred when unambiguous.
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
    prediction, then its measurement, slide after slide); ``None`` when shown.
    """
    save = check_save(save)
    genes = [genes] if isinstance(genes, str) else list(genes)
    drawn = []
    for data, keys in as_slides(sdata, image_key=image_key):
        if predicted_key not in data.tables:
            raise KeyError(
                f"No table {predicted_key!r} (tables: {list(data.tables)}); run sd.tl.predict_expression first or "
                "pass predicted_key=."
            )
        predicted = data.tables[predicted_key]
        unknown = [g for g in genes if g not in predicted.var_names]
        if unknown or not genes:
            raise KeyError(
                f"Genes {unknown or genes} are not among the {predicted.n_vars} predicted genes of table "
                f"{predicted_key!r} (e.g. {predicted.var_names[:5].tolist()})."
            )
        params = predicted.uns.get(predicted_key, {}).get("params", {})
        elements = {"image_key": keys["image_key"], "shapes_key": params.get("shapes_key"), "require_scale": False}
        geometry = resolve_geometry(data, **elements, table_key=predicted_key)
        values = np.asarray(predicted[geometry.table_rows, genes].X, dtype=float)
        measured = _measured(data, predicted.obs_names[geometry.table_rows], genes, params, layer)
        drawn.append((data, geometry, values, measured))
    columns = sum(1 if measured is None else 2 for *_, measured in drawn)
    fig, panels, _ = panel_grid(len(genes), columns, ax=None, figsize=figsize, panel=(5, 4.5))
    axes = np.asarray(panels, dtype=object).reshape(len(genes), columns)
    names = slide_names([geometry for _, geometry, _, _ in drawn])
    for i, gene in enumerate(genes):
        column = 0
        for (data, geometry, values, measured), name in zip(drawn, names, strict=True):
            prefix = f"{name}: " if len(drawn) > 1 else ""
            maps = [(values[:, i], "predicted")]
            if measured is not None:
                maps.append((measured.get(gene), "measured"))
            for shown, what in maps:
                ax = axes[i, column]
                column += 1
                if shown is None:
                    ax.set_axis_off()
                    ax.text(0.5, 0.5, f"{prefix}{gene}: not measured", ha="center", va="center")
                    continue
                norm = _norm([shown], (None, None))
                _draw_values(ax, data, geometry, shown, cmap, alpha, norm)
                _colorbar(ax, cmap, norm)
                ax.set_title(f"{prefix}{gene} {what}")
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
