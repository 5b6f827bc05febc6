"""sd.pl.domains: the domains of :func:`spade_sd.tl.domains` (or any categorical column) over the H&E."""

from __future__ import annotations

import os
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from spatialdata import SpatialData

from spade_sd.pl._common import as_slides, check_save, finish, panel_grid, per_slide
from spade_sd.pl._shapes import draw_categories, legend, palette, slide_names
from spade_sd.spots.geometry import choose_element, resolve_geometry
from spade_sd.utils.constants import DOMAINS_KEY


def domains(
    sdata: SpatialData | Sequence[SpatialData],
    key: str = DOMAINS_KEY,
    *,
    image_key: str | Sequence[str] | None = None,
    shapes_key: str | Sequence[str] | None = None,
    table_key: str | Sequence[str] | None = None,
    alpha: float = 0.8,
    title: str | Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Axes | list[Axes] | Figure | None:
    """Spatial domains (:func:`spade_sd.tl.domains`) as coloured spots, bins, cells or tiles over the H&E.

    Drawn as :func:`spade_sd.pl.experts` draws: circles, squares or polygons, one image of them above 50,000.

    Parameters
    ----------
    sdata
        SpatialData with the image, the spots or tiles and the table holding ``.obs[key]``; or a list of them, one
        panel each, in a row.
    key
        Categorical ``.obs`` column to colour by (``key_added`` of :func:`spade_sd.tl.domains`, or e.g. expression
        domains or an annotation, to compare).
    image_key, shapes_key, table_key
        Elements; by default the table holding ``.obs[key]``, the shapes it annotates and the image beside them. A
        list draws several slides held in one SpatialData, one panel each.
    alpha
        Opacity of the spots or tiles.
    title
        Panel title, or one per slide; default the column and the settings :func:`spade_sd.tl.domains` recorded.
    figsize, ax
        Size of a new figure, or axes to draw into (one slide).
    show
        Show the figure; by default when matplotlib is interactive.
    save
        Write the figure to this file (the format from its suffix, e.g. ``"domains.png"`` or ``".pdf"``).
    return_fig
        Return the figure instead of the axes.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` if ``return_fig``; else the :class:`~matplotlib.axes.Axes` when not
    shown (``show=False``), a list of them with several slides; ``None`` when shown.
    """
    save = check_save(save)
    slides = as_slides(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key)
    titles = per_slide(title, len(slides), "title")
    drawn = []
    for data, keys in slides:
        holding = (
            [n for n, t in data.tables.items() if key in t.obs] if keys["table_key"] is None else [keys["table_key"]]
        )
        if not holding:
            raise KeyError(
                f"No table of this SpatialData has .obs[{key!r}] (tables: {list(data.tables)}); run sd.tl.domains "
                "first or pass key=."
            )
        keys["table_key"] = choose_element("tables", holding, "table_key", f"tables with .obs[{key!r}]")
        geometry = resolve_geometry(data, **keys, require_scale=False)
        table = data.tables[geometry.table_key]
        if key not in table.obs:
            raise KeyError(
                f"Table {geometry.table_key!r} has no .obs[{key!r}] (columns: {list(table.obs)}); run sd.tl.domains."
            )
        labels = table.obs[key]
        if labels.dtype.name != "category":
            raise TypeError(
                f".obs[{key!r}] of table {geometry.table_key!r} holds {labels.dtype} values, not categories; pass a "
                "categorical column (sd.tl.domains writes one) or convert it with .astype('category')."
            )
        drawn.append((data, geometry, table, labels.iloc[geometry.table_rows]))
    categories = list(dict.fromkeys(str(c) for *_, labels in drawn for c in labels.cat.categories))
    colors = palette(drawn[0][2], key, categories)
    fig, axes, created = panel_grid(1, len(drawn), ax=ax, figsize=figsize, panel=(6.5, 6))
    names = slide_names([geometry for _, geometry, _, _ in drawn])
    for panel, (data, geometry, table, labels), name, given in zip(axes, drawn, names, titles, strict=True):
        draw_categories(panel, data, geometry, labels, colors, alpha)
        panel.set_title(given or (_title(table, key) if len(drawn) == 1 else f"{name}: {_title(table, key)}"))
    legend(axes[-1], colors, key)
    return finish(
        fig, axes[0] if len(axes) == 1 else axes, show=show, save=save, return_fig=return_fig, created=created
    )


def _title(table, key: str) -> str:
    params = table.uns.get(key, {}).get("params", {}) if isinstance(table.uns.get(key), dict) else {}
    if "use_rep" not in params:
        return key
    return f"{key}: {params['use_rep']}, λ = {params['spatial_weight']:g}, resolution {params['resolution']:g}"
