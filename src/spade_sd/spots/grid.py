"""A grid of patches over shapes much smaller than a patch (Visium HD bins, Xenium cells): encoding ∝ patches.

An 8 µm bin's 112 µm patch and its neighbour's, 8 µm away, overlap by 93 %: encoding one patch per shape costs time
proportional to the shapes (hundreds of thousands per slide) for features that barely differ. Instead, patches are
centred on a square grid with ``stride_um`` between centres (the patch size by default), anchored at the image's
pixel origin, and only the grid cells that hold a shape's centre are encoded; every shape takes the features of the
grid centre nearest to its own centre, which is the centre of the grid cell holding it (integer arithmetic on the
grid: no distance matrix, no tree). Anchored at the image, the grid is the same for every shapes element over it:
elements covering the same tissue (8 and 16 µm bins) encode the same patches and share their cached features.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spade_sd.config import GRID_SHAPE_FRACTION
from spade_sd.spots.bins import BINS
from spade_sd.spots.geometry import SpotGeometry, resolve_geometry
from spade_sd.spots.patches import SpotPatches
from spade_sd.utils.logging import logger
from spade_sd.utils.validation import check_bool, check_number, check_patch_geometry


class GridPatches(SpotPatches):
    """The patches of the occupied cells of a grid over shapes, and which patch each shape takes.

    A :class:`~spade_sd.spots.patches.SpotPatches` over the grid's centres: ``len()``, ``read`` and the feature cache
    see one patch per occupied grid cell; :attr:`index` spreads anything computed per patch over the shapes.

    Parameters
    ----------
    image
        The image element.
    shapes
        The resolved geometry of the shapes (bins, cells).
    size_um, size_px
        Patch geometry.
    stride_um
        µm between neighbouring grid centres, at most ``size_um`` (so that every shape lies inside its patch).

    Attributes
    ----------
    shapes
        The shapes' geometry (``geometry`` is the grid's: one centre per patch, in the same level-0 pixels; its
        ``table_rows`` name, for messages about a patch, the row of the first shape in that grid cell).
    index
        ``(n_shapes,)`` position of each shape's patch, in the order of ``shapes.table_rows``.
    stride_um
        µm between grid centres.
    """

    def __init__(
        self, image, shapes: SpotGeometry, *, size_um: float = 112.0, size_px: int = 224, stride_um: float
    ) -> None:
        stride_px = stride_um / shapes.mpp
        cells = np.floor(shapes.centers / stride_px).astype(np.int64)
        low = cells.min(axis=0)
        width = int(cells[:, 0].max() - low[0]) + 1
        # one integer per cell: unique on it is a sort of n integers, not of n rows
        flat = (cells[:, 1] - low[1]) * width + (cells[:, 0] - low[0])
        occupied, first, index = np.unique(flat, return_index=True, return_inverse=True)
        grid_cells = np.c_[occupied % width + low[0], occupied // width + low[1]]
        grid = dataclasses.replace(
            shapes,
            table_rows=shapes.table_rows[first],
            centers=(grid_cells + 0.5) * stride_px,
            radius=np.full(len(occupied), stride_px / 2),
            kind=BINS,
            size_px=stride_px,
        )
        super().__init__(image, grid, size_um=size_um, size_px=size_px)
        self.shapes, self.index, self.stride_um = shapes, index.reshape(-1), float(stride_um)


def check_grid_options(grid, stride_um) -> None:
    """Refuse a ``grid`` that is not ``None``/``True``/``False`` and a ``stride_um`` that is no positive µm.

    ``stride_um`` against the patch size is checked by :func:`check_stride` once that size is known.
    """
    if grid is not None:
        check_bool("grid", grid)
    if stride_um is None:
        return
    check_number("stride_um", stride_um, minimum=0, exclusive_minimum=True, unit="µm")
    if grid is False:
        raise ValueError(
            f"stride_um={stride_um!r} spaces the patch grid, but grid=False encodes one patch per shape; pass "
            "grid=None (or True) to use the grid, or leave stride_um unset."
        )


def check_stride(stride_um: float | None, size_um: float) -> None:
    """Refuse a grid stride above the patch side: shapes between patches would lie outside every patch."""
    if stride_um is not None and stride_um > size_um:
        raise ValueError(
            f"stride_um={stride_um:g} µm exceeds the patch side of {size_um:g} µm: a shape near the corner of a grid "
            f"cell would lie outside the patch it takes. Pass stride_um ≤ {size_um:g} (None: the patch side; "
            "smaller strides encode more, closer patches)."
        )


def uses_grid(shapes: SpotGeometry, size_um: float, grid: bool | None, stride_um: float | None) -> bool:
    """Whether shapes take the features of the nearest grid patch.

    ``grid=True`` or a given ``stride_um`` asks for it; ``grid=False`` refuses it; ``None`` uses it for shapes
    smaller than ``GRID_SHAPE_FRACTION`` of the patch side (:data:`spade_sd.config.GRID_SHAPE_FRACTION`).
    """
    if grid is not None:
        return grid
    if stride_um is not None:
        return True
    size_um_shapes = shapes.size_px * shapes.mpp
    return bool(np.isfinite(size_um_shapes) and size_um_shapes < GRID_SHAPE_FRACTION * size_um)


def shape_patches(
    image,
    shapes: SpotGeometry,
    *,
    size_um: float = 112.0,
    size_px: int = 224,
    grid: bool | None = None,
    stride_um: float | None = None,
    min_patches: int = 0,
) -> SpotPatches:
    """The patches to encode for ``shapes``: one per shape, or a :class:`GridPatches` (logged, one line).

    Parameters
    ----------
    image
        The image element.
    shapes
        The shapes' resolved geometry.
    size_um, size_px
        Patch geometry.
    grid, stride_um
        As :func:`uses_grid` decides; ``stride_um`` defaults to ``size_um``. Checked here too (a stride above
        ``size_um`` is an error), before any patch is read.
    min_patches
        The fewest patches the caller can use (per-slide feature statistics need some): a grid with fewer falls
        back to one patch per shape (logged) when it was not asked for, and is returned as it is when it was.
    """
    check_grid_options(grid, stride_um)
    check_stride(stride_um, size_um)
    if not uses_grid(shapes, size_um, grid, stride_um):
        return SpotPatches(image, shapes, size_um=size_um, size_px=size_px)
    asked = grid is not None or stride_um is not None
    stride_um = size_um if stride_um is None else float(stride_um)
    patches = GridPatches(image, shapes, size_um=size_um, size_px=size_px, stride_um=stride_um)
    if len(patches) < min_patches and not asked:
        logger.info(
            "A grid over the %d %s of %r holds %d patches, fewer than the %d needed: encoding one patch per shape",
            shapes.n_spots,
            shapes.kind,
            shapes.shapes_key,
            len(patches),
            min_patches,
        )
        return SpotPatches(image, shapes, size_um=size_um, size_px=size_px)
    logger.info(
        "%d %s of %r take the features of the nearest of %d patches (%g µm, on a grid %g µm apart); grid=False "
        "encodes one patch per shape",
        shapes.n_spots,
        shapes.kind,
        shapes.shapes_key,
        len(patches),
        size_um,
        stride_um,
    )
    return patches


def resolve_shape_patches(
    sdata,
    *,
    size_um: float = 112.0,
    size_px: int = 224,
    mpp: float | None = None,
    grid: bool | None = None,
    stride_um: float | None = None,
    **elements: str | None,
) -> tuple[SpotGeometry, SpotPatches]:
    """The shapes' geometry and the lazy patches to encode for them (:func:`shape_patches`); nothing is read yet.

    Parameters
    ----------
    sdata
        SpatialData holding an H&E image, shapes and a table annotating them.
    size_um, size_px, mpp, **elements
        As :func:`~spade_sd.spots.patches.resolve_patches`.
    grid, stride_um
        As :func:`shape_patches`.

    Returns
    -------
    The shapes' :class:`~spade_sd.spots.geometry.SpotGeometry` and their patches: a :class:`GridPatches` (whose
    ``index`` maps the shapes to its patches) or one patch per shape.
    """
    size_um, size_px = check_patch_geometry(size_um, size_px)
    check_grid_options(grid, stride_um)
    check_stride(stride_um, size_um)
    geometry = resolve_geometry(sdata, mpp=mpp, **elements)
    image = sdata.images[geometry.image_key]
    patches = shape_patches(image, geometry, size_um=size_um, size_px=size_px, grid=grid, stride_um=stride_um)
    return geometry, patches


def per_shape(patches: SpotPatches, values: np.ndarray) -> np.ndarray:
    """``values`` computed per patch (rows), spread over the shapes: each shape's patch's row."""
    return values[patches.index] if isinstance(patches, GridPatches) else values
