"""What the public tools share: backbone arguments, writing results into tables, models attached to data."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cache

import numpy as np
from anndata import AnnData

from spade_sd.utils.constants import DERIVED_FROM, OUTPUTS, RESERVED_UNS, UNS_KEY, WRITTEN_BY
from spade_sd.utils.logging import logger

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


def table_owner(table: AnnData) -> str | None:
    """The tool that made ``table`` (``uns['spade_sd']['written_by']``), else ``None``: the user's own."""
    meta = table.uns.get(UNS_KEY, {})
    if not isinstance(meta, dict):
        return None
    # tables of predictions made before the record existed name their spots' table only
    return meta.get(WRITTEN_BY) or ("tl.predict_expression" if DERIVED_FROM in meta else None)


def check_free_table_name(sdata, name: str, tool: str, *, reads: dict[str, str] | None = None) -> bool:
    """Refuse ``name`` for a new table of ``tool`` unless it is free or names an earlier table of the same tool.

    ``reads`` maps the tables the call reads to why (e.g. ``{"table": "the spots' table"}``); they are never
    replaced. Element names must be unique across kinds and letter case. Returns whether an earlier table of
    ``tool`` is replaced (the caller logs it).
    """
    if name in RESERVED_UNS:
        # the new table's own record would go to .uns[name]
        raise ValueError(
            f"{tool} cannot name its table {name!r}: the names {list(RESERVED_UNS)} are reserved for tables' "
            "metadata. Pass another key_added=."
        )
    for kind in ("images", "labels", "points", "shapes", "tables"):
        for existing in getattr(sdata, kind):
            if existing.lower() != name.lower():
                continue
            if existing in (reads or {}):
                why = f"which this call reads ({reads[existing]})"
            else:
                owner = table_owner(sdata.tables[existing]) if kind == "tables" else None
                if owner == tool and existing == name:
                    return True
                why = f"written by {owner}" if owner else "not written by spade_sd"
            raise ValueError(
                f"The SpatialData already has an element {existing!r} ({kind[:-1]}), {why}; {tool} replaces only a "
                f"table it made itself. Pass another key_added= (element names must be unique across kinds and "
                f"letter case; taken: {_listed(_element_names(sdata))})."
            )
    return False


def _element_names(sdata) -> list[str]:
    return [name for kind in ("images", "labels", "points", "shapes", "tables") for name in getattr(sdata, kind)]


def _listed(names: list[str], limit: int = 10) -> str:
    return repr(sorted(names)[:limit])[:-1] + (", …]" if len(names) > limit else "]")


@dataclass(frozen=True)
class Outputs:
    """The slots a tool is about to write in one table, checked by :func:`claim_outputs`; :meth:`record` them."""

    table: AnnData
    table_key: str
    tool: str
    slots: tuple[tuple[str, str], ...]
    replaced: tuple[tuple[str, str], ...]

    def record(self) -> None:
        """Record ``tool`` as the owner of every slot (in ``uns['spade_sd']['outputs']``) and log what it replaced.

        Call it once the outputs are written. Records of keys no longer in the table are dropped, so a key the
        user deletes and then makes again is theirs.
        """
        meta = self.table.uns.setdefault(UNS_KEY, {})
        record = {
            field: {key: str(owner) for key, owner in owners.items() if key in _field(self.table, field)}
            for field, owners in meta.get(OUTPUTS, {}).items()
        }
        for field, key in self.slots:
            if key in _field(self.table, field):  # a slot the call may write but did not (embed's gene side)
                record.setdefault(field, {})[key] = self.tool
        meta[OUTPUTS] = {field: owners for field, owners in record.items() if owners}
        if self.replaced:
            replaced = ", ".join(f".{field}[{key!r}]" for field, key in self.replaced)
            logger.info("%s replaced its earlier %s of table %r", self.tool, replaced, self.table_key)


def _field(table: AnnData, field: str):
    return table.obs.columns if field == "obs" else getattr(table, field)


def output_owner(table: AnnData, field: str, key: str) -> str | None:
    """The tool recorded as the writer of ``table.<field>[key]``, ``None`` if none is (the key is the user's)."""
    meta = table.uns.get(UNS_KEY, {})
    owners = meta.get(OUTPUTS, {}).get(field, {}) if isinstance(meta, dict) else {}
    owner = owners.get(key) if isinstance(owners, dict) else None
    return _earlier_owner(table, field, key) if owner is None else str(owner)


def _earlier_owner(table: AnnData, field: str, key: str) -> str | None:
    """The tool that wrote ``table.<field>[key]`` before ownership was recorded, told by the record it left beside.

    Tables embedded by an earlier spade_sd (read back from zarr) hold no ``outputs`` record; each tool's own
    ``.uns`` entry still says what it wrote, so rerunning the tool replaces its output instead of refusing it.
    """
    for name, entry in table.uns.items():
        if name in RESERVED_UNS or not hasattr(entry, "get"):
            continue
        if "outputs" in entry and "model" in entry:  # tl.embed: .uns[stem] lists its .obsm keys and expert column
            written = {str(k) for k in entry["outputs"]}
            if (field == "uns" and key == name) or (field in ("obsm", "obs") and key in written):
                return "tl.embed"
        elif key == name and "params" in entry:
            params = entry["params"]
            if "backbone" in entry and field in ("obsm", "uns"):
                return "tl.features"
            if "profile" in entry and "model" in entry and field in ("obs", "uns"):
                return "tl.query"
            if hasattr(params, "get") and "label_key" in params and field in ("obs", "uns"):
                return "tl.transfer_labels"
        elif field == "obsm" and key == f"{name}_probabilities" and "label_key" in entry.get("params", {}):
            return "tl.transfer_labels"
    return None


def claim_outputs(
    table: AnnData,
    table_key: str,
    tool: str,
    slots: list[tuple[str, str]],
    *,
    reads: dict[tuple[str, str], str] | None = None,
) -> Outputs:
    """Check, before any work, that ``tool`` may write ``slots`` (``("obs" | "obsm" | "uns", key)``) of ``table``.

    A slot is refused when the call reads it (``reads`` maps such slots to why), when it is spade_sd's or
    spatialdata's metadata, or when it holds anything but an earlier output of the same tool: another tool's
    output or the user's own data. The error names the reason and the keys taken.
    """
    replaced = []
    for field, key in slots:
        owner = output_owner(table, field, key)
        deletable = False  # what the call reads and the metadata must stay; an existing output may go
        if (field, key) in (reads or {}):
            why = f"this call reads it ({reads[field, key]})"
        elif field == "uns" and key in RESERVED_UNS:
            why = "it holds the table's metadata (spade_sd's and spatialdata's), which the tools read"
        elif key not in _field(table, field):
            continue
        elif owner == tool:
            replaced.append((field, key))
            continue
        else:
            deletable = True
            why = (
                f"it holds the output of {owner}, which {tool} does not overwrite"
                if owner
                else "it holds data that spade_sd did not write (yours, or another package's), which no tool overwrites"
            )
        taken = f".{field} of that table has {_listed([str(k) for k in _field(table, field)])}"
        delete = f", or delete .{field}[{key!r}] first if it is not needed" if deletable else ""
        raise ValueError(
            f"{tool} cannot write .{field}[{key!r}] of table {table_key!r}: {why}. Pass another key_added= "
            f"({taken}){delete}."
        )
    return Outputs(table, table_key, tool, tuple(slots), tuple(replaced))


def parent_table(table: AnnData) -> AnnData:
    """The AnnData a view (``table[rows]``) was taken from, else ``table`` itself: which spots a table holds."""
    return table._adata_ref if table.is_view else table


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
