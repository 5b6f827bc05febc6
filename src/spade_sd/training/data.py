"""Data plumbing of expert training: spots as tensors, batches within one expert, validation held out by slide.

At scale the standardized features are never held: :class:`StandardizedRows` reads them from each slide's array
(a memory map of float16 or float32 features on disk, say) where a batch or a pass needs them, and
:class:`ExpressionRows` keeps the expression sparse, each batch's rows made dense when read.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from scipy import sparse
from torch.utils.data import DataLoader, Dataset, Sampler

from spade_sd.config import SealConfig, TrainingConfig
from spade_sd.encoders.features import as_float32
from spade_sd.model.standardization import FeatureScaler
from spade_sd.utils.logging import logger

# Bytes of memory-mapped pages read between two releases of them (see release_pages)
RELEASE_BYTES = 64 * 2**20
# A scattered row maps this much: on a page fault the kernel maps the cached pages around it, 64 KB ("fault-around"),
# or on recent kernels the whole large folio holding it, up to 2 MB (one page-table leaf), as the page cache holds a
# file written in large writes: 1,000 lone rows of such a feature file mapped 850 KB each here (Linux 6.18), and 2,097,152
# spots over 512 slides mapped 3 GB of pages between releases in training (benchmarks/results/pretrain_scale.md)
FAULT_AROUND_BYTES = 2 * 2**20
# Rows of one block when passing over every spot
BLOCK_ROWS = 4_096


def release_pages(array: np.ndarray) -> None:
    """Unmap the pages of a read-only memory map that reading touched; nothing for any other array.

    A memory map's pages stay mapped into the process (and counted in its resident memory) once read, until the
    kernel needs the memory; a pass over 5 GB of features would look like 5 GB resident. Dropping them keeps them
    in the page cache (reading them again costs a minor fault) and the resident set bounded. Copy-on-write maps
    (``mode="c"``) are left alone: dropping their pages would drop what was written to them.
    """
    base = _mapped_file(array)
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


def _mapped_file(array: np.ndarray) -> mmap.mmap | None:
    """The memory map under a read-only ``np.memmap`` (or a view of one); ``None`` for any other array."""
    if not isinstance(array, np.memmap) or array.mode == "c":
        return None
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


class PageBudget:
    """Releases the pages of the memory maps among ``arrays`` once :data:`RELEASE_BYTES` have been read from them.

    The readers count what their page faults map, not what they asked for: a run of rows its bytes, a scattered row
    at least :data:`FAULT_AROUND_BYTES`. Arrays that are not read-only memory maps are left alone.
    """

    def __init__(self, arrays: Iterable[Any]) -> None:
        # one array per memory map: the slides' arrays are often views of one file, released as a whole
        self._mapped = list({id(_mapped_file(a)): a for a in arrays if _mapped_file(a) is not None}.values())
        self._since_release = 0

    def read(self, n_bytes: int) -> None:
        """Count ``n_bytes`` read; release every map's pages when the budget is spent."""
        if not self._mapped:
            return
        self._since_release += n_bytes
        if self._since_release >= RELEASE_BYTES:
            for array in self._mapped:
                release_pages(array)
            self._since_release = 0


