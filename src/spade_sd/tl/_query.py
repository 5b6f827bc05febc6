"""sd.tl.query: gene → image retrieval, scoring every spot or tile by how well its H&E matches an expression query."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData

from spade_sd.spots.grid import check_grid_options, per_shape
from spade_sd.tl._common import accepts_legacy_anndata, claim_outputs, given_or_attached_model, obs_filled, unit_rows
from spade_sd.tl._embed import embed_patches, grid_record, model_patches
from spade_sd.tl._reference import ExpressionReference, expression_reference
from spade_sd.utils.constants import QUERY_KEY
from spade_sd.utils.logging import logger
from spade_sd.utils.validation import check_bool, check_choice, check_int, check_key, check_number

MARKERS = ("spots", "raised")
TOOL = "tl.query"


@accepts_legacy_anndata(TOOL)
def query(
    sdata: SpatialData | AnnData,
    model=None,
    *,
    genes: Sequence[str] | Mapping[str, float] | None = None,
    profile: Sequence[float] | np.ndarray | pd.Series | None = None,
    reference: SpatialData | AnnData | None = None,
    quantile: float = 0.95,
    markers: Literal["spots", "raised"] = "spots",
    key_added: str = QUERY_KEY,
    batch_size: int = 64,
    cache: bool = True,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    layer: str | None = None,
    grid: bool | None = None,
    stride_um: float | None = None,
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
        SpatialData whose spots or tiles (with their H&E image and table) are scored; or scanpy's legacy spatial
        AnnData (``uns['spatial']``, :func:`scanpy.read_visium`), converted with
        :func:`spatialdata_io.experimental.from_legacy_anndata` (logged), the outputs below written back to it.
    model
        The :class:`~spade_sd.SpadeModel` whose joint space answers the query; ``None``: the model
        :func:`spade_sd.tl.pretrain` attached to ``sdata``.
    genes
        Marker genes, as a list: "where these genes are high", turned into a profile over the panel from the
        reference bank's spots as ``markers`` says: with ``markers="spots"`` any gene the bank measures
        (``model.reference.genes``: the panel and the training slides' most variable genes), or with ``reference=``
        any gene of that table; otherwise panel genes. Or a mapping gene → value in log1p-normalized units
        (``log1p(10⁴ · counts / library size)``), the other panel genes at the bank's mean; every gene must be in the
        model's panel. Needs the model's reference bank, unless ``reference=`` measures every panel gene.
    profile
        A measured profile instead: an array over the model's panel genes (in ``model.panel.genes`` order), or a
        :class:`pandas.Series` indexed by gene (genes outside the panel are ignored; panel genes it lacks take the
        bank's mean, which needs the bank), in log1p-normalized units. Give ``genes`` or ``profile``, not both.
    reference
        Spots with measured expression to select by the marker ``genes`` instead of the bank's (``markers="spots"``
        only): a SpatialData (its spots' table, resolved as :func:`spade_sd.tl.predict_expression` resolves it) or
        an AnnData, either holding raw counts; nothing of it is embedded. Its counts are normalized as the bank's
        (``log1p`` of counts scaled to the panel's ``target_sum``), the spots ranked as below, and the profile is
        the selected spots' mean over the panel genes; panel genes the table lacks take the bank's mean (an error
        without a bank). Use it for markers found on a section the model was not trained on, e.g. the top
        Wilcoxon genes of one of its expression domains, which the bank need not hold.
    quantile
        How high "high" is for marker genes: the 95th percentile of the bank (or ``reference``) by default. With
        ``markers="spots"`` its top ``1 - quantile`` must hold at least one spot (20 spots for 0.95).
    markers
        How marker genes become a profile. ``"spots"``: the mean panel expression of the bank spots (or the
        ``reference`` spots) where the markers are highest (the top ``1 - quantile``, 5 % by default, ranked by the
        mean of the markers' z-scores), so the genes that go with the markers come along. ``"raised"``: the bank's
        mean panel expression with the markers raised to their ``quantile`` over the bank (the 95th percentile),
        every other gene at its mean. A profile that differs from the mean in a few genes only is embedded close to the mean
        profile's embedding: on mouse olfactory bulb (a model trained on two sections, queried on a third), the
        score of ``"spots"`` correlated with the marker's measured expression at r ≈ 0.45 for the eight best
        predicted panel genes, that of ``"raised"`` at r ≈ 0.13.
    key_added
        Column of the score. A key holding an earlier output of this tool is replaced (logged); one holding anything
        else (another tool's output, the user's own data) is an error, before any patch is encoded.
    image_key, shapes_key, table_key
        Elements; inferred when unambiguous.
    layer
        Layer of the ``reference``'s table holding raw counts; ``None`` uses ``X``. Only with ``reference``.
    batch_size, cache
        Feature extraction batch size and on-disk feature cache.
    grid, stride_um
        Shapes much smaller than a patch (bins, cells) take the score of the nearest patch of a grid, each patch
        encoded and scored once, as in :func:`spade_sd.tl.embed`; ``grid=False`` encodes one patch per shape.

    Returns
    -------
    Nothing; adds to the spots' table:

    ``.obs[key_added]``
        Cosine similarity in [-1, 1] between the query's and each spot's embedding (NaN on rows annotating other
        elements); higher matches better. See :func:`spade_sd.pl.query`.
    ``.uns[key_added]``
        ``params`` (kind of query, genes, quantile, the ``reference`` marker spots were selected from: ``"bank"``,
        ``"AnnData"`` or ``"SpatialData"``, and its ``n_reference`` spots, elements, ``grid``), the ``profile`` over
        ``profile_genes`` (the panel) that was embedded, and the ``model``'s identity.
    ``.uns['spade_sd']['outputs']``
        This tool recorded as the writer of both keys.
    """
    check_key("key_added", key_added)
    check_number("quantile", quantile, minimum=0, maximum=1)
    check_choice("markers", markers, MARKERS)
    check_int("batch_size", batch_size, minimum=1)
    check_bool("cache", cache)
    check_grid_options(grid, stride_um)
    if layer is not None:
        check_key("layer", layer)
    model = given_or_attached_model(sdata, model, "query")
    source = _marker_reference(model, reference, genes, profile, markers, layer)
    values, kind = query_profile(
        model, genes=genes, profile=profile, quantile=quantile, markers=markers, reference=source
    )
    elements = {"image_key": image_key, "shapes_key": shapes_key, "table_key": table_key}
    geometry, patches = model_patches(sdata, model, **elements, grid=grid, stride_um=stride_um)
    table = sdata.tables[geometry.table_key]
    claimed = claim_outputs(table, geometry.table_key, TOOL, [("obs", key_added), ("uns", key_added)])

    # scored once per patch encoded (the query is the same for every shape), then each shape its patch's
    image, weights = embed_patches(model, patches, batch_size=batch_size, cache=cache, spread=False)
    gene = model.embed_expression(np.repeat(values[None], len(image), axis=0), weights)
    image, gene = model.expression_space(image), model.expression_space(gene)
    score = per_shape(patches, (unit_rows(image) * unit_rows(gene)).sum(axis=1))
    table.obs[key_added] = obs_filled(table, geometry.table_rows, score, key_added).astype(float)
    asked = list(genes) if isinstance(genes, Sequence | Mapping) and not isinstance(genes, str) else genes
    table.uns[key_added] = {
        "params": {
            "query": kind,
            **({"genes": [str(g) for g in asked]} if asked is not None else {}),
            **({"quantile": quantile, "markers": markers} if kind == "markers" else {}),
            **(_selected_from(model, source) if kind == "markers" and markers == "spots" else {}),
            "image_key": geometry.image_key,
            "shapes_key": geometry.shapes_key,
            **grid_record(patches),
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
    reference: ExpressionReference | None = None,
) -> tuple[np.ndarray, str]:
    """The query's expression over the model's panel genes, and its kind (``"markers"``, ``"values"``, ``"profile"``).

    Every problem (both or neither of ``genes`` and ``profile``, an empty query, genes outside the panel or the
    ``reference``, values that are not finite, no reference bank where one is needed, too few spots for
    ``quantile``) is an error here, before any patch is read. ``reference``: the spots marker genes select
    (``markers="spots"``), resolved by :func:`~spade_sd.tl._reference.expression_reference`; ``None``: the bank's.
    """
    if (genes is None) == (profile is None):
        raise ValueError(
            "Give the query as genes= (marker genes, or a mapping gene → value) or as profile= (measured expression), "
            f"exactly one of them; found {'both' if genes is not None else 'neither'}."
        )
    if genes is not None:
        return _from_genes(model, genes, quantile, markers, reference)
    return _from_profile(model, profile), "profile"


def _marker_reference(model, reference, genes, profile, markers: str, layer: str | None) -> ExpressionReference | None:
    """``reference`` resolved for reading its expression, or an error where a query of this kind does not use it."""
    if reference is None:
        if layer is not None:
            raise ValueError(
                f"layer={layer!r} names the layer of raw counts of reference=, but no reference was given; drop "
                "layer=, or pass reference= (a table of raw counts whose spots the marker genes select)."
            )
        return None
    use = "pass genes=[...] (marker genes, markers='spots') to select its spots by them, or drop reference="
    if profile is not None:
        raise ValueError(
            f"reference= selects spots by marker genes, but profile= is already the expression to query; {use}."
        )
    if isinstance(genes, Mapping):
        raise ValueError(
            f"reference= selects spots by marker genes, but genes= is a mapping gene → value, which sets the profile "
            f"directly; {use}."
        )
    if markers != "spots":
        raise ValueError(
            f"reference= selects the spots where the markers are highest (markers='spots'); markers={markers!r} "
            "raises them in the bank's mean profile and reads no spots. Pass markers='spots' (the default), or drop "
            "reference= to query the bank."
        )
    return expression_reference(model, reference, layer=layer, batch_size=1, cache=False, embedded=False)


def _selected_from(model, source: ExpressionReference | None) -> dict:
    """The ``.uns`` record of where marker spots were selected."""
    if source is None:
        return {"reference": "bank", "n_reference": len(model.reference)}
    return {"reference": source.kind, "n_reference": source.n_spots}


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


def _from_genes(
    model, genes, quantile: float, markers: str, reference: ExpressionReference | None
) -> tuple[np.ndarray, str]:
    if isinstance(genes, str):
        genes = [genes]
    mapping = isinstance(genes, Mapping)
    names = [str(g) for g in genes]
    if not names:
        raise ValueError("The query is empty: name at least one gene of the model's panel.")
    if not mapping and markers == "spots":
        return _from_marker_spots(model, names, quantile, reference), "markers"
    positions = _panel_positions(model, names)
    if mapping:
        given = np.array([genes[g] for g in genes], dtype=float)
        if not np.isfinite(given).all():
            raise ValueError(f"The query's values must be finite; found {dict(zip(names, given, strict=True))}.")
    bank = _panel_bank(model)
    values = bank.mean(axis=0)
    if mapping:
        values[positions] = given
    else:
        values[positions] = np.maximum(values[positions], np.quantile(bank[:, positions], quantile, axis=0))
    return values.astype(np.float32), "values" if mapping else "markers"


def _from_marker_spots(model, genes: list[str], quantile: float, reference: ExpressionReference | None) -> np.ndarray:
    """The mean panel expression of the spots where the markers are highest: the bank's, or the ``reference``'s.

    The spots are chosen by any gene their table measures; the profile is theirs over the panel, and panel genes
    the ``reference`` lacks take the bank's mean. Everything is checked before the reference is normalized.
    """
    from spade_sd.model.reference import gene_indices

    duplicated = sorted({g for g in genes if genes.count(g) > 1})
    if duplicated:
        raise ValueError(f"The query names genes more than once: {duplicated}.")
    if reference is None:
        bank = _panel_bank(model)
        _check_enough_spots(len(bank), quantile, "the model's reference bank")
        try:
            columns = model.reference.gene_indices(genes)
        except KeyError as error:
            raise KeyError(
                f"{error.args[0]} Or pass reference= with a table of raw counts that measures them (e.g. the section "
                "the markers were found on)."
            ) from error
        marked = model.reference.expression[:, columns].astype(np.float32)
        return bank[_highest(marked, quantile)].mean(axis=0)
    where = f"the reference {reference.kind}'s table"
    gene_indices(reference.genes, genes, where)
    panel = pd.Index(model.panel.genes)
    measured = panel.isin(reference.genes)
    missing = panel[~measured]
    if len(missing) and model.reference is None:
        raise ValueError(
            f"{where[0].upper()}{where[1:]} lacks {len(missing)} of the model's {len(panel)} panel genes "
            f"({', '.join(missing[:10])}{' …' if len(missing) > 10 else ''}), which would take the reference bank's "
            "mean, but the model has none. Pass a reference that measures every panel gene, or use a model trained "
            "with a reference bank (sd.tl.pretrain(..., reference_size=2000))."
        )
    _check_enough_spots(reference.n_spots, quantile, where)
    read = list(dict.fromkeys([*genes, *panel[measured]]))
    expression = reference.expression(read)
    marked = expression[:, : len(genes)]
    values = _panel_bank(model).mean(axis=0) if len(missing) else np.zeros(len(panel), dtype=np.float32)
    values[measured] = expression[_highest(marked, quantile)][:, pd.Index(read).get_indexer(panel[measured])].mean(0)
    if len(missing):
        logger.info("%d panel genes the reference lacks take the bank's mean: %s", len(missing), list(missing[:10]))
    return values


def _check_enough_spots(n_spots: int, quantile: float, where: str) -> None:
    # a tolerance, so that 0.95 of 20 spots (1 - 0.95 is 0.05000000000000004) selects the one spot it means
    if (1 - quantile) * n_spots < 1 - 1e-9:
        need = "no number of spots" if quantile == 1 else f"at least {math.ceil(1 / (1 - quantile) - 1e-9)} spots"
        lower = f"quantile ≤ {math.floor(1000 * (1 - 1 / n_spots)) / 1000:g}, or " if n_spots else ""
        raise ValueError(
            f"quantile={quantile:g} selects the top {1 - quantile:.3g} of the spots, but {where} holds {n_spots}: "
            f"fewer than one spot would be selected ({need} would do). Pass {lower}reference= a table with more spots."
        )


def _highest(marked: np.ndarray, quantile: float) -> np.ndarray:
    """Rows of the top ``1 - quantile`` spots, ranked by the mean of the markers' z-scores.

    A marker constant over the spots has z-score 0 everywhere.
    """
    marked = np.asarray(marked, dtype=np.float32)
    spread = marked.std(axis=0)
    z = (marked - marked.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    return np.argsort(-z.mean(axis=1), kind="stable")[: math.ceil((1 - quantile) * len(marked) - 1e-9)]


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
