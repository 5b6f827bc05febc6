"""Reference spots with measured expression, for :func:`spade_sd.tl.predict_expression`.

The model's bank, an AnnData embedded with the model, or a SpatialData embedded now. Everything is checked when the
reference is resolved; embedding and normalizing wait for :meth:`ExpressionReference.load`, after the caller's other
checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from anndata import AnnData
from spatialdata import SpatialData

from spade_sd.spots.genes import GenePanel, check_expression_tables
from spade_sd.tl._embed import embed_patches, model_patches
from spade_sd.utils.constants import EMBEDDING_KEY


@dataclass(frozen=True)
class ExpressionReference:
    """Reference spots resolved and checked, their embedding and expression not yet computed.

    Attributes
    ----------
    kind
        ``"bank"``, ``"AnnData"`` or ``"SpatialData"``.
    genes
        The genes the reference measures.
    n_spots
        Number of reference spots.
    load
        ``load(genes)`` returns the image-side embedding ``(n_spots, out_dim)`` and the log1p-normalized expression
        ``(n_spots, len(genes))``.
    spots
        The reference spots as rows of their table (a view), in reference order; ``None`` for the bank. It tells
        :func:`~spade_sd.tl.predict_expression` when the reference holds the very spots it predicts.
    """

    kind: str
    genes: list[str]
    n_spots: int
    load: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
    spots: AnnData | None = None


def expression_reference(model, reference, *, layer: str | None, batch_size: int, cache: bool) -> ExpressionReference:
    """Resolve and check ``reference`` (``None``: the model's bank); nothing is embedded or normalized yet."""
    if reference is None:
        return _bank(model)
    if isinstance(reference, AnnData):
        return _embedded_table(model, reference, layer)
    if isinstance(reference, SpatialData):
        return _slide(model, reference, layer, batch_size=batch_size, cache=cache)
    raise TypeError(
        f"reference must be None (the model's reference bank), a SpatialData or an AnnData; found "
        f"{type(reference).__name__}."
    )


def _bank(model) -> ExpressionReference:
    bank = model.reference
    if bank is None:
        raise ValueError(
            "The model has no reference bank (trained with reference_size=0, or saved before spade_sd kept one): "
            "pass reference= (a SpatialData with raw counts, or an AnnData embedded with this model by tl.embed), "
            "or train with sd.tl.pretrain(..., reference_size=2000)."
        )

    def load(genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return bank.embedding, bank.expression[:, bank.gene_indices(genes)]

    return ExpressionReference("bank", list(bank.genes), len(bank), load)


def _normalizer(model, genes: list[str]) -> GenePanel:
    return GenePanel(genes, target_sum=model.panel.target_sum)


def _embedded_table(model, table: AnnData, layer: str | None) -> ExpressionReference:
    if EMBEDDING_KEY not in table.obsm:
        raise KeyError(
            f"The reference AnnData has no .obsm[{EMBEDDING_KEY!r}] (it has {sorted(table.obsm)}): embed it with "
            "sd.tl.embed and this model first, or pass its SpatialData as reference."
        )
    found = table.uns.get("spade", {}).get("model", {}).get("identity")
    if found != model.identity():
        raise ValueError(
            f"The reference's .obsm[{EMBEDDING_KEY!r}] was computed by model {found!r} (its .uns['spade']['model']"
            f"['identity']), not by this one ({model.identity()!r}): embeddings of different models are not "
            "comparable. Embed the reference with this model (sd.tl.embed) first."
        )
    embedding = np.asarray(table.obsm[EMBEDDING_KEY], dtype=np.float32)
    rows = np.flatnonzero(np.isfinite(embedding).all(axis=1))
    if len(rows) == 0:
        raise ValueError(f"The reference's .obsm[{EMBEDDING_KEY!r}] has no finite row: nothing to retrieve.")
    check_expression_tables([("reference", table)], layer=layer)

    def load(genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return embedding[rows], _normalizer(model, genes).transform(table[rows], layer=layer)

    return ExpressionReference("AnnData", list(table.var_names), len(rows), load, table[rows])


def _slide(model, sdata: SpatialData, layer: str | None, **options) -> ExpressionReference:
    try:
        geometry, patches = model_patches(sdata, model)
    except ValueError as error:
        raise ValueError(
            f"The reference SpatialData's spots cannot be resolved: {error} Pass its spots' table as an AnnData "
            "instead, embedded with this model (sd.tl.embed(reference, model, shapes_key=...))."
        ) from error
    table = sdata.tables[geometry.table_key][geometry.table_rows]
    check_expression_tables([(geometry.table_key, table)], layer=layer)

    def load(genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        embedding, _ = embed_patches(model, patches, **options)
        return embedding, _normalizer(model, genes).transform(table, layer=layer)

    return ExpressionReference("SpatialData", list(table.var_names), len(table), load, table)
