"""Which elements are meant, and where each spot lies in the image's pixels, at every pyramid level, in µm.

Everything here goes through spatialdata's transformations: spot centers are mapped from the shapes' coordinates
to a coordinate system shared with the image, then into the pixels of each pyramid level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.transformations import get_transformation
from xarray import DataArray, DataTree

from spade_sd.spots.bins import (
    BINS,
    CELLS,
    NOUNS,
    SPOTS,
    bin_name_size,
    bin_size_um,
    reader_of,
    shape_kind,
    units_in_um,
)
from spade_sd.utils.constants import (
    BIN_SIZE_UM,
    DERIVED_FROM,
    MPP,
    SPOT_DIAMETER_UM,
    SPOT_DIAMETERS_UM,
    TECHNOLOGY,
    UNS_KEY,
    VISIUM_OBS,
)
from spade_sd.utils.validation import check_mpp, check_number

# Visium's 55 µm spots lie 100 µm apart along a row of its hexagonal grid, where array_col steps by 2 per spot;
# rows are √3/2 of that apart. Hence the µm per step of array_col and of array_row.
VISIUM_PITCH_UM = 100.0
_VISIUM_STEP_UM = (VISIUM_PITCH_UM / 2, VISIUM_PITCH_UM * np.sqrt(3) / 2)
# Spots whose distances to each other measure a Visium grid's pitch (all pairs among them)
_GRID_SPOTS = 256
# Diameters (µm) of the circles Visium tables carry: the 55 µm spot, or Space Ranger's 65 µm spot_diameter_fullres
VISIUM_CIRCLES_UM = (55.0, 65.0)
# A scale (given, or a grid's) may make the spots this much larger or smaller than their technology's spot size, and
# no more: a fitted scale or a drawn radius is off by a few percent, a wrong image level by a factor of 3 or more.
SCALE_AGREEMENT = 0.2
# Spots centred less than this many level-0 pixels past the image's edge are read (padded with white):
# spatialdata.bounding_box_query crops an image to whole pixels but keeps every spot centred in the box.
EDGE_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class SpotGeometry:
    """The resolved (image, shapes, table) triple and every spot's position in the image's pixels.

    Attributes
    ----------
    image_key, shapes_key, table_key, coordinate_system
        The elements used and the coordinate system they share.
    table_rows
        Positions in the table of the rows annotating ``shapes_key``; ``centers`` and ``radius`` follow this order.
    centers
        ``(n, 2)`` spot centers ``(x, y)`` in full-resolution (level-0) pixels.
    radius
        ``(n,)`` spot radius in level-0 pixels (for polygons: the radius of the circle of equal area).
    mpp
        µm per level-0 pixel, and ``mpp_source`` says where it came from.
    level_shapes
        ``(height, width)`` of each pyramid level.
    level_downsample
        Level-0 pixels per pixel of each level, ``(x, y)``.
    kind, size_px
        What the shapes are (``"spots"``: circles or round polygons of one size; ``"bins"``: squares of one size;
        ``"cells"``: anything else) and their size in level-0 pixels (diameter, side, or median diameter of equal
        area).
    """

    image_key: str
    shapes_key: str
    table_key: str
    coordinate_system: str
    table_rows: np.ndarray
    centers: np.ndarray
    radius: np.ndarray
    mpp: float
    mpp_source: str
    level_shapes: tuple[tuple[int, int], ...]
    level_downsample: tuple[tuple[float, float], ...]
    kind: str = SPOTS
    size_px: float = float("nan")

    @property
    def n_spots(self) -> int:
        """Number of spots."""
        return len(self.centers)

    def centers_at(self, level: int) -> np.ndarray:
        """Spot centers ``(x, y)`` in the continuous pixel coordinates of pyramid ``level`` (pixel k spans [k, k+1))."""
        return self.centers / np.asarray(self.level_downsample[level])


def image_levels(image: DataArray | DataTree) -> list[DataArray]:
    """The pyramid levels of an image element, finest first (a single-scale image is one level)."""
    if isinstance(image, DataTree):
        return [next(iter(image[name].values())) for name in image]
    return [image]


def _available(kind: str, names: list[str]) -> str:
    return f"available {kind}: {sorted(names)}" if names else f"this SpatialData has no {kind}"


_ELEMENT_KINDS = ("images", "labels", "points", "shapes", "tables")
_SPOTS_AS_SHAPES = (
    "spade_sd reads spots from shapes: circles (points with a 'radius' column) or polygons. Make them with "
    "spatialdata.models.ShapesModel.parse, e.g. from cell centers with a radius"
)


def _element_kind(sdata: SpatialData, name: str) -> str | None:
    return next((kind for kind in _ELEMENT_KINDS if name in getattr(sdata, kind)), None)


def check_element_key(sdata: SpatialData, kind: str, key: str | None) -> None:
    """Refuse a ``key`` that names no element of ``kind`` (``"images"``, ``"shapes"``, ...), saying what it is."""
    if key is not None and not isinstance(key, str):
        raise TypeError(f"{kind[:-1]}_key must be a string naming one of the {kind}; found {key!r}.")
    names = list(getattr(sdata, kind))
    if key is not None and key not in names:
        other = _element_kind(sdata, key)
        if other is not None:
            hint = f" {_SPOTS_AS_SHAPES}." if kind == "shapes" and other in ("points", "labels") else ""
            raise ValueError(f"{key!r} is a {other[:-1]} element, not {kind}; {_available(kind, names)}.{hint}")
        raise KeyError(f"{kind[:-1]} {key!r} is not in the SpatialData; {_available(kind, names)}.")


def annotated_regions(table: AnnData) -> list[str]:
    """The element names a table annotates (its ``spatialdata_attrs`` region)."""
    attrs = table.uns.get("spatialdata_attrs", {})
    region = attrs.get("region", [])
    return [region] if isinstance(region, str) else list(region)


def _what_tables_annotate(sdata: SpatialData, tables: list[str]) -> str:
    if not tables:
        return "this SpatialData has no tables"
    described = []
    for name in tables:
        regions = annotated_regions(sdata.tables[name])
        kinds = [
            f"{kind[:-1]} {region!r}" if (kind := _element_kind(sdata, region)) else f"{region!r} (not in it)"
            for region in regions
        ]
        described.append(f"table {name!r} annotates {', '.join(kinds) if kinds else 'nothing'}")
    return "; ".join(described)


def coordinate_systems(element) -> set[str]:
    """The coordinate systems an element has a transformation to."""
    return set(get_transformation(element, get_all=True))


def choose_element(kind: str, candidates: list[str], argument: str, why: str, *, fix: str = "") -> str:
    """The only candidate element, else an error listing the candidates and the argument that chooses one.

    ``fix`` says what to do when there is no candidate at all (a sentence added to that error).
    """
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"No {kind} fits: {why}.{' ' + fix if fix else ''}")
    raise ValueError(f"Several {kind} could be meant: {sorted(candidates)}; pass {argument}= to choose one ({why}).")


def _no_table_fix(shapes_key: str) -> str:
    return (
        f"spade_sd reads each spot's expression from a table annotating its shapes: make one with "
        f"TableModel.parse(AnnData(X=<counts>, obs=<region and instance columns>), region={shapes_key!r}, "
        "region_key=..., instance_key=...) and add it to sdata.tables. For an H&E image without expression (e.g. "
        "image patches made for segmentation), sd.pp.tile_image(sdata) tiles the tissue and makes the tiles' table."
    )


def _no_image_fix(sdata: SpatialData, shapes_systems: set[str]) -> str:
    if not sdata.images:
        return (
            f"This SpatialData has no images: add the H&E image under the spots (Image2DModel.parse) with a "
            f"transformation to one of {sorted(shapes_systems)}."
        )
    found = {name: sorted(coordinate_systems(image)) for name, image in sdata.images.items()}
    return (
        f"The images' coordinate systems are {found}: give the H&E image a transformation to one of "
        f"{sorted(shapes_systems)} (spatialdata.transformations.set_transformation)."
    )


def resolve_elements(
    sdata: SpatialData, *, image_key: str | None = None, shapes_key: str | None = None, table_key: str | None = None
) -> tuple[str, str, str, str]:
    """Resolve which image, shapes and table are meant, and a coordinate system shared by image and shapes.

    Parameters
    ----------
    sdata
        The SpatialData object.
    image_key, shapes_key, table_key
        Names given by the user; the others are inferred, and ambiguity is an error listing the candidates.

    Returns
    -------
    ``(image_key, shapes_key, table_key, coordinate_system)``.
    """
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a spatialdata.SpatialData, found {type(sdata).__name__}.")
    for kind, key in (("images", image_key), ("shapes", shapes_key), ("tables", table_key)):
        check_element_key(sdata, kind, key)

    tables = [table_key] if table_key is not None else list(sdata.tables)
    annotating = {name: [r for r in annotated_regions(sdata.tables[name]) if r in sdata.shapes] for name in tables}
    if table_key is not None and not annotating[table_key]:
        raise ValueError(
            f"Table {table_key!r} annotates no shapes element ({_what_tables_annotate(sdata, [table_key])}); "
            f"{_available('shapes', list(sdata.shapes))}. {_SPOTS_AS_SHAPES}, and annotate them with "
            "TableModel.parse(region=<shapes name>, ...)."
        )
    if shapes_key is None:
        annotated = sorted({r for regions in annotating.values() for r in regions})
        if not annotated:
            raise ValueError(
                f"No table annotates a shapes element ({_what_tables_annotate(sdata, tables)}); "
                f"{_available('shapes', list(sdata.shapes))}. {_SPOTS_AS_SHAPES}, and annotate them with "
                "TableModel.parse(region=<shapes name>, ...)."
            )
        shapes_key = choose_element("shapes", annotated, "shapes_key", "shapes elements annotated by a table")
    if table_key is None:
        candidates = [n for n, r in annotating.items() if shapes_key in r]
        if not candidates:
            raise ValueError(
                f"No table annotates shapes {shapes_key!r} ({_what_tables_annotate(sdata, tables)}). "
                f"{_no_table_fix(shapes_key)}"
            )
        # a table of predictions annotates the same spots as their own table, which is the one meant by default
        own = [n for n in candidates if DERIVED_FROM not in sdata.tables[n].uns.get(UNS_KEY, {})]
        table_key = choose_element("tables", own or candidates, "table_key", f"tables annotating {shapes_key!r}")
    elif shapes_key not in annotating[table_key]:
        raise ValueError(
            f"Table {table_key!r} does not annotate shapes {shapes_key!r}; it annotates {annotating[table_key]}."
        )

    shapes_systems = coordinate_systems(sdata.shapes[shapes_key])
    if image_key is None:
        sharing = [name for name in sdata.images if coordinate_systems(sdata.images[name]) & shapes_systems]
        why = f"images sharing a coordinate system with shapes {shapes_key!r} ({sorted(shapes_systems)})"
        image_key = choose_element("images", sharing, "image_key", why, fix=_no_image_fix(sdata, shapes_systems))
    image_systems = coordinate_systems(sdata.images[image_key])
    shared = sorted(image_systems & shapes_systems)
    if not shared:
        raise ValueError(
            f"Image {image_key!r} (coordinate systems {sorted(image_systems)}) and shapes {shapes_key!r} "
            f"(coordinate systems {sorted(shapes_systems)}) share no coordinate system; add a transformation "
            "to a common one with spatialdata.transformations.set_transformation."
        )
    coordinate_system = "global" if "global" in shared else shared[0]
    return image_key, shapes_key, table_key, coordinate_system


def affine_to(element, coordinate_system: str) -> np.ndarray:
    """3×3 matrix mapping the element's (x, y) to the coordinate system's (x, y)."""
    transformation = get_transformation(element, to_coordinate_system=coordinate_system)
    return np.asarray(transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def pixels_from_shapes(sdata: SpatialData, image_key: str, shapes_key: str, coordinate_system: str) -> np.ndarray:
    """3×3 matrix mapping the shapes' own (x, y) to the image's level-0 pixels, through ``coordinate_system``."""
    to_level0 = np.linalg.inv(affine_to(image_levels(sdata.images[image_key])[0], coordinate_system))
    return to_level0 @ affine_to(sdata.shapes[shapes_key], coordinate_system)


def pyramid_downsample(
    levels: list[DataArray], coordinate_system: str, to_level0: np.ndarray
) -> tuple[tuple[float, float], ...]:
    """Level-0 pixels per pixel ``(x, y)`` of each pyramid level, through the levels' transformations."""
    factors = []
    for level in levels:
        linear = (to_level0 @ affine_to(level, coordinate_system))[:2, :2]
        # Rounding a level's size makes its x and y factors differ slightly (9911 → 4955 px is 2.0002), by up to a
        # pixel per side: a 49 × 50 px crop's next level of 24 × 25 px has factors 2.04 and 2.0. Anything more is a
        # rotated, sheared or stretched level, which a square patch window cannot follow.
        rounding = 1e-2 + 1 / max(level.sizes["x"] - 1, 1) + 1 / max(level.sizes["y"] - 1, 1)
        if not np.allclose(linear, np.diag(np.diag(linear)), atol=1e-9) or not np.isclose(
            linear[0, 0], linear[1, 1], rtol=rounding
        ):
            raise ValueError(
                f"Pyramid level {level.name!r} is not an isotropic downscaling of the full-resolution level "
                f"(linear part {linear.tolist()}); spade_sd reads patches from isotropic pyramids only."
            )
        factors.append((float(linear[0, 0]), float(linear[1, 1])))
    return tuple(factors)


