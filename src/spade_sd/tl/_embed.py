from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from spade_sd.config import PatchConfig
from spade_sd.model.subspace import UNLIKE_TRAINING, KeptShare
from spade_sd.spots.geometry import SpotGeometry, resolve_elements, resolve_geometry
from spade_sd.spots.patches import SpotPatches
from spade_sd.tl._common import (
    accepts_legacy_anndata,
    claim_outputs,
    embedding_records,
    find_model,
    model_record,
    rows_filled,
)
from spade_sd.utils.logging import logger
from spade_sd.utils.validation import check_bool, check_int, check_key

TOOL = "tl.embed"


def result_keys(key_added: str) -> dict[str, str]:
    stem = check_key("key_added", key_added).removeprefix("X_")
    if not stem:
        raise ValueError(f"key_added must name something after the 'X_' prefix; found {key_added!r}.")
    return {
        "embedding": key_added,
        "weights": f"{key_added}_weights",
        "gene": f"{key_added}_gene",
        "expression": f"{key_added}_expr",
        "expert": f"{stem}_expert",
        "uns": stem,
    }


def result_slots(keys: dict[str, str]) -> list[tuple[str, str]]:
    """Every slot :func:`embed` may write for :func:`result_keys`' ``keys``, as :func:`claim_outputs` takes them."""
    obsm = [("obsm", keys[name]) for name in ("embedding", "weights", "gene", "expression")]
    return [*obsm, ("obs", keys["expert"]), ("uns", keys["uns"])]


def _panel_expression(model, spots, layer: str | None, table_key: str) -> tuple[np.ndarray | None, str | None]:
    """The spots' expression over the model's panel, or why the gene side cannot be embedded."""
    missing = [g for g in model.panel.genes if g not in spots.var_names]
    if missing:
        return None, (
            f"table {table_key!r} lacks {len(missing)} of the model's {len(model.panel)} panel genes "
            f"(e.g. {missing[:10]})"
        )
    try:
        return model.panel.transform(spots, layer=layer), None
    except (KeyError, ValueError) as error:  # not raw counts, NaN, duplicated genes, no such layer, ...
        return None, str(error).strip("\"'")


def embed_patches(
    model,
    patches,
    *,
    hard: bool = False,
    batch_size: int = 64,
    cache: bool = True,
    num_workers: int = 0,
    share: KeptShare | None = None,
    represent: bool = False,
    spread: bool = True,
) -> tuple[np.ndarray, ...]:
    """Embedding and expert weights of every patch, as :func:`embed` computes them, streaming the backbone features.

    A model with per-slide standardization needs the slide's feature statistics first: one pass over the
    features collects them (computing the features once, into the cache or a temporary file), a second embeds
    (:meth:`SpadeModel.embed_chunks <spade_sd.SpadeModel.embed_chunks>`). ``share``, if given, accumulates how
    much of the heads' output variance the model's principal subspace keeps. ``represent``: ``X_spade`` as well
    (:meth:`SpadeModel.represent <spade_sd.SpadeModel.represent>`), from the same pass.

    For the patches of a grid over shapes (:class:`~spade_sd.spots.grid.GridPatches`) the model embeds each patch
    once; ``spread`` then gives every shape its patch's rows (``False``: one row per patch, for callers that work
    per patch before spreading, :func:`~spade_sd.spots.grid.per_shape`). Per-slide statistics and ``share`` are
    those of the patches, each region of the tissue counted once.
    """
    from spade_sd.encoders.features import iter_features, rereadable_features
    from spade_sd.spots.grid import per_shape

    options = {"batch_size": batch_size, "cache": cache, "num_workers": num_workers}
    if model.standardization == "slide":
        source = rereadable_features(patches, model.backbone, **options)
    else:  # one pass: no temporary file even without the cache
        source = nullcontext(lambda: iter_features(patches, model.backbone, **options))
    with source as passes:
        outputs = model.embed_chunks(passes, len(patches), hard=hard, share=share, represent=represent)
    return tuple(per_shape(patches, values) for values in outputs) if spread else outputs


