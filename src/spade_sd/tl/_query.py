"""sd.tl.query: gene → image retrieval, scoring every spot or tile by how well its H&E matches an expression query."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from spade_sd.tl._common import claim_outputs, given_or_attached_model, obs_filled, unit_rows
from spade_sd.tl._embed import embed_patches, model_patches
from spade_sd.utils.constants import QUERY_KEY
from spade_sd.utils.logging import logger
from spade_sd.utils.validation import check_bool, check_choice, check_int, check_key, check_number

MARKERS = ("spots", "raised")
TOOL = "tl.query"


def query(
    sdata: SpatialData,
    model=None,
    *,
    genes: Sequence[str] | Mapping[str, float] | None = None,
    profile: Sequence[float] | np.ndarray | pd.Series | None = None,
    quantile: float = 0.95,
    markers: Literal["spots", "raised"] = "spots",
    key_added: str = QUERY_KEY,
    batch_size: int = 64,
    cache: bool = True,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
) -> None:
    """Score every spot or tile by how well its H&E matches an expression query (gene → image retrieval).

    The query is an expression profile over the model's panel genes, embedded through the gene side and compared
    (cosine similarity) with each patch's image-side embedding, computed as :func:`spade_sd.tl.embed` computes it.
    The gene side is routed like the patch: for each spot, the experts' gene embeddings of the query are mixed
    with that spot's own routing weights, so each region is queried in its own expert's terms. Works on tiles of
    slides without ST (:func:`spade_sd.pp.tile_image`).

    Parameters
    ----------
    sdata
        SpatialData whose spots or tiles (with their H&E image and table) are scored.
    model
        The :class:`~spade_sd.SpadeModel` whose joint space answers the query; ``None``: the model
        :func:`spade_sd.tl.pretrain` attached to ``sdata``.
    genes
        Marker genes, as a list: "where these genes are high", turned into a profile over the panel from the
        reference bank's spots as ``markers`` says: with ``markers="spots"`` any gene the bank measures
        (``model.reference.genes``: the panel and the training slides' most variable genes), otherwise panel genes.
        Or a mapping gene → value in log1p-normalized units (``log1p(10⁴ · counts / library size)``), the other
        panel genes at the bank's mean; every gene must be in the model's panel. Needs the model's reference bank.
    profile
        A measured profile instead: an array over the model's panel genes (in ``model.panel.genes`` order), or a
        :class:`pandas.Series` indexed by gene (genes outside the panel are ignored; panel genes it lacks take the
        bank's mean, which needs the bank), in log1p-normalized units. Give ``genes`` or ``profile``, not both.
    quantile
        How high "high" is for marker genes: the 95th percentile of the bank by default.
    markers
        How marker genes become a profile. ``"spots"``: the mean panel expression of the bank spots where the
        markers are highest (the top ``1 - quantile`` of the bank, 5 % by default, ranked by the mean of the
        markers' z-scores), so the genes that go with the markers come along. ``"raised"``: the bank's mean panel
        expression with the markers raised to their ``quantile`` over the bank (the 95th percentile), every other
        gene at its mean. A profile that differs from the mean in a few genes only is embedded close to the mean
        profile's embedding: on mouse olfactory bulb (a model trained on two sections, queried on a third), the
        score of ``"spots"`` correlated with the marker's measured expression at r ≈ 0.45 for the eight best
        predicted panel genes, that of ``"raised"`` at r ≈ 0.13.
    key_added
        Column of the score. A key holding an earlier output of this tool is replaced (logged); one holding anything
        else (another tool's output, the user's own data) is an error, before any patch is encoded.
    image_key, shapes_key, table_key
        Elements; inferred when unambiguous.
    batch_size, cache
        Feature extraction batch size and on-disk feature cache.

    Returns
    -------
    Nothing; adds to the spots' table:

    ``.obs[key_added]``
        Cosine similarity in [-1, 1] between the query's and each spot's embedding (NaN on rows annotating other
        elements); higher matches better. See :func:`spade_sd.pl.query`.
    ``.uns[key_added]``
        ``params`` (kind of query, genes, quantile, elements), the ``profile`` over ``profile_genes`` (the panel)
        that was embedded, and the ``model``'s identity.
    ``.uns['spade_sd']['outputs']``
        This tool recorded as the writer of both keys.
    """
    check_key("key_added", key_added)
    check_number("quantile", quantile, minimum=0, maximum=1)
    check_choice("markers", markers, MARKERS)
    check_int("batch_size", batch_size, minimum=1)
    check_bool("cache", cache)
    model = given_or_attached_model(sdata, model, "query")
    values, kind = query_profile(model, genes=genes, profile=profile, quantile=quantile, markers=markers)
    elements = {"image_key": image_key, "shapes_key": shapes_key, "table_key": table_key}
    geometry, patches = model_patches(sdata, model, **elements)
    table = sdata.tables[geometry.table_key]
    claimed = claim_outputs(table, geometry.table_key, TOOL, [("obs", key_added), ("uns", key_added)])

    image, weights = embed_patches(model, patches, batch_size=batch_size, cache=cache)
    gene = model.embed_expression(np.repeat(values[None], len(image), axis=0), weights)
    image, gene = model.expression_space(image), model.expression_space(gene)
    score = (unit_rows(image) * unit_rows(gene)).sum(axis=1)
    table.obs[key_added] = obs_filled(table, geometry.table_rows, score, key_added).astype(float)
    asked = list(genes) if isinstance(genes, Sequence | Mapping) and not isinstance(genes, str) else genes
    table.uns[key_added] = {
        "params": {
            "query": kind,
            **({"genes": [str(g) for g in asked]} if asked is not None else {}),
            **({"quantile": quantile, "markers": markers} if kind == "markers" else {}),
            "image_key": geometry.image_key,
            "shapes_key": geometry.shapes_key,
        },
        "profile_genes": list(model.panel.genes),
        "profile": values.astype(float).tolist(),
        "model": {"identity": model.identity()},
    }
    claimed.record()
    logger.info(
        "Added .obs[%r] and .uns[%r] to table %r (%d spots)", key_added, key_added, geometry.table_key, len(score)
    )


def query_profile(
    model,
    *,
    genes: Sequence[str] | Mapping[str, float] | None = None,
    profile: Sequence[float] | np.ndarray | pd.Series | None = None,
    quantile: float = 0.95,
    markers: str = "spots",
) -> tuple[np.ndarray, str]:
    """The query's expression over the model's panel genes, and its kind (``"markers"``, ``"values"``, ``"profile"``).

    Every problem (both or neither of ``genes`` and ``profile``, an empty query, genes outside the panel, values
    that are not finite, no reference bank where one is needed) is an error here, before any patch is read.
    """
    if (genes is None) == (profile is None):
        raise ValueError(
            "Give the query as genes= (marker genes, or a mapping gene → value) or as profile= (measured expression), "
            f"exactly one of them; found {'both' if genes is not None else 'neither'}."
        )
    if genes is not None:
        return _from_genes(model, genes, quantile, markers)
    return _from_profile(model, profile), "profile"


def _panel_bank(model) -> np.ndarray:
    """The reference bank's expression over the panel genes (float32), or an error saying the query needs a bank."""
    if model.reference is None:
        raise ValueError(
            "This query needs the model's reference bank (its mean expression fills the genes the query does not "
            "set), but the model has none (trained with reference_size=0, or saved before spade_sd kept one). "
            "Pass a complete profile= over the panel genes, or train with sd.tl.pretrain(..., reference_size=2000)."
        )
    return model.reference.expression[:, model.reference.gene_indices(model.panel.genes)].astype(np.float32)


def _panel_positions(model, genes: list[str]) -> np.ndarray:
    from spade_sd.model.reference import gene_indices

    duplicated = sorted({g for g in genes if genes.count(g) > 1})
    if duplicated:
        raise ValueError(f"The query names genes more than once: {duplicated}.")
    return gene_indices(model.panel.genes, genes, "the model's gene panel (the genes its gene side reads)")


def _from_genes(model, genes, quantile: float, markers: str) -> tuple[np.ndarray, str]:
    if isinstance(genes, str):
        genes = [genes]
    mapping = isinstance(genes, Mapping)
    names = [str(g) for g in genes]
    if not names:
        raise ValueError("The query is empty: name at least one gene of the model's panel.")
    if mapping or markers == "raised":
        positions = _panel_positions(model, names)
    if mapping:
        given = np.array([genes[g] for g in genes], dtype=float)
        if not np.isfinite(given).all():
            raise ValueError(f"The query's values must be finite; found {dict(zip(names, given, strict=True))}.")
    bank = _panel_bank(model)
    values = bank.mean(axis=0)
    if mapping:
        values[positions] = given
    elif markers == "raised":
        values[positions] = np.maximum(values[positions], np.quantile(bank[:, positions], quantile, axis=0))
    else:
        # the spots are chosen by any gene the bank measures; the profile is theirs over the panel
        marked = _bank_markers(model, names)
        spread = marked.std(axis=0)
        z = (marked - marked.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
        top = np.argsort(-z.mean(axis=1), kind="stable")[: max(1, math.ceil((1 - quantile) * len(bank)))]
        values = bank[top].mean(axis=0)
    return values.astype(np.float32), "values" if mapping else "markers"


def _bank_markers(model, genes: list[str]) -> np.ndarray:
    """The bank's expression (float32) of marker genes, any of the bank's genes; panel genes are not required."""
    duplicated = sorted({g for g in genes if genes.count(g) > 1})
    if duplicated:
        raise ValueError(f"The query names genes more than once: {duplicated}.")
    bank = model.reference
    return bank.expression[:, bank.gene_indices(genes)].astype(np.float32)


def _from_profile(model, profile) -> np.ndarray:
    n = len(model.panel)
    if isinstance(profile, pd.Series):
        if profile.empty:
            raise ValueError("The query profile is empty: give expression over the model's panel genes.")
        if profile.index.duplicated().any():
            raise ValueError(
                f"The profile's index names genes more than once: {profile.index[profile.index.duplicated()].tolist()[:10]}."
            )
        covered = pd.Index(model.panel.genes).isin(profile.index)
        if not covered.any():
            raise KeyError(
                f"The profile names none of the model's {n} panel genes (e.g. {model.panel.genes[:5]}); its index "
                f"holds {profile.index[:5].tolist()}…"
            )
        values = _panel_bank(model).mean(axis=0) if not covered.all() else np.zeros(n, dtype=np.float32)
        values[covered] = profile.reindex(np.asarray(model.panel.genes)[covered]).to_numpy(dtype=float)
    else:
        values = np.asarray(profile, dtype=float)
        if values.size == 0:
            raise ValueError("The query profile is empty: give expression over the model's panel genes.")
        if values.shape != (n,):
            raise ValueError(
                f"profile must hold one value per panel gene, shape ({n},) in model.panel.genes order (or be a "
                f"pandas Series indexed by gene); found shape {values.shape}."
            )
    if not np.isfinite(values).all():
        raise ValueError("The query profile must be finite; found NaN or infinite values.")
    return np.asarray(values, dtype=np.float32)