def _spot_table(sdata: SpatialData, shapes_key: str, table_key: str) -> tuple[np.ndarray, pd.Index]:
    """Rows of the table annotating the shapes, and the shapes index they point at."""
    table = sdata.tables[table_key]
    attrs = table.uns["spatialdata_attrs"]
    region_key, instance_key = attrs["region_key"], attrs["instance_key"]
    rows = np.flatnonzero((table.obs[region_key] == shapes_key).to_numpy())
    instances = pd.Index(table.obs[instance_key].to_numpy()[rows])
    missing = ~instances.isin(sdata.shapes[shapes_key].index)
    if missing.any():
        raise ValueError(
            f"{missing.sum()} rows of table {table_key!r} point at instances absent from shapes {shapes_key!r} "
            f"(e.g. {instances[missing][:5].tolist()}); the table's {instance_key!r} must match the shapes' index."
        )
    return rows, instances


@dataclass(frozen=True)
class _Outline:
    """Centers and radii of shapes in their own coordinates (polygons: the radius of the circle of equal area)."""

    centers: np.ndarray
    radius: np.ndarray
    circles: bool
    kind: str
    size: float


def _outline(shapes, shapes_key: str) -> _Outline:
    geometry = shapes.geometry
    if (geometry.geom_type == "Point").all():
        if "radius" not in shapes:
            raise ValueError(
                f"Shapes {shapes_key!r} are points without a 'radius' column; spots are circles (points with a "
                "radius) or polygons. Add the spots' radius in the shapes' units: shapes['radius'] = ..."
            )
        centers, radius, circles = np.c_[geometry.x, geometry.y], shapes["radius"].to_numpy(float), True
    else:
        centroids = geometry.centroid
        centers, radius, circles = (
            np.c_[centroids.x, centroids.y],
            np.sqrt(geometry.area.to_numpy(float) / np.pi),
            False,
        )
    return _Outline(centers, radius, circles, *shape_kind(geometry, radius, circles))