class StandardizedRows:
    """The standardized features of every training spot, read from each slide's features only where they are used.

    Indexing with a slice or with row positions returns float32 rows, as indexing the standardized matrix would;
    :meth:`blocks` passes over every row. The features may be memory maps (float16 or float32 on disk): only the
    rows asked for are read, converted to float32 and standardized, first by their slide's own statistics (with
    per-slide standardization) and then by ``scaler``, and the memory maps' pages are released every
    :data:`RELEASE_BYTES` read (a scattered row counting as the :data:`FAULT_AROUND_BYTES` its page fault maps), so the
    resident memory stays bounded whatever the number of spots and however the rows asked for are spread.

    Parameters
    ----------
    features
        Each slide's backbone features ``(n_slide, d)``, slide after slide.
    slide_scalers
        Each slide's own standardization, or ``None`` for none (``standardize="global"``).
    scaler
        The standardization of all slides, applied after the slides' own; ``None`` until it is fitted (on
        :meth:`blocks`), then set with :meth:`with_scaler`.
    """

    def __init__(
        self,
        features: Sequence[np.ndarray],
        slide_scalers: Sequence[FeatureScaler] | None = None,
        scaler: FeatureScaler | None = None,
    ) -> None:
        widths = {np.shape(f)[1] if np.ndim(f) == 2 else None for f in features}
        if len(features) == 0 or len(widths) != 1 or None in widths:
            raise ValueError(
                "Expected every slide's features as a 2-d array (n_spots, d) of one width d; found shapes "
                f"{sorted({np.shape(f) for f in features})[:5]}. Compute every slide's features with one backbone."
            )
        if slide_scalers is not None and len(slide_scalers) != len(features):
            raise ValueError(f"Expected one scaler per slide ({len(features)}); found {len(slide_scalers)}.")
        self.features = list(features)
        self.offsets = np.cumsum([0, *map(len, self.features)])
        self.slide_scalers = slide_scalers
        self.scaler = scaler
        self._pages = PageBudget(self.features)

    def with_scaler(self, scaler: FeatureScaler) -> StandardizedRows:
        """The same rows, standardized by ``scaler`` too."""
        return StandardizedRows(self.features, self.slide_scalers, scaler)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_spots, d)``."""
        return int(self.offsets[-1]), int(np.shape(self.features[0])[1])

    @property
    def ndim(self) -> int:
        """2, as the matrix it stands for."""
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray | Sequence[int]) -> np.ndarray:
        return self._read(_row_positions(key, len(self)))

    def blocks(self, size: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, rows)`` blocks of ``size`` standardized rows covering every spot, in order."""
        for start in range(0, len(self), size):
            yield start, self[start : start + size]

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        row_bytes = self.shape[1] * max(np.dtype(f.dtype).itemsize for f in self.features)
        scattered_rows = max(1, RELEASE_BYTES // max(row_bytes, FAULT_AROUND_BYTES))
        for s, positions, local in _slide_runs(self.offsets, rows):
            if local[-1] - local[0] + 1 == len(local):  # a run of rows is read as one slice
                out[positions] = as_float32(self.features[s][local[0] : local[-1] + 1])
                # a run maps its pages and those around them: a lone row (one of 128 in a batch over 512 slides)
                # maps as much as a scattered one
                self._pages.read(max(len(local) * row_bytes, FAULT_AROUND_BYTES))
            else:
                # scattered rows (a batch, a draw) one by one, from where they lie, a bounded number between releases
                for start in range(0, len(local), scattered_rows):
                    piece = slice(start, start + scattered_rows)
                    out[positions[piece]] = as_float32(self.features[s][local[piece]])
                    self._pages.read(len(local[piece]) * max(row_bytes, FAULT_AROUND_BYTES))
            if self.slide_scalers is not None:  # the slide's rows by its own statistics, as they are read
                out[positions] = self.slide_scalers[s].transform(out[positions])
        # in place: a draw of many rows is not copied again
        return out if self.scaler is None else self.scaler.transform(out, copy=False)


def drawn_blocks(source: Any, rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """``source[rows]`` (an array, :class:`StandardizedRows` or :class:`ExpressionRows`), ``size`` rows at a time."""
    for start in range(0, len(rows), size):
        yield source[rows[start : start + size]]


def _slide_runs(offsets: np.ndarray, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(slide, positions in rows, the slide's own sorted row positions)`` for every slide that ``rows`` touch."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    bounds = np.searchsorted(ordered, offsets)
    for s in np.flatnonzero(np.diff(bounds)):
        part = slice(bounds[s], bounds[s + 1])
        yield int(s), order[part], ordered[part] - offsets[s]


def _row_positions(key: slice | np.ndarray | Sequence[int], n: int) -> np.ndarray:
    """Row positions (non-negative int64) from a slice, boolean mask or positions, checked against ``n`` rows."""
    if isinstance(key, slice):
        key = np.arange(*key.indices(n))
    rows = np.asarray(key)
    if rows.dtype == bool:
        rows = np.flatnonzero(rows)
    rows = rows.astype(np.int64, copy=False)
    if rows.ndim != 1 or (rows.size and (rows.min() < -n or rows.max() >= n)):
        raise IndexError(f"Expected row positions below {n}; found {rows.min()}..{rows.max()}.")
    return np.where(rows < 0, rows + n, rows)


class ExpressionRows:
    """Every training spot's expression over the gene panel, held sparse slide by slide; rows come out dense.

    Log-normalized counts keep their zeros, so the bounded-memory path holds each slide's non-zero values
    (:meth:`GenePanel.transform(..., as_sparse=True) <spade_sd.GenePanel.transform>`) instead of a dense
    ``(n_spots, n_genes)`` array: the values as float32, their genes' positions in 16 bits where the panel has at
    most 65,536 genes (6 bytes per value instead of a CSR matrix's 8). Indexing with a slice or row positions
    returns those rows as float32, as indexing the dense matrix would.

    Parameters
    ----------
    parts
        Each slide's expression ``(n_slide, n_genes)``, slide after slide: sparse matrices or arrays (an iterator of
        them is converted one slide at a time).
    """

    def __init__(self, parts: Iterable[sparse.spmatrix | np.ndarray]) -> None:
        self.values: list[np.ndarray] = []
        self.genes: list[np.ndarray] = []
        self.starts: list[np.ndarray] = []  # each slide's rows' first value, and the end of its last
        sizes, widths = [], set()
        for part in parts:
            shape = np.shape(part)
            widths.add(shape[1] if len(shape) == 2 else None)
            if len(widths) > 1 or None in widths:
                raise ValueError(
                    "Expected every slide's expression as a 2-d matrix (n_spots, n_genes) over one gene panel; found "
                    f"widths {sorted(widths, key=str)}. Transform every slide with the same GenePanel."
                )
            part = sparse.csr_matrix(part, dtype=np.float32)
            if not part.has_canonical_format:  # one value per gene and row, so reading a row assigns each gene once
                part = part.copy()  # the caller's matrix is left as it was
                part.sum_duplicates()
            self.values.append(part.data)
            self.genes.append(part.indices.astype(np.uint16 if shape[1] <= 2**16 else np.int32))
            self.starts.append(part.indptr.astype(np.int64))
            sizes.append(shape[0])
        if not sizes:
            raise ValueError("Expected the expression of at least one slide; found none.")
        self.n_genes = int(widths.pop())
        self.offsets = np.cumsum([0, *sizes])

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_spots, n_genes)``."""
        return int(self.offsets[-1]), self.n_genes

    @property
    def ndim(self) -> int:
        """2, as the matrix it stands for."""
        return 2

    @property
    def nbytes(self) -> int:
        """Bytes held by the values, their genes and the rows' starts."""
        return sum(a.nbytes for arrays in (self.values, self.genes, self.starts) for a in arrays)

    def __len__(self) -> int:
        return self.shape[0]

    def is_finite(self) -> bool:
        """Whether every stored value is finite (the zeros not stored are)."""
        return all(np.isfinite(values).all() for values in self.values)

    def __getitem__(self, key: slice | np.ndarray | Sequence[int]) -> np.ndarray:
        rows = _row_positions(key, len(self))
        out = np.zeros((len(rows), self.n_genes), dtype=np.float32)
        for s, positions, local in _slide_runs(self.offsets, rows):
            first = self.starts[s][local]
            lengths = self.starts[s][local + 1] - first
            # every value of those rows: each row's run of values, one after the other
            taken = np.repeat(first - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
            out[np.repeat(positions, lengths), self.genes[s][taken]] = self.values[s][taken]
        return out

    def column_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Every gene's mean and (population) standard deviation over all rows, in float64, from the stored values.

        In two passes, as :meth:`numpy.ndarray.std` takes them: the mean, then the squared deviations, those of the
        zeros not stored counted as ``mean²`` each.
        """
        n = len(self)
        if n == 0:
            raise ValueError("Expected at least one row to take gene statistics from; found none.")
        total, stored = np.zeros(self.n_genes), np.zeros(self.n_genes)
        for values, genes in zip(self.values, self.genes, strict=True):
            total += np.bincount(genes, weights=values, minlength=self.n_genes)
            stored += np.bincount(genes, minlength=self.n_genes)
        mean = total / n
        squares = (n - stored) * np.square(mean)
        for values, genes in zip(self.values, self.genes, strict=True):
            squares += np.bincount(genes, weights=np.square(values - mean[genes]), minlength=self.n_genes)
        return mean, np.sqrt(squares / n)


class ZScoredRows:
    """Rows of expression standardized per gene as they are read: ``(rows − mean) / std``, float32.

    Standardized expression has no zeros left to leave out, so it is held as its :class:`ExpressionRows` (or an
    array) and standardized a batch at a time, as the whole matrix would be.

    Parameters
    ----------
    rows
        Every spot's expression ``(n_spots, n_genes)``.
    mean, std
        Per gene, ``(n_genes,)``.
    """

    def __init__(self, rows: ExpressionRows | np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        self.rows = rows
        self.mean, self.std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        if self.mean.shape != (rows.shape[1],) or self.std.shape != (rows.shape[1],):
            raise ValueError(
                f"Expected a mean and a std per gene ({rows.shape[1]}); found shapes {self.mean.shape} and "
                f"{self.std.shape}."
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_spots, n_genes)``."""
        return tuple(self.rows.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray | Sequence[int]) -> np.ndarray:
        return (np.asarray(self.rows[key], dtype=np.float32) - self.mean) / self.std


class SpotDataset(Dataset):
    """(image feature, expression, expert) triples; a list of indices is fetched as one batch.

    Parameters
    ----------
    X, Y
        Image features and expression: in-memory arrays (held as tensors, one row per spot of the dataset), or
        with ``rows``, every spot's (:class:`StandardizedRows`, :class:`ExpressionRows` or arrays) read batch by
        batch.
    expert_idx
        Expert of each spot of the dataset.
    rows
        The position in ``X`` and ``Y`` of each spot of the dataset (e.g. the training spots).
    """

    def __init__(
        self,
        X: np.ndarray | StandardizedRows,
        Y: np.ndarray | ExpressionRows,
        expert_idx: np.ndarray,
        rows: np.ndarray | None = None,
    ) -> None:
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows is None:
            X, Y = (torch.as_tensor(np.asarray(values, dtype=np.float32)) for values in (X, Y))
        self.X, self.Y = X, Y
        self.expert = torch.as_tensor(np.asarray(expert_idx, dtype=np.int64))

    def __len__(self) -> int:
        return self.expert.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, expert = self.__getitems__([i])
        return x[0], y[0], expert[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # one fancy-indexing per batch instead of per spot; the DataLoader's collate_fn passes it through
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.rows is None:
            return self.X[idx], self.Y[idx], self.expert[idx]
        rows = self.rows[idx.numpy()]
        return torch.from_numpy(self.X[rows]), torch.from_numpy(np.asarray(self.Y[rows])), self.expert[idx]


def _keep_batch(batch: Any) -> Any:
    return batch


class ExpertBatchSampler(Sampler[list[int]]):
    """Batches that each hold spots of one expert, in a random interleaving of the experts.

    Each epoch, every expert's spots are shuffled (generator seeded by ``(seed, epoch)``) and cut into global
    batches of ``batch_size * num_replicas`` spots; a batch is trimmed to a multiple of ``num_replicas`` and
    kept only if it still holds at least 2 spots (and one per process). The batches of all experts are then
    shuffled together. Under DDP every process builds the same global batches and takes its own equal slice,
    so at each step all processes train the same expert.

    Parameters
    ----------
    expert_idx
        Expert of each spot of the dataset.
    batch_size
        Spots per batch per process.
    shuffle
        Shuffle spots and batch order (training); otherwise a fixed order (validation).
    seed
        Seed of the shuffling.
    num_replicas
        Number of processes.
    rank
        This process's rank.
    """

    def __init__(
        self,
        expert_idx: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"Invalid batch_size={batch_size}, rank={rank}, num_replicas={num_replicas}.")
        self.expert_idx = np.asarray(expert_idx)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._length = len(self._global_batches(0))

    def set_epoch(self, epoch: int) -> None:
        """Shuffle as in epoch ``epoch``; without calls, each pass over the sampler counts as the next epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches(self.epoch)
        self.epoch += 1
        for batch in batches:
            per_process = len(batch) // self.num_replicas
            yield batch[self.rank * per_process : (self.rank + 1) * per_process].tolist()

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        world, size = self.num_replicas, self.batch_size * self.num_replicas
        batches = []
        for expert in np.unique(self.expert_idx):
            idx = np.flatnonzero(self.expert_idx == expert)
            if self.shuffle:
                idx = rng.permutation(idx)
            for start in range(0, len(idx), size):
                batch = idx[start : start + size]
                batch = batch[: len(batch) - len(batch) % world]
                if len(batch) >= max(2, world):
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches


def split_by_slide(
    slide: np.ndarray,
    *,
    val_slides: Sequence | None = None,
    val_fraction: float = TrainingConfig.val_fraction,
    coords: np.ndarray | None = None,
    min_val_slides: int = TrainingConfig.min_val_slides,
    seed: int = TrainingConfig.seed,
) -> np.ndarray:
    """Boolean mask of the validation spots, holding out whole slides (or, with few slides, a block of each).

    Parameters
    ----------
    slide
        Slide label of each spot.
    val_slides
        Slides to hold out; if ``None``, ``round(val_fraction * n_slides)`` slides (at least 1, at most all but
        one) are drawn with ``seed``. An empty list or ``val_fraction=0`` means no validation.
    val_fraction
        Fraction of slides (or, for blocks, of each slide's extent) to hold out.
    coords
        Spot coordinates (n, 2), each slide in its own frame. With fewer than ``min_val_slides`` slides (and
        ``val_slides`` not given), the spots in the last ``val_fraction`` of every slide's longer axis form a
        spatially contiguous validation block of that slide. Without coordinates a single slide gets no
        validation (a warning says so) and early stopping falls back to the training loss.
    min_val_slides
        Fewest slides for which whole slides are held out. Holding out one of two or three slides would leave
        a half or a third of the few hundred spots of small ST studies unseen by the heads (leave-one-section-out
        on the three olfactory bulb sections trains on two); a block of each slide keeps every slide in training.
    seed
        Seed of the slide draw.

    Returns
    -------
    Boolean array (n_spots,), True for validation spots.
    """
    slide = np.asarray(slide)
    slides = np.unique(slide)
    if val_slides is not None:
        missing = set(np.asarray(val_slides).tolist()) - set(slides.tolist())
        if missing:
            raise ValueError(f"val_slides {sorted(missing)} are not among the slides {slides.tolist()}.")
        mask = np.isin(slide, np.asarray(val_slides))
        if mask.all():
            raise ValueError("val_slides holds out every slide; leave at least one slide for training.")
        return mask
    if val_fraction <= 0:
        return np.zeros(slide.shape[0], dtype=bool)
    if coords is not None and 1 < len(slides) < min_val_slides:
        return _blocks(slide, np.asarray(coords, dtype=np.float64), val_fraction)
    if len(slides) > 1:
        n_val = min(max(1, round(val_fraction * len(slides))), len(slides) - 1)
        chosen = np.random.default_rng(seed).choice(slides, size=n_val, replace=False)
        return np.isin(slide, chosen)
    if coords is None:
        logger.warning(
            "Only one slide and no coordinates: training without validation; early stopping and the returned "
            "weights follow the training loss, which does not measure generalisation."
        )
        return np.zeros(slide.shape[0], dtype=bool)
    logger.warning(
        "Only one slide: validating on a spatially contiguous block (the last %.0f%% along its longer axis); "
        "neighboring spots across the block's border are correlated, so the validation loss is optimistic.",
        100 * val_fraction,
    )
    return _blocks(slide, np.asarray(coords, dtype=np.float64), val_fraction)


def validation_mask(
    slide: np.ndarray, config: TrainingConfig | SealConfig, coords: np.ndarray | None = None
) -> np.ndarray:
    """:func:`split_by_slide` with a configuration's ``val_slides``, ``val_fraction``, ``min_val_slides`` and ``seed``."""
    return split_by_slide(
        slide,
        val_slides=config.val_slides,
        val_fraction=config.val_fraction,
        coords=coords,
        min_val_slides=config.min_val_slides,
        seed=config.seed,
    )


def _blocks(slide: np.ndarray, coords: np.ndarray, val_fraction: float) -> np.ndarray:
    """The last ``val_fraction`` of every slide along its longer axis."""
    mask = np.zeros(slide.shape[0], dtype=bool)
    for name in np.unique(slide):
        rows = slide == name
        xy = coords[rows]
        axis = int(np.argmax(np.ptp(xy, axis=0)))
        mask[rows] = xy[:, axis] > np.quantile(xy[:, axis], 1 - val_fraction)
    return mask


class ExpertDataModule(L.LightningDataModule):
    """Training and validation batches, each from a single expert.

    Parameters
    ----------
    X, Y, expert_idx
        Standardized image features (n_spots, d; an array, or :class:`StandardizedRows` read batch by batch),
        log-normalized expression (n_spots, n_genes; with :class:`StandardizedRows`, also
        :class:`ExpressionRows`), expert of each spot.
    val_mask
        True for validation spots.
    batch_size
        Spots per batch per process.
    seed
        Seed of the batch shuffling.
    """

    def __init__(
        self,
        X: np.ndarray | StandardizedRows,
        Y: np.ndarray | ExpressionRows,
        expert_idx: np.ndarray,
        val_mask: np.ndarray,
        *,
        batch_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        if isinstance(X, StandardizedRows):  # rows read batch by batch, from every spot's features and expression
            sets = [(X, Y, expert_idx[m], np.flatnonzero(m)) for m in (~val_mask, val_mask)]
        else:
            sets = [(X[m], Y[m], expert_idx[m]) for m in (~val_mask, val_mask)]
        self.train_set, self.val_set = (SpotDataset(*arguments) for arguments in sets)
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        """Shuffled single-expert batches; under DDP this process's slice of each global batch."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Single-expert validation batches in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def _loader(self, dataset: SpotDataset, *, shuffle: bool) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = ExpertBatchSampler(
            dataset.expert.numpy(), self.batch_size, shuffle=shuffle, seed=self.seed, num_replicas=world, rank=rank
        )
        # in-memory tensors, or rows read in one call per batch: worker processes would only add start-up and
        # transfer costs
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=_keep_batch, num_workers=0)
