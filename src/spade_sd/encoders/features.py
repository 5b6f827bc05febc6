"""Batched frozen-backbone features of spot patches, and their on-disk cache.

Reading the next batch of patches overlaps with encoding the current one (a reader thread), so the backbone is
kept busy. Features stream out in chunks of consecutive patches (:func:`iter_features`) and are appended to the
cache file as they come, so a whole slide's (n_tiles × dim) features never need to sit in memory. Features are
cached as ``.npy`` files named by a digest of the patches (image content under a sample of spots, every spot
position, scale and patch geometry) and the backbone (architecture and weights), so a second run with the same
inputs reads them back, chunk by chunk, instead of recomputing. They are stored as float32, or as float16
(:attr:`sd.settings.feature_cache_dtype <spade_sd.utils.settings.Settings.feature_cache_dtype>`) in files named
apart, and always served as float32 (:func:`mapped_features` maps the file as it is stored).

Nothing is lost and nothing is served silently: a backbone without a stable identity (a plain function given no
``version=``) is never cached; a cache file is checked (header, dtype, shape, exact size, every value finite)
before its first chunk is served, and a damaged one is removed, with a warning, and computed again; partial files
left by processes killed while writing are removed by the next computation.
"""

from __future__ import annotations

import gc
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import cache
from pathlib import Path
from typing import BinaryIO

import numpy as np

from spade_sd.encoders.auto_calibration import calibrate_from
from spade_sd.encoders.finetuned import FineTunedBackbone, PrefixEncoder
from spade_sd.spots.content import BlankCount, check_sample
from spade_sd.spots.patches import SpotPatches
from spade_sd.utils.logging import logger, progress_bar, timed
from spade_sd.utils.settings import backbone_threads, settings

CACHE_FORMAT = "spade_sd.features/1"
# Patches whose features are held at once: 4096 × 1280 float32 is 21 MB
CHUNK_SIZE = 4096
# The subfolder of settings.cache_dir holding the cached features
_CACHE_FOLDER = "features"
# Partial cache files are named <key>.<pid of the writing process>.partial.npy
_PARTIAL_NAME = re.compile(r"[0-9a-f]+\.(\d+)\.partial\.npy")
# A partial file last written this many seconds before its pid's process started predates that process (pid reuse)
_PID_REUSE_SLACK_S = 2.0

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, the partial files' pids alone tell stale ones
    fcntl = None


def cache_key(patches: SpotPatches, backbone, dtype: np.dtype | str | None = None) -> str:
    """Digest naming the features of these patches under this backbone, stored as ``dtype``.

    Parameters
    ----------
    patches
        The spot patches.
    backbone
        A :class:`~spade_sd.Backbone` (or any encoder with an ``identity()``).
    dtype
        The stored precision, float32 or float16; ``None``: :attr:`sd.settings.feature_cache_dtype
        <spade_sd.utils.settings.Settings.feature_cache_dtype>`. float32 files keep the key they always had.
    """
    digest = hashlib.blake2b(digest_size=20)
    # a Backbone names its int8 and bf16 features apart from its float32 ones; other encoders have one precision
    identity = getattr(backbone, "feature_identity", backbone.identity)()
    stored = cache_dtype() if dtype is None else np.dtype(dtype)
    if stored not in (np.float32, np.float16):
        raise ValueError(f"Cached features are stored as float32 or float16; found dtype={stored}.")
    # float32 adds nothing, so the files cached before float16 existed keep their names
    precision = () if stored == np.float32 else (f"stored as {stored.name}",)
    for part in (CACHE_FORMAT, patches.fingerprint(), identity, *precision):
        digest.update(part.encode())
    return digest.hexdigest()


def cache_dtype() -> np.dtype:
    """The precision cached features are stored in: :attr:`sd.settings.feature_cache_dtype <spade_sd.utils.settings.Settings.feature_cache_dtype>`."""
    return np.dtype(settings.feature_cache_dtype)


def _cache_allowed(backbone, cache: bool) -> bool:
    """Whether to use the feature cache: asked for, and the backbone's identity names what it computes.

    Parameters
    ----------
    backbone
        A :class:`~spade_sd.Backbone`.
    cache
        Whether the caller asked for the cache.

    Returns
    -------
    ``cache``, except ``False`` (with one info message saying why and how to cache) for a backbone without
    :attr:`~spade_sd.Backbone.stable_identity`.
    """
    if cache and not backbone.stable_identity:
        logger.info(
            "Not caching the features of backbone %r: a plain callable without version= or to_config() has no stable identity, so "
            "cached features could be served to another function (or an edited one). To cache them, pass "
            'Backbone(fn, version="...") and change the version whenever the function\'s outputs change.',
            backbone.name,
        )
        return False
    return cache