@accepts_legacy_anndata(TOOL)
def embed(
    sdata: SpatialData,
    model=None,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    mpp: float | None = None,
    key_added: str = "X_spade",
    hard: bool = False,
    genes: bool | None = None,
    layer: str | None = None,
    batch_size: int = 64,
    cache: bool = True,
    num_workers: int = 0,
    grid: bool | None = None,
    stride_um: float | None = None,
) -> None:
    """Embed every spot (or tile) of a slide with a trained SPADE model.

    The image side needs only the H&E, so this works on tiles of slides without ST
    (see :func:`spade_sd.pp.tile_image`); the gene side is added where the table holds the model's panel genes.

    Parameters
    ----------
    sdata
        SpatialData with an H&E image, spots or tiles, and a table annotating them; or scanpy's legacy spatial
        AnnData (``uns['spatial']``, as ``sc.read_visium`` makes it), converted with spatialdata-io (logged), the
        outputs written to it.
    model
        A :class:`~spade_sd.SpadeModel`, or the folder or Hugging Face Hub repository id it was saved to
        (:meth:`SpadeModel.save_pretrained <spade_sd.SpadeModel.save_pretrained>`). ``None`` uses the model
        :func:`spade_sd.tl.pretrain` attached to this object; else the model that made the earlier embedding under
        ``key_added``, loaded from where it was saved (recorded in ``.uns``; logged, and a warning says what differs
        if the model there is another); else trains one on it (logged; a warning says why an earlier embedding's
        model could not be found).
    image_key, shapes_key, table_key, mpp
        Elements and scale, as in :func:`spade_sd.pp.spot_patches`.
    key_added
        Key of the embedding; the other outputs are named after it. Keys holding earlier outputs of this tool are
        replaced (logged); a key holding anything else (another tool's output, the user's own data) is an error,
        before a model is trained or any patch encoded.
    hard
        Route each patch to a single expert (the nearest fine centroid's) instead of the soft mixture.
    genes
        Add the gene-side embedding: ``None`` when the table holds raw counts of every panel gene (otherwise the
        gene side is skipped with an info message saying why; the image side is always embedded), ``True``
        requires it (an error says what is missing, before any patch is read), ``False`` skips it.
    layer
        Layer of the table holding raw counts for the gene side; ``None`` uses ``X``. Recorded in
        ``.uns['spade']['params']['expression']``.
    batch_size, cache
        Feature extraction batch size and on-disk feature cache.
    num_workers
        Processes reading patches while the backbone encodes (a :class:`torch.utils.data.DataLoader`); 0 reads
        in a thread, which keeps a CPU backbone busy. Use several on machines with many cores feeding a GPU.
    grid
        Embed shapes through a grid of patches: each takes the embedding of the grid patch whose centre is nearest
        its own, so encoding and embedding scale with the patches, not the shapes (logged, one line).
        ``None``: for shapes smaller than a quarter of the patch side (Visium HD's 8 and 16 µm bins, Xenium cells
        under 112 µm patches; :data:`~spade_sd.config.GRID_SHAPE_FRACTION`); ``True``: always; ``False``: one
        patch per shape. Recorded in ``.uns['spade']['params']['grid']``.
    stride_um
        µm between the grid's patch centres: ``None`` is the patch side (patches side by side); smaller strides
        give shapes patches centred closer to them, at the cost of more patches. At most the patch side; giving it
        asks for the grid.

    Returns
    -------
    Nothing; adds to the table (with the default ``key_added="X_spade"``):

    ``.obsm['X_spade']``
        The representation to cluster and transfer labels on, ``(n_obs, model.representation_dim)``. By default
        (``representation="backbone+readout"``) the backbone's features of every spot, their part that the read-out
        predicts weighing ``1 + readout_lift`` times, followed by the expression the model reads from its H&E
        (:meth:`SpadeModel.represent <spade_sd.SpadeModel.represent>`: distances within that block are distances
        between the expression profiles the model predicts, scaled to ``readout_weight`` of the features' spread).
        For a model trained with ``representation="heads"`` (and every model saved before spade_sd 0.3): the heads'
        image-side embedding ``(n_obs, model.dim)``, ``out_dim`` aligned coordinates followed, for
        ``output="joint"``, by a block of standardized backbone features.
    ``.obs['spade_expert']``
        Categorical expert with the largest routing weight.
    ``.obsm['X_spade_weights']``
        Routing weights ``(n_obs, n_experts)``.
    ``.obsm['X_spade_gene']``
        Gene-side embedding, where expression over the panel exists.
    ``.obsm['X_spade_expr']``
        For a model with an expression subspace (``expression_comps``, 16 by default): the heads' image-side
        embedding projected onto it (:meth:`SpadeModel.expression_space <spade_sd.SpadeModel.expression_space>`), what
        :func:`~spade_sd.tl.predict_expression` and :func:`~spade_sd.tl.query` compare. Use ``X_spade`` to cluster
        and transfer labels; ``X_spade_expr`` for linear probes of expression fitted on few spots.
    ``.uns['spade']``
        ``params`` of this call (elements, routing, expression source, patch geometry), the ``model``'s identity,
        backbone (with the ``precision`` of its features) and configuration (:meth:`SpadeConfig.to_dict <spade_sd.config.SpadeConfig.to_dict>`) and, for a
        saved model, its ``source`` (``{"path": folder}`` or ``{"repo_id": …, "revision": …}``: where a later call
        without ``model`` loads it from), and the package ``versions`` that trained it; for a model with a principal subspace (the projection of ``n_comps``,
        else the expression subspace), ``subspace``: its ``n_comps``, what it ``projects``, the share of these
        patches' embedding variance it keeps (``kept_variance``) and that share on the training spots
        (``training_kept_variance``). Below 0.85 of the training share a warning says the images are unlike the
        training slides and what that means for the outputs.
    ``.uns['spade_sd']['outputs']``
        This tool recorded as the writer of the keys above.

    All outputs are computed before any is written, so a failure leaves the table as it was. Features are
    computed (or read from the cache) and embedded a chunk of patches at a time: peak memory grows with the outputs,
    of which the default ``X_spade`` holds the features themselves (``(n_obs, backbone.dim + 16)`` float32, 5 MB per
    1,000 spots with the default backbone), no intermediate copy of them. A model trained
    with ``standardize="slide"`` standardizes the features by the statistics of all patches embedded here
    (a first pass over the features; at least 30 patches), so embed a slide's spots or tiles in one call.
    """
    from spade_sd.spots.grid import check_grid_options, per_shape

    keys = result_keys(key_added)
    num_workers = _checked_options(genes=genes, hard=hard, cache=cache, batch_size=batch_size, num_workers=num_workers)
    check_grid_options(grid, stride_um)
    if layer is not None:
        check_key("layer", layer)
    # checked before a model is trained on the slide (model=None) or any patch encoded
    table_name = resolve_elements(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key)[2]
    claimed = claim_outputs(sdata.tables[table_name], table_name, TOOL, result_slots(keys))
    records = embedding_records(sdata, table_name, keys["uns"])
    elements = {"image_key": image_key, "shapes_key": shapes_key, "table_key": table_key, "mpp": mpp}
    model = resolve_model(sdata, model, records, **elements, layer=layer, stride_um=stride_um)
    geometry, spot_patches = model_patches(sdata, model, **elements, grid=grid, stride_um=stride_um)
    table = sdata.tables[geometry.table_key]
    rows = geometry.table_rows
    expression = _expression(model, table[rows], genes, layer, geometry.table_key)
    share = None if model.subspace is None else KeptShare()
    embedding, weights, representation = embed_patches(
        model,
        spot_patches,
        hard=hard,
        batch_size=batch_size,
        cache=cache,
        num_workers=num_workers,
        share=share,
        represent=True,
        spread=False,
    )
    outputs = {keys["embedding"]: representation, keys["weights"]: weights}
    if model.expression_subspace is not None:
        outputs[keys["expression"]] = model.expression_space(embedding)
        if share is None:
            share = model.expression_subspace.kept_share(embedding[:, : model.mixture.config["out_dim"]])
    # computed per patch above; from here on per shape (the gene side reads each shape's own expression)
    outputs = {key: per_shape(spot_patches, value) for key, value in outputs.items()}
    weights = outputs[keys["weights"]]
    if expression is not None:
        outputs[keys["gene"]] = model.embed_expression(expression, weights)
    _check_finite(outputs, len(rows), geometry.table_key)
    _write(table, rows, keys, outputs, weights, model.n_experts)
    table.uns[keys["uns"]] = {
        "params": {
            "image_key": geometry.image_key,
            "shapes_key": geometry.shapes_key,
            "hard": hard,
            "tau": model.tau,
            "mpp": geometry.mpp,
            "expression": "none" if expression is None else ("X" if layer is None else f"layers[{layer!r}]"),
            **model.config.patches.to_dict(),
            **grid_record(spot_patches),
        },
        "model": model_record(model),
        "versions": dict(model.config.versions),
        "outputs": sorted(outputs) + [keys["expert"]],
    }
    if share is not None:
        table.uns[keys["uns"]]["subspace"] = _subspace_report(model, share, keys)
    claimed.record()
    logger.info(
        "Added .obsm[%s], .obs[%r] and .uns[%r] to table %r (%d spots)",
        ", ".join(repr(k) for k in outputs),
        keys["expert"],
        keys["uns"],
        geometry.table_key,
        len(rows),
    )


