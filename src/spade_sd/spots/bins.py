"""Spots, square bins and segmented cells: what a shapes element holds, and the µm its recorded metadata gives.

A spot diameter measures spots only: circles (or round polygons) of one size. Visium HD's bins are squares of one
size, measured by their side in µm, which spatialdata-io's ``visium_hd`` reader writes into the element names
(``{dataset_id}_square_008um`` and the table ``square_008um``) and :func:`spade_sd.pp.aggregate` records in its
table. Cells (polygons or circles of varied size) have no size to measure the image by: their scale comes from
shapes known to be in µm, as spatialdata-io's ``xenium`` reader writes them, or from bins in the same coordinate
system.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
import shapely
from geopandas import GeoSeries

from spade_sd.utils.constants import (
    BIN_SIZE_UM,
    READER_ATTR,
    UNS_KEY,
    VISIUM_HD_BIN_NAME,
    XENIUM_CELL_SHAPES,
    XENIUM_OBS,
)
from spade_sd.utils.validation import check_number

SPOTS, BINS, CELLS = "spots", "bins", "cells"
NOUNS = {SPOTS: "circles", BINS: "squares", CELLS: "cells"}
# Shapes of one size: the largest at most this much larger than the smallest. Spots and bins are drawn at one size
# (exactly, by their readers); segmented cells vary several-fold.
ONE_SIZE = 0.05
# Sides and diagonals of a square agree to this fraction (bins are exact squares; a float32 round trip is ~1e-7).
SQUARE_TOLERANCE = 1e-3
# 4πA/P² of a polygon that stands for a circle: a regular octagon has 0.948, a hexagon 0.907, a square 0.785.
ROUND = 0.94
# Xenium's cell_area (from its segmentation mask) and the area of its simplified boundary polygon agree within a few
# tens of percent; read in another unit (e.g. the 0.2125 µm morphology pixels) they differ more than 20-fold.
AREA_AGREEMENT = 2.0
_BIN_NAME = re.compile(VISIUM_HD_BIN_NAME)


def _one_size(values: np.ndarray) -> bool:
    values = values[np.isfinite(values)]
    return len(values) > 0 and values.min() > 0 and values.max() <= (1 + ONE_SIZE) * values.min()


def _square_sides(geometry: np.ndarray) -> np.ndarray | None:
    """Each polygon's side when every one is a square (four corners, equal sides and diagonals), else ``None``."""
    if not (shapely.get_type_id(geometry) == 3).all():  # 3: Polygon
        return None
    if (shapely.get_num_interior_rings(geometry) > 0).any() or (shapely.get_num_coordinates(geometry) != 5).any():
        return None
    corners = shapely.get_coordinates(geometry).reshape(-1, 5, 2)[:, :4]
    sides = np.linalg.norm(np.diff(corners, axis=1, append=corners[:, :1]), axis=2)
    diagonals = np.linalg.norm(corners[:, 2:] - corners[:, :2], axis=2)
    side = sides.mean(axis=1)
    square = (np.abs(sides - side[:, None]) <= SQUARE_TOLERANCE * side[:, None]).all(axis=1) & (
        np.abs(diagonals - side[:, None] * np.sqrt(2)) <= SQUARE_TOLERANCE * side[:, None]
    ).all(axis=1)
    return side if square.all() else None


def shape_kind(geometry: GeoSeries, radius: np.ndarray, circles: bool) -> tuple[str, float]:
    """What the shapes are, and their typical size in their own units.

    Parameters
    ----------
    geometry
        The shapes' geometries.
    radius
        Their radius (circles) or the radius of the circle of equal area (polygons), in their own units.
    circles
        Whether they are circles (points with a radius).

    Returns
    -------
    ``(kind, size)``: :data:`SPOTS` (circles, or round polygons, of one size; size: the diameter), :data:`BINS`
    (squares of one size; size: the side) or :data:`CELLS` (anything else; size: the median diameter of equal area).
    """
    diameter = 2 * float(np.median(radius))
    if circles:
        return (SPOTS if _one_size(radius) else CELLS), diameter
    polygons = np.asarray(geometry.values, dtype=object)
    sides = _square_sides(polygons)
    if sides is not None and _one_size(sides):
        return BINS, float(np.median(sides))
    roundness = 4 * np.pi * shapely.area(polygons) / np.maximum(shapely.length(polygons), 1e-300) ** 2
    if _one_size(radius) and (roundness >= ROUND).all():
        return SPOTS, diameter
    return CELLS, diameter


def bin_size_um(meta: Mapping, names: Iterable[str]) -> tuple[float | None, str]:
    """The side in µm of square bins: recorded in ``uns['spade_sd']``, or in a Visium HD element name.

    Parameters
    ----------
    meta
        The table's ``uns['spade_sd']``.
    names
        The names of the shapes and of the table (spatialdata-io's ``visium_hd`` writes the size into both).

    Returns
    -------
    The side and where it comes from, else ``(None, "")``.
    """
    if BIN_SIZE_UM in meta:
        field = f"the table's uns[{UNS_KEY!r}][{BIN_SIZE_UM!r}]"
        return check_number(field, meta[BIN_SIZE_UM], minimum=0, exclusive_minimum=True, unit="µm"), field
    for name in names:
        if (size := bin_name_size(name)) is not None:
            return size, f"the Visium HD bin size in the element name {name!r}"
    return None, ""


def units_in_um(obs: pd.DataFrame, areas: np.ndarray, shapes_key: str, reader: str | None) -> str:
    """Why the shapes' own coordinates are in µm, as spatialdata-io's ``xenium`` reader writes cells; else ``""``.

    Parameters
    ----------
    obs
        The table's rows for the shapes, in the order of ``areas``.
    areas
        The shapes' areas in their own units.
    shapes_key
        The shapes' name.
    reader
        The reader spatialdata-io recorded in ``SpatialData.attrs``, if any.
    """
    if reader == "xenium" and shapes_key in XENIUM_CELL_SHAPES:
        return f"spatialdata-io's xenium reader, whose {shapes_key!r} are in µm"
    if not all(name in obs for name in XENIUM_OBS):
        return ""
    cell_area = pd.to_numeric(obs[XENIUM_OBS[1]], errors="coerce").to_numpy(float)
    known = np.isfinite(cell_area) & (cell_area > 0) & np.isfinite(areas) & (areas > 0)
    if not known.any():
        return ""
    ratio = float(np.median(areas[known] / cell_area[known]))
    if 1 / AREA_AGREEMENT <= ratio <= AREA_AGREEMENT:
        return f"Xenium's cell areas in µm² (obs[{XENIUM_OBS[1]!r}]), which the shapes' own areas match"
    return ""


def bin_name_size(name: str) -> float | None:
    """The bin side in µm that a Visium HD element name states, else ``None``."""
    match = _BIN_NAME.search(name)
    return float(match.group(1)) if match is not None and float(match.group(1)) > 0 else None


def reader_of(attrs: Mapping) -> str | None:
    """The spatialdata-io reader recorded in ``SpatialData.attrs``, if any."""
    reader = attrs.get(READER_ATTR)
    return reader if isinstance(reader, str) else None
