"""Mean ± std per encoder and metric of any evaluation frame."""

from __future__ import annotations

import pandas as pd

_REPLICATE_COLUMNS = ("fold", "repeat", "group")


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std per encoder and metric of any frame returned by this module's evaluations (or several concatenated).

    With a ``task`` column (:func:`spade_sd.tl.evaluate`'s frames), each task is summarised on its own: the ridge
    probe's and kNN's ``"pearson"`` are two rows, not one mean of both. Per-gene values are first averaged within
    each replicate (fold, repeat, group), ignoring NaN; the mean and standard deviation (``ddof=0``, as HEST reports
    it) are then taken over replicates.

    Parameters
    ----------
    df
        A tidy evaluation frame with at least ``encoder``, ``metric`` and ``value``.

    Returns
    -------
    One row per (encoder, metric), or per (encoder, task, metric) where ``df`` has a ``task`` column, in order of
    appearance, with columns ``encoder``, (``task``,) ``metric``, ``mean``,
    ``std``, ``n`` (replicates with a defined value) and ``n_undefined`` (NaN rows left out, e.g. genes
    constant in a test fold).
    """
    missing = {"encoder", "metric", "value"} - set(df.columns)
    if missing:
        raise ValueError(
            f"`df` needs the columns encoder, metric and value; missing {sorted(missing)} in {list(df.columns)}."
        )
    keys = ["encoder", "task", "metric"] if "task" in df.columns else ["encoder", "metric"]
    replicates = [column for column in _REPLICATE_COLUMNS if column in df.columns]
    per_replicate = df.groupby([*keys, *replicates], sort=False, dropna=False)["value"].mean().reset_index()
    summary = per_replicate.groupby(keys, sort=False)["value"].agg(
        mean="mean", std=lambda values: values.std(ddof=0), n="count"
    )
    undefined = df["value"].isna().groupby([df[key] for key in keys], sort=False).sum().rename("n_undefined")
    return summary.join(undefined).reset_index()
