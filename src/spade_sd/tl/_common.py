"""What the public tools share: backbone arguments, writing results into tables, finding the model, legacy input.

Finding the model (:func:`find_model`): one given (a :class:`~spade_sd.SpadeModel`, or a folder or Hugging Face Hub
id it was saved to), else the one :func:`spade_sd.tl.pretrain` attached to the data, else the one an earlier
:func:`spade_sd.tl.embed` recorded in ``.uns`` (its identity and where it was saved), loaded from there.

Legacy input (:func:`accepts_legacy_anndata`): scanpy's spatial AnnData (``uns['spatial']``) is converted to a
SpatialData with spatialdata-io, the tool runs on it, and the outputs it records are written back to the AnnData (or,
for a tool that makes a new table, that table is returned).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData
from spatialdata import SpatialData

from spade_sd.utils.constants import (
    DERIVED_FROM,
    LEGACY_SPATIAL,
    MODEL_SOURCE,
    OUTPUTS,
    RESERVED_UNS,
    SOURCE_PATH,
    SOURCE_REPO,
    SOURCE_REVISION,
    SPATIAL_KEY,
    UNS_KEY,
    WRITTEN_BY,
)
from spade_sd.utils.logging import logger

# Models trained by pretrain(), by the SpatialData they were trained on; dropped with the object.
ATTACHED_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The same for legacy AnnData objects (unhashable, so by id, each entry dropped with its object): {id: (ref, model)}
_ANNDATA_MODELS: dict[int, tuple[weakref.ref, Any]] = {}
# SpatialData converted from a legacy AnnData -> that AnnData, so models attached to one are found from the other
_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    """The model :func:`find_model` finds; an error saying what to pass if it finds none.

    Unlike :func:`spade_sd.tl.embed`, tools that read what a model learnt never train one on the data in hand.
    """
    found, problem = find_model(sdata, model, tool)
    if found is None:
        raise ValueError(
            f"{tool} needs a trained model: pass model= (a SpadeModel from sd.tl.pretrain, or the folder or Hugging "
            "Face Hub id it was saved to with save_pretrained); none was given and none is attached to this "
            f"SpatialData{'; ' + problem if problem else ''}."
        )
    return found


def find_model(sdata, model, tool: str, *, records: dict[str, Mapping] | None = None) -> tuple[Any, str | None]:
    """The model to use, and ``None`` or why no earlier one could be found.

    Parameters
    ----------
    sdata
        The data the tool runs on.
    model
        A :class:`~spade_sd.SpadeModel`, a folder or Hugging Face Hub repository id
        (:meth:`SpadeModel.from_pretrained <spade_sd.SpadeModel.from_pretrained>`), or ``None``: the model
        attached to ``sdata`` by :func:`spade_sd.tl.pretrain`, else the one ``records`` name.
    tool
        The tool, named in messages.
    records
        The earlier embeddings' ``.uns`` records to look at, by where they are (e.g. ``".uns['spade'] of table
        'table'"``); ``None`` looks at every table's. A model they name is loaded from where it was saved (logged)
        and attached to ``sdata``; a differing identity is warned about, saying what differs.

    Returns
    -------
    The model (``None`` if none was given, attached or recorded and found), and why a recorded one was not found.
    """
    if model is not None:
        return as_model(model, tool), None
    found = attached_model(sdata)
    if found is not None:
        return found, None
    records = embedding_records(sdata) if records is None else records
    found, problem = _recorded_model(records)
    if found is not None:
        attach_model(sdata, found)
    return found, problem


def as_model(model, tool: str):
    """``model`` if it is a :class:`~spade_sd.SpadeModel`, else the model saved in the folder or Hub repository it names."""
    from spade_sd.model.spade_model import SpadeModel

    if isinstance(model, str | os.PathLike):
        return SpadeModel.from_pretrained(model)
    if not isinstance(model, SpadeModel):
        raise TypeError(
            f"{tool}: Expected a spade_sd.SpadeModel as model (or the folder or Hugging Face Hub id of one saved with "
            f"save_pretrained), found {type(model).__name__}."
        )
    return model


def attached_model(data):
    """The model :func:`spade_sd.tl.pretrain` attached to ``data`` (a SpatialData or a legacy AnnData), or ``None``."""
    if isinstance(data, AnnData):
        entry = _ANNDATA_MODELS.get(id(data))
        return entry[1] if entry is not None and entry[0]() is data else None
    model = ATTACHED_MODELS.get(data)
    source = _CONVERTED.get(data)
    if model is None and source is not None and source() is not None:
        model = attached_model(source())
    return model


def attach_model(data, model) -> None:
    """Attach ``model`` to ``data`` (and, for a SpatialData converted from a legacy AnnData, to that AnnData)."""
    if isinstance(data, AnnData):
        key = id(data)
        if key not in _ANNDATA_MODELS:
            weakref.finalize(data, _ANNDATA_MODELS.pop, key, None)
        _ANNDATA_MODELS[key] = (weakref.ref(data), model)
        return
    ATTACHED_MODELS[data] = model
    source = _CONVERTED.get(data)
    if source is not None and source() is not None:
        attach_model(source(), model)


def embedding_records(sdata, table_key: str | None = None, uns_key: str | None = None) -> dict[str, Mapping]:
    """The ``.uns`` records :func:`spade_sd.tl.embed` left, by where they are; only ``uns_key`` of ``table_key`` if given."""
    records = {}
    for name, table in getattr(sdata, "tables", {}).items():
        if table_key is not None and name != table_key:
            continue
        for key, entry in table.uns.items():
            if key in RESERVED_UNS or (uns_key is not None and key != uns_key):
                continue
            if hasattr(entry, "get") and "outputs" in entry and hasattr(entry.get("model"), "get"):
                records[f".uns[{key!r}] of table {name!r}"] = entry
    return records


def backbone_record(backbone) -> dict[str, Any]:
    """What the tools record of the backbone that computed their features.

    Its :meth:`~spade_sd.Backbone.to_config`, the ``precision`` of its features (``"float32"``, ``"int8"``,
    ``"bf16"``) and their ``feature_identity`` (what names them in the feature cache).
    """
    return backbone.to_config() | {"precision": backbone.precision, "feature_identity": backbone.feature_identity()}


def model_record(model) -> dict[str, Any]:
    """What :func:`spade_sd.tl.embed` records of its model in ``.uns[key]['model']``.

    Its identity, backbone and configuration, and where it was saved (``source``), so a later call can load it.
    """
    record = {
        "identity": model.identity(),
        "n_experts": model.n_experts,
        "backbone": backbone_record(model.backbone),
        "config": model.config.to_dict(),
    }
    if model.source:
        record[MODEL_SOURCE] = dict(model.source)
    return record


def _recorded_model(records: dict[str, Mapping]) -> tuple[Any, str | None]:
    """The one model ``records`` name, loaded from where it was saved; else ``None`` and why not (``None`` if none)."""
    identities = {str(record["model"].get("identity")) for record in records.values()}
    if not identities:
        return None, None
    if len(identities) > 1:
        shown = "; ".join(f"{where}: {record['model'].get('identity')}" for where, record in records.items())
        return None, f"the earlier embeddings were made by {len(identities)} models ({shown}): pass the one to use"
    saved = [(where, record) for where, record in records.items() if hasattr(record["model"].get(MODEL_SOURCE), "get")]
    if not saved:
        where, record = next(iter(records.items()))
        identity = record["model"].get("identity")
        return None, (
            f"the embedding in {where} was made by model {identity}, which is not attached to this SpatialData and "
            "was never saved (no path is recorded)"
        )
    where, record = saved[0]
    return _load_recorded(where, record["model"])


def _load_recorded(where: str, record: Mapping) -> tuple[Any, str | None]:
    from spade_sd.model.spade_model import SpadeModel

    identity = str(record.get("identity"))
    source = {str(key): str(value) for key, value in record[MODEL_SOURCE].items()}
    if SOURCE_PATH in source:
        location = source[SOURCE_PATH]
        if not Path(location).is_dir():
            return None, (
                f"the embedding in {where} was made by model {identity}, saved at {location}, which is not attached "
                "to this SpatialData and no longer at that path (moved or deleted?)"
            )
        options = {}
    elif SOURCE_REPO in source:
        location = source[SOURCE_REPO]
        options = {"revision": source.get(SOURCE_REVISION) or None}
    else:
        return None, f"the embedding in {where} records model {identity} saved at {source}, which names no folder"
    try:
        model = SpadeModel.from_pretrained(location, **options)
    except (OSError, ValueError) as error:
        return (
            None,
            f"the embedding in {where} was made by model {identity}, saved at {location}, which fails to load: {error}",
        )
    found = model.identity()
    if found == identity:
        logger.info("Reusing model %s, which made the embedding in %s: loaded from %s", identity, where, location)
    else:
        logger.warning(
            "The model now at %s (identity %s) is not the one that made the embedding in %s (identity %s): %s. "
            "Embedding with it, its results will differ from the earlier ones; to keep the earlier model, save "
            "each model to a folder of its own.",
            location,
            found,
            where,
            identity,
            model_difference(record, model),
        )
    return model, None


def model_difference(record: Mapping, model) -> str:
    """What differs between a recorded model (:func:`model_record`) and ``model``: backbone, experts, configuration."""
    differences = []
    backbone = record.get("backbone", {})
    if str(backbone.get("identity")) != model.backbone.identity():
        differences.append(f"backbone {backbone.get('name')!r} recorded, {model.backbone.name!r} found (other weights)")
    if _plain(record.get("n_experts")) != model.n_experts:
        differences.append(f"{_plain(record.get('n_experts'))} experts recorded, {model.n_experts} found")
    recorded, found = _flat(_plain(record.get("config", {}))), _flat(model.config.to_dict())
    changed = [key for key in sorted(recorded.keys() | found.keys()) if recorded.get(key) != found.get(key)]
    differences += [f"config {key} {recorded.get(key)} recorded, {found.get(key)} found" for key in changed[:5]]
    if len(changed) > 5:
        differences.append(f"and {len(changed) - 5} more configuration entries")
    return "; ".join(differences) or "the same configuration and backbone, other trained weights (trained again?)"


def _plain(value: Any) -> Any:
    """``value`` as JSON holds it: what anndata reads back from zarr (numpy arrays and scalars) made plain."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, np.ndarray | list | tuple):
        return [_plain(item) for item in value]
    return value.item() if isinstance(value, np.generic) else value


