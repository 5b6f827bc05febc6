"""The gene panel shared by several slides: HVG selection, normalisation to log1p expression, saving."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree

from spade_sd.config import PANEL_FLAVORS, PanelConfig
from spade_sd.utils.constants import SAMPLE, SAMPLE_KEY, SPATIAL_KEY, UNS_KEY
from spade_sd.utils.logging import logger
from spade_sd.utils.validation import did_you_mean

_CHECK_CHUNK = 10_000_000
_NEIGHBOUR_RADIUS = 1.5
_MAX_LISTED = 10


@dataclass(frozen=True)
class _Sample:
    """Raw counts of one sample and its gene names; ``counts`` is never written to."""

    name: str
    counts: sparse.csr_matrix | np.ndarray
    genes: pd.Index


@dataclass
class GenePanel:
    """The genes an expression head sees, and how their counts become model inputs.

    Fit it once on the training slides (:meth:`fit`), then :meth:`transform` any slide that holds the panel's
    genes. Counts must be raw (non-negative integers); normalised or log-transformed input is rejected, pass
    ``layer=`` to point at a layer of raw counts instead.

    Attributes
    ----------
    genes
        Panel genes, matched against ``var_names``; the column order of :meth:`transform`.
    flavor
        ``"union"``: the union over samples of each sample's top ``n_top_genes`` HVGs (SPADE). ``"global"``:
        ``n_top_genes`` HVGs on all samples together (SEAL, with ``n_top_genes=2000``).
    n_top_genes
        HVGs per sample (``"union"``) or in total (``"global"``).
    target_sum
        Counts per spot after normalisation; ``None`` uses the median library size of the table being
        transformed (of each sample during :meth:`fit`), as scanpy does.
    min_counts
        Genes with fewer total counts (per sample for ``"union"``, over all samples for ``"global"``) were not
        eligible as HVGs.
    smoothing
        Weight ``s`` of the spot-context smoothing in :meth:`transform`: ``x ← (1 − s)·x + s·mean(neighbours)``.
    """

    genes: list[str]
    flavor: Literal["union", "global"] = PanelConfig.flavor
    n_top_genes: int = PanelConfig.n_top_genes
    target_sum: float | None = 1e4
    min_counts: int = 3
    smoothing: float = PanelConfig.smoothing

    def __post_init__(self) -> None:
        self.genes = [str(g) for g in self.genes]
        if not self.genes:
            raise ValueError(
                "A GenePanel needs at least one gene; found an empty list. Name its genes, or select them from raw "
                "counts with GenePanel.fit(tables)."
            )
        _check_options(self.flavor, self.n_top_genes, self.target_sum, self.min_counts, self.smoothing)

    def __len__(self) -> int:
        return len(self.genes)

    @classmethod
    def fit(
        cls,
        tables: AnnData | Sequence[AnnData],
        *,
        n_top_genes: int = PanelConfig.n_top_genes,
        flavor: Literal["union", "global"] = PanelConfig.flavor,
        layer: str | None = None,
        target_sum: float | None = 1e4,
        min_counts: int = 3,
        smoothing: float = PanelConfig.smoothing,
    ) -> GenePanel:
        """Select the panel from the raw counts of one or more tables.

        Each sample is ``normalize_total`` (over all of its genes) → ``log1p`` → ``seurat`` HVGs. Only genes
        present in every sample are candidates, so every sample contributes up to ``n_top_genes`` genes that all
        slides can provide. A table with several values in ``obs["sample"]`` counts as several samples. The
        tables are not modified.

        Parameters
        ----------
        tables
            One table or several, with raw counts in ``X`` or in ``layers[layer]`` and genes as ``var_names``.
        n_top_genes
            HVGs per sample (``"union"``) or in total (``"global"``).
        flavor
            ``"union"`` (SPADE) or ``"global"`` (SEAL); see :class:`GenePanel`.
        layer
            Layer holding raw counts; ``None`` uses ``X``.
        target_sum
            Counts per spot after normalisation; ``None`` uses each table's median library size.
        min_counts
            Genes with fewer counts are not eligible as HVGs.
        smoothing
            Spot-context smoothing weight in ``[0, 1]`` that :meth:`transform` will apply.

        Returns
        -------
        The fitted panel.
        """
        _check_options(flavor, n_top_genes, target_sum, min_counts, smoothing)
        named = _named_tables(tables)
        for name, table in named:
            _check_table(table, name, layer)
        start = time.perf_counter()
        samples = [sample for name, table in named for sample in _split_samples(table, name, layer)]
        _check_spots_to_vary(samples, flavor)
        shared = _shared_genes(samples)
        if flavor == "union":
            genes = _union_hvgs(samples, shared, n_top_genes, target_sum, min_counts)
        else:
            genes = _global_hvgs(samples, shared, n_top_genes, target_sum, min_counts)
        if not genes:
            raise ValueError(_no_gene_counted(samples, shared, flavor, min_counts, layer))
        logger.info(
            "GenePanel.fit: %d genes (%s) from %d sample(s) sharing %d genes in %.2f s",
            len(genes),
            flavor,
            len(samples),
            len(shared),
            time.perf_counter() - start,
        )
        return cls(genes, flavor, n_top_genes, target_sum, min_counts, smoothing)

    def transform(
        self, table: AnnData, *, layer: str | None = None, as_sparse: bool = False
    ) -> np.ndarray | sparse.csr_matrix:
        """Log-normalised expression of the panel genes.

        ``normalize_total`` over all of each spot's genes (its library size), ``log1p``, then the panel's columns
        in panel order; with ``smoothing > 0`` each spot is then pulled towards the mean of its neighbours (spots
        of the same ``obs["sample"]`` within 1.5 × the median nearest-neighbour distance in ``obsm["spatial"]``).

        Parameters
        ----------
        table
            Raw counts in ``X`` or ``layers[layer]``, genes as ``var_names``; not modified.
        layer
            Layer holding raw counts; ``None`` uses ``X``.
        as_sparse
            Return a sparse matrix, never holding the dense one (for many spots: ``log1p`` keeps zeros zero). The
            values are the dense result's (with ``smoothing > 0``, to float rounding: the neighbours' mean is
            applied as one sparse operator).

        Returns
        -------
        A float32 array (``as_sparse``: CSR matrix) of shape ``(n_spots, len(self.genes))``.
        """
        name = _table_name(table, None)
        _check_table(table, name, layer)
        self._check_covers(table, name)
        if self.smoothing > 0 and SPATIAL_KEY not in table.obsm:
            raise ValueError(
                f"Smoothing needs spot centers in obsm['spatial'], but table {name!r} has only "
                f"{sorted(table.obsm)}; add them or use a panel with smoothing=0."
            )
        columns = table.var_names.get_indexer(self.genes)
        logexpr = _log_normalise(_counts_matrix(table, layer, name), columns, self.target_sum)
        if as_sparse:
            expression = sparse.csr_matrix(logexpr)
            if self.smoothing > 0:
                expression = _smoothing_operator(table, self.smoothing) @ expression
            return expression.astype(np.float32).tocsr()
        expression = logexpr.toarray() if sparse.issparse(logexpr) else logexpr
        if self.smoothing > 0:
            expression = _smooth(expression, table, self.smoothing)
        return expression.astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, Any]:
        """The panel as a JSON-able dictionary (with the spade_sd version that wrote it)."""
        from importlib.metadata import version

        return {**asdict(self), "spade_sd_version": version("spade_sd")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenePanel:
        """Rebuild a panel from :meth:`to_dict` output."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"spade_sd_version"}
        if unknown or "genes" not in d:
            raise ValueError(
                f"Not a GenePanel dictionary: expected the keys {sorted(known)}, got {sorted(d)}. "
                "Use a dictionary written by GenePanel.to_dict()."
            )
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | PathLike) -> None:
        """Write the panel to a JSON file."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | PathLike) -> GenePanel:
        """Read a panel written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def _check_covers(self, table: AnnData, name: str) -> None:
        missing = pd.Index(self.genes).difference(table.var_names, sort=False)
        if len(missing):
            raise ValueError(
                f"Table {name!r} lacks {len(missing)} of the {len(self.genes)} panel genes, e.g. "
                f"{_listing(missing)}.{did_you_mean(missing, table.var_names)} Fit the panel on tables that share "
                "these genes, or map gene names to the same identifiers."
            )