def linear_scale(matrix: np.ndarray) -> float:
    """Length scale of an affine map (the geometric mean of its x and y scales)."""
    return float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


# Bins read to measure a coordinate system (their first ones: all of one size)
_BINS_MEASURED = 1000


def _bins_nearby(sdata: SpatialData, shapes_key: str, system: str, to_level0: np.ndarray) -> tuple[float, str] | None:
    """µm per level-0 pixel from Visium HD bins in the same coordinate system (for the cells segmented with them)."""
    for name in sorted(sdata.shapes):
        size_um = bin_name_size(name)
        if name == shapes_key or size_um is None or system not in coordinate_systems(sdata.shapes[name]):
            continue
        bins = sdata.shapes[name].iloc[:_BINS_MEASURED]
        if not (bins.geometry.geom_type == "Point").all() or "radius" in bins:
            outline = _outline(bins, name)
            if outline.kind != CELLS:
                px = outline.size * linear_scale(to_level0 @ affine_to(sdata.shapes[name], system))
                return size_um / px, f"the {size_um:g} µm Visium HD bins {name!r} in coordinate system {system!r}"
    return None


@dataclass(frozen=True)
class _Spots:
    """What the scale is derived from and checked against: the spots of one shapes element, in level-0 pixels."""

    image_key: str
    shapes_key: str
    table_key: str
    obs: pd.DataFrame
    centers: np.ndarray
    radius: np.ndarray
    circles: bool
    kind: str
    size_px: float
    px_per_unit: float
    units_in_um: str
    bins_nearby: tuple[float, str] | None

    @property
    def diameter_px(self) -> float:
        return 2 * float(np.median(self.radius))