def _features_cache_dir() -> Path:
    return settings.cache_dir / _CACHE_FOLDER


def check_num_workers(num_workers: int) -> int:
    """``num_workers`` as an int, or a clear error: reader processes, 0 for a reader thread."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int | np.integer) or num_workers < 0:
        raise ValueError(
            f"num_workers must be a non-negative integer (reader processes; 0 reads in a thread), found "
            f"{num_workers!r}."
        )
    return int(num_workers)


class _PatchBatches:
    """Map-style dataset of whole batches of patches, read synchronously in a reader process."""

    def __init__(self, patches: SpotPatches, batch_size: int) -> None:
        self.patches, self.batch_size = patches, batch_size

    def __len__(self) -> int:
        return -(-len(self.patches) // self.batch_size)

    def __getitem__(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        start = batch * self.batch_size
        indices = np.arange(start, min(start + self.batch_size, len(self.patches)))
        return indices, self.patches.read(indices, scheduler="synchronous")


def _as_is(item):
    return item


def iter_batches(
    patches: SpotPatches, batch_size: int, *, num_workers: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(indices, uint8 patches)`` batches in order, read ahead while the caller works on the current one.

    ``num_workers=0`` reads the next batch in a thread (dask's threaded scheduler); ``num_workers > 0`` reads
    batches in that many processes (a :class:`torch.utils.data.DataLoader`, two batches ahead per process), for
    machines whose cores outnumber what one reader keeps busy, e.g. feeding a GPU.
    """
    if check_num_workers(num_workers):
        from torch.utils.data import DataLoader

        # the reader processes are forked: garbage holding an onnxruntime session must be freed here, not collected
        # in a child, where destroying the session's thread pool (its threads not forked) waits forever
        gc.collect()
        loader = DataLoader(
            _PatchBatches(patches, batch_size),
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_as_is,
            prefetch_factor=2,
        )
        yield from loader
        return
    starts = range(0, len(patches), batch_size)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spade_sd-read") as reader:
        pending = None
        for start in starts:
            indices = np.arange(start, min(start + batch_size, len(patches)))
            future = reader.submit(patches.read, indices)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (indices, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def iter_features(
    patches: SpotPatches,
    backbone,
    *,
    batch_size: int = 64,
    cache: bool = True,
    chunk_size: int | None = None,
    num_workers: int = 0,
) -> Iterator[tuple[int, np.ndarray]]:
    """Features of consecutive patches, chunk by chunk, read from the cache or computed (and appended to it).

    What the patches show is checked on patches already read (:mod:`spade_sd.spots.content`): first a sample of
    them, spread over the spots, which refuses patches that nearly all show no tissue before any is encoded and
    warns when they do not look like brightfield H&E; then every batch encoded, warning when more than a few
    percent show no tissue.

    Parameters
    ----------
    patches
        The spot patches.
    backbone
        A :class:`~spade_sd.Backbone`.
    batch_size
        Patches read and encoded at a time.
    cache
        Read and write the on-disk cache (``$SPADE_SD_CACHE_DIR/features``). The cache file is written
        incrementally and only appears, complete, once every chunk was computed and found finite. A cached file
        is checked in full before its first chunk is served; a damaged one is removed (with a warning) and the
        features computed again. Not used, with an info message, for a backbone without a stable identity. A cache
        folder that cannot take the file (a file itself, under a file, not writable) is refused before any patch
        is encoded, with an error naming the setting to change (:meth:`~spade_sd.utils.settings.Settings.cache_folder`).
        Stored as :attr:`sd.settings.feature_cache_dtype <spade_sd.utils.settings.Settings.feature_cache_dtype>`:
        with ``"float16"``, the features served are the float16 values (as float32), computed or read alike, and
        features beyond float16's range raise an :class:`OverflowError`, with nothing cached.
    chunk_size
        Patches per yielded chunk (rounded up to whole batches when computing); default ``CHUNK_SIZE``.
    num_workers
        Processes reading patches (see :func:`iter_batches`); 0 reads in a thread.

    Yields
    ------
    ``(start, features)``: float32 features ``(n, backbone.dim)`` of patches ``start`` to ``start + n``.
    """
    chunk_size = CHUNK_SIZE if chunk_size is None else int(chunk_size)
    num_workers = check_num_workers(num_workers)
    check_sample(patches)  # patches that nearly all show no tissue are refused before any is encoded
    # before the cache key: engine="auto" may settle on a lower precision, whose features are cached apart
    calibrate_from(backbone, patches)
    cache = _cache_allowed(backbone, cache)
    dtype = cache_dtype()
    path = _cache_path(patches, backbone, dtype) if cache else None
    if path is not None and path.is_file():
        shape = (len(patches), backbone.dim)
        file = _open_checked(path, shape, chunk_size, dtype)
        if file is not None:
            with file:
                logger.debug("Reading %d cached %s %s features from %s", len(patches), dtype, backbone.name, path)
                yield from _rows(file, path, shape, chunk_size, dtype)
            return
    if path is not None:  # the cache must take the features before the first patch is encoded
        settings.cache_folder(
            _CACHE_FOLDER, instead=", or pass cache=False to compute the features without caching them"
        )
    chunk_size = _whole_batches(chunk_size, batch_size)
    options = {"num_workers": num_workers, "dtype": dtype}
    yield from _compute_chunks(patches, backbone, batch_size, chunk_size, path, **options)


def as_float32(rows: np.ndarray) -> np.ndarray:
    """Rows as float32: float16 ones converted exactly, by looking every value's 16 bits up in a table.

    Every row read from a float16 cache is converted, and numpy's own float16 cast is not vectorized: the look-up
    is several times faster (``benchmarks/results/feature_cache_dtype.md``). Other arrays are returned as they are.
    """
    if rows.dtype != np.float16:
        return rows
    return _float16_values().take(np.ascontiguousarray(rows).view(np.uint16))


@cache
def _float16_values() -> np.ndarray:
    """The float32 value of every float16 bit pattern (256 KB)."""
    return np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _cache_path(patches: SpotPatches, backbone, dtype: np.dtype) -> Path:
    """The cache file of these patches' features under this backbone, stored as ``dtype``."""
    return _features_cache_dir() / f"{cache_key(patches, backbone, dtype)}.npy"


def _whole_batches(chunk_size: int, batch_size: int) -> int:
    """``chunk_size`` rounded up to whole batches: computed chunks are filled batch by batch."""
    return -(-chunk_size // batch_size) * batch_size


def _read_header(file) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of a ``.npy`` file, leaving it at the first data byte.

    Raises
    ------
    ValueError
        If the file does not start with a ``.npy`` header numpy can read (also for an empty file).
    """
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(file)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(file)
    raise ValueError(f".npy format version {version} is not one this package writes")


def _open_checked(
    path: Path, shape: tuple[int, int], chunk_size: int, dtype: np.dtype = np.dtype(np.float32)
) -> BinaryIO | None:
    """A cached ``.npy`` opened at its first row if it is sound, else ``None`` after removing it with a warning.

    Sound means: a ``.npy`` header of ``dtype`` and ``shape`` in C order, exactly as many bytes as that promises, and
    only finite values, checked by reading it ``chunk_size`` rows at a time, so memory stays bounded and no chunk
    is served from a file later found damaged.

    Parameters
    ----------
    path
        The cache file.
    shape
        The expected ``(n_patches, dim)``.
    chunk_size
        Rows read at a time while checking.
    dtype
        The precision the cache stores (float32 or float16); a file of any other is damaged.

    Returns
    -------
    The open binary file, positioned at the first row (the caller closes it), or ``None``.
    """
    identity, problem = None, None
    try:
        file = path.open("rb")
    except OSError as err:
        problem = f"cannot be opened: {err}"
    else:
        try:
            identity = os.fstat(file.fileno())
            problem = _problem(file, path, shape, chunk_size, dtype)
        except OSError as err:
            problem = f"cannot be read: {err}"
        if problem is None:
            return file
        file.close()
    logger.warning("The feature cache %s is damaged (%s); removing it and computing the features again.", path, problem)
    try:
        found = path.stat()
        # another process may have put a sound file there meanwhile (by an atomic rename): leave that one
        if identity is None or (found.st_dev, found.st_ino) == (identity.st_dev, identity.st_ino):
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        logger.warning("Could not remove the damaged feature cache %s: %s", path, err)
    return None


def _problem(
    file: BinaryIO, path: Path, shape: tuple[int, int], chunk_size: int, dtype: np.dtype = np.dtype(np.float32)
) -> str | None:
    """What is wrong with an open cached ``.npy`` of ``dtype`` (``None`` if nothing), leaving it at its first row."""
    try:
        found, fortran, stored = _read_header(file)
    except (ValueError, EOFError, SyntaxError, TypeError) as err:
        return f"not a readable .npy file: {err}"
    if found != shape or fortran or stored != dtype:
        order = " in Fortran order" if fortran else ""
        return f"holds {stored} of shape {found}{order}, expected {dtype} of shape {shape}"
    offset = file.tell()
    size, expected = os.fstat(file.fileno()).st_size, offset + shape[0] * shape[1] * dtype.itemsize
    if size != expected:
        return f"{'truncated: ' if size < expected else ''}{size} bytes, expected {expected}"
    for start, chunk in _rows(file, path, shape, chunk_size, dtype):
        finite = np.isfinite(chunk).all(axis=1)
        if not finite.all():
            return f"non-finite features in {np.count_nonzero(~finite)} rows from row {start + np.argmin(finite)}"
    file.seek(offset)
    return None


def _rows(
    file: BinaryIO, path: Path, shape: tuple[int, int], chunk_size: int, dtype: np.dtype = np.dtype(np.float32)
) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows)`` chunks of rows stored as ``dtype``, read with plain file reads from the current position.

    The rows come out as float32 whatever ``dtype``. A memory map would count toward resident memory.
    """
    for start in range(0, shape[0], chunk_size):
        chunk = np.empty((min(chunk_size, shape[0] - start), shape[1]), dtype=dtype)
        if file.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
            raise OSError(f"The feature cache {path} is truncated; delete it to recompute the features.")
        yield start, as_float32(chunk)


def _chunks_from(path: Path, shape: tuple[int, int], chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
    with path.open("rb") as file:
        _read_header(file)
        yield from _rows(file, path, shape, chunk_size)


def _writer_gone(pid: int, modified: float) -> bool:
    """Whether the process that wrote a partial file, last modified at ``modified``, no longer runs.

    Parameters
    ----------
    pid
        The process id in the file's name.
    modified
        The file's modification time (seconds since the epoch).

    Returns
    -------
    ``True`` if no process has that pid (or only a zombie), or (on Linux) the process now holding it started
    after the file was last written, so the pid was reused; ``False`` when unsure.
    """
    if pid < 1:
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return True
    except PermissionError:  # alive, owned by another user
        pass
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
        fields = stat[stat.rindex(")") + 2 :].split()
        state, started = fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):  # not Linux, or the process just ended
        return False
    return state in ("Z", "X") or modified < started - _PID_REUSE_SLACK_S


def _remove_stale_partials(folder: Path) -> None:
    """Remove partial cache files whose writing process was killed (``kill -9``, a crash, a power cut).

    A partial file is stale when :func:`_writer_gone` says its pid's process is gone, and nobody holds the
    advisory lock a writer keeps on it (a live writer elsewhere, e.g. on another machine sharing the folder, may
    carry a pid that is free here). The partial of a live process writing now is never removed.
    """
    if os.name != "posix" or not folder.is_dir():
        return
    removed = []
    for partial in folder.glob("*.partial.npy"):
        match = _PARTIAL_NAME.fullmatch(partial.name)
        try:
            if match is None or not _writer_gone(int(match[1]), partial.stat().st_mtime):
                continue
            with partial.open("rb") as file:
                if fcntl is not None:
                    try:
                        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live writer holds it
                    except OSError:
                        pass  # no locks on this file system: the pid alone decides
                partial.unlink()
            removed.append(partial.name)
        except FileNotFoundError:
            continue
        except OSError as err:
            logger.warning("Could not remove the stale partial feature file %s: %s", partial, err)
    if removed:
        logger.info(
            "Removed %d partial feature file(s) in %s left by processes that no longer run: %s",
            len(removed),
            folder,
            ", ".join(sorted(removed)),
        )


def _encoded_batches(
    patches: SpotPatches, backbone, batch_size: int, num_workers: int, *, cached: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(indices, features)`` batches in order.

    A :class:`~spade_sd.FineTunedBackbone` whose features are cached runs only its adapted suffix, on its frozen
    prefix's activations, which are cached too (and shared by every fine-tuning of the same base and split); any
    other backbone encodes the patches.
    """
    if cached and isinstance(backbone, FineTunedBackbone):
        encoder = PrefixEncoder(backbone)
        # whole batches per chunk, so the batches yielded start at multiples of batch_size like the patches' do
        chunk_size = max(1, 2**24 // (encoder.dim * batch_size)) * batch_size
        options = {"batch_size": batch_size, "cache": True, "chunk_size": chunk_size, "num_workers": num_workers}
        for start, chunk in iter_features(patches, encoder, **options):
            for offset in range(0, len(chunk), batch_size):
                prefix = chunk[offset : offset + batch_size].reshape(-1, *encoder.shape)
                with backbone_threads():
                    features = backbone.features_from_prefix(prefix)
                yield start + offset + np.arange(len(prefix)), features
        return
    blank = BlankCount()
    for indices, batch in iter_batches(patches, batch_size, num_workers=num_workers):
        blank.add(indices, batch)
        with backbone_threads():  # only around the backbone: the caller's threads run between batches
            features = backbone(batch)
        yield indices, features
    blank.report(patches)


def _compute_chunks(
    patches: SpotPatches,
    backbone,
    batch_size: int,
    chunk_size: int,
    path: Path | None,
    *,
    num_workers: int = 0,
    dtype: np.dtype = np.dtype(np.float32),
) -> Iterator[tuple[int, np.ndarray]]:
    """Encode the patches, chunk by chunk, into ``path`` (if given) as ``dtype``; yield each chunk as stored.

    The file appears at ``path`` only once every chunk was written; any error leaves nothing there.
    """
    n, dim = len(patches), backbone.dim
    partial = None if path is None else path.with_suffix(f".{os.getpid()}.partial.npy")
    if partial is not None:
        _remove_stale_partials(path.parent)
    try:
        with timed("Encoding %d patches with %s", n, backbone.name) as timer:
            with (
                progress_bar(total=n, desc=f"Encoding patches ({backbone.name})", unit="patch") as bar,
                nullcontext() if partial is None else open_locked_npy(partial, (n, dim), dtype) as file,
            ):
                chunk, chunk_start = np.empty((min(chunk_size, n), dim), dtype=np.float32), 0
                for indices, features in _encoded_batches(
                    patches, backbone, batch_size, num_workers, cached=path is not None
                ):
                    bar.update(len(indices))
                    chunk[indices - chunk_start] = features
                    filled = int(indices[-1]) + 1 - chunk_start
                    if filled < len(chunk):
                        continue
                    if not np.isfinite(chunk).all():
                        raise FloatingPointError(
                            f"Backbone {backbone.name!r} produced non-finite features; nothing was cached."
                        )
                    if file is not None:
                        chunk = _as_stored(chunk, dtype, backbone.name)
                        file.write(chunk.tobytes())
                    yield chunk_start, as_float32(chunk)
                    chunk_start += filled
                    chunk = np.empty((min(chunk_size, n - chunk_start), dim), dtype=np.float32)
            timer.add("%.1f patches/s", n / max(timer.elapsed, 1e-9))
            if partial is not None:
                partial.replace(path)
                timer.add("cached in %s", path)
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)


def _as_stored(chunk: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """Finite float32 features as the cache stores them (``dtype``), or an error if they do not fit it.

    Raises
    ------
    OverflowError
        If a value lies beyond float16's finite range (it would be stored as an infinity).
    """
    if dtype == np.float32:
        return chunk
    with np.errstate(over="ignore"):
        stored = chunk.astype(dtype)
    if not np.isfinite(stored).all():
        raise OverflowError(
            f"Backbone {name!r} produced features up to {float(np.abs(chunk).max()):.6g} in magnitude, beyond "
            f"{dtype}'s largest finite value {float(np.finfo(dtype).max):g}, so sd.settings.feature_cache_dtype = "
            f"{dtype.name!r} cannot store them; nothing was cached. Set sd.settings.feature_cache_dtype = 'float32' "
            "(the default) for this backbone."
        )
    return stored


def open_locked_npy(path: Path, shape: tuple[int, int], dtype: np.dtype = np.dtype(np.float32)) -> BinaryIO:
    """A ``.npy`` file of ``dtype`` and ``shape`` opened for appending its rows in order.

    The file is exclusively locked (advisory, released on closing or when the process dies) so that
    :func:`_remove_stale_partials` in other processes leaves it alone.

    Parameters
    ----------
    path
        The file to create (or overwrite); its folder is created if missing.
    shape
        ``(n_rows, dim)`` written into the header; the caller writes exactly that many rows of ``dtype``.
    dtype
        The values' type written into the header (float32, or float16 for :attr:`sd.settings.feature_cache_dtype
        <spade_sd.utils.settings.Settings.feature_cache_dtype>`).

    Returns
    -------
    The binary file, positioned after the header (the caller closes it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    file = path.open("wb")
    if fcntl is not None:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # no locks on this file system, or a thread of this process writes the same file
            pass
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(file, header)
    return file


@contextmanager
def rereadable_features(
    patches: SpotPatches, backbone, *, batch_size: int = 64, cache: bool = True, num_workers: int = 0
) -> Iterator[Callable[[], Iterator[tuple[int, np.ndarray]]]]:
    """A function that iterates over the features of every patch, chunk by chunk, as often as it is called.

    The features are computed once, on the first pass: into the cache, or (``cache=False``, or a backbone without
    a stable identity) into a temporary file that is deleted on leaving the context. Later passes read them back
    chunk by chunk, so a whole slide's features are never held in memory (e.g. per-slide statistics in one pass,
    the embedding in the next).
    """
    options = {"batch_size": batch_size, "num_workers": num_workers}
    if _cache_allowed(backbone, cache):
        yield lambda: iter_features(patches, backbone, cache=True, **options)
        return
    with tempfile.TemporaryDirectory(prefix="spade_sd-features-") as folder:
        path = Path(folder) / "features.npy"

        def passes() -> Iterator[tuple[int, np.ndarray]]:
            if path.is_file():
                yield from _chunks_from(path, (len(patches), backbone.dim), CHUNK_SIZE)
            else:
                chunk_size = _whole_batches(CHUNK_SIZE, batch_size)
                yield from _compute_chunks(patches, backbone, batch_size, chunk_size, path, num_workers=num_workers)

        yield passes


def extract_features(
    patches: SpotPatches,
    backbone,
    *,
    batch_size: int = 64,
    cache: bool = True,
    num_workers: int = 0,
) -> np.ndarray:
    """All the patches' features in one array: :func:`iter_features` collected (same arguments and cache).

    Returns
    -------
    float32 array ``(len(patches), backbone.dim)``.
    """
    features = np.empty((len(patches), backbone.dim), dtype=np.float32)
    chunks = iter_features(patches, backbone, batch_size=batch_size, cache=cache, num_workers=num_workers)
    for start, chunk in chunks:
        features[start : start + len(chunk)] = chunk
    return features


def mapped_features(
    patches: SpotPatches, backbone, *, batch_size: int = 64, cache: bool = True, num_workers: int = 0
) -> np.ndarray:
    """All the patches' features as a read-only memory map of their cache file (computed into it if missing).

    For wide features (the activations inside a backbone) and :func:`spade_sd.tl.pretrain`'s bounded-memory path:
    the features are computed, or checked, chunk by chunk of at most about 64 MB, and then read from disk only where
    rows are used. Without the cache (``cache=False``, or a backbone without a stable identity) they are collected
    in memory instead.

    Returns
    -------
    Array ``(len(patches), backbone.dim)``: the cache file memory-mapped as it is stored (float32, or float16 under
    :attr:`sd.settings.feature_cache_dtype <spade_sd.utils.settings.Settings.feature_cache_dtype>` ``= "float16"``;
    readers convert the rows they use), or float32 in memory without the cache.
    """
    chunk_size = max(1, 2**24 // max(backbone.dim, 1))
    if not _cache_allowed(backbone, cache):
        features = np.empty((len(patches), backbone.dim), dtype=np.float32)
        options = {"batch_size": batch_size, "cache": False, "chunk_size": chunk_size, "num_workers": num_workers}
        for start, chunk in iter_features(patches, backbone, **options):
            features[start : start + len(chunk)] = chunk
        return features
    dtype = cache_dtype()
    options = {"batch_size": batch_size, "cache": True, "chunk_size": chunk_size, "num_workers": num_workers}
    for _ in iter_features(patches, backbone, **options):
        pass
    return np.load(_cache_path(patches, backbone, dtype), mmap_mode="r")
