"""Package settings: where downloads and derived files go, where the real data sets are found, how much is logged.

Like :data:`scanpy.settings`, one object holds them (:data:`settings`, also ``spade_sd.settings``). Unless set
explicitly, the folders follow the environment variables ``SPADE_SD_CACHE_DIR`` and ``SPADE_SD_DATA_DIR`` each time
they are read, so a test or a notebook may change them at any point.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

CACHE_DIR_ENV = "SPADE_SD_CACHE_DIR"
DATA_DIR_ENV = "SPADE_SD_DATA_DIR"


class Settings:
    """Folders and verbosity of spade_sd.

    Attributes
    ----------
    cache_dir
        Downloads, decoded images, ONNX exports and cached features: ``SPADE_SD_CACHE_DIR``, else the user's cache
        folder (:func:`pooch.os_cache`).
    data_dir
        A folder holding the real data sets laid out as ``<dataset>/<path>`` (``SPADE_SD_DATA_DIR``), or ``None``
        to download them.
    verbosity
        Level of the ``spade_sd`` logger (e.g. ``logging.INFO``).
    """

    def __init__(self) -> None:
        self._cache_dir: Path | None = None
        self._data_dir: Path | None = None

    @property
    def cache_dir(self) -> Path:
        """Folder for downloads and derived files."""
        if self._cache_dir is not None:
            return self._cache_dir
        if os.environ.get(CACHE_DIR_ENV):
            return Path(os.environ[CACHE_DIR_ENV])
        import pooch

        return Path(pooch.os_cache("spade_sd"))

    @cache_dir.setter
    def cache_dir(self, value: str | os.PathLike | None) -> None:
        self._cache_dir = None if value is None else Path(value)

    def cache_folder(self, name: str, *, instead: str = "") -> Path:
        """The subfolder ``name`` of the cache, created if missing, or an error saying which setting to change.

        Callers check it before any work whose result they would cache, so a cache folder that cannot hold files
        stops them before, not after, the work.

        Parameters
        ----------
        name
            The subfolder of :attr:`cache_dir` (e.g. ``"features"``).
        instead
            What else the caller may do, appended to the error (e.g. ``", or pass cache=False"``).

        Returns
        -------
        ``cache_dir / name``, an existing folder that this process may create files in.

        Raises
        ------
        NotADirectoryError
            If the cache folder, or a folder above or inside it on the way to ``name``, is a file.
        PermissionError
            If the folder cannot be created or written to (permissions, a read-only file system).
        """
        cache_dir = self.cache_dir
        folder = cache_dir / name
        fix = (
            f"It comes from {self._cache_dir_source()}; point sd.settings.cache_dir (or the environment variable "
            f"{CACHE_DIR_ENV}) at a folder you can write to{instead}."
        )
        # pathlib's exists() is False under a file, so the first existing path that is not a folder is the culprit
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            if blocking == cache_dir:
                problem = f"the cache folder {cache_dir} is a file, not a folder"
            elif blocking in cache_dir.parents:
                problem = f"the cache folder {cache_dir} lies under the file {blocking}"
            else:
                problem = f"{blocking}, in the cache folder {cache_dir}, is a file, not a folder"
            raise NotADirectoryError(f"Cannot cache files: {problem}. {fix}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # O_TMPFILE where available: nothing appears in the folder, even for a moment
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise PermissionError(
                f"Cannot cache files: the cache folder {folder} is not writable ({reason}). {fix}"
            ) from err
        return folder

    def _cache_dir_source(self) -> str:
        if self._cache_dir is not None:
            return "sd.settings.cache_dir"
        if os.environ.get(CACHE_DIR_ENV):
            return f"the environment variable {CACHE_DIR_ENV}"
        return "the default cache folder of this user (pooch.os_cache)"

    @property
    def data_dir(self) -> Path | None:
        """Folder of the real data sets, or ``None`` to download them."""
        if self._data_dir is not None:
            return self._data_dir
        value = os.environ.get(DATA_DIR_ENV)
        return Path(value) if value else None

    @data_dir.setter
    def data_dir(self, value: str | os.PathLike | None) -> None:
        self._data_dir = None if value is None else Path(value)

    @property
    def verbosity(self) -> int:
        """Level of the ``spade_sd`` logger."""
        return logging.getLogger("spade_sd").getEffectiveLevel()

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        logging.getLogger("spade_sd").setLevel(level)

    def __repr__(self) -> str:
        return (
            f"Settings(cache_dir={str(self.cache_dir)!r}, data_dir={None if self.data_dir is None else str(self.data_dir)!r}, "
            f"verbosity={logging.getLevelName(self.verbosity)!r})"
        )


settings = Settings()