def _agree(a: float, b: float) -> bool:
    return max(a, b) <= (1 + SCALE_AGREEMENT) * min(a, b)


def _visium_pitch_px(spots: _Spots) -> float | None:
    """Pixels per Visium pitch (100 µm), from the spots' distances and array positions; ``None`` without a grid.

    The spots need ``obs`` columns ``array_row`` and ``array_col`` on Visium's hexagonal grid (``array_row +
    array_col`` even) and at least two positions; the distances are those among up to ``_GRID_SPOTS`` of them.
    """
    if not all(name in spots.obs for name in VISIUM_OBS[1:]):
        return None
    row, col = (pd.to_numeric(spots.obs[name], errors="coerce").to_numpy(float) for name in VISIUM_OBS[1:])
    if not np.isfinite(row + col).all() or (np.mod(row + col, 2) != 0).any():
        return None
    n = len(spots.centers)
    sample = np.unique(np.linspace(0, n - 1, min(n, _GRID_SPOTS)).round().astype(int))
    i, j = np.triu_indices(len(sample), k=1)
    a, b = sample[i], sample[j]
    um = np.hypot((col[a] - col[b]) * _VISIUM_STEP_UM[0], (row[a] - row[b]) * _VISIUM_STEP_UM[1])
    px = np.hypot(*(spots.centers[a] - spots.centers[b]).T)
    apart = um > 0
    return float(np.median(px[apart] / um[apart])) * VISIUM_PITCH_UM if apart.any() else None


