from __future__ import annotations

import time

from spatialdata import SpatialData

from spade_sd.spots.geometry import check_element_key, choose_element, image_levels
from spade_sd.spots.patches import check_image
from spade_sd.spots.tiles import make_tiles
from spade_sd.tl._common import check_free_element_names
from spade_sd.utils.constants import UNS_KEY, WRITTEN_BY
from spade_sd.utils.logging import logger
from spade_sd.utils.validation import SIZE_UM_RANGE, check_bool, check_int, check_key, check_mpp, check_number

TOOL = "pp.tile_image"


def _with_elements(sdata: SpatialData, shapes: dict, tables: dict) -> SpatialData:
    """A new SpatialData sharing ``sdata``'s elements (nothing is duplicated), plus the given ones."""
    return SpatialData(
        images=dict(sdata.images),
        labels=dict(sdata.labels),
        points=dict(sdata.points),
        shapes={**sdata.shapes, **shapes},
        tables={**sdata.tables, **tables},
        attrs=sdata.attrs,
    )


def tile_image(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    size_um: float = 112.0,
    stride_um: float | None = None,
    tissue_only: bool = True,
    mpp: float | None = None,
    tissue_level: int | None = None,
    min_tissue_fraction: float = 0.5,
    key_added: str = "tiles",
    copy: bool = False,
) -> SpatialData | None:
    """Cover an H&E image with square tiles, keeping those over tissue, so that slides without ST can be embedded.

    The tiles form a grid of ``size_um`` squares every ``stride_um`` from the image's top-left corner; a tile belongs
    to the grid when its center lies in the image (tiles at the border may reach beyond it, and their patches are
    padded with white). They are stored in the image's full-resolution (level-0) pixels with the image's own
    transformations, so they share every coordinate system of the image, and
    ``sd.pp.spot_patches(sdata, shapes_key=key_added, size_um=size_um)`` returns exactly their squares.

    Tissue is found on one coarse pyramid level, the coarsest whose pixels are at most ``size_um / 4`` µm (or
    ``tissue_level``), which alone is loaded into memory; an image without a coarse enough level is read with a
    stride instead. Glass is grey and H&E-stained tissue is not, so pixels whose HSV saturation (0 to 1) exceeds a
    threshold are tissue. The threshold is the slide's Otsu threshold, which adapts to its staining, bounded to
    [0.10, 0.12]: glass stays below 0.10 and about 90 % of tissue pixels lie above 0.12 (measured on her2st and
    mouse olfactory bulb slides). An image of tissue only, or of glass only, has a single mode that Otsu would split in
    two; it is recognised (the lower Otsu class is on average above 0.10, or the upper one below it) and thresholded
    at 0.10 (all tissue) or 0.12 (no tissue but clearly stained specks) instead. A closing then an opening with a
    disk of an eighth of a tile fill the gaps between nuclei and drop specks, and connected pieces smaller than a
    quarter of a tile (dust, debris) are removed. A tile's tissue fraction is the exact share of its square covered
    by that mask. Glass tinted as strongly as pale tissue cannot be told from it by saturation: pass
    ``tissue_only=False`` and filter the tiles yourself on such slides.

    Parameters
    ----------
    sdata
        SpatialData holding the H&E image (RGB, RGBA or grey; uint8 or float in [0, 1]; dims ``(c, y, x)``).
    image_key
        The image to tile; may be left out when there is only one.
    size_um
        Side of a tile in µm (112 µm: the HEST patch at 0.5 µm/px and 224 px).
    stride_um
        Distance between neighbouring tiles in µm; ``size_um`` by default. Less than ``size_um`` gives overlapping
        tiles, more leaves gaps.
    tissue_only
        Keep only the tiles whose tissue fraction is at least ``min_tissue_fraction``; else keep the full grid.
    mpp
        µm per pixel of the image's full-resolution level. Inferred, when not given, from the spot tables that
        annotate shapes on this image (their ``uns['spade_sd']`` metadata or known spot diameter).
    tissue_level
        Pyramid level on which to detect tissue, instead of the automatic choice.
    min_tissue_fraction
        Tissue fraction, in [0, 1], a tile needs to be kept.
    key_added
        Name of the shapes element; the table is named ``f"{key_added}_table"`` (spatialdata wants element names
        unique across element kinds). Neither may exist already, not even as earlier tiles (tables may annotate
        them).
    copy
        Return a new SpatialData, sharing ``sdata``'s elements, with the tiles added, and leave ``sdata`` unchanged.

    Returns
    -------
    ``None``, or the new SpatialData when ``copy=True``. Adds

    ``.shapes[key_added]``
        The kept tiles as square polygons in level-0 pixels, indexed by tile id (``row * n_cols + col`` of the
        full grid, so ids do not depend on which tiles are kept), with the image's transformations.
    ``.tables[f"{key_added}_table"]``
        One row per kept tile, annotating ``key_added`` (``region_key="region"``, ``instance_key="tile_id"``):

        - ``.obs['tile_id']``, ``.obs['region']``, ``.obs['tile_row']``, ``.obs['tile_col']``: where the tile is;
        - ``.obs['tissue_fraction']``: the share of its square covered by tissue;
        - ``.obsm['spatial']``: tile centers ``(x, y)`` in level-0 pixels;
        - ``.uns['spade_sd']``: ``kind='tiles'``, ``image_key``, ``mpp`` (µm per level-0 pixel) and
          ``mpp_source``, ``size_um``, ``stride_um``, ``tissue_only``, ``min_tissue_fraction``, ``tissue_level``,
          ``tissue_step`` (the stride within that level), ``tissue_threshold`` (the saturation threshold used),
          ``tissue_saturation_bounds`` (the bounds on it) and ``written_by='pp.tile_image'`` (no other tool
          replaces the table).

    Examples
    --------
    >>> import spade_sd as sd
    >>> sdata = sd.datasets.her2st("C2")
    >>> sd.pp.tile_image(sdata, size_um=112.0)
    >>> patches = sd.pp.spot_patches(sdata, shapes_key="tiles", size_um=112.0)
    """
    start = time.perf_counter()
    size_um = check_number("size_um", size_um, minimum=SIZE_UM_RANGE[0], maximum=SIZE_UM_RANGE[1], unit="µm")
    stride_um = size_um if stride_um is None else stride_um
    stride_um = check_number("stride_um", stride_um, minimum=SIZE_UM_RANGE[0], maximum=SIZE_UM_RANGE[1], unit="µm")
    if mpp is not None:
        mpp = check_mpp("mpp", mpp)
    check_number("min_tissue_fraction", min_tissue_fraction, minimum=0, maximum=1)
    check_bool("tissue_only", tissue_only)
    check_bool("copy", copy)
    if tissue_level is not None:
        check_int("tissue_level", tissue_level, minimum=0)
    check_key("key_added", key_added)
    check_element_key(sdata, "images", image_key)
    if image_key is None:
        image_key = choose_element("images", list(sdata.images), "image_key", "the images of this SpatialData")
    check_image(image_levels(sdata.images[image_key])[0])
    table_key = f"{key_added}_table"
    check_free_element_names(sdata, [key_added, table_key], "tile_image", "tiles")

    tiles = make_tiles(
        sdata,
        image_key,
        region=key_added,
        size_um=size_um,
        stride_um=stride_um,
        mpp=mpp,
        tissue_only=tissue_only,
        tissue_level=tissue_level,
        min_tissue_fraction=min_tissue_fraction,
    )
    tiles.table.uns[UNS_KEY][WRITTEN_BY] = TOOL
    if copy:
        sdata = _with_elements(sdata, {key_added: tiles.shapes}, {table_key: tiles.table})
    else:
        sdata.shapes[key_added] = tiles.shapes
        sdata.tables[table_key] = tiles.table
    n_tiles = tiles.table.n_obs
    logger.info(
        "Added %d tiles of %g µm %s (%.1f %% of the grid) of image %r as %r and %r in %.1f s",
        n_tiles,
        size_um,
        "over tissue" if tissue_only else "over the whole image",
        100 * n_tiles / tiles.n_grid,
        image_key,
        key_added,
        table_key,
        time.perf_counter() - start,
    )
    return sdata if copy else None
