"""What the public tools share: backbone arguments, writing results into tables, models attached to data."""

from __future__ import annotations

import weakref
from functools import cache

import numpy as np
from anndata import AnnData

# Models trained by pretrain(), by the SpatialData they were trained on; dropped with the object.
ATTACHED_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@cache
def _default_backbone():
    from spade_sd.encoders.backbone import Backbone

    return Backbone()


def as_backbone(backbone):
    """A :class:`~spade_sd.Backbone` from ``None`` (the offline default), a Backbone, or its constructor input."""
    from spade_sd.encoders.backbone import Backbone

    if backbone is None:
        return _default_backbone()
    return backbone if isinstance(backbone, Backbone) else Backbone(backbone)


def rows_filled(table: AnnData, rows: np.ndarray, values: np.ndarray, key: str | None = None) -> np.ndarray:
    """A full ``(n_obs, …)`` array holding ``values`` at ``rows``.

    Other rows keep the existing ``obsm[key]`` when it has the same width, else NaN (the table annotates other
    elements there).
    """
    if len(rows) == table.n_obs and np.array_equal(rows, np.arange(table.n_obs)):
        return values
    existing = table.obsm.get(key) if key is not None else None
    if existing is not None and np.shape(existing)[1:] == values.shape[1:]:
        full = np.array(existing, dtype=values.dtype, copy=True)
    else:
        full = np.full((table.n_obs, *values.shape[1:]), np.nan, dtype=values.dtype)
    full[rows] = values
    return full


def slide_name(table: AnnData, shapes_key: str) -> str:
    """The sample name a loader recorded, else the shapes' name."""
    return str(table.uns.get("spade_sd", {}).get("sample", shapes_key))