def _visium_layout(spots: _Spots) -> tuple[bool, str]:
    """Whether spots that record no technology are Visium's, from the layout its readers write; else why not.

    Space Ranger's, spatialdata-io's and scanpy's Visium tables have ``obs`` columns ``in_tissue``, ``array_row``
    and ``array_col``; the spots are circles on Visium's hexagonal grid, as wide as a Visium spot on that grid's
    scale (55 µm, or the 65 µm of Space Ranger's ``spot_diameter_fullres``). Visium HD's bins (a square grid) and
    cells fail these tests.
    """
    if not all(name in spots.obs for name in VISIUM_OBS):
        return False, ""
    what = f"its obs has Visium's {', '.join(VISIUM_OBS)}"
    if not spots.circles:
        return False, f"{what}, but shapes {spots.shapes_key!r} are polygons, not Visium's circles"
    pitch = _visium_pitch_px(spots)
    if pitch is None:
        return False, f"{what}, but not as positions on Visium's hexagonal grid (array_row + array_col even)"
    across = spots.diameter_px / pitch * VISIUM_PITCH_UM
    low, high = VISIUM_CIRCLES_UM
    if not low / (1 + SCALE_AGREEMENT) <= across <= high * (1 + SCALE_AGREEMENT):
        return False, (
            f"{what} on a hexagonal grid, but its circles would be {across:.3g} µm across if the grid's pitch were "
            f"Visium's {VISIUM_PITCH_UM:g} µm (Visium's circles are {low:g} to {high:g} µm)"
        )
    return True, ""


def _space_ranger_scalefactors(table: AnnData) -> bool:
    """Whether ``uns['spatial']`` holds Space Ranger's Visium scale factors (scanpy's layout; not Visium HD's bins)."""
    libraries = table.uns.get("spatial", {}).values()
    factors = [lib.get("scalefactors", {}) for lib in libraries if isinstance(lib, dict)]
    return any("spot_diameter_fullres" in f and BIN_SIZE_UM not in f for f in factors)


