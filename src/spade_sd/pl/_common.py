"""What every ``sd.pl`` function shares: the slides it draws, its panels, and, as scanpy's plots do, save and show.

Last, each plot saves the figure, shows it, and returns the axes or the figure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from spatialdata import SpatialData


def as_slides(
    sdata: SpatialData | Sequence[SpatialData], **keys: str | Sequence[str] | None
) -> list[tuple[SpatialData, dict]]:
    """One ``(SpatialData, element names)`` per slide to draw, each its own panel.

    Several slides are a list of SpatialData, or lists of element names (``shapes_key=[...]``, ``image_key=[...]``)
    naming slides held in one SpatialData; a single value applies to every slide.

    Raises
    ------
    TypeError
        If ``sdata`` holds anything but SpatialData.
    ValueError
        If the lists are empty or of different lengths.
    """
    several = isinstance(sdata, Sequence) and not isinstance(sdata, str)
    datas = list(sdata) if several else [sdata]
    wrong = [type(d).__name__ for d in datas if not isinstance(d, SpatialData)]
    if wrong:
        raise TypeError(f"Expected a spatialdata.SpatialData or a list of them; found {', '.join(wrong)}.")
    lengths = {"sdata": len(datas)} if several else {}
    for name, value in keys.items():
        if isinstance(value, Sequence) and not isinstance(value, str):
            lengths[name] = len(value)
    n = max(lengths.values(), default=1)
    if n == 0 or any(length != n for length in lengths.values()):
        raise ValueError(
            f"Several slides are drawn from lists of one length each (one entry per slide); found lengths "
            f"{lengths}. Pass lists of equal, non-zero length, or single values that apply to every slide."
        )

    def entry(value, i: int):
        return value[i] if isinstance(value, Sequence) and not isinstance(value, str) else value

    return [(datas[i] if several else datas[0], {k: entry(v, i) for k, v in keys.items()}) for i in range(n)]


def per_slide(value: str | Sequence[str] | None, n: int, argument: str) -> list:
    """``value`` for each of ``n`` slides: a single value (or ``None``) for all, or a list with one per slide."""
    if value is None or isinstance(value, str):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{argument} needs one entry per slide ({n}); found {len(value)}: {list(value)!r}.")
    return list(value)


def panel_grid(
    rows: int, columns: int, *, ax: Axes | None, figsize: tuple[float, float] | None, panel: tuple[float, float]
) -> tuple[Figure, list[Axes], bool]:
    """The figure's panels, row by row: new ones (``panel`` inches each unless ``figsize``), or the caller's ``ax``.

    Returns the figure, its panels and whether the figure was made here.
    """
    if ax is not None:
        if rows * columns != 1:
            raise ValueError(f"ax holds one panel, but this plot draws {rows * columns}; pass ax=None.")
        return ax.figure, [ax], False
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=figsize or (panel[0] * columns, panel[1] * rows),
        squeeze=False,
        layout="constrained",
    )
    return fig, list(axes.ravel()), True


def check_save(save: str | os.PathLike | None) -> Path | None:
    """The file ``save`` names, checked before anything is drawn: a known image format and an existing folder.

    A path without a suffix gets matplotlib's default format (``savefig.format``, PNG unless changed), as
    :meth:`~matplotlib.figure.Figure.savefig` would add it.

    Raises
    ------
    TypeError
        If ``save`` is not a path.
    ValueError
        If its suffix is no format matplotlib writes, or it names a folder.
    FileNotFoundError
        If its folder does not exist.
    """
    if save is None:
        return None
    if isinstance(save, bool) or not isinstance(save, str | os.PathLike):
        raise TypeError(f"save must be a file path (e.g. 'experts.png') or None; found {save!r}.")
    path = Path(save).expanduser()
    if not path.suffix:
        path = path.with_name(f"{path.name}.{mpl.rcParams['savefig.format']}")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(
            f"save={str(save)!r}: matplotlib cannot write {path.suffix!r} files; end the path with one of "
            f"{sorted('.' + f for f in formats)}, e.g. '.png' or '.pdf'."
        )
    if path.is_dir():
        raise ValueError(f"save={str(save)!r} is a folder; pass a file path such as {str(path / 'figure.png')!r}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"save={str(save)!r}: the folder {str(path.parent)!r} does not exist; create it or save elsewhere."
        )
    return path


def finish(
    fig: Figure,
    axes: Axes | list[Axes],
    *,
    show: bool | None,
    save: Path | None,
    return_fig: bool,
    created: bool,
) -> Axes | list[Axes] | Figure | None:
    """Save the figure (if ``save``), show it (if ``show``), and return what scanpy's plots return.

    Parameters
    ----------
    fig
        The figure drawn.
    axes
        Its panels: one Axes, or a list when there are several.
    show
        Show the figure; ``None``: when matplotlib is interactive.
    save
        The file checked by :func:`check_save`, or ``None``. It is written next to its final name and renamed, so
        a failure never leaves a half-written file in its place.
    return_fig
        Return the figure, whether shown or not.
    created
        The figure was made by the plot (not the caller's ``ax``): saved, it is closed, as scanpy does, so that
        figures saved in a loop do not pile up; the returned axes stay usable.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` if ``return_fig``; else ``None`` when shown, the axes when not.
    """
    if save is not None:
        _save_atomically(fig, save)
    shown = mpl.is_interactive() if show is None else show
    if shown:
        plt.show()
    if save is not None and created:
        plt.close(fig)
    if return_fig:
        return fig
    return None if shown else axes


def _save_atomically(fig: Figure, path: Path) -> None:
    # a name of this process beside the target (not tempfile's, whose files are private to the user)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        fig.savefig(partial, format=path.suffix[1:].lower(), bbox_inches="tight")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