def _check_options(flavor: str, n_top_genes: int, target_sum: float | None, min_counts: int, smoothing: float) -> None:
    if flavor not in PANEL_FLAVORS:
        raise ValueError(f"flavor must be one of {PANEL_FLAVORS}, got {flavor!r}.")
    if n_top_genes < 1:
        raise ValueError(f"n_top_genes must be at least 1, got {n_top_genes}.")
    if target_sum is not None and target_sum <= 0:
        raise ValueError(f"target_sum must be positive or None, got {target_sum}.")
    if min_counts < 0:
        raise ValueError(f"min_counts must be non-negative, got {min_counts}.")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}.")


def _table_name(table: AnnData, position: int | None) -> str:
    sample = table.uns.get(UNS_KEY, {}).get(SAMPLE)
    if sample is not None:
        return str(sample)
    return "table" if position is None else f"tables[{position}]"


def _named_tables(tables: AnnData | Sequence[AnnData]) -> list[tuple[str, AnnData]]:
    if isinstance(tables, AnnData):
        tables = [tables]
    if not tables or not all(isinstance(t, AnnData) for t in tables):
        raise TypeError(f"Expected an AnnData or a non-empty sequence of AnnData, got {type(tables).__name__}.")
    return [(_table_name(table, i), table) for i, table in enumerate(tables)]