def _flat(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, Mapping):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.dumps(value, sort_keys=True)}


def is_legacy_anndata(data) -> bool:
    """Whether ``data`` is scanpy's legacy spatial AnnData (``uns['spatial']``), which the tools convert."""
    return isinstance(data, AnnData) and LEGACY_SPATIAL in data.uns


def accepts_legacy_anndata(tool: str, *, returns_table: bool = False) -> Callable:
    """Let a tool whose first argument is a SpatialData take scanpy's legacy spatial AnnData as well.

    The AnnData is converted (:func:`legacy_to_spatialdata`), the tool runs on the SpatialData, and the outputs the
    tool recorded (``.uns['spade_sd']['outputs']``) are written back to the AnnData. A failure leaves it unchanged.
    ``returns_table``: the tool adds a new table instead (:func:`spade_sd.tl.predict_expression`), which no slot of
    the AnnData can hold; it is returned as a plain AnnData (:func:`_returned_table`) and the AnnData is not changed.
    """
    outputs = "the new table is returned" if returns_table else "the outputs are written back to the AnnData"

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def run(sdata, *args, **kwargs):
            if not isinstance(sdata, AnnData):
                return function(sdata, *args, **kwargs)
            converted = legacy_to_spatialdata(sdata, tool, outputs=outputs)
            result = function(converted, *args, **kwargs)
            if returns_table:
                return _returned_table(converted, sdata, tool)
            _write_back(converted.tables[_LEGACY_TABLE], sdata)
            return result

        return run

    return decorate


