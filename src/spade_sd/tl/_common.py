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


def given_or_attached_model(sdata, model, tool: str):
    """``model``, else the model :func:`spade_sd.tl.pretrain` attached to ``sdata``; an error if there is neither.

    Unlike :func:`spade_sd.tl.embed`, tools that read what a model learnt never train one on the data in hand.
    """
    from spade_sd.model.spade_model import SpadeModel

    if model is None:
        model = ATTACHED_MODELS.get(sdata)
        if model is None:
            raise ValueError(
                f"{tool} needs a trained model: pass model= (a SpadeModel from sd.tl.pretrain or SpadeModel.load); "
                "none was given and none is attached to this SpatialData."
            )
    if not isinstance(model, SpadeModel):
        raise TypeError(f"Expected a spade_sd.SpadeModel as model, found {type(model).__name__}.")
    return model


def check_free_table_name(sdata, name: str) -> None:
    """Refuse ``name`` for a new table unless no element has it (any kind, any letter case) or it is a derived table.

    A derived table (``uns['spade_sd']['derived_from']``, written by :func:`spade_sd.tl.predict_expression`) is
    replaced; anything else is the user's and is kept.
    """
    from spade_sd.utils.constants import DERIVED_FROM, UNS_KEY

    for kind in ("images", "labels", "points", "shapes", "tables"):
        for existing in getattr(sdata, kind):
            if existing.lower() != name.lower():
                continue
            if kind == "tables" and existing == name and DERIVED_FROM in sdata.tables[name].uns.get(UNS_KEY, {}):
                return
            raise ValueError(
                f"The SpatialData already has an element {existing!r} ({kind[:-1]}) that was not written by "
                f"this tool; pass another key_added= (element names must be unique across kinds and letter case)."
            )


def obs_filled(table: AnnData, rows: np.ndarray, values: np.ndarray, key: str) -> np.ndarray:
    """A full ``(n_obs,)`` object column holding ``values`` at ``rows``, other rows keeping an existing ``obs[key]``."""
    full = np.full(table.n_obs, None, dtype=object)
    if key in table.obs and len(rows) < table.n_obs:
        full[:] = table.obs[key].astype(object).to_numpy()
    full[rows] = values
    return full


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero): cosine similarity becomes a dot product."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