def check_expression_tables(
    named_tables: Sequence[tuple[str, AnnData]], *, layer: str | None = None, panel: GenePanel | None = None
) -> None:
    """Check tables before any work: raw counts, unique gene names, and genes shared by all (or covering ``panel``).

    Parameters
    ----------
    named_tables
        ``(name, table)`` pairs; names appear in the messages.
    layer
        Layer holding raw counts; ``None`` uses ``X``.
    panel
        A fitted panel every table must cover; ``None``: the tables must share at least one gene.
    """
    for name, table in named_tables:
        _check_table(table, name, layer)
        if panel is not None:
            panel._check_covers(table, name)
    if panel is None:
        _shared_genes([_Sample(name, None, table.var_names) for name, table in named_tables])


def _check_table(table: AnnData, name: str, layer: str | None) -> None:
    duplicated = table.var_names[table.var_names.duplicated()].unique()
    if len(duplicated):
        # making them unique would invent names ("GENE-1") that never match across slides
        raise ValueError(
            f"Table {name!r} has {len(duplicated)} duplicated gene names in var_names, e.g. {_listing(duplicated)}. "
            "Sum or drop the duplicates first (or call table.var_names_make_unique() if that is what you want)."
        )
    _check_raw_counts(_counts_matrix(table, layer, name), name, layer)


def _counts_matrix(table: AnnData, layer: str | None, name: str) -> sparse.csr_matrix | np.ndarray:
    # the layers of an AnnData view without layers list a None key
    layers = sorted(key for key in table.layers.keys() if key is not None)
    if layer is not None and layer not in layers:
        raise KeyError(f"Table {name!r} has no layer {layer!r}; available layers: {layers}.")
    if table.n_vars == 0:  # a table made only to annotate shapes: no layer= can help
        raise ValueError(
            f"Table {name!r} holds no genes (0 variables), so no expression to learn from. Pass a table of raw "
            "counts per spot annotating the shapes (from a spatialdata-io reader, or sopa's aggregation); for an "
            "H&E image alone, embed it with a trained model: sd.tl.embed(sdata, model)."
        )
    matrix = table.X if layer is None else table.layers[layer]
    if matrix is None:
        raise ValueError(f"Table {name!r} has no X; pass layer= with the name of a layer of raw counts.")
    return matrix.tocsr() if sparse.issparse(matrix) else np.asarray(matrix)


def _check_raw_counts(matrix: sparse.csr_matrix | np.ndarray, name: str, layer: str | None) -> None:
    where = "X" if layer is None else f"layers[{layer!r}]"
    values = matrix.data if sparse.issparse(matrix) else matrix.reshape(-1)
    integral = np.issubdtype(values.dtype, np.integer)
    # chunked, so the check never allocates more than one chunk-sized temporary
    for start in range(0, values.size, _CHECK_CHUNK):
        chunk = values[start : start + _CHECK_CHUNK]
        if (chunk < 0).any():
            raise ValueError(f"Table {name!r} {where} has negative values; GenePanel needs raw counts.")
        if integral:
            continue
        if not np.isfinite(chunk).all():
            raise ValueError(
                f"Table {name!r} {where} holds NaN or infinite values; GenePanel needs raw counts "
                "(non-negative integers)."
            )
        fractional = chunk[chunk != np.round(chunk)]
        if fractional.size:
            raise ValueError(
                f"Table {name!r} {where} holds non-integer values (e.g. {fractional[0]:.4g}), so it looks "
                "normalised or log-transformed; GenePanel needs raw counts. Pass layer= with the name of a "
                "layer of raw counts."
            )


