"""JSON metadata saved beside safetensors weights, checked entry by entry against a copy inside the weights file.

A saved model (``config.json`` + ``model.safetensors``) or saved adapters (``adapters.json`` +
``adapters.safetensors``) read back, besides their tensors, configuration that decides their outputs: a gene panel
and its order, the standardization, the principal subspace, SEAL's heads. The JSON file is the one a person reads;
a copy of it is written into the safetensors header (its ``__metadata__``), so the SHA-256 of the weights file,
recorded in the JSON file, covers the configuration too. On load every entry of the JSON file is compared with that
copy, and one that was edited, added or deleted is refused by name (:func:`check_against_copy`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Header metadata key of the JSON copy
COPY_KEY = "spade_sd.metadata"
# Differences named in one error; the rest are counted
_SHOWN = 5


def write_weights(tensors: Mapping[str, Any], path: str | os.PathLike, copy: str) -> str:
    """Write numpy ``tensors`` to the safetensors file ``path`` with ``copy`` (JSON text) in its header.

    Returns
    -------
    The SHA-256 hex digest of the written file.
    """
    from safetensors.numpy import save_file

    save_file(dict(tensors), path, metadata={COPY_KEY: copy})
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def saved_copy(data: bytes) -> Any:
    """The JSON copy in the header of safetensors ``data``, or ``None`` when it holds none."""
    (size,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    return json.loads(metadata[COPY_KEY]) if COPY_KEY in metadata else None


def check_against_copy(found: Mapping[str, Any], data: bytes, json_path: Path, weights_path: Path) -> None:
    """Raise a ValueError naming every entry of ``found`` (read from ``json_path``) that differs from the copy.

    Parameters
    ----------
    found
        The JSON file's content, without the weights digest (the copy cannot hold the digest of its own file).
    data
        The bytes of ``weights_path``, already checked against that digest.
    json_path, weights_path
        The two files, named in the message.
    """
    saved = saved_copy(data)
    if saved is None:
        raise ValueError(
            f"{weights_path} holds no copy of {json_path.name}, which its format {found.get('format')!r} always "
            f"writes: the two files do not belong together. Save them again from the object that wrote them."
        )
    differences = list(_differences(found, saved, ""))
    if differences:
        shown = "; ".join(differences[:_SHOWN])
        more = f"; and {len(differences) - _SHOWN} more" if len(differences) > _SHOWN else ""
        raise ValueError(
            f"{json_path} does not match the copy saved with the weights in {weights_path.name} (whose SHA-256 "
            f"it records): {shown}{more}. The file was edited or comes from elsewhere; restore the saved values or "
            "save again from the object that wrote it."
        )


def require(found: Mapping[str, Any], paths: Sequence[str], json_path: str | os.PathLike, writer: str) -> None:
    """Raise a ValueError naming the first of the dotted ``paths`` (e.g. ``"panel.genes"``) ``found`` lacks.

    Parameters
    ----------
    found
        The JSON file's content.
    paths
        Dotted entries that must be present.
    json_path
        The file (or a description of where ``found`` comes from), named in the message.
    writer
        What writes such files (e.g. ``"SpadeModel.save"``), named in the message.
    """
    for path in paths:
        value: Any = found
        for depth, key in enumerate(keys := path.split(".")):
            where = ".".join(keys[: depth + 1])
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"{json_path}: entry {'.'.join(keys[:depth])!r} should be a JSON object holding {key!r}; found "
                    f"{_shown(value)}. Expected a file written by {writer}."
                )
            if key not in value:
                raise ValueError(f"{json_path} has no entry {where!r}; expected a file written by {writer}.")
            value = value[key]


def _differences(found: Any, saved: Any, path: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(found, dict):
        out = []
        for key in sorted(saved.keys() | found.keys()):
            where = f"{path}.{key}" if path else key
            if key not in found:
                out.append(f"{where!r} is missing (saved: {_shown(saved[key])})")
            elif key not in saved:
                out.append(f"{where!r} was added ({_shown(found[key])}; not saved)")
            else:
                out.extend(_differences(found[key], saved[key], where))
        return out
    if isinstance(saved, list) and isinstance(found, list):
        if len(found) != len(saved):
            return [f"{path!r} holds {len(found)} entries, {len(saved)} were saved"]
        if _equal(found, saved):
            return []
        if sorted(map(_canonical, found)) == sorted(map(_canonical, saved)):
            return [f"{path!r} holds the same {len(saved)} entries in another order"]
        return [
            d for i, (a, b) in enumerate(zip(found, saved, strict=True)) for d in _differences(a, b, f"{path}[{i}]")
        ]
    return [] if _equal(found, saved) else [f"{path!r} is {_shown(found)}, {_shown(saved)} was saved"]


def _equal(found: Any, saved: Any) -> bool:
    """JSON equality: of the same type (1 is not 1.0 nor true), NaN equal to NaN (a history may hold NaN)."""
    return _canonical(found) == _canonical(saved)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _shown(value: Any) -> str:
    text = json.dumps(value)
    if len(text) <= 60:
        return text
    return f"{text[:50]}… ({len(value)} entries)" if isinstance(value, list | dict) else f"{text[:57]}…"