def _obs_spot_diameter(spots: _Spots) -> float:
    values = pd.to_numeric(spots.obs[SPOT_DIAMETER_UM], errors="coerce").to_numpy(float)
    if not np.isfinite(values).all() or (values <= 0).any() or np.ptp(values) > 0:
        raise ValueError(
            f"Table {spots.table_key!r}'s obs[{SPOT_DIAMETER_UM!r}] must hold one positive spot diameter in µm for "
            f"the spots of shapes {spots.shapes_key!r}; found {pd.unique(values)[:5].tolist()}."
        )
    return float(values[0])


def _spot_size(table: AnnData, spots: _Spots) -> tuple[float | None, str, str]:
    """The spots' diameter in µm, where it comes from and their technology; else ``None``, why not, ``""``.

    In this order: ``uns['spade_sd']``'s spot diameter or technology (spade_sd's loaders, users), the
    ``obs[spot_diameter_um]`` column (which survives ``spatialdata.concatenate``, unlike ``uns``), then, when no
    technology is recorded, Visium recognised from Space Ranger's scale factors (scanpy's layout) or from its grid
    (spatialdata-io's ``visium`` reader, or any Visium table that lost its ``uns``).
    """
    meta = table.uns.get(UNS_KEY, {})
    technology = meta.get(TECHNOLOGY)
    if SPOT_DIAMETER_UM in meta:
        field = f"the table's uns[{UNS_KEY!r}][{SPOT_DIAMETER_UM!r}]"
        diameter = check_number(field, meta[SPOT_DIAMETER_UM], minimum=0, exclusive_minimum=True, unit="µm")
        return diameter, field, str(technology)
    if technology in SPOT_DIAMETERS_UM:
        return SPOT_DIAMETERS_UM[technology], f"the {technology} spot diameter", technology
    if SPOT_DIAMETER_UM in spots.obs:
        return _obs_spot_diameter(spots), f"the table's obs[{SPOT_DIAMETER_UM!r}]", ""
    if technology is not None:  # a technology spade_sd knows no spot size of: nothing to guess
        return None, f"its technology {technology!r} has no known spot size", ""
    visium, why_not = _visium_layout(spots)
    if visium or _space_ranger_scalefactors(table):
        return SPOT_DIAMETERS_UM["Visium"], "the Visium spot diameter (a Visium table, by its layout)", "Visium"
    return None, why_not, ""


def _scale_from_circles(table: AnnData, spots: _Spots) -> tuple[float | None, str]:
    """The µm per pixel spots of one size give and how; else ``None`` and why not.

    Visium's spots are measured by their grid, 100 µm between neighbours, whenever the table has their array
    positions: the circles spatialdata-io and scanpy draw are Space Ranger's ``spot_diameter_fullres``, a 65 µm
    spot rather than the 55 µm one (measured: 100 µm pitch / diameter = 1.54 on both scMuscle samples). Other spots
    are measured by their circles' diameter.
    """
    diameter, source, technology = _spot_size(table, spots)
    if technology == "Visium" and (pitch := _visium_pitch_px(spots)) is not None:
        return VISIUM_PITCH_UM / pitch, "Visium's 100 µm spot pitch on the spots' array_row/array_col grid"
    if diameter is None:
        return None, source
    if not np.isfinite(spots.radius).all() or (spots.radius <= 0).any():
        raise ValueError(
            f"Spots of table {spots.table_key!r} need positive radii to derive µm per pixel from {source}."
        )
    return diameter / spots.diameter_px, f"{source} and the circles' radius"