def _split_samples(table: AnnData, name: str, layer: str | None) -> Iterator[_Sample]:
    counts = _counts_matrix(table, layer, name)
    labels = table.obs[SAMPLE_KEY] if SAMPLE_KEY in table.obs else None
    if labels is None or labels.nunique() < 2:
        yield _Sample(name, counts, table.var_names)
        return
    for label in pd.unique(labels):
        yield _Sample(f"{name}[sample={label!r}]", counts[np.flatnonzero(labels == label)], table.var_names)


def _shared_genes(samples: list[_Sample]) -> pd.Index:
    shared = samples[0].genes
    for sample in samples[1:]:
        shared = shared[shared.isin(sample.genes)]
    if shared.empty:
        sizes = ", ".join(f"{s.name!r} ({len(s.genes)} genes)" for s in samples)
        raise ValueError(
            f"The samples share no gene: {sizes}.{_shared_in_another_case(samples)} Check that they name genes the "
            "same way (symbols vs Ensembl IDs, with or without versions, letter case)."
        )
    return shared


def _shared_in_another_case(samples: list[_Sample]) -> str:
    """How many genes the samples share with letter case ignored, and an example of two spellings ("" if none)."""
    spellings = [{str(g).casefold(): str(g) for g in s.genes} for s in samples]
    common = set.intersection(*(set(names) for names in spellings))
    if not common:
        return ""
    example = next(folded for folded in spellings[0] if folded in common)
    shown = " and ".join(repr(name) for name in dict.fromkeys(names[example] for names in spellings))
    return f" They share {len(common)} genes when letter case is ignored, e.g. {shown}."


def _check_spots_to_vary(samples: list[_Sample], flavor: str) -> None:
    """Refuse to select highly variable genes where there is no variance: a sample (or all of them) of one spot."""
    sizes = {s.name: s.counts.shape[0] for s in samples}
    union = flavor == "union"
    small = {name: n for name, n in sizes.items() if n < 2} if union else sizes if sum(sizes.values()) < 2 else {}
    if not small:
        return
    found = ", ".join(f"{name!r} has {n}" for name, n in small.items())
    if union:
        raise ValueError(
            f"Highly variable genes need at least 2 spots in every sample (flavor='union'), to vary over; {found}. "
            "Leave these samples out, or select the genes over all samples together with flavor='global' "
            "(panel_flavor='global' in sd.tl.pretrain)."
        )
    raise ValueError(
        f"Highly variable genes need at least 2 spots in all (flavor='global'), to vary over; {found}. Fit the "
        "panel on more spots."
    )


def _no_gene_counted(samples: list[_Sample], shared: pd.Index, flavor: str, min_counts: int, layer: str | None) -> str:
    """Why no gene was eligible for the panel, and what to check."""
    where = "X" if layer is None else f"layers[{layer!r}]"
    scope = "in any one sample" if flavor == "union" else "over all samples together"
    totals = ", ".join(f"{s.name!r} {float(s.counts.sum()):.0f}" for s in samples)
    return (
        f"No gene can enter the panel: none of the {len(shared)} genes the samples share has at least "
        f"min_counts={min_counts} counts {scope}; counts in all: {totals}. Check that {where} holds raw counts (or "
        "pass layer= naming a layer that does), or pass a panel fitted with a lower min_counts "
        "(sd.GenePanel.fit(tables, min_counts=...))."
    )


def _log_normalise(
    counts: sparse.csr_matrix | np.ndarray, columns: np.ndarray, target_sum: float | None
) -> sparse.csr_matrix | np.ndarray:
    """``log1p(target · counts / library)`` on ``columns``, the library summed over all genes (scanpy's rule)."""
    library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    target = np.median(library[library > 0]) if target_sum is None else target_sum
    scale = np.divide(target, library, out=np.zeros_like(library), where=library > 0)
    subset = counts[:, columns]
    if sparse.issparse(subset):
        return (sparse.diags(scale) @ subset.astype(np.float64)).tocsr().log1p()
    return np.log1p(subset.astype(np.float64) * scale[:, None])


def _gene_totals(sample: _Sample, genes: pd.Index) -> np.ndarray:
    return np.asarray(sample.counts.sum(axis=0)).ravel()[sample.genes.get_indexer(genes)]


