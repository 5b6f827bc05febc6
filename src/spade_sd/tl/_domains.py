"""sd.tl.domains: spatial domains, Leiden clusters of a representation next to its spatial neighbourhood."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

from spade_sd.config import DomainsConfig
from spade_sd.tl._common import claim_outputs
from spade_sd.utils.constants import DOMAINS_KEY, EMBEDDING_KEY, SPATIAL_KEY
from spade_sd.utils.logging import logger
from spade_sd.utils.validation import check_key

TOOL = "tl.domains"


def domains(
    sdata: SpatialData | AnnData,
    *,
    use_rep: str = EMBEDDING_KEY,
    spatial_weight: float = DomainsConfig.spatial_weight,
    resolution: float = DomainsConfig.resolution,
    spatial_neighbors: int = DomainsConfig.spatial_neighbors,
    n_neighbors: int = DomainsConfig.n_neighbors,
    seed: int = DomainsConfig.seed,
    spatial_key: str = SPATIAL_KEY,
    library_key: str | None = None,
    table_key: str | None = None,
    key_added: str = DOMAINS_KEY,
) -> None:
    """Spatial domains: Leiden clusters of each spot's representation next to the mean of its neighbours'.

    Each spot's (or tile's) representation, centred and scaled as a whole (its geometry kept), is put next to the
    mean of its ``spatial_neighbors`` nearest spots' (squidpy's :func:`~squidpy.gr.spatial_neighbors_knn`), weighted
    ``√(1 − λ)`` and ``√λ`` with λ ``spatial_weight``, as BANKSY does; scanpy's neighbour graph of that and Leiden (igraph) give the domains.
    Clustering the representation alone (``spatial_weight=0``) scatters domains across the tissue. With
    ``use_rep="X_spade"`` on tiles of an H&E-only slide (:func:`spade_sd.pp.tile_image`, then
    :func:`spade_sd.tl.embed` with ``shapes_key="tiles"``) the domains are informed by expression with no ST at
    all. How well they follow a section's expression domains is measured on the :doc:`/quality` page
    (``benchmarks/clustering.py``).

    Parameters
    ----------
    sdata
        SpatialData (or a table) whose rows are spots or tiles with a representation and centers. Scanpy's legacy
        spatial AnnData (``uns['spatial']``) is such a table: only its ``.obsm`` is read, so it is clustered and
        written as it is, with no conversion (its image is not needed).
    use_rep
        ``.obsm`` key of the representation: ``"X_spade"`` (:func:`spade_sd.tl.embed`), ``"X_backbone"``
        (:func:`spade_sd.tl.features`), or any other. Rows without values (NaN: rows annotating other elements)
        are left out.
    spatial_weight
        λ in ``[0, 1]``: the neighbourhood's share. 0 clusters the representation alone. On ``X_spade``, 0.5
        followed held-out sections' expression domains better than 0.8 (BANKSY's choice for domains) in each of
        three measurements on mouse olfactory bulb and her2st (ARI 1.34× the backbone's plain Leiden against 1.27×
        with the default model; ``benchmarks/results/clustering_emphasis.md``).
    resolution
        Leiden resolution; higher gives more domains. At 0.5 about as many as Leiden at 0.5 finds in a section's
        own expression (3 to 5 there).
    spatial_neighbors
        Nearest spots (or tiles) averaged into the neighbourhood: 6 is the first ring of a Visium grid.
    n_neighbors
        Neighbours of scanpy's graph on the augmented representation.
    seed
        Seed of the graph and of Leiden.
    spatial_key
        ``.obsm`` key of the centers ``(x, y)``, which spade_sd's loaders and :func:`spade_sd.pp.tile_image`
        write.
    library_key
        ``.obs`` column naming each row's section, whose spots are neighbours only of each other; default the
        shapes each row annotates (spatialdata's ``region_key``), else one section.
    table_key
        The table; default the only one holding ``.obsm[use_rep]``.
    key_added
        Column of the domains. A key holding an earlier output of this tool is replaced (logged); one holding
        anything else (another tool's output, the user's own data) is an error, before any work.

    Returns
    -------
    Nothing; adds to the table:

    ``.obs[key_added]``
        Categorical domain of each clustered row (``"0"``, ``"1"``, …), NaN on rows without
        ``use_rep``. See :func:`spade_sd.pl.domains`.
    ``.uns[key_added]``
        ``params`` (the settings above and the keys read), ``n_domains`` and ``n_spots``.
    ``.uns['spade_sd']['outputs']``
        This tool recorded as the writer of both keys.
    """
    from spade_sd.metrics._domains import leiden_partitions
    from spade_sd.spots.neighbourhood import neighbourhood_features, spatial_graph

    start = time.perf_counter()
    for name, key in (("use_rep", use_rep), ("spatial_key", spatial_key), ("key_added", key_added)):
        check_key(name, key)
    config = DomainsConfig(
        spatial_weight=spatial_weight,
        resolution=resolution,
        spatial_neighbors=spatial_neighbors,
        n_neighbors=n_neighbors,
        seed=seed,
    )
    table_key, table = _table(sdata, use_rep, table_key)
    rows, X, coordinates = _rows(table, table_key, use_rep, spatial_key)
    library_key, groups = _libraries(table, table_key, library_key, rows)
    _check_sizes(groups, config, use_rep, len(rows))
    reads = {("obsm", use_rep): "the representation", ("obsm", spatial_key): "the centers"}
    outputs = claim_outputs(table, table_key, TOOL, [("obs", key_added), ("uns", key_added)], reads=reads)

    graph = spatial_graph(coordinates, n_neighbors=config.spatial_neighbors, groups=groups)
    features = neighbourhood_features(X, graph, config.spatial_weight)
    partitions = leiden_partitions(
        features, resolutions=[config.resolution], seeds=[config.seed], n_neighbors=config.n_neighbors
    )
    labels = partitions[config.resolution, config.seed]

    values = np.full(table.n_obs, np.nan, dtype=object)
    values[rows] = labels.astype(str)
    categories = [str(c) for c in range(labels.max() + 1)]
    table.obs[key_added] = pd.Categorical(values, categories=categories)
    params = {**config.to_dict(), "use_rep": use_rep, "spatial_key": spatial_key}
    table.uns[key_added] = {
        "params": {**params, **({"library_key": library_key} if library_key is not None else {})},
        "n_domains": len(categories),
        "n_spots": len(rows),
    }
    outputs.record()
    logger.info(
        "Added .obs[%r] and .uns[%r] to table %r: %d domains over %d rows in %.1f s",
        key_added,
        key_added,
        table_key,
        len(categories),
        len(rows),
        time.perf_counter() - start,
    )


def _table(sdata: SpatialData | AnnData, use_rep: str, table_key: str | None) -> tuple[str, AnnData]:
    """The table to cluster and its name: ``table_key``, else the only table holding ``.obsm[use_rep]``."""
    if isinstance(sdata, AnnData):
        return table_key or "table", sdata
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a SpatialData or an AnnData table; found {type(sdata).__name__}.")
    if table_key is not None:
        check_key("table_key", table_key)
        if table_key not in sdata.tables:
            raise KeyError(f"No table {table_key!r} in this SpatialData; its tables are {list(sdata.tables)}.")
        return table_key, sdata.tables[table_key]
    holding = [name for name, table in sdata.tables.items() if use_rep in table.obsm]
    if len(holding) == 1:
        return holding[0], sdata.tables[holding[0]]
    if not holding:
        held = {name: list(table.obsm) for name, table in sdata.tables.items()}
        raise KeyError(
            f"No table holds .obsm[{use_rep!r}] (the tables' .obsm: {held}). Compute it first (sd.tl.embed for "
            "'X_spade', sd.tl.features for 'X_backbone') or pass use_rep= one of those keys."
        )
    raise ValueError(f"Tables {holding} all hold .obsm[{use_rep!r}]; pass table_key= one of them.")


def _rows(table: AnnData, table_key: str, use_rep: str, spatial_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows with a representation, that representation and their centers; an error if centers are missing."""
    if use_rep not in table.obsm:
        raise KeyError(
            f"Table {table_key!r} has no .obsm[{use_rep!r}] (it has {list(table.obsm)}). Compute it first "
            "(sd.tl.embed for 'X_spade', sd.tl.features for 'X_backbone') or pass use_rep= one of those keys."
        )
    X = np.asarray(table.obsm[use_rep], dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f".obsm[{use_rep!r}] must be 2-D (rows × features); found shape {X.shape}.")
    rows = np.flatnonzero(np.isfinite(X).all(axis=1))
    if rows.size == 0:
        raise ValueError(f"No row of table {table_key!r} has finite values in .obsm[{use_rep!r}]; nothing to cluster.")
    if spatial_key not in table.obsm:
        raise KeyError(
            f"Table {table_key!r} has no centers of its spots or tiles in .obsm[{spatial_key!r}] (it has "
            f"{list(table.obsm)}); spade_sd's loaders and sd.pp.tile_image write them. Add each row's (x, y) there "
            "or pass spatial_key= the key holding them."
        )
    coordinates = np.asarray(table.obsm[spatial_key], dtype=np.float64)
    if coordinates.ndim != 2 or coordinates.shape[1] != 2:
        raise ValueError(f".obsm[{spatial_key!r}] must hold (x, y) per row, shape (n, 2); found {coordinates.shape}.")
    missing = ~np.isfinite(coordinates[rows]).all(axis=1)
    if missing.any():
        raise ValueError(
            f"{missing.sum()} of the {rows.size} rows with .obsm[{use_rep!r}] have no finite center in "
            f".obsm[{spatial_key!r}] (e.g. {table.obs_names[rows[missing]][:5].tolist()}); give them centers."
        )
    return rows, X[rows], coordinates[rows]


def _libraries(
    table: AnnData, table_key: str, library_key: str | None, rows: np.ndarray
) -> tuple[str | None, np.ndarray | None]:
    """The column naming each row's section and its values on ``rows`` (``None``: one section)."""
    if library_key is None:
        library_key = table.uns.get("spatialdata_attrs", {}).get("region_key")
        if library_key not in table.obs:
            return None, None
    else:
        check_key("library_key", library_key)
        if library_key not in table.obs:
            raise KeyError(
                f"library_key {library_key!r} is not a column of table {table_key!r} (columns: {list(table.obs)})."
            )
    groups = table.obs[library_key].to_numpy()[rows]
    if pd.isna(groups).any():
        raise ValueError(f"{int(pd.isna(groups).sum())} rows to cluster have no {library_key!r}; give them one.")
    return library_key, groups.astype(str)


def _check_sizes(groups: np.ndarray | None, config: DomainsConfig, use_rep: str, n_rows: int) -> None:
    names, counts = (["all rows"], [n_rows]) if groups is None else np.unique(groups, return_counts=True)
    sections = dict(zip(names, counts, strict=True))
    small = {str(name): int(n) for name, n in sections.items() if n <= config.spatial_neighbors}
    if small:
        raise ValueError(
            f"Sections {small} have no more rows with .obsm[{use_rep!r}] than spatial_neighbors="
            f"{config.spatial_neighbors}, so a row cannot have that many neighbours. Pass a smaller "
            "spatial_neighbors, or leave those sections out."
        )
    if n_rows <= config.n_neighbors:
        raise ValueError(
            f"{n_rows} rows to cluster, not more than n_neighbors={config.n_neighbors}; pass a smaller n_neighbors."
        )
