"""Package settings: where downloads and derived files go, where the real data sets are found, how much is logged.

Like :data:`scanpy.settings`, one object holds them (:data:`settings`, also ``spade_sd.settings``). Unless set
explicitly, the folders follow the environment variables ``SPADE_SD_CACHE_DIR`` and ``SPADE_SD_DATA_DIR`` each time
they are read, so a test or a notebook may change them at any point.
"""

from __future__ import annotations

import logging
import os
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