def _top_hvgs(logexpr: sparse.csr_matrix | np.ndarray, genes: pd.Index, n_top_genes: int) -> pd.Index:
    if len(genes) <= n_top_genes:
        return genes
    import scanpy as sc  # imported on use: embedding with a trained model needs no scanpy

    hvg = sc.pp.highly_variable_genes(
        AnnData(logexpr, var=pd.DataFrame(index=genes)), n_top_genes=n_top_genes, flavor="seurat", inplace=False
    )
    return genes[np.asarray(hvg["highly_variable"])]


def _union_hvgs(
    samples: list[_Sample], shared: pd.Index, n_top_genes: int, target_sum: float | None, min_counts: int
) -> list[str]:
    selected: set[str] = set()
    for sample in samples:
        columns = sample.genes.get_indexer(shared)
        eligible = _gene_totals(sample, shared) >= min_counts
        logexpr = _log_normalise(sample.counts, columns[eligible], target_sum)
        selected.update(_top_hvgs(logexpr, shared[eligible], n_top_genes))
    return [g for g in shared if g in selected]


def _global_hvgs(
    samples: list[_Sample], shared: pd.Index, n_top_genes: int, target_sum: float | None, min_counts: int
) -> list[str]:
    totals = sum(_gene_totals(s, shared) for s in samples)
    eligible = shared[totals >= min_counts]
    blocks = [_log_normalise(s.counts, s.genes.get_indexer(eligible), target_sum) for s in samples]
    stacked = sparse.vstack(blocks, format="csr") if sparse.issparse(blocks[0]) else np.vstack(blocks)
    return list(_top_hvgs(stacked, eligible, n_top_genes))


def _smooth(expression: np.ndarray, table: AnnData, weight: float) -> np.ndarray:
    coords = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    labels = table.obs[SAMPLE_KEY].to_numpy() if SAMPLE_KEY in table.obs else np.zeros(table.n_obs)
    smoothed = expression.copy()
    for label in pd.unique(labels):
        rows = np.flatnonzero(labels == label)
        mean, has_neighbours = _neighbour_mean(expression[rows], coords[rows])
        smoothed[rows[has_neighbours]] = (1.0 - weight) * expression[rows[has_neighbours]] + weight * mean
    return smoothed


def _smoothing_operator(table: AnnData, weight: float) -> sparse.csr_matrix:
    """The ``(n, n)`` operator of :func:`_smooth`: ``(1 − w)·x + w·mean(neighbours)`` for spots with neighbours."""
    coords = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    labels = table.obs[SAMPLE_KEY].to_numpy() if SAMPLE_KEY in table.obs else np.zeros(table.n_obs)
    n = table.n_obs
    diagonal, entries = np.ones(n), []
    for label in pd.unique(labels):
        rows = np.flatnonzero(labels == label)
        adjacency = _neighbour_graph(coords[rows]).tocoo()
        degree = np.bincount(adjacency.row, minlength=len(rows)).astype(np.float64)
        diagonal[rows[degree > 0]] = 1.0 - weight
        entries.append((rows[adjacency.row], rows[adjacency.col], weight / degree[adjacency.row]))
    entries.append((np.arange(n), np.arange(n), diagonal))
    i, j, values = (np.concatenate(part) for part in zip(*entries, strict=True))
    return sparse.csr_matrix((values, (i, j)), shape=(n, n))


def _neighbour_graph(coords: np.ndarray) -> sparse.csr_matrix:
    """Adjacency of spots within 1.5 × the median nearest-neighbour distance of each other (no edges below 2)."""
    n = len(coords)
    if n < 2:
        return sparse.csr_matrix((n, n))
    tree = cKDTree(coords)
    nearest = tree.query(coords, k=2)[0][:, 1]
    pairs = tree.query_pairs(_NEIGHBOUR_RADIUS * np.median(nearest), output_type="ndarray")
    i, j = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    return sparse.csr_matrix((np.ones(len(i)), (i, j)), shape=(n, n))


def _neighbour_mean(expression: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean expression of each spot's neighbours, for the spots that have any, and which spots those are."""
    n = len(coords)
    if n < 2:
        return expression[:0], np.zeros(n, dtype=bool)
    adjacency = _neighbour_graph(coords)
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    has_neighbours = degree > 0
    mean = (adjacency @ expression)[has_neighbours] / degree[has_neighbours, None]
    return mean, has_neighbours


def _listing(names: pd.Index) -> str:
    shown = ", ".join(map(str, names[:_MAX_LISTED]))
    return shown + (f" … ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")
