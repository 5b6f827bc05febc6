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

from spade_sd.utils.constants import DERIVED_FROM, MPP, SPOT_DIAMETER_UM, SPOT_DIAMETERS_UM, TECHNOLOGY, UNS_KEY
from spade_sd.utils.validation import check_mpp, check_number


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


def choose_element(kind: str, candidates: list[str], argument: str, why: str) -> str:
    """The only candidate element, else an error listing the candidates and the argument that chooses one."""
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"No {kind} fits: {why}.")
    raise ValueError(f"Several {kind} could be meant: {sorted(candidates)}; pass {argument}= to choose one ({why}).")


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
        own = [n for n in candidates if DERIVED_FROM not in sdata.tables[n].uns.get(UNS_KEY, {})]
        # a table of predictions annotates the same spots as their own table, which is the one meant by default
        table_key = choose_element("tables", own or candidates, "table_key", f"tables annotating {shapes_key!r}")
    elif shapes_key not in annotating[table_key]:
        raise ValueError(
            f"Table {table_key!r} does not annotate shapes {shapes_key!r}; it annotates {annotating[table_key]}."
        )

    shapes_systems = coordinate_systems(sdata.shapes[shapes_key])
    if image_key is None:
        sharing = [name for name in sdata.images if coordinate_systems(sdata.images[name]) & shapes_systems]
        why = f"images sharing a coordinate system with shapes {shapes_key!r} ({sorted(shapes_systems)})"
        image_key = choose_element("images", sharing, "image_key", why)
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


def pyramid_downsample(
    levels: list[DataArray], coordinate_system: str, to_level0: np.ndarray
) -> tuple[tuple[float, float], ...]:
    """Level-0 pixels per pixel ``(x, y)`` of each pyramid level, through the levels' transformations."""
    factors = []
    for level in levels:
        linear = (to_level0 @ affine_to(level, coordinate_system))[:2, :2]
        # Odd sizes make a level's x and y factors differ slightly (9911 → 4955 px is 2.0002); anything else is
        # a rotated or sheared level, which a square patch window cannot follow.
        if not np.allclose(linear, np.diag(np.diag(linear)), atol=1e-9) or not np.isclose(
            linear[0, 0], linear[1, 1], rtol=1e-2
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


def _centers_and_radius(shapes, instances: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    shapes = shapes.loc[instances]
    geometry = shapes.geometry
    if (geometry.geom_type == "Point").all():
        if "radius" not in shapes:
            raise ValueError("Point shapes need a 'radius' column to be spots (circles).")
        return np.c_[geometry.x, geometry.y], shapes["radius"].to_numpy(float)
    centroids = geometry.centroid
    return np.c_[centroids.x, centroids.y], np.sqrt(geometry.area.to_numpy(float) / np.pi)


def _known_spot_diameter(table: AnnData) -> tuple[float | None, str]:
    meta = table.uns.get(UNS_KEY, {})
    if SPOT_DIAMETER_UM in meta:
        field = f"the table's uns[{UNS_KEY!r}][{SPOT_DIAMETER_UM!r}]"
        return check_number(field, meta[SPOT_DIAMETER_UM], minimum=0, exclusive_minimum=True, unit="µm"), field
    technology = meta.get(TECHNOLOGY)
    if technology is None and "spatial" in table.uns:
        libraries = table.uns["spatial"].values()
        if any("spot_diameter_fullres" in lib.get("scalefactors", {}) for lib in libraries):
            technology = "Visium"  # Space Ranger's scalefactors, as spatialdata-io and scanpy read them
    if technology in SPOT_DIAMETERS_UM:
        return SPOT_DIAMETERS_UM[technology], f"the {technology} spot diameter"
    return None, ""


def _resolve_mpp(mpp: float | None, table: AnnData, radius: np.ndarray, table_key: str) -> tuple[float, str]:
    if mpp is not None:
        return check_mpp("mpp", mpp), "the mpp argument"
    meta = table.uns.get(UNS_KEY, {})
    if MPP in meta:
        field = f"the table's uns[{UNS_KEY!r}][{MPP!r}]"
        return check_mpp(field, meta[MPP]), field
    diameter, source = _known_spot_diameter(table)
    if diameter is not None:
        if not np.isfinite(radius).all() or (radius <= 0).any():
            raise ValueError(f"Spots of table {table_key!r} need positive radii to derive µm per pixel from {source}.")
        derived = diameter / (2 * float(np.median(radius)))
        return check_mpp(f"the µm per pixel derived from {source} and the circles' radius", derived), (
            f"{source} and the circles' radius"
        )
    raise ValueError(
        f"The physical scale is unknown: table {table_key!r} records no spot diameter or technology "
        f"(uns[{UNS_KEY!r}] has {sorted(meta)}), and no mpp was given. Pass mpp= (µm per pixel of the image's "
        f"full-resolution level), or set uns[{UNS_KEY!r}] = {{{SPOT_DIAMETER_UM!r}: ...}} on the table "
        f"(known technologies: {SPOT_DIAMETERS_UM})."
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
        µm per pixel of the image's full-resolution level; inferred from the table's metadata or the spot
        diameter of a known technology when not given.
    require_scale
        Whether an unknown scale is an error; otherwise ``mpp`` is NaN (for plots, which need no physical scale).

    Returns
    -------
    The resolved :class:`SpotGeometry`. Spots whose center lies outside the image are an error.
    """
    image_key, shapes_key, table_key, system = resolve_elements(
        sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key
    )
    levels = image_levels(sdata.images[image_key])
    to_level0 = np.linalg.inv(affine_to(levels[0], system))
    shapes = sdata.shapes[shapes_key]
    shapes_to_pixels = to_level0 @ affine_to(shapes, system)

    rows, instances = _spot_table(sdata, shapes_key, table_key)
    if len(rows) == 0:
        raise ValueError(f"Table {table_key!r} has no rows for shapes {shapes_key!r}.")
    centers, radius = _centers_and_radius(shapes, instances)
    centers = _apply(shapes_to_pixels, centers)
    radius = radius * np.sqrt(abs(np.linalg.det(shapes_to_pixels[:2, :2])))

    height, width = levels[0].sizes["y"], levels[0].sizes["x"]
    outside = (centers[:, 0] < 0) | (centers[:, 1] < 0) | (centers[:, 0] >= width) | (centers[:, 1] >= height)
    if outside.any():
        raise ValueError(
            f"{outside.sum()} of {len(centers)} spots of {shapes_key!r} lie outside image {image_key!r} "
            f"({width} × {height} px in coordinate system {system!r}), e.g. spots {instances[outside][:5].tolist()} "
            f"at pixels {np.round(centers[outside][:3], 1).tolist()}; check the transformations or the image_key."
        )
    try:
        value, source = _resolve_mpp(mpp, sdata.tables[table_key], radius, table_key)
    except ValueError:
        if require_scale:
            raise
        value, source = float("nan"), "unknown"
    return SpotGeometry(
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
        coordinate_system=system,
        table_rows=rows,
        centers=centers,
        radius=radius,
        mpp=value,
        mpp_source=source,
        level_shapes=tuple((lv.sizes["y"], lv.sizes["x"]) for lv in levels),
        level_downsample=pyramid_downsample(levels, system, to_level0),
    )