# The table spatialdata-io's from_legacy_anndata makes
_LEGACY_TABLE = "table"


def legacy_to_spatialdata(
    adata: AnnData, tool: str, *, outputs: str = "the outputs are written back to the AnnData"
) -> SpatialData:
    """A SpatialData from scanpy's legacy spatial AnnData, by :func:`spatialdata_io.experimental.from_legacy_anndata`.

    It keeps the image of the most pixels (scanpy's ``hires`` over ``lowres``), so that the spots are read at the
    finest scale there is. The AnnData is not changed. ``outputs`` says in the log where the tool's outputs go.

    Raises
    ------
    TypeError
        ``adata`` lacks what the layout needs (``obsm['spatial']``, one library in ``uns['spatial']`` with an image).
    ModuleNotFoundError
        spatialdata-io is not installed.
    """
    spatial = adata.uns.get(LEGACY_SPATIAL)
    expected = (
        f"{tool} reads a SpatialData, or scanpy's legacy spatial AnnData (sc.read_visium): obsm['spatial'] holding "
        "the spots' full-resolution pixels and uns['spatial'][library_id] holding 'images' and 'scalefactors'"
    )
    libraries = list(spatial) if isinstance(spatial, Mapping) else []
    if not libraries:
        found = "no uns['spatial']" if spatial is None else f"uns['spatial'] holding no library ({spatial!r:.60})"
        raise TypeError(f"{expected}; found an AnnData with {found}.")
    if len(libraries) > 1:
        raise TypeError(
            f"{expected}; found {len(libraries)} libraries in uns['spatial'] ({libraries[:5]}). Pass one slide at a "
            "time: subset the AnnData to one library's spots and keep only its entry in uns['spatial']."
        )
    images = spatial[libraries[0]].get("images", {}) if isinstance(spatial[libraries[0]], Mapping) else {}
    if not isinstance(images, Mapping) or not images:
        raise TypeError(f"{expected}; uns['spatial'][{libraries[0]!r}] holds no images, and {tool} needs the H&E.")
    coords = adata.obsm.get(SPATIAL_KEY)
    if coords is None or np.ndim(coords) != 2 or np.shape(coords)[1] != 2:
        shape = None if coords is None else np.shape(coords)
        raise TypeError(f"{expected}; found obsm['spatial'] of shape {shape}, not (n_obs, 2).")
    try:
        from spatialdata_io.experimental import from_legacy_anndata as convert
    except ImportError as error:
        raise ModuleNotFoundError(
            f"{tool} converts scanpy's legacy spatial AnnData with spatialdata-io, which is not installed ({error}). "
            "Install it (pip install spatialdata-io) or pass a SpatialData."
        ) from error
    sdata = convert(adata)
    kept = max(sdata.images, key=lambda name: int(np.prod(sdata.images[name].shape[1:])))
    for name in [name for name in sdata.images if name != kept]:
        del sdata.images[name]
    _CONVERTED[sdata] = weakref.ref(adata)
    logger.info(
        "%s: converted scanpy's legacy AnnData (library %r, image %r) to a SpatialData with "
        "spatialdata_io.experimental.from_legacy_anndata; %s. For several calls, convert once: "
        "sdata = from_legacy_anndata(adata) (the outputs then go to sdata's tables).",
        tool,
        libraries[0],
        kept.removeprefix(f"{libraries[0]}_"),
        outputs,
    )
    return sdata


