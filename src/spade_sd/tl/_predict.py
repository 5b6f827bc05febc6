"""sd.tl.predict_expression: expression of every spot or tile predicted from its H&E through the aligned space."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

from spade_sd.model.readout import RIDGE_GRID
from spade_sd.spots.grid import check_grid_options, per_shape
from spade_sd.tl._common import (
    accepts_legacy_anndata,
    check_free_table_name,
    converted_from,
    given_or_attached_model,
    parent_table,
)
from spade_sd.tl._embed import embed_patches, grid_record, model_patches
from spade_sd.tl._reference import ExpressionReference, expression_reference
from spade_sd.utils.constants import DERIVED_FROM, OUTPUTS, PREDICTED_KEY, UNS_KEY, WRITTEN_BY
from spade_sd.utils.logging import logger
from spade_sd.utils.validation import check_bool, check_choice, check_int, check_key, did_you_mean

METHODS = ("knn", "ridge")
TOOL = "tl.predict_expression"
# Ridge penalties searched by leave-one-out, relative to the total variance of the reference embeddings


@accepts_legacy_anndata(TOOL, returns_table=True)
def predict_expression(
    sdata: SpatialData | AnnData,
    model=None,
    *,
    reference: SpatialData | AnnData | None = None,
    genes: Sequence[str] | None = None,
    method: Literal["knn", "ridge"] = "knn",
    k: int = 50,
    key_added: str = PREDICTED_KEY,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    layer: str | None = None,
    batch_size: int = 64,
    cache: bool = True,
    grid: bool | None = None,
    stride_um: float | None = None,
) -> AnnData | None:
    """Predict the expression of every spot or tile from its H&E patch alone.

    Each patch is embedded on the image side exactly as :func:`spade_sd.tl.embed` embeds it, then compared with
    reference spots whose expression was measured. Slides without ST work the same way, on tiles from
    :func:`spade_sd.pp.tile_image`.

    Parameters
    ----------
    sdata
        SpatialData with an H&E image, spots or tiles, and a table annotating them; or scanpy's legacy spatial
        AnnData (``uns['spatial']``, :func:`scanpy.read_visium`), converted with
        :func:`spatialdata_io.experimental.from_legacy_anndata` (logged). Its prediction, a new table that no slot
        of that AnnData can hold, is then returned (see Returns) and the AnnData is left as it was.
    model
        A :class:`~spade_sd.SpadeModel`; ``None`` uses the one :func:`spade_sd.tl.pretrain` attached to ``sdata``.
    reference
        Spots with measured expression. ``None``: the model's reference bank (:attr:`SpadeModel.reference
        <spade_sd.SpadeModel.reference>`, training spots over the panel and the training slides' most variable
        genes). A SpatialData: its spots are embedded with the model and its table's raw counts normalized. An
        AnnData: a table embedded by this very model with :func:`spade_sd.tl.embed` (its ``.obsm['X_spade_expr']``,
        or ``.obsm['X_spade']`` for a model with ``representation="heads"``, checked against
        ``.uns['spade']['model']['identity']``) holding raw counts.

        A reference may hold the very spots predicted: ``sdata`` itself, or its spots' table (or a view of it, e.g.
        ``table[table.obs["labelled"]]``; for scanpy's legacy AnnData, that AnnData or a view of it). Each such spot
        is then left out of its own prediction (leave-one-out: ``"knn"`` averages its ``k`` nearest *other*
        reference spots, ``"ridge"`` predicts it from the fit without it), so that no spot reads its own measured
        expression. A copy of the table is not recognised as the same
        spots; pass the table or ``sdata`` itself. The bank is not checked for the spots predicted: on a slide the
        model was trained on, it holds them, and each finds its own expression among its neighbours.
    genes
        Genes to predict; ``None``: every gene of the reference. Unknown genes are an error, before any work.
    method
        ``"knn"`` (BLEEP): the mean expression of the ``k`` reference spots most similar by cosine similarity,
        weighted by the positive part of the similarity, exactly as :func:`spade_sd.metrics.knn_predict` (the
        rule :func:`spade_sd.metrics.knn_expression` scores). ``"ridge"``: a linear map from the embedding, fitted
        on the reference spots by ridge regression, the penalty chosen by leave-one-out over a grid
        (:class:`~sklearn.linear_model.RidgeCV`); smoother than retrieval, and it extrapolates between references.
    k
        Neighbours of ``"knn"``, at most the number of reference spots (minus one when they include the spots
        predicted).
    key_added
        Name of the new table. A table this function wrote earlier under that name is replaced (logged); any other
        element of that name (the user's, another tool's, or a table this call reads) is an error, before any
        patch is encoded.
    image_key, shapes_key, table_key
        Elements of ``sdata``; inferred when unambiguous.
    layer
        Layer of the reference's table holding raw counts (SpatialData or AnnData reference); ``None`` uses ``X``.
    batch_size, cache
        Feature extraction batch size and on-disk feature cache.
    grid, stride_um
        Shapes much smaller than a patch (bins, cells) take the prediction of the nearest patch of a grid, each
        patch encoded and predicted once, as in :func:`spade_sd.tl.embed`; ``grid=False`` encodes one patch per
        shape. Shapes that are themselves reference spots are predicted one by one, each left out of its own.

    Returns
    -------
    Nothing; adds

    ``.tables[key_added]``
        A new table annotating the same shapes element as the spots' own table (same region and instance keys),
        one row per spot in the same order and with the same ``obs_names`` as the spots' rows of their table:
        ``X`` the predicted ``log1p(10⁴ · counts / library size)`` (float32; the panel's ``target_sum``),
        ``var_names`` the genes, ``.obsm['spatial']`` copied where the spots' table has it, and
        ``.uns['spade_sd']`` the spots' table's metadata with ``derived_from`` naming that table (element inference
        then prefers the spots' own table) and ``written_by`` naming this tool.
    ``.tables[key_added].uns[key_added]``
        ``params`` (method, k, ridge penalty, reference, elements, genes, ``grid``) and the ``model``'s identity.

    For scanpy's legacy AnnData, that table is returned instead, laid out as scanpy's: the same rows and
    ``obs_names`` as the AnnData, ``X`` the predictions, ``.obsm['spatial']``, ``.uns[key_added]`` and a copy of the
    AnnData's ``.uns['spatial']`` (so :func:`scanpy.pl.spatial` draws it over the H&E), without spatialdata's
    region and instance columns.
    """
    check_choice("method", method, METHODS)
    check_int("k", k, minimum=1)
    check_key("key_added", key_added)
    check_int("batch_size", batch_size, minimum=1)
    check_bool("cache", cache)
    check_grid_options(grid, stride_um)
    if layer is not None:
        check_key("layer", layer)
    model = given_or_attached_model(sdata, model, "predict_expression")
    source = expression_reference(model, reference, layer=layer, batch_size=batch_size, cache=cache)
    genes = _chosen_genes(genes, source)
    if method == "knn" and k > source.n_spots:
        raise ValueError(f"k={k} exceeds the {source.n_spots} reference spots ({source.kind}); pass a smaller k.")
    elements = {"image_key": image_key, "shapes_key": shapes_key, "table_key": table_key}
    geometry, patches = model_patches(sdata, model, **elements, grid=grid, stride_um=stride_um)
    own = _own_positions(source, sdata.tables[geometry.table_key], geometry)
    if method == "knn" and own is not None and (own >= 0).any() and k > source.n_spots - 1:
        raise ValueError(
            f"k={k} exceeds the {source.n_spots - 1} reference spots left to a predicted spot: the reference holds "
            f"spots predicted ({source.kind}), each left out of its own neighbours. Pass k ≤ {source.n_spots - 1}."
        )
    replaced = check_free_table_name(sdata, key_added, TOOL, reads=_tables_read(sdata, geometry, source))

    query, _ = embed_patches(model, patches, batch_size=batch_size, cache=cache, spread=False)
    ref_embedding, ref_expression = source.load(genes)
    # compared within the model's expression subspace, where the aligned space holds what predicts expression
    query, ref_embedding = model.expression_space(query), model.expression_space(ref_embedding)
    if own is not None and (own >= 0).any():  # each such spot left out of its own prediction: one by one
        prediction, alpha = _predicted(method, per_shape(patches, query), ref_embedding, ref_expression, k, own)
    else:  # once per patch encoded, then each shape its patch's
        prediction, alpha = _predicted(method, query, ref_embedding, ref_expression, k)
        prediction = per_shape(patches, prediction)
    table = _prediction_table(sdata, geometry, prediction.astype(np.float32), genes)
    table.uns[key_added] = {
        "params": {
            "method": method,
            **({"k": k} if alpha is None else {"alpha": alpha}),
            "reference": source.kind,
            "n_reference": source.n_spots,
            "n_genes": len(genes),
            **({"target_sum": model.panel.target_sum} if model.panel.target_sum is not None else {}),
            "image_key": geometry.image_key,
            "shapes_key": geometry.shapes_key,
            "table_key": geometry.table_key,
            **grid_record(patches),
        },
        "model": {"identity": model.identity()},
    }
    if replaced:
        logger.info("%s replaced its earlier table %r", TOOL, key_added)
    sdata.tables[key_added] = table
    logger.info(
        "Added table %r: %d genes predicted (%s, %s reference of %d spots) for %d spots of %r",
        key_added,
        len(genes),
        method,
        source.kind,
        source.n_spots,
        len(prediction),
        geometry.shapes_key,
    )


def _chosen_genes(genes: Sequence[str] | None, source: ExpressionReference) -> list[str]:
    if genes is None:
        return list(source.genes)
    genes = [genes] if isinstance(genes, str) else list(genes)
    not_names = [g for g in genes if not isinstance(g, str)]
    if not_names:
        raise TypeError(f"genes must be gene names (strings); found {not_names[:5]}.")
    if not genes:
        raise ValueError("genes is empty: name at least one gene, or pass None for every gene of the reference.")
    duplicated = sorted({g for g in genes if genes.count(g) > 1})
    if duplicated:
        raise ValueError(f"genes holds duplicates: {duplicated}.")
    missing = pd.Index(genes).difference(pd.Index(source.genes), sort=False)
    if len(missing):
        raise KeyError(
            f"{len(missing)} of the {len(genes)} genes are not measured by the reference ({source.kind}, "
            f"{len(source.genes)} genes): {list(missing[:10])}.{did_you_mean(missing, source.genes)} Choose among "
            "its genes, or pass a reference that measures them."
        )
    return list(genes)


def _tables_read(sdata: SpatialData, geometry, source: ExpressionReference) -> dict[str, str]:
    """The tables of ``sdata`` the call reads, with why: never replaced by the new table."""
    reads = {geometry.table_key: "the spots' table"}
    if source.spots is not None:
        parent = parent_table(source.spots)
        for name in (name for name, table in sdata.tables.items() if table is parent):
            reads[name] = f"{reads[name]} and the reference" if name in reads else "the reference"
    return reads


def _own_positions(source: ExpressionReference, table: AnnData, geometry) -> np.ndarray | None:
    """Each predicted spot's position in the reference, -1 where it is not there; ``None`` if none can be.

    The reference holds predicted spots when its rows are rows of the very table the spots are predicted for, or of
    the legacy AnnData that table was converted from (the same spots, by ``obs_names``).
    """
    spots = None if source.spots is None else parent_table(source.spots)
    if spots is None or (spots is not table and spots is not converted_from(table)):
        return None
    if not table.obs_names.is_unique:
        raise ValueError(
            f"The reference holds spots of table {geometry.table_key!r}, the spots predicted, but that table's "
            "obs_names are not unique, so each spot cannot be left out of its own neighbours. Make them unique "
            "first (table.obs_names_make_unique())."
        )
    position = np.full(table.n_obs, -1)
    position[table.obs_names.get_indexer(source.spots.obs_names)] = np.arange(source.spots.n_obs)
    return position[geometry.table_rows]


def _predicted(
    method: str,
    query: np.ndarray,
    ref_embedding: np.ndarray,
    ref_expression: np.ndarray,
    k: int,
    own: np.ndarray | None = None,
) -> tuple[np.ndarray, float | None]:
    """The prediction for every query, and the ridge penalty chosen (``None`` for knn).

    A query at ``own >= 0`` is that reference spot itself, and is predicted without it (leave-one-out).
    """
    mine = np.flatnonzero(own >= 0) if own is not None else np.array([], dtype=int)
    if method == "knn":
        from spade_sd.metrics import knn_predict

        prediction = knn_predict(query, ref_embedding, ref_expression, k=k, metric="cosine")
        if len(mine):
            prediction[mine] = _knn_left_out(query[mine], ref_embedding, ref_expression, k, own[mine])
        return prediction, None
    from sklearn.linear_model import RidgeCV

    X = np.asarray(ref_embedding, dtype=np.float64)
    Y = np.asarray(ref_expression, dtype=np.float64)
    total = float(np.square(X - X.mean(axis=0)).sum()) or 1.0
    ridge = RidgeCV(alphas=total * RIDGE_GRID).fit(X, Y)
    prediction = ridge.predict(np.asarray(query, dtype=np.float64))
    if len(mine):
        prediction[mine] -= _ridge_left_out_change(X, Y - ridge.predict(X), ridge.alpha_, query[mine], own[mine])
    return prediction, float(ridge.alpha_)


def _knn_left_out(query: np.ndarray, reference: np.ndarray, expression: np.ndarray, k: int, own: np.ndarray):
    """:func:`spade_sd.metrics.knn_predict` of each query among the reference spots other than ``own``."""
    from sklearn.neighbors import NearestNeighbors

    distance, neighbours = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(reference).kneighbors(query)
    # drop the spot itself, or the farthest of the k + 1 if it is not among them (ties)
    drop = np.where((neighbours == own[:, None]).any(axis=1), (neighbours == own[:, None]).argmax(axis=1), k)
    keep = np.ones_like(neighbours, dtype=bool)
    keep[np.arange(len(query)), drop] = False
    distance, neighbours = distance[keep].reshape(-1, k), neighbours[keep].reshape(-1, k)
    weights = np.clip(1.0 - distance, 0.0, None)  # cosine similarity's positive part, as knn_predict weighs
    weights[weights.sum(axis=1) == 0] = 1.0
    weights /= weights.sum(axis=1, keepdims=True)
    prediction = np.zeros((len(query), expression.shape[1]))
    for j in range(k):
        prediction += weights[:, j, None] * np.asarray(expression[neighbours[:, j]], dtype=np.float64)
    return prediction


def _ridge_left_out_change(X: np.ndarray, residual: np.ndarray, alpha: float, query: np.ndarray, own: np.ndarray):
    """How much each query's ridge prediction drops when reference spot ``own`` leaves the fit (exact).

    Ridge with an unpenalized intercept, as :class:`~sklearn.linear_model.RidgeCV` fits it: with ``Z = [1, X]``
    and ``A = ZᵀZ + diag(0, α, …, α)``, removing row ``j`` changes the coefficients by
    ``-A⁻¹ z_j r_j / (1 - z_jᵀ A⁻¹ z_j)`` (Sherman–Morrison), ``r_j`` its residual.
    """
    Z = np.c_[np.ones(len(X)), X]
    A = Z.T @ Z + alpha * np.diag(np.r_[0.0, np.ones(X.shape[1])])
    solved = np.linalg.solve(A, Z[own].T).T  # A⁻¹ z_j, one row per query
    leverage = (solved * Z[own]).sum(axis=1)
    at_query = (np.c_[np.ones(len(query)), np.asarray(query, dtype=np.float64)] * solved).sum(axis=1)
    return (at_query / (1.0 - leverage))[:, None] * residual[own]


def _prediction_table(sdata: SpatialData, geometry, prediction: np.ndarray, genes: list[str]) -> AnnData:
    """A table annotating the spots' shapes like their own table does, rows in the same order and names."""
    from spatialdata.models import TableModel

    own = sdata.tables[geometry.table_key]
    attrs = own.uns["spatialdata_attrs"]
    region_key, instance_key = attrs["region_key"], attrs["instance_key"]
    rows = geometry.table_rows
    obs = pd.DataFrame(
        {
            region_key: pd.Categorical([geometry.shapes_key] * len(rows)),
            instance_key: own.obs[instance_key].to_numpy()[rows],
        },
        index=own.obs_names[rows],
    )
    table = AnnData(X=prediction, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    if "spatial" in own.obsm:
        table.obsm["spatial"] = np.asarray(own.obsm["spatial"])[rows]
    # the spots' metadata (sample, scale) without the record of the spots' table's outputs
    meta = {name: value for name, value in own.uns.get(UNS_KEY, {}).items() if name != OUTPUTS}
    table.uns[UNS_KEY] = {**meta, DERIVED_FROM: geometry.table_key, WRITTEN_BY: TOOL}
    return TableModel.parse(table, region=geometry.shapes_key, region_key=region_key, instance_key=instance_key)
