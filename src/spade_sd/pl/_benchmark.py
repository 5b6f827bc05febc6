"""Plot evaluation results: encoders side by side, one panel per metric, mean ± std over folds or repeats."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from spade_sd.metrics import summarize
from spade_sd.pl._common import check_save, finish

_CHANCE_PREFIX = "chance@"
_SUMMARY_COLUMNS = {"encoder", "metric", "mean", "std"}


def _as_summary(df: pd.DataFrame) -> pd.DataFrame:
    if "value" in df.columns:
        summary = summarize(df)
    elif _SUMMARY_COLUMNS <= set(df.columns):
        summary = df
    else:
        raise ValueError(
            "`df` must be an evaluation frame (columns encoder, metric, value) or its `summarize` output "
            f"(columns encoder, metric, mean, std); found columns {list(df.columns)}."
        )
    return _metric_per_task(summary)


def _metric_per_task(summary: pd.DataFrame) -> pd.DataFrame:
    """A metric that several tasks share (the probe's and kNN's ``pearson``) becomes one panel per task."""
    if "task" not in summary.columns:
        return summary
    shared = summary.groupby("metric", sort=False)["task"].nunique() > 1
    renamed = summary["metric"].map(shared).fillna(False).astype(bool)
    return summary.assign(metric=summary["metric"].where(~renamed, summary["metric"] + " (" + summary["task"] + ")"))


def _chosen_metrics(summary: pd.DataFrame, metric: str | Sequence[str] | None) -> list[str]:
    # Chance levels are drawn as reference lines on their recall panels, not as panels of their own.
    available = [m for m in dict.fromkeys(summary["metric"]) if not m.startswith(_CHANCE_PREFIX)]
    if metric is None:
        return available
    chosen = [metric] if isinstance(metric, str) else list(metric)
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; available: {available}.")
    return chosen


def _chance_level(summary: pd.DataFrame, metric: str) -> float | None:
    if "@" not in metric:
        return None
    reference = summary.loc[summary["metric"] == _CHANCE_PREFIX + metric.split("@", 1)[1], "mean"]
    return float(reference.mean()) if len(reference) else None


def _draw_panel(
    ax: Axes, panel: pd.DataFrame, colors: dict[str, str], kind: Literal["bar", "point"], chance: float | None
) -> None:
    positions = np.arange(len(panel))
    panel_colors = [colors[encoder] for encoder in panel["encoder"]]
    if kind == "bar":
        ax.bar(positions, panel["mean"], yerr=panel["std"], color=panel_colors, capsize=3)
    else:
        for position, mean, std, color in zip(positions, panel["mean"], panel["std"], panel_colors, strict=True):
            ax.errorbar(position, mean, yerr=std, fmt="o", color=color, capsize=3)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.legend(frameon=False, fontsize="small")
    ax.set_xticks(positions, panel["encoder"], rotation=45, ha="right")
    ax.set_xlim(-0.5, len(panel) - 0.5)
    ax.set_title(panel["metric"].iloc[0])
    ax.set_ylabel("mean ± std")


def benchmark(
    df: pd.DataFrame,
    *,
    metric: str | Sequence[str] | None = None,
    kind: Literal["bar", "point"] = "bar",
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Axes | list[Axes] | Figure | None:
    """Compare encoders on evaluation results: one panel per metric, mean ± std over folds or repeats.

    Parameters
    ----------
    df
        Output of the evaluations (several encoders concatenated), or its :func:`~spade_sd.metrics.summarize`
        output. Per-gene scores are averaged over genes first, then over folds / repeats.
    metric
        Metric(s) to show; default all of them. A metric of several tasks is named with its task, e.g.
        ``"pearson (knn)"``. ``chance@k`` rows (from gene → image recall) become a dashed
        reference line on the ``recall@k`` panel.
    kind
        ``"bar"``: bars with error bars; ``"point"``: points with error bars.
    ax
        Axes to draw on; only when a single panel is drawn.
    figsize
        Size of a new figure; default 3.2 × 3.2 inches per panel.
    show
        Show the figure; default: only when matplotlib is in interactive mode.
    save
        Write the figure to this file (the format from its suffix, e.g. ``"benchmark.png"`` or ``".pdf"``).
    return_fig
        Return the figure.

    Returns
    -------
    As scanpy's plots: the :class:`~matplotlib.figure.Figure` if ``return_fig``; else, when not shown
    (``show=False``), the :class:`~matplotlib.axes.Axes` of the one metric, or a list of them, one per metric;
    ``None`` when shown.
    """
    save = check_save(save)
    if kind not in ("bar", "point"):
        raise ValueError(f'`kind` must be "bar" or "point"; found {kind!r}.')
    summary = _as_summary(df)
    metrics = _chosen_metrics(summary, metric)
    if ax is not None and len(metrics) != 1:
        raise ValueError(f"`ax` holds one panel but {len(metrics)} metrics were chosen ({metrics}); pass `metric`.")
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {encoder: cycle[i % len(cycle)] for i, encoder in enumerate(dict.fromkeys(summary["encoder"]))}
    created = ax is None
    if ax is None:
        width, height = figsize or (3.2 * len(metrics), 3.2)
        fig, axes = plt.subplots(1, len(metrics), figsize=(width, height), squeeze=False, layout="constrained")
        panels = list(axes.ravel())
    else:
        fig, panels = ax.figure, [ax]
    for panel_ax, name in zip(panels, metrics, strict=True):
        panel = summary[summary["metric"] == name]
        _draw_panel(panel_ax, panel, colors, kind, _chance_level(summary, name))
    axes = panels[0] if len(panels) == 1 else panels
    return finish(fig, axes, show=show, save=save, return_fig=return_fig, created=created)
