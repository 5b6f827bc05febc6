"""Package settings: folders, verbosity, progress bars, CPU threads and the feature cache's precision.

Where downloads and derived files go, where the real data sets are found, how much is logged, whether progress bars
are drawn, how many CPU threads the backbone may use and in which precision cached features are stored. Like :data:`scanpy.settings`, one object holds them (:data:`settings`, also ``spade_sd.settings``). Unless set
explicitly, the folders follow the environment variables ``SPADE_SD_CACHE_DIR`` and ``SPADE_SD_DATA_DIR`` each time
they are read, so a test or a notebook may change them at any point.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_DIR_ENV = "SPADE_SD_CACHE_DIR"
DATA_DIR_ENV = "SPADE_SD_DATA_DIR"
# The level of the spade_sd logger unless set: what starts, how long it took and what was added is shown
DEFAULT_VERBOSITY = logging.INFO
# scanpy's verbosity numbers (error, warning, info, hint, debug) as logging levels, so its users' habits carry over
_SCANPY_VERBOSITY = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.INFO, 4: logging.DEBUG}
_LEVEL_NAMES = ("debug", "info", "warning", "error", "critical")
# Precisions the feature cache stores; the first is the default
FEATURE_CACHE_DTYPES = ("float32", "float16")


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
        Level of the ``spade_sd`` logger: ``"info"`` (the default) shows what each step starts, how long it took
        and what it added; ``"warning"`` only what needs attention; ``"debug"`` also the details, and the messages,
        tips and model summaries of Lightning, which are silenced otherwise.
    progress
        Draw progress bars (``tqdm.auto``: widgets in notebooks) over feature extraction, tiling and training
        epochs. ``True`` (the default) draws them where someone watches: a terminal or a notebook, not a log file
        or a pipe; ``False`` never.
    n_jobs
        CPU threads of the backbone (PyTorch's :func:`torch.set_num_threads` while it encodes, onnxruntime's
        session) within spade_sd's calls; the caller's torch setting is restored afterwards. ``None`` (the
        default): torch's own setting, and every core this process may use for onnxruntime; ``-1``: every core.
        Training the small heads uses ``train_threads`` of the training configuration instead.
    low_precision
        Whether a :class:`~spade_sd.Backbone` with ``engine="auto"`` on a CPU may run a lower-precision engine (int8
        or bf16) where it measures faster and keeps its features within the fidelity gate of the float32 ones
        (:mod:`~spade_sd.encoders.precision`). ``True`` (the default): the tools give such a backbone real patches
        of the first slide it encodes on this machine to judge by, if it is a transformer
        (:mod:`~spade_sd.encoders.auto_calibration`);
        ``False``: float32 unless a backbone is given ``calibration=`` or another ``engine``.
    feature_cache_dtype
        Precision of the backbone features written to the feature cache (``$SPADE_SD_CACHE_DIR/features``):
        ``"float32"`` (the default) or ``"float16"``, which halves the disk (1,280-d features: 2.5 KB instead of
        5 KB per patch) and the pages that :func:`~spade_sd.tl.pretrain`'s bounded-memory path reads from its memory
        maps, at float16's precision (11 significant bits). Each precision has its own cache files, so switching
        never reads the other's; callers still receive float32 features, and float16 is refused, with nothing
        cached, for a backbone whose features exceed its range (±65,504). Measured in ``docs/scale.md``.
    """

    def __init__(self) -> None:
        self._cache_dir: Path | None = None
        self._data_dir: Path | None = None
        self._progress = True
        self._n_jobs: int | None = None
        self._low_precision = True
        self._feature_cache_dtype = FEATURE_CACHE_DTYPES[0]

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
        """Level of the ``spade_sd`` logger (a :mod:`logging` level; ``logging.INFO`` by default)."""
        return logging.getLogger("spade_sd").getEffectiveLevel()

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        logging.getLogger("spade_sd").setLevel(_as_level(level))

    @property
    def progress(self) -> bool:
        """Whether progress bars are drawn (where a terminal or a notebook shows them)."""
        return self._progress

    @progress.setter
    def progress(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"sd.settings.progress must be True or False; found {value!r}.")
        self._progress = value

    @property
    def n_jobs(self) -> int | None:
        """CPU threads of the backbone within spade_sd's calls; ``None``: torch's and onnxruntime's own choice."""
        return self._n_jobs

    @n_jobs.setter
    def n_jobs(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1):
            raise ValueError(
                f"sd.settings.n_jobs must be a positive number of threads, -1 for every core or None for torch's own "
                f"setting; found {value!r}."
            )
        self._n_jobs = value

    @property
    def low_precision(self) -> bool:
        """Whether ``engine="auto"`` may run an int8 or bf16 engine that passes the fidelity gate (see the class)."""
        return self._low_precision

    @low_precision.setter
    def low_precision(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"sd.settings.low_precision must be True or False; found {value!r}.")
        self._low_precision = value

    @property
    def feature_cache_dtype(self) -> str:
        """Precision of cached backbone features: ``"float32"`` (the default) or ``"float16"``."""
        return self._feature_cache_dtype

    @feature_cache_dtype.setter
    def feature_cache_dtype(self, value: str) -> None:
        if not isinstance(value, str) or value not in FEATURE_CACHE_DTYPES:
            raise ValueError(
                f"sd.settings.feature_cache_dtype must be one of {list(FEATURE_CACHE_DTYPES)} (the precision of cached "
                f"backbone features); found {value!r}."
            )
        self._feature_cache_dtype = value

    def threads(self) -> int | None:
        """The number of threads :attr:`n_jobs` asks for (``-1`` resolved to the cores this process may use)."""
        if self._n_jobs == -1:
            return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return self._n_jobs

    def __repr__(self) -> str:
        return (
            f"Settings(cache_dir={str(self.cache_dir)!r}, data_dir={None if self.data_dir is None else str(self.data_dir)!r}, "
            f"verbosity={logging.getLevelName(self.verbosity)!r}, progress={self.progress!r}, n_jobs={self.n_jobs!r}, "
            f"low_precision={self.low_precision!r}, feature_cache_dtype={self.feature_cache_dtype!r})"
        )


def _as_level(level: int | str) -> int:
    """A logging level from a level, its name (any case) or one of scanpy's verbosity numbers 0–4."""
    if isinstance(level, str) and level.lower() in _LEVEL_NAMES:
        return logging.getLevelName(level.upper())
    if isinstance(level, int) and not isinstance(level, bool):
        if level in _SCANPY_VERBOSITY:
            return _SCANPY_VERBOSITY[level]
        if level > 0:
            return level
    raise ValueError(
        f"sd.settings.verbosity must be one of {list(_LEVEL_NAMES)}, a logging level (e.g. logging.INFO) or scanpy's "
        f"0 (errors) to 4 (debug); found {level!r}."
    )


@contextmanager
def backbone_threads() -> Iterator[None]:
    """Run with :attr:`Settings.n_jobs` torch CPU threads (if set), restoring the caller's number afterwards."""
    threads = settings.threads()
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


settings = Settings()