def grid_record(patches: SpotPatches) -> dict:
    """What ``.uns[...]['params']`` records of how the shapes were encoded: the grid's stride and patches, if any."""
    from spade_sd.spots.grid import GridPatches

    if not isinstance(patches, GridPatches):
        return {"grid": False}
    return {"grid": True, "stride_um": patches.stride_um, "n_patches": len(patches)}


def _subspace_report(model, share: KeptShare, keys: dict[str, str]) -> dict:
    """The principal subspace's kept share of these patches' embedding variance; warns when they are unlike training.

    The subspace is the one the embedding is projected onto (``n_comps``) or, for a full-rank embedding, the one
    the expression tools compare within (``expression_comps``).
    """
    subspace = model.subspace if model.subspace is not None else model.expression_subspace
    kept, training = share.share, subspace.kept
    report = {
        "n_comps": subspace.n_comps,
        "projects": "embedding" if model.subspace is not None else "expression tools",
        "kept_variance": kept,
        "training_kept_variance": training,
    }
    # models saved before the training share was recorded lack it; anndata cannot write None
    report = {name: value for name, value in report.items() if value is not None}
    if kept is not None and training is not None and kept < UNLIKE_TRAINING * training:
        if model.subspace is not None:
            consequence = (
                f".obsm[{keys['embedding']!r}] may know less about their morphology than the backbone's features. "
                "For morphology tasks (clustering, label transfer) embed them with model.full_rank() as well, e.g. "
                "sd.tl.embed(sdata, model.full_rank(), key_added='X_spade_full')"
            )
        elif model.readout is not None:
            held = (
                "the backbone's features unchanged"
                if model.readout.lift is None
                else "every direction of the backbone's features (those the expression read-out predicts weigh "
                f"{1 + model.config.training.readout_lift:g} times)"
            )
            consequence = (
                f".obsm[{keys['embedding']!r}] holds {held}: for clustering and label transfer it stays at least "
                "level with them on such slides (measured across data sets). But its expression block and the "
                f"expression tools (tl.predict_expression, tl.query, .obsm[{keys['expression']!r}]) read directions "
                "fitted to the training tissue: treat the expression they read from these images with caution"
            )
        else:
            consequence = (
                f".obsm[{keys['embedding']!r}] keeps every direction (for clustering and label transfer it stays at "
                "least level with the backbone's features on such slides), but the expression tools "
                f"(tl.predict_expression, tl.query, .obsm[{keys['expression']!r}]) compare within directions fitted "
                "to the training tissue: treat their results on these images with caution"
            )
        logger.warning(
            "The model's %d-d principal subspace keeps %.0f%% of these patches' embedding variance, against %.0f%% "
            "on its training spots: the images are unlike the training slides (another tissue, for instance). "
            "%s; docs/quality.md has the measurements.",
            subspace.n_comps,
            100 * kept,
            100 * training,
            consequence,
        )
    return report


