"""Domains: Leiden clusters of expression, and how well the Leiden clusters of an embedding agree with them."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd

from spade_sd.metrics._common import as_labels, as_matrix, check_positive_int
from spade_sd.utils.logging import logger

RESOLUTIONS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 16))
"""Leiden resolutions that :func:`domain_agreement` sweeps (0.1 to 1.5)."""
N_SEEDS = 5
"""Leiden seeds per resolution in :func:`domain_agreement`."""
REFERENCE_RESOLUTIONS: tuple[float, ...] = (0.5, 1.0)
"""Leiden resolutions of the expression domains that :func:`spade_sd.tl.evaluate` scores against."""
REFERENCE_HVGS = 1000
REFERENCE_PCS = 20
N_NEIGHBORS = 15


def _neighbour_graph(x: np.ndarray, n_neighbors: int, seed: int):
    """An AnnData holding scanpy's neighbour graph of the rows of ``x``, ready for Leiden."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(obsm={"rep": x})
    # The Gaussian kernel avoids UMAP's numba-compiled connectivities, which cost 10-80 s of compilation per process.
    sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep="rep", method="gauss", random_state=seed)
    return adata


def _leiden(adata, resolution: float, seed: int) -> np.ndarray:
    import scanpy as sc

    sc.tl.leiden(adata, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return adata.obs["leiden"].astype(int).to_numpy()


def leiden_partitions(
    X: np.ndarray, *, resolutions: Sequence[float], seeds: Sequence[int], n_neighbors: int = N_NEIGHBORS
) -> dict[tuple[float, int], np.ndarray]:
    """Leiden clusters of the rows of ``X`` at every (resolution, seed), on one scanpy neighbour graph.

    The graph is scanpy's ``n_neighbors`` nearest neighbours with Gaussian-kernel weights (exact for fewer than
    4,096 rows, so it does not depend on the seed there), made into an igraph graph as ``sc.tl.leiden`` makes it;
    Leiden is igraph's (modularity, two iterations), seeded by Python's :class:`random.Random`. Building the graph
    once for every run, not once per ``sc.tl.leiden`` call, makes a sweep about 5× faster. :func:`spade_sd.tl.domains`
    clusters with this function, so its domains are those this module scores.
    """
    import random

    import igraph

    adjacency = _neighbour_graph(X, n_neighbors, seed=min(seeds)).obsp["connectivities"]
    sources, targets = adjacency.nonzero()
    graph = igraph.Graph(n=adjacency.shape[0], edges=list(zip(sources, targets, strict=True)), directed=False)
    graph.es["weight"] = np.asarray(adjacency[sources, targets]).ravel()
    partitions = {}
    try:
        for seed in seeds:
            for resolution in resolutions:
                igraph.set_random_number_generator(random.Random(int(seed)))
                clusters = graph.community_leiden(
                    objective_function="modularity", weights="weight", resolution=float(resolution), n_iterations=2
                )
                partitions[float(resolution), int(seed)] = np.unique(clusters.membership, return_inverse=True)[1]
    finally:
        igraph.set_random_number_generator(random)
    return partitions


def _check_n_spots(n_spots: int, n_neighbors: int) -> None:
    if n_spots <= n_neighbors:
        raise ValueError(
            f"Need more spots than n_neighbors={n_neighbors} for a neighbour graph; found {n_spots}. "
            "Pass a smaller n_neighbors or a larger section."
        )


def expression_domains(
    Y: npt.ArrayLike,
    *,
    resolution: float = 0.5,
    n_neighbors: int = N_NEIGHBORS,
    n_pcs: int = 50,
    n_top_genes: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Expression-defined domains: Leiden clusters of the spots' expression, as labels where no annotation exists.

    Highly variable genes (optional) → PCA → k-nearest-neighbour graph with Gaussian-kernel weights → Leiden
    (igraph implementation), with scanpy. The domains :func:`spade_sd.tl.evaluate` scores clusterings against use
    ``n_top_genes=1000, n_pcs=20`` on a section's own expression, at resolutions 0.5 and 1.0.

    Parameters
    ----------
    Y
        Log-normalised expression, spots × genes (``normalize_total`` to 10⁴, ``log1p``).
    resolution
        Leiden resolution; higher gives more domains.
    n_neighbors
        Neighbours in the graph.
    n_pcs
        Principal components (capped by the data's size).
    n_top_genes
        Keep the most variable genes first (scanpy's ``"seurat"`` flavor, which expects log data); ``None`` or
        at least the number of genes: all of them.
    seed
        Seeds PCA, the graph and Leiden.

    Returns
    -------
    One integer domain per spot, numbered from 0.
    """
    import anndata as ad
    import scanpy as sc

    y = as_matrix("Y", Y)
    _check_n_spots(y.shape[0], n_neighbors)
    if n_top_genes is not None:
        check_positive_int("n_top_genes", n_top_genes)
    adata = ad.AnnData(y)
    if n_top_genes is not None and n_top_genes < y.shape[1]:
        sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat")
        adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    sc.pp.pca(adata, n_comps=min(n_pcs, y.shape[0] - 1, adata.n_vars - 1), random_state=seed)
    graph = _neighbour_graph(adata.obsm["X_pca"], n_neighbors, seed)
    return _leiden(graph, resolution, seed)


def matched_resolution(cluster_counts: Mapping[float, Sequence[int] | float], n_domains: int) -> float:
    """The resolution whose mean number of clusters is nearest ``n_domains`` (the lower one where two tie).

    Parameters
    ----------
    cluster_counts
        Resolution → number of clusters found at it, one per seed (or their mean).
    n_domains
        Number of domains of the reference partition.

    Returns
    -------
    One of the resolutions of ``cluster_counts``.
    """
    if not cluster_counts:
        raise ValueError("cluster_counts is empty: give the number of clusters found at one resolution at least.")
    check_positive_int("n_domains", n_domains)
    mean = {float(r): float(np.mean(counts)) for r, counts in cluster_counts.items()}
    return min(sorted(mean), key=lambda r: abs(mean[r] - n_domains))


def domain_agreement(
    X: npt.ArrayLike,
    domains: npt.ArrayLike,
    *,
    resolutions: Sequence[float] = RESOLUTIONS,
    n_seeds: int = N_SEEDS,
    n_neighbors: int = N_NEIGHBORS,
    reference: str = "domains",
    label: str = "encoder",
) -> pd.DataFrame:
    """How well Leiden clusters of an embedding follow a reference partition of the same spots.

    The clusters are those a user gets from ``sc.pp.neighbors(adata, use_rep=...); sc.tl.leiden(adata)``: scanpy's
    neighbour graph of ``X`` (with the Gaussian kernel) and igraph's Leiden (modularity, 2 iterations), at every
    resolution of ``resolutions`` with ``n_seeds`` seeds. Leiden's cluster count grows with the resolution, and ARI
    and NMI change with it, so the score is read at the resolution whose mean cluster count is nearest the number of
    reference domains (:func:`matched_resolution`): one row per seed there, so that :func:`summarize` gives the mean
    and the spread over seeds. Score one section at a time: sections clustered together split by section.

    Parameters
    ----------
    X
        Embeddings of one section's spots, spots × features (e.g. ``obsm["X_spade"]``).
    domains
        The reference, one label per spot: expression domains (:func:`expression_domains`) or an annotation
        (e.g. pathologist regions); at least 2 of them.
    resolutions
        Leiden resolutions swept; default 0.1 to 1.5 in steps of 0.1.
    n_seeds
        Leiden seeds (0, 1, …) per resolution.
    n_neighbors
        Neighbours of scanpy's graph on ``X``.
    reference
        Written to the ``reference`` column (e.g. ``"expression@0.5"``), so frames of several references concatenate.
    label
        Written to the ``encoder`` column.

    Returns
    -------
    Two rows per seed (``metric`` ``"ari"``: adjusted Rand index, 0 for chance and 1 for the same partition up to
    renaming; ``"nmi"``: normalized mutual information, arithmetic mean) with columns ``encoder``, ``reference``,
    ``repeat`` (the seed), ``metric``, ``value``, ``resolution`` (the matched one), ``n_clusters`` (that seed's),
    ``mean_clusters`` (over seeds at that resolution), ``n_domains`` and ``n_spots``.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    x = as_matrix("X", X)
    truth = as_labels("domains", domains, x.shape[0])
    check_positive_int("n_seeds", n_seeds)
    check_positive_int("n_neighbors", n_neighbors)
    _check_n_spots(x.shape[0], n_neighbors)
    grid = sorted({float(r) for r in resolutions})
    if not grid or min(grid) <= 0:
        raise ValueError(f"resolutions must be positive numbers, at least one; found {list(resolutions)}.")
    n_domains = np.unique(truth).size
    if n_domains < 2:
        raise ValueError(
            f"The reference {reference!r} has a single domain ({np.unique(truth).tolist()}); agreement needs 2 or "
            "more (cluster the reference at a higher resolution)."
        )
    start = time.perf_counter()
    seeds = range(n_seeds)
    partitions = leiden_partitions(x, resolutions=grid, seeds=seeds, n_neighbors=n_neighbors)
    counts = {r: [np.unique(partitions[r, s]).size for s in seeds] for r in grid}
    chosen = matched_resolution(counts, n_domains)
    rows = []
    for seed in seeds:
        clusters = partitions[chosen, seed]
        common = {"encoder": label, "reference": reference, "repeat": seed}
        sizes = {
            "resolution": chosen,
            "n_clusters": np.unique(clusters).size,
            "mean_clusters": float(np.mean(counts[chosen])),
            "n_domains": n_domains,
            "n_spots": x.shape[0],
        }
        rows.append({**common, "metric": "ari", "value": float(adjusted_rand_score(truth, clusters)), **sizes})
        rows.append({**common, "metric": "nmi", "value": float(normalized_mutual_info_score(truth, clusters)), **sizes})
    logger.info(
        f"domain agreement of {label!r} with {reference!r}: resolution {chosen} ({np.mean(counts[chosen]):.1f} "
        f"clusters for {n_domains} domains) in {time.perf_counter() - start:.1f} s"
    )
    return pd.DataFrame(rows)
