"""sd.pl.domains: the domains of :func:`spade_sd.tl.domains` (or any categorical column) over the H&E."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from spatialdata import SpatialData

from spade_sd.pl._common import check_save, finish
from spade_sd.spots.geometry import choose_element, resolve_elements
from spade_sd.utils.constants import DOMAINS_KEY

# Margin around the spots, as a share of their extent: the view frames the tissue, not the whole scan.
_MARGIN = 0.05


def domains(
    sdata: SpatialData,
    key: str = DOMAINS_KEY,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    alpha: float = 0.8,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Spatial domains (:func:`spade_sd.tl.domains`) as coloured spots or tiles over the H&E, with spatialdata-plot.

    Parameters
    ----------
    sdata
        SpatialData with the image, the spots or tiles and the table holding ``.obs[key]``.
    key
        Categorical ``.obs`` column to colour by (``key_added`` of :func:`spade_sd.tl.domains`, or e.g. expression
        domains or an annotation, to compare).
    image_key, shapes_key, table_key
        Elements; by default the table holding ``.obs[key]``, the shapes it annotates and the image beside them.
    alpha
        Opacity of the spots or tiles.
    title
        Panel title; default the column and the settings :func:`spade_sd.tl.domains` recorded.
    figsize, ax
        Size of a new figure, or axes to draw into.
    show
        Show the figure; by default when matplotlib is interactive.
    save
        Write the figure to this file (the format from its suffix, e.g. ``"domains.png"`` or ``".pdf"``).
    return_fig
        Return the figure instead of the axes.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` if ``return_fig``; else the :class:`~matplotlib.axes.Axes` when not
    shown (``show=False``), ``None`` when shown.
    """
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor of SpatialData)

    save = check_save(save)

    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a spatialdata.SpatialData, found {type(sdata).__name__}.")
    holding = [n for n, t in sdata.tables.items() if key in t.obs] if table_key is None else [table_key]
    if not holding:
        raise KeyError(
            f"No table of this SpatialData has .obs[{key!r}] (tables: {list(sdata.tables)}); run sd.tl.domains first "
            "or pass key=."
        )
    table_key = choose_element("tables", holding, "table_key", f"tables with .obs[{key!r}]")
    image_key, shapes_key, table_key, system = resolve_elements(
        sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key
    )
    table = sdata.tables[table_key]
    if key not in table.obs:
        raise KeyError(f"Table {table_key!r} has no .obs[{key!r}] (columns: {list(table.obs)}); run sd.tl.domains.")
    labels = table.obs[key]
    if labels.dtype.name != "category":
        raise TypeError(
            f".obs[{key!r}] of table {table_key!r} holds {labels.dtype} values, not categories; pass a categorical "
            "column (sd.tl.domains writes one) or convert it with .astype('category')."
        )
    created = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=figsize or (6.5, 6), layout="constrained")
    (
        sdata.pl.render_images(element=image_key)
        .pl.render_shapes(element=shapes_key, color=key, table_name=table_key, fill_alpha=alpha)
        .pl.show(coordinate_systems=system, ax=ax, title=title or _title(table, key), show=False)
    )
    _frame(ax, sdata.shapes[shapes_key], system)
    ax.set_axis_off()
    return finish(ax.figure, ax, show=show, save=save, return_fig=return_fig, created=created)


def _title(table, key: str) -> str:
    params = table.uns.get(key, {}).get("params", {}) if isinstance(table.uns.get(key), dict) else {}
    if "use_rep" not in params:
        return key
    return f"{key}: {params['use_rep']}, λ = {params['spatial_weight']:g}, resolution {params['resolution']:g}"


def _frame(ax: Axes, shapes, system: str) -> None:
    """Limit the view to the shapes' extent and a margin (the scan around the tissue is mostly glass)."""
    from spatialdata import get_extent

    extent = get_extent(shapes, coordinate_system=system)
    (x0, x1), (y0, y1) = extent["x"], extent["y"]
    margin = _MARGIN * max(x1 - x0, y1 - y0)
    ax.set_xlim(x0 - margin, x1 + margin)
    ax.set_ylim(y1 + margin, y0 - margin)
