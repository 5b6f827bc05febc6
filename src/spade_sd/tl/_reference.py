"""Reference spots with measured expression, for :func:`spade_sd.tl.predict_expression` and :func:`spade_sd.tl.query`.

The model's bank, an AnnData embedded with the model, or a SpatialData embedded now. Everything is checked when the
reference is resolved; embedding and normalizing wait for :meth:`ExpressionReference.load` (or
:attr:`ExpressionReference.expression` where only the expression is read), after the caller's other checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from anndata import AnnData
from spatialdata import SpatialData

from spade_sd.spots.genes import GenePanel, check_expression_tables
from spade_sd.tl._embed import embed_patches, model_patches, result_keys
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
    expression
        ``expression(genes)``: the log1p-normalized expression ``(n_spots, len(genes))``, normalized as the bank is.
    embedding
        ``embedding()``: the image-side embedding ``(n_spots, out_dim)``; ``None`` when resolved with
        ``embedded=False``.
    spots
        The reference spots as rows of their table (a view), in reference order; ``None`` for the bank. It tells
        :func:`~spade_sd.tl.predict_expression` when the reference holds the very spots it predicts.
    """

    kind: str
    genes: list[str]
    n_spots: int
    expression: Callable[[list[str]], np.ndarray]
    embedding: Callable[[], np.ndarray] | None
    spots: AnnData | None = None

    def load(self, genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The image-side embedding ``(n_spots, out_dim)`` and the log1p-normalized expression of ``genes``."""
        if self.embedding is None:
            raise RuntimeError("This reference was resolved with embedded=False: only its expression can be read.")
        return self.embedding(), self.expression(genes)


def expression_reference(
    model, reference, *, layer: str | None, batch_size: int, cache: bool, embedded: bool = True
) -> ExpressionReference:
    """Resolve and check ``reference`` (``None``: the model's bank); nothing is embedded or normalized yet.

    ``embedded=False``: the caller reads the expression only (:func:`~spade_sd.tl.query` selecting spots by their
    markers), so an AnnData needs raw counts but no embedding, and a SpatialData's spots are never encoded.
    """
    if reference is None:
        return _bank(model)
    if isinstance(reference, AnnData):
        if not embedded:
            return _counts_table(model, reference, layer)
        return _embedded_table(model, reference, layer)
    if isinstance(reference, SpatialData):
        return _slide(model, reference, layer, embedded, batch_size=batch_size, cache=cache)
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

    def expression(genes: list[str]) -> np.ndarray:
        return bank.expression[:, bank.gene_indices(genes)]

    return ExpressionReference("bank", list(bank.genes), len(bank), expression, lambda: bank.embedding)


def _normalizer(model, genes: list[str]) -> GenePanel:
    return GenePanel(genes, target_sum=model.panel.target_sum)


def _embedded_table(model, table: AnnData, layer: str | None) -> ExpressionReference:
    # the tools compare the heads' embeddings: X_spade itself for a model that writes them there, else their
    # projection onto the expression subspace, X_spade_expr (the default X_spade is the backbone's features next to
    # the read-out); projecting a projection again changes nothing
    key = EMBEDDING_KEY if model.readout is None else result_keys(EMBEDDING_KEY)["expression"]
    if key not in table.obsm:
        raise KeyError(
            f"The reference AnnData has no .obsm[{key!r}] (it has {sorted(table.obsm)}): embed it with "
            "sd.tl.embed and this model first, or pass its SpatialData as reference."
        )
    found = table.uns.get("spade", {}).get("model", {}).get("identity")
    if found != model.identity():
        raise ValueError(
            f"The reference's .obsm[{key!r}] was computed by model {found!r} (its .uns['spade']['model']"
            f"['identity']), not by this one ({model.identity()!r}): embeddings of different models are not "
            "comparable. Embed the reference with this model (sd.tl.embed) first."
        )
    embedding = np.asarray(table.obsm[key], dtype=np.float32)
    rows = np.flatnonzero(np.isfinite(embedding).all(axis=1))
    if len(rows) == 0:
        raise ValueError(f"The reference's .obsm[{key!r}] has no finite row: nothing to retrieve.")
    reference = _counts_table(model, table[rows], layer)
    return dataclasses.replace(reference, embedding=lambda: embedding[rows])


def _counts_table(model, table: AnnData, layer: str | None) -> ExpressionReference:
    check_expression_tables([("reference", table)], layer=layer)

    def expression(genes: list[str]) -> np.ndarray:
        return _normalizer(model, genes).transform(table, layer=layer)

    return ExpressionReference("AnnData", list(table.var_names), table.n_obs, expression, None, table)


def _slide(model, sdata: SpatialData, layer: str | None, embedded: bool, **options) -> ExpressionReference:
    try:
        geometry, patches = model_patches(sdata, model)
    except ValueError as error:
        instead = (
            "embedded with this model (sd.tl.embed(reference, model, shapes_key=...))" if embedded else "of raw counts"
        )
        raise ValueError(
            f"The reference SpatialData's spots cannot be resolved: {error} Pass its spots' table as an AnnData "
            f"instead, {instead}."
        ) from error
    table = sdata.tables[geometry.table_key][geometry.table_rows]
    check_expression_tables([(geometry.table_key, table)], layer=layer)

    def expression(genes: list[str]) -> np.ndarray:
        return _normalizer(model, genes).transform(table, layer=layer)

    def embedding() -> np.ndarray:
        return embed_patches(model, patches, **options)[0]

    return ExpressionReference(
        "SpatialData", list(table.var_names), len(table), expression, embedding if embedded else None, table
    )