def _write_back(table: AnnData, adata: AnnData) -> None:
    """Write the outputs recorded in ``table`` (converted from ``adata``) back to ``adata``, dropping those removed."""
    if not table.obs_names.equals(adata.obs_names):  # from_legacy_anndata keeps every spot, in order
        raise RuntimeError("The converted table's spots differ from the AnnData's; nothing was written back.")
    before = adata.uns.get(UNS_KEY, {}).get(OUTPUTS, {}) if hasattr(adata.uns.get(UNS_KEY), "get") else {}
    after = table.uns.get(UNS_KEY, {}).get(OUTPUTS, {})
    for field, owners in after.items():
        for key in owners:
            if field == "obs":  # by position: the spots are the same, in order (checked above)
                adata.obs[key] = table.obs[key].values
            else:
                getattr(adata, field)[key] = getattr(table, field)[key]
    for field, owners in before.items():
        for key in owners:
            if key not in after.get(field, {}) and key not in _field(table, field) and key in _field(adata, field):
                del getattr(adata, field)[key]
    if UNS_KEY in table.uns:
        adata.uns[UNS_KEY] = table.uns[UNS_KEY]


def converted_from(table: AnnData) -> AnnData | None:
    """The legacy AnnData whose conversion (:func:`legacy_to_spatialdata`) holds ``table``, else ``None``."""
    for sdata, source in list(_CONVERTED.items()):
        if sdata.tables.get(_LEGACY_TABLE) is table:
            return source()
    return None