def _scale_from_spots(table: AnnData, spots: _Spots) -> tuple[float | None, str]:
    """The µm per pixel the shapes give and how; else ``None`` and why not.

    Bins (and Visium HD's bins drawn as circles) are measured by their side in µm, never by a spot diameter; cells
    by nothing of their own: their scale comes from shapes in µm (spatialdata-io's xenium layout) or from bins in
    the same coordinate system.
    """
    meta = table.uns.get(UNS_KEY, {})
    why = ""
    if spots.kind in (SPOTS, BINS):
        side_um, source = bin_size_um(meta, (spots.shapes_key, spots.table_key))
        if side_um is not None:
            return side_um / spots.size_px, f"{source} and the bins' side"
    if spots.kind == SPOTS:
        derived, why = _scale_from_circles(table, spots)
        if derived is not None:
            return derived, why
    if spots.units_in_um:
        return 1 / spots.px_per_unit, f"{spots.units_in_um}, through the transformations"
    if spots.kind == CELLS and spots.bins_nearby is not None:
        return spots.bins_nearby
    if spots.kind == BINS:
        why = (
            f"shapes {spots.shapes_key!r} are polygons: squares of one size ({spots.size_px:.3g} px a side), read "
            f"as bins, whose side in µm is recorded nowhere (uns[{UNS_KEY!r}][{BIN_SIZE_UM!r}], or a Visium HD name "
            "such as 'square_008um'); a spot diameter does not measure squares"
        )
    elif spots.kind == CELLS:
        why = (
            f"shapes {spots.shapes_key!r} are cells ({'circles' if spots.circles else 'polygons'} of varied size "
            "or shape), which no spot diameter measures, and neither Xenium's µm coordinates nor Visium HD bins "
            "in the same coordinate system were found"
        )
    return None, why


def _what_to_record(spots: _Spots) -> str:
    if spots.kind == BINS:
        return f"or record the bins' side on the table: uns[{UNS_KEY!r}] = {{{BIN_SIZE_UM!r}: ...}}"
    if spots.kind == CELLS:
        return (
            "or aggregate the cells into squares of known size (sd.pp.aggregate, which takes mpp= once and "
            "records the squares' size)"
        )
    return f"or set uns[{UNS_KEY!r}] = {{{SPOT_DIAMETER_UM!r}: ...}} on the table (known technologies: {SPOT_DIAMETERS_UM})"


def _resolve_mpp(mpp: float | None, table: AnnData, spots: _Spots) -> tuple[float, str]:
    meta = table.uns.get(UNS_KEY, {})
    derived, derived_source = _scale_from_spots(table, spots)
    if mpp is None and MPP not in meta:
        if derived is None:
            raise ValueError(
                f"The physical scale is unknown: table {spots.table_key!r} records no spot diameter, bin size or "
                f"technology (uns[{UNS_KEY!r}] has {sorted(meta)}){'; ' + derived_source if derived_source else ''}, "
                f"and no mpp was given. Pass mpp= (µm per pixel of image {spots.image_key!r}'s own full-resolution "
                f"level), {_what_to_record(spots)}."
            )
        return check_mpp(f"the µm per pixel derived from {derived_source}", derived), derived_source
    source = "the mpp argument" if mpp is not None else f"the table's uns[{UNS_KEY!r}][{MPP!r}]"
    value = check_mpp("mpp" if mpp is not None else source, mpp if mpp is not None else meta[MPP])
    if derived is not None and not _agree(value, derived):
        fix = f"pass mpp={derived:.4g}, or leave mpp out" if mpp is not None else f"correct uns[{UNS_KEY!r}][{MPP!r}]"
        raise ValueError(
            f"{source[0].upper()}{source[1:]} gives {value:.4g} µm per pixel, but the spots of shapes "
            f"{spots.shapes_key!r} give image {spots.image_key!r} {derived:.4g} µm per pixel ({derived_source}): "
            f"at {value:.4g} their {spots.size_px:.3g} px {NOUNS[spots.kind]} would be {value * spots.size_px:.3g} µm "
            f"across. mpp is the µm per pixel of the image element's own full-resolution level (its level 0; for a "
            f"Visium low-resolution PNG its own pixels, not Space Ranger's full-resolution ones): {fix}."
        )
    return value, source