def _checked_options(*, genes, hard, cache, batch_size, num_workers) -> int:
    """Check :func:`embed`'s options before any work; returns the number of reader processes."""
    from spade_sd.encoders.features import check_num_workers

    if genes not in (None, True, False):
        raise ValueError(f"genes must be None, True or False; found {genes!r}.")
    check_bool("hard", hard)
    check_bool("cache", cache)
    check_int("batch_size", batch_size, minimum=1)
    return check_num_workers(num_workers)


def resolve_model(
    sdata: SpatialData, model, records: dict, *, layer: str | None = None, stride_um: float | None = None, **elements
):
    """The model given or found (:func:`~spade_sd.tl._common.find_model`), else one trained on ``sdata`` now (logged).

    ``stride_um`` is checked against the patch side of the model found, or of the one about to be trained, first.
    """
    from spade_sd.spots.grid import check_stride

    model, problem = find_model(sdata, model, TOOL, records=records)
    check_stride(stride_um, PatchConfig.size_um if model is None else model.config.patches.size_um)
    if model is None:
        from spade_sd.tl._pretrain import pretrain

        if problem:
            logger.warning(
                "%s%s: training a new model on this slide with tl.pretrain, whose embedding replaces the earlier "
                "one. To embed with the earlier model, pass it: sd.tl.embed(sdata, model=<its folder>).",
                problem[0].upper(),
                problem[1:],
            )
        else:
            logger.info("No model given or attached to this SpatialData: training one on it with tl.pretrain")
        model = pretrain(sdata, **elements, layer=layer)
        logger.warning(
            "tl.embed trained a model on this slide's %d spots (%d experts); it is kept in memory with this "
            "SpatialData only. To keep it: model = sd.tl.pretrain(sdata); model.save_pretrained(path), then "
            "sd.tl.embed(sdata, model=path): the path is recorded, so sd.tl.embed(sdata) finds the model again "
            "after sdata.write and read_zarr.",
            model.config.n_spots,
            model.n_experts,
        )
    return model