def _returned_table(converted: SpatialData, adata: AnnData, tool: str) -> AnnData:
    """The table ``tool`` added to ``converted`` (made from ``adata``), as scanpy lays out a spatial AnnData.

    spatialdata's bookkeeping (the link to the converted shapes) goes; ``adata``'s ``uns['spatial']`` (its H&E and
    scale factors) is copied in, so that :func:`scanpy.pl.spatial` draws the table over the H&E.
    """
    (name,) = [name for name in converted.tables if name != _LEGACY_TABLE]  # the converted SpatialData had one
    table = converted.tables[name]
    attrs = table.uns.pop("spatialdata_attrs", {})
    table.obs = table.obs.drop(columns=[attrs.get("region_key"), attrs.get("instance_key")], errors="ignore")
    # the converted table it was derived from is gone with the conversion
    table.uns.get(UNS_KEY, {}).pop(DERIVED_FROM, None)
    table.uns[LEGACY_SPATIAL] = copy.deepcopy(adata.uns[LEGACY_SPATIAL])
    logger.info(
        "%s: returned the new table (%d × %d) as an AnnData; the legacy AnnData is unchanged", tool, *table.shape
    )
    return table


def table_owner(table: AnnData) -> str | None:
    """The tool that made ``table`` (``uns['spade_sd']['written_by']``), else ``None``: the user's own."""
    meta = table.uns.get(UNS_KEY, {})
    if not isinstance(meta, dict):
        return None
    # tables of predictions made before the record existed name their spots' table only
    return meta.get(WRITTEN_BY) or ("tl.predict_expression" if DERIVED_FROM in meta else None)


def check_free_element_names(sdata: SpatialData, names: list[str], tool: str, made: str) -> None:
    """Refuse ``names`` any element of ``sdata`` already has, before a tool adds elements of those names.

    spatialdata wants element names unique across element kinds and letter case. Not even the tool's own earlier
    ``made`` elements are replaced: tables of embeddings or predictions may annotate them.
    """
    kinds = ("images", "labels", "points", "shapes", "tables")
    existing = {name.lower(): (kind[:-1], name) for kind in kinds for name in getattr(sdata, kind)}
    for name in names:
        if name.lower() in existing:
            kind, found = existing[name.lower()]
            owner = table_owner(sdata.tables[found]) if kind == "table" else None
            raise ValueError(
                f"The SpatialData already has an element {found!r} ({kind}"
                f"{', written by ' + owner if owner else ''}); {tool} does not overwrite it (not even earlier "
                f"{made}). Pass another key_added=, or delete it first with `del sdata[{found!r}]`."
            )


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