def _check_inside(spots: _Spots, instances: pd.Index, level0: DataArray, system: str, mpp: float) -> None:
    """Refuse spots centred outside the image; those less than ``EDGE_TOLERANCE_PX`` past its edge are read."""
    height, width = level0.sizes["y"], level0.sizes["x"]
    x, y = spots.centers.T
    past = np.max([-x, -y, x - width, y - height, np.zeros_like(x)], axis=0)
    outside = past > EDGE_TOLERANCE_PX
    if not outside.any():
        return
    farthest = f"{past.max():.1f} px" + (f" ({past.max() * mpp:.3g} µm)" if np.isfinite(mpp) else "")
    raise ValueError(
        f"{outside.sum()} of {len(x)} spots of {spots.shapes_key!r} lie outside image {spots.image_key!r} "
        f"({width} × {height} px in coordinate system {system!r}), up to {farthest} past its edge, e.g. spots "
        f"{instances[outside][:5].tolist()} at pixels {np.round(spots.centers[outside][:3], 1).tolist()}. Check "
        "the transformations and the image_key; to keep part of a slide, crop the whole SpatialData (image, "
        "shapes and table together) with spatialdata.bounding_box_query."
    )


def resolve_geometry(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    mpp: float | None = None,
    require_scale: bool = True,
) -> SpotGeometry:
    """Resolve the elements and compute every spot's center and radius in image pixels, and the µm per pixel.

    Parameters
    ----------
    sdata
        The SpatialData object.
    image_key, shapes_key, table_key
        Element names; inferred when unambiguous.
    mpp
        µm per pixel of the image element's own full-resolution level (level 0 of its pyramid, as stored in the
        SpatialData: for spatialdata-io's Visium low-resolution image, its ~13 µm pixels, not Space Ranger's
        full-resolution ones). Inferred, when not given, from the table's metadata or the spot diameter of a known
        technology (including Visium recognised from the layout spatialdata-io and scanpy read it into). A scale
        given (or in the table's metadata) that makes spots of a known size more than ``SCALE_AGREEMENT`` larger
        or smaller is an error stating the image's actual µm per pixel.
    require_scale
        Whether an unknown scale is an error; otherwise ``mpp`` is NaN (for plots, which need no physical scale).

    Returns
    -------
    The resolved :class:`SpotGeometry`. Spots whose center lies outside the image, by more than
    ``EDGE_TOLERANCE_PX`` (a crop's rounding), are an error.
    """
    image_key, shapes_key, table_key, system = resolve_elements(
        sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key
    )
    levels = image_levels(sdata.images[image_key])
    to_level0 = np.linalg.inv(affine_to(levels[0], system))
    shapes = sdata.shapes[shapes_key]
    shapes_to_pixels = pixels_from_shapes(sdata, image_key, shapes_key, system)

    rows, instances = _spot_table(sdata, shapes_key, table_key)
    if len(rows) == 0:
        raise ValueError(f"Table {table_key!r} has no rows for shapes {shapes_key!r}.")
    outline = _outline(shapes.loc[instances], shapes_key)
    table = sdata.tables[table_key]
    obs = table.obs.iloc[rows]
    px_per_unit = linear_scale(shapes_to_pixels)
    spots = _Spots(
        image_key,
        shapes_key,
        table_key,
        obs,
        _apply(shapes_to_pixels, outline.centers),
        outline.radius * px_per_unit,
        outline.circles,
        outline.kind,
        outline.size * px_per_unit,
        px_per_unit,
        units_in_um(obs, np.pi * outline.radius**2, shapes_key, reader_of(sdata.attrs)),
        _bins_nearby(sdata, shapes_key, system, to_level0) if outline.kind == CELLS else None,
    )
    try:
        value, source = _resolve_mpp(mpp, table, spots)
    except ValueError as error:
        unknown = error
        value, source = float("nan"), "unknown"
    else:
        unknown = None
    _check_inside(spots, instances, levels[0], system, value)
    if unknown is not None and require_scale:
        raise unknown
    return SpotGeometry(
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
        coordinate_system=system,
        table_rows=rows,
        centers=spots.centers,
        radius=spots.radius,
        mpp=value,
        mpp_source=source,
        level_shapes=tuple((lv.sizes["y"], lv.sizes["x"]) for lv in levels),
        level_downsample=pyramid_downsample(levels, system, to_level0),
        kind=spots.kind,
        size_px=spots.size_px,
    )
