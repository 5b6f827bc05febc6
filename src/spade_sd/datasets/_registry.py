"""Where the real data sets' files come from: a hash-checked registry of their upstream addresses.

Every file is named ``"<dataset>/<path inside the upstream repository>"``. Files are found in a local folder laid
out like that (the ``data_dir`` argument or the ``SPADE_SD_DATA_DIR`` environment variable) or downloaded with
pooch into its cache; either way their SHA-256 is checked before use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

from spade_sd.utils.settings import DATA_DIR_ENV, settings


@dataclass(frozen=True)
class RegistryEntry:
    """One file of a data set: its SHA-256, size in bytes and upstream address."""

    sha256: str
    size: int
    url: str


@cache
def registry() -> dict[str, RegistryEntry]:
    """All files of all data sets, keyed by ``"<dataset>/<path>"``."""
    entries = {}
    for line in files(__package__).joinpath("registry.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, sha256, size, url = line.split()
        entries[key] = RegistryEntry(sha256=sha256, size=int(size), url=url)
    return entries


def registered_names(prefix: str, pattern: str) -> list[str]:
    """The names (``pattern``'s first group) in the registered files under ``prefix``: a data set's samples."""
    found = {m.group(1) for key in registry() if key.startswith(prefix) and (m := re.search(pattern, key))}
    return sorted(found)


def check_registered(value: str, available: list[str], what: str) -> None:
    """Refuse a sample name that is not among the registered ones, listing them."""
    if value not in available:
        raise ValueError(f"Unknown {what} {value!r}; the registry has {available}.")


def _sha256(path: Path) -> str:
    import pooch

    return pooch.file_hash(str(path), alg="sha256")


def fetch(key: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path to the verified local copy of a registered file.

    Parameters
    ----------
    key
        ``"<dataset>/<path>"`` as listed in the registry.
    data_dir
        A folder laid out like the registry (``<dataset>/<path>``). Defaults to ``SPADE_SD_DATA_DIR``; when neither
        is set the file is downloaded from its upstream address into the cache.

    Returns
    -------
    The local path of the file, whose SHA-256 matches the registry.
    """
    entries = registry()
    if key not in entries:
        raise KeyError(f"{key!r} is not a registered data file; registered files start with {sorted(entries)[:3]}…")
    entry = entries[key]
    if data_dir is None:
        data_dir = settings.data_dir
    if data_dir is not None:
        path = Path(data_dir) / key
        if not path.is_file():
            raise FileNotFoundError(
                f"Data file {key!r} was sought at {path} (data_dir={str(data_dir)!r}) and is not there. "
                f"Point data_dir or {DATA_DIR_ENV} (spade_sd.settings.data_dir) at a folder laid out like <dataset>/<path>, "
                f"or unset both to download it from {entry.url}."
            )
        found = _sha256(path)
        if found != entry.sha256:
            raise OSError(
                f"Data file {key!r} at {path} is damaged or a different version: its SHA-256 is {found}, "
                f"expected {entry.sha256}. Replace it with the file from {entry.url}."
            )
        return path

    import pooch

    # Keep the upstream folder layout so that readers of a layout (Space Ranger's) work on the downloaded copy.
    target = settings.cache_dir / "data" / key
    return Path(pooch.retrieve(entry.url, known_hash=f"sha256:{entry.sha256}", fname=target.name, path=target.parent))
