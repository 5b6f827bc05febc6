from __future__ import annotations

import time

from spatialdata import SpatialData

from spade_sd.config import PatchConfig
from spade_sd.spots.aggregate import aggregate_shapes, count_matrices
from spade_sd.spots.bins import BINS, NOUNS
from spade_sd.spots.geometry import check_element_key, resolve_geometry
from spade_sd.tl._common import check_free_element_names
from spade_sd.utils.logging import logger
from spade_sd.utils.validation import SIZE_UM_RANGE, check_key, check_mpp, check_number

TOOL = "pp.aggregate"


def aggregate(
    sdata: SpatialData,
    *,
    shapes_key: str,
    size_um: float = PatchConfig.size_um,
    key_added: str = "pseudo_spots",
    table_key: str | None = None,
    image_key: str | None = None,
    mpp: float | None = None,
) -> None:
    """Sum bins or cells into squares of a grid over the tissue: pseudo-spots that train and embed like spots.

    Visium HD's bins (2–16 µm) and Xenium's cells are far smaller than a patch (112 µm): each alone would pair a
    whole patch with the expression of a sliver of it. Summing every bin or cell whose centre falls in a
    ``size_um`` square (HEST's pseudo-spots) gives spots as large as the patch, whose counts describe what the patch
    shows. Only squares holding at least one bin or cell are kept. The grid starts at the corner of the shapes'
    bounding box and runs along their own axes, so the squares keep the shapes' transformations.

    Parameters
    ----------
    sdata
        SpatialData with the bins or cells (shapes), the table of their raw counts, and the H&E image.
    shapes_key
        The bins or cells, e.g. ``"{dataset_id}_square_008um"`` (spatialdata-io's ``visium_hd``) or
        ``"cell_boundaries"`` / ``"cell_circles"`` (its ``xenium``).
    size_um
        Side of a square in µm; the patch size by default, so that a patch shows exactly its square. At least the
        bins' side (or the cells' median diameter).
    key_added
        Name of the squares (shapes); their table is ``f"{key_added}_table"`` (spatialdata wants element names unique
        across element kinds). Neither may exist already.
    table_key, image_key
        The table of the shapes' counts and the image their scale is measured on; inferred when unambiguous.
    mpp
        µm per pixel of the image's full-resolution level, where nothing recorded gives the scale (see
        :func:`spade_sd.pp.spot_patches`): Visium HD's bins are measured by the bin size in their names, Xenium's cells
        by their coordinates in µm.

    Returns
    -------
    ``None``. Adds

    ``.shapes[key_added]``
        The squares as polygons in the shapes' own coordinates, with their transformations, indexed by square id
        (``(row * n_cols + col)`` of the grid, per sample).
    ``.tables[f"{key_added}_table"]``
        One row per square, annotating ``key_added`` (``region_key="region"``, ``instance_key="square_id"``):

        - ``X`` and every layer of raw counts (non-negative integers), summed; sparse stays sparse. ``X`` is
          ``None`` when it holds no raw counts (pass ``layer=`` to the tools then); other layers are left out.
        - ``.var``: the genes, as in the shapes' table;
        - ``.obs['n_aggregated']``: how many bins or cells the square sums; ``.obs['grid_row']``,
          ``.obs['grid_col']``: where it lies in the grid; ``.obs['sample']`` when the shapes' table has it;
        - ``.obsm['spatial']``: the squares' centres in the shapes' own coordinates;
        - ``.uns['spade_sd']``: ``bin_size_um`` (``size_um``: what gives the squares' scale), ``aggregated_from``,
          ``grid_origin``, ``grid_side`` (in the shapes' units), ``mpp_source``, the shapes' ``sample`` if
          recorded, and ``written_by='pp.aggregate'``.

    Examples
    --------
    >>> import spade_sd as sd
    >>> from spatialdata_io import visium_hd
    >>> sdata = visium_hd("path/to/outs", dataset_id="hd", load_segmentations_only=False)
    >>> sd.pp.aggregate(sdata, shapes_key="hd_square_008um", image_key="hd_full_image", key_added="pseudo_spots")
    >>> model = sd.tl.pretrain(sdata, shapes_key="pseudo_spots", image_key="hd_full_image")
    """
    start = time.perf_counter()
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a spatialdata.SpatialData, found {type(sdata).__name__}.")
    size_um = check_number("size_um", size_um, minimum=SIZE_UM_RANGE[0], maximum=SIZE_UM_RANGE[1], unit="µm")
    if mpp is not None:
        mpp = check_mpp("mpp", mpp)
    check_key("key_added", key_added)
    check_element_key(sdata, "shapes", shapes_key)
    if shapes_key is None:
        raise TypeError(
            f"shapes_key must name the bins or cells to aggregate; available shapes: {sorted(sdata.shapes)}."
        )
    table_name = f"{key_added}_table"
    check_free_element_names(sdata, [key_added, table_name], "aggregate", "squares")

    geometry = resolve_geometry(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key, mpp=mpp)
    shapes_um = geometry.size_px * geometry.mpp
    if size_um < shapes_um * (1 - 1e-6):
        what = f"{NOUNS[geometry.kind]} of {shapes_um:.4g} µm" + ("" if geometry.kind == BINS else " (median diameter)")
        raise ValueError(
            f"size_um={size_um:g} µm is smaller than the shapes it sums: {shapes_key!r} are {what}, at "
            f"{geometry.mpp:.4g} µm per pixel ({geometry.mpp_source}), so a square would hold one at most. Pass "
            f"size_um ≥ {shapes_um:.4g} (the patch size, {PatchConfig.size_um:g} µm, by default)."
        )
    table = sdata.tables[geometry.table_key]
    matrices, skipped = count_matrices(table)
    if not matrices:
        raise ValueError(
            f"Table {geometry.table_key!r} holds no raw counts (non-negative integers) in X or a layer "
            f"(layers: {sorted(k for k in table.layers.keys() if k is not None)}), and aggregate sums counts. Pass "
            "the table of the bins' or cells' raw counts as read by spatialdata-io (table_key=)."
        )
    if skipped:
        logger.info("aggregate: %s of table %r hold no raw counts and are left out", skipped, geometry.table_key)

    squares = aggregate_shapes(sdata, geometry, size_um=size_um, matrices=matrices, region=key_added, tool=TOOL)
    sdata.shapes[key_added] = squares.shapes
    try:
        sdata.tables[table_name] = squares.table
    except Exception:  # a table that does not fit is not added, and neither are its squares
        del sdata.shapes[key_added]
        raise
    n_squares = squares.table.n_obs
    logger.info(
        "Aggregated %d %s of %r into %d squares of %g µm (%.1f per square), as %r and %r, in %.1f s",
        geometry.n_spots,
        geometry.kind,
        shapes_key,
        n_squares,
        size_um,
        geometry.n_spots / n_squares,
        key_added,
        table_name,
        time.perf_counter() - start,
    )