def model_patches(
    sdata: SpatialData, model, *, grid: bool | None = None, stride_um: float | None = None, **elements
) -> tuple[SpotGeometry, SpotPatches]:
    """The shapes' geometry and lazy patches to encode at the model's patch geometry, enough for its standardization.

    Shapes much smaller than a patch (``grid``, ``stride_um``: :func:`~spade_sd.spots.grid.shape_patches`) get the
    patches of a grid over them; when that grid holds too few patches for a model that standardizes per slide, the
    automatic choice (``grid=None``, no ``stride_um``) falls back to one patch per shape (logged) and an explicit one
    is an error.
    """
    from spade_sd.model.standardization import MIN_SLIDE_PATCHES
    from spade_sd.spots.grid import GridPatches, check_grid_options, check_stride, shape_patches

    patches = model.config.patches
    check_grid_options(grid, stride_um)
    check_stride(stride_um, patches.size_um)
    geometry = resolve_geometry(sdata, **elements)
    needed = MIN_SLIDE_PATCHES if model.standardization == "slide" else 0
    spot_patches = shape_patches(
        sdata.images[geometry.image_key],
        geometry,
        size_um=patches.size_um,
        size_px=patches.size_px,
        grid=grid,
        stride_um=stride_um,
        min_patches=needed,
    )
    if len(spot_patches) < needed:
        where = (
            f"{len(spot_patches)} grid patches over the {geometry.n_spots} shapes of {geometry.shapes_key!r}. Pass "
            "a smaller stride_um, or grid=False to encode one patch per shape"
            if isinstance(spot_patches, GridPatches)
            else f"{len(spot_patches)} in {geometry.shapes_key!r}. Embed all of the slide's spots or tiles (see "
            "sd.pp.tile_image)"
        )
        raise ValueError(
            f"The model standardizes features per slide, which needs at least {MIN_SLIDE_PATCHES} patches of the "
            f"slide; found {where}, or use a model trained with standardize='global'."
        )
    return geometry, spot_patches


def _expression(model, spots, genes: bool | None, layer: str | None, table_key: str) -> np.ndarray | None:
    """The spots' panel expression for the gene side, ``None`` where it is skipped (an error if ``genes=True``)."""
    if genes is False:
        return None
    expression, problem = _panel_expression(model, spots, layer, table_key)
    if problem and genes:
        raise ValueError(f"No gene-side embedding possible: {problem}. Pass genes=False to skip it.")
    if problem:
        logger.info("No gene-side embedding (the image side is embedded as usual): %s", problem)
    return expression


def _check_finite(outputs: dict[str, np.ndarray], n_rows: int, table_key: str) -> None:
    bad = {key: int((~np.isfinite(value).all(axis=1)).sum()) for key, value in outputs.items()}
    if any(bad.values()):
        raise FloatingPointError(
            f"The embedding holds non-finite values ({bad} rows of {n_rows}); nothing was written to table "
            f"{table_key!r}. Check the backbone's features and the model."
        )


def _write(
    table, rows: np.ndarray, keys: dict[str, str], outputs: dict[str, np.ndarray], weights: np.ndarray, n_experts: int
) -> None:
    """Write the outputs at ``rows`` of ``table``, keeping other rows' earlier results (all computed first)."""
    outputs = {key: rows_filled(table, rows, value, key) for key, value in outputs.items()}
    expert = np.full(table.n_obs, None, dtype=object)
    if keys["expert"] in table.obs and len(rows) < table.n_obs:
        expert[:] = table.obs[keys["expert"]].astype(object).to_numpy()
    expert[rows] = weights.argmax(axis=1).astype(str)
    for key, value in outputs.items():
        table.obsm[key] = value
    for stale in ("gene", "expression"):
        if keys[stale] not in outputs and keys[stale] in table.obsm and len(rows) == table.n_obs:
            # an earlier run's output would no longer match the new image side
            del table.obsm[keys[stale]]
            logger.info("Removed the earlier .obsm[%r]: this run's model does not compute it", keys[stale])
    table.obs[keys["expert"]] = pd.Categorical(expert, categories=[str(e) for e in range(n_experts)])
