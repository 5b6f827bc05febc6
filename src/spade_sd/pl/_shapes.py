"""Shapes over the H&E as what they are: spots as circles, bins as squares, cells as their polygons.

Every spatial ``sd.pl`` plot draws through :func:`draw_shapes`. spatialdata-plot (``render_images`` +
``render_shapes``) draws the same shapes; we keep our own renderer because, measured in one run on 2 CPU cores
(``benchmarks/plots.py``, ``benchmarks/results/plots.md``), it is faster on 500,000 Visium HD bins (12.8 s against
34.3 s with ``method="datashader"``), and on 100,000 Xenium cells, where spatialdata-plot is faster (3.1 s against
6.3 s), its figure of a rotated H&E showed seams of mismatched colour where ours draws every cell in the H&E's
pixel frame. It also reads only the window shown, from the coarsest pyramid level that still fills the panel, where
spatialdata-plot reads the whole image level it draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from matplotlib.axes import Axes
from matplotlib.collections import EllipseCollection, PolyCollection
from spatialdata import SpatialData

from spade_sd.spots.bins import BINS, SPOTS, bin_name_size
from spade_sd.spots.geometry import SpotGeometry, image_levels, pixels_from_shapes

# Above this many shapes a panel is an image of them at the panel's resolution: matplotlib builds and draws a
# PolyCollection at about 13 µs a square (6.5 s for 500,000), and a vector PDF of them would be hundreds of MB.
RASTER_ABOVE = 50_000
# Margin around the shapes, as a share of their extent: the view frames the tissue, not the whole scan (mostly glass)
MARGIN = 0.05

CIRCLES, SQUARES, POLYGONS = "circles", "squares", "polygons"


@dataclass(frozen=True)
class Outlines:
    """The shapes of a :class:`~spade_sd.spots.geometry.SpotGeometry` in level-0 pixels, in its order.

    ``form`` is how they are drawn: ``"circles"`` (``centers`` and ``radius``), ``"squares"`` or ``"polygons"``
    (``polygons``: shapely polygons, or multipolygons, in level-0 pixels).
    """

    form: str
    centers: np.ndarray
    radius: np.ndarray
    polygons: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.centers)

    def subset(self, rows: np.ndarray) -> Outlines:
        """The outlines of ``rows`` (a boolean mask or positions)."""
        polygons = None if self.polygons is None else self.polygons[rows]
        return Outlines(self.form, self.centers[rows], self.radius[rows], polygons)


def outlines(sdata: SpatialData, geometry: SpotGeometry) -> Outlines:
    """The shapes the geometry resolved, as they are drawn: spots as circles, bins as squares, cells as polygons.

    Visium HD bins stored as circles (spatialdata-io's ``bins_as_squares=False``) are drawn as the squares they are;
    round polygons of one size (spots) as their circles; cells stored as circles (Xenium's ``cell_circles``) as
    circles of their own radius.
    """
    table = sdata.tables[geometry.table_key]
    instance_key = table.uns["spatialdata_attrs"]["instance_key"]
    instances = table.obs[instance_key].to_numpy()[geometry.table_rows]
    shapes = sdata.shapes[geometry.shapes_key].loc[instances]
    squares = geometry.kind == BINS or bin_name_size(geometry.shapes_key) is not None
    points = (shapes.geometry.geom_type == "Point").all()
    if not squares and (points or geometry.kind == SPOTS):
        return Outlines(CIRCLES, geometry.centers, geometry.radius)
    polygons = np.asarray(shapes.geometry.values, dtype=object)
    if points:  # bins stored as circles: the square each circle is inscribed in
        radius = shapes["radius"].to_numpy(float)
        x, y = shapely.get_x(polygons), shapely.get_y(polygons)
        polygons = shapely.box(x - radius, y - radius, x + radius, y + radius)
    to_pixels = pixels_from_shapes(sdata, geometry.image_key, geometry.shapes_key, geometry.coordinate_system)
    polygons = shapely.transform(polygons, lambda xy: xy @ to_pixels[:2, :2].T + to_pixels[:2, 2])
    return Outlines(SQUARES if squares else POLYGONS, geometry.centers, geometry.radius, polygons)


def draw_shapes(
    ax: Axes,
    sdata: SpatialData,
    geometry: SpotGeometry,
    colors: np.ndarray,
    known: np.ndarray,
    alpha: float,
    *,
    raster_above: int = RASTER_ABOVE,
) -> None:
    """The H&E, framed on the shapes, with the ``known`` shapes drawn over it in ``colors``.

    Parameters
    ----------
    ax
        The panel.
    sdata, geometry
        The slide and its resolved elements.
    colors
        ``(known.sum(), 4)`` RGBA colours, one per known shape in the geometry's order.
    known
        Which shapes to draw (the others, e.g. without a label, leave the H&E visible).
    alpha
        Opacity of the shapes, so that the tissue shows through.
    raster_above
        More shapes than this are drawn as one image at the panel's resolution (:data:`RASTER_ABOVE`).
    """
    shapes = outlines(sdata, geometry)
    bounds = _frame(shapes, geometry.level_shapes[0])
    _draw_image(ax, sdata, geometry, bounds)
    shown = shapes.subset(np.asarray(known, dtype=bool))
    colors = np.asarray(colors, dtype=float).reshape(len(shown), 4)
    if len(shown) > raster_above:
        _draw_raster(ax, shown, colors, bounds, alpha)
    elif len(shown):
        _draw_vectors(ax, shown, colors, alpha)
    x0, x1, y0, y1 = bounds  # set last: imshow widens the view to its image
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # image rows grow downwards
    ax.set_aspect("equal")
    ax.set_axis_off()


def _frame(shapes: Outlines, image_shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(x0, x1, y0, y1)`` in level-0 pixels: the shapes and a margin, within the image."""
    low, high = shapes.centers.min(axis=0), shapes.centers.max(axis=0)
    margin = MARGIN * float((high - low).max()) + 2 * float(shapes.radius.max())
    height, width = image_shape
    return (
        max(low[0] - margin, 0.0),
        min(high[0] + margin, float(width)),
        max(low[1] - margin, 0.0),
        min(high[1] + margin, float(height)),
    )


def _panel_pixels(ax: Axes) -> tuple[float, float]:
    box = ax.get_window_extent()
    return max(box.width, 1.0), max(box.height, 1.0)


def _draw_image(ax: Axes, sdata: SpatialData, geometry: SpotGeometry, bounds) -> None:
    """The window of the H&E the panel shows, read from the coarsest level that still fills the panel's pixels.

    Only that window is read (a lazy slice of the pyramid level), so a whole-slide scan never loads its level 0;
    a single-level image is read with a stride instead.
    """
    levels = image_levels(sdata.images[geometry.image_key])
    x0, x1, y0, y1 = bounds
    width, height = _panel_pixels(ax)
    chosen = 0
    for i, (dx, dy) in enumerate(geometry.level_downsample):
        if (x1 - x0) / dx >= width and (y1 - y0) / dy >= height:
            chosen = i
    dx, dy = geometry.level_downsample[chosen]
    level = levels[chosen]
    stride = max(1, int(min((x1 - x0) / dx / width, (y1 - y0) / dy / height)))
    xs, xe = max(math.floor(x0 / dx), 0), min(math.ceil(x1 / dx), level.sizes["x"])
    ys, ye = max(math.floor(y0 / dy), 0), min(math.ceil(y1 / dy), level.sizes["y"])
    window = level.isel(x=slice(xs, xe, stride), y=slice(ys, ye, stride)).transpose("y", "x", "c").values
    if window.shape[-1] == 1:
        window = np.repeat(window, 3, axis=-1)
    # the window's last pixel ends where the stride's last step ends
    right, bottom = xs + window.shape[1] * stride, ys + window.shape[0] * stride
    ax.imshow(window[..., :3], extent=(xs * dx, right * dx, bottom * dy, ys * dy), interpolation="antialiased")


def _draw_vectors(ax: Axes, shapes: Outlines, colors: np.ndarray, alpha: float) -> None:
    if shapes.form == CIRCLES:
        diameters = 2 * shapes.radius
        collection = EllipseCollection(
            diameters,
            diameters,
            np.zeros(len(shapes)),
            units="xy",
            offsets=shapes.centers,
            offset_transform=ax.transData,
            facecolors=colors,
            edgecolors="none",
            alpha=alpha,
        )
    else:
        vertices, owners = _rings(shapes.polygons)
        collection = PolyCollection(vertices, facecolors=colors[owners], edgecolors="none", alpha=alpha)
    ax.add_collection(collection, autolim=False)


def _rings(polygons: np.ndarray) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray]:
    """The outer rings' vertices (not repeating the first) and the shape each belongs to (a multipolygon's parts).

    Cells' holes are left out: segmentations have none worth drawing at a slide's scale.
    """
    parts, owners = shapely.get_parts(polygons, return_index=True)
    coordinates, ring = shapely.get_coordinates(shapely.get_exterior_ring(parts), return_index=True)
    counts = np.bincount(ring, minlength=len(parts))
    keep = np.ones(len(coordinates), dtype=bool)
    keep[np.cumsum(counts) - 1] = False  # shapely's rings repeat their first vertex last
    coordinates, counts = coordinates[keep], counts - 1
    if len(counts) and (counts == counts[0]).all():  # squares: one array, PolyCollection's fast path
        return coordinates.reshape(len(counts), counts[0], 2), owners
    return np.split(coordinates, np.cumsum(counts)[:-1]), owners


def _draw_raster(ax: Axes, shapes: Outlines, colors: np.ndarray, bounds, alpha: float) -> None:
    """The shapes as one image with the panel's pixels: each pixel the mean colour of the shapes covering its centre.

    A shape smaller than a pixel (bins on a whole slide) colours the pixel holding its centre, so every shape counts
    and none is lost between pixel centres.
    """
    x0, x1, y0, y1 = bounds
    width, height = _panel_pixels(ax)
    step = max((x1 - x0) / width, (y1 - y0) / height)
    n_x, n_y = max(math.ceil((x1 - x0) / step), 1), max(math.ceil((y1 - y0) / step), 1)
    origin = np.array([x0, y0])
    limit = np.array([n_x - 1, n_y - 1])
    if shapes.form == CIRCLES:
        low, high = shapes.centers - shapes.radius[:, None], shapes.centers + shapes.radius[:, None]
    else:
        corners = shapely.bounds(shapes.polygons)
        low, high = corners[:, :2], corners[:, 2:]
    # the pixels whose centres lie in each shape's bounding box
    first = np.ceil((low - origin) / step - 0.5).astype(np.int64)
    last = np.floor((high - origin) / step - 0.5).astype(np.int64)
    centre = np.clip(np.floor((shapes.centers - origin) / step).astype(np.int64), 0, limit)
    small = (last < first).any(axis=1)
    first[small], last[small] = centre[small], centre[small]
    first, last = np.clip(first, 0, limit), np.clip(last, 0, limit)
    span = last - first + 1
    count = span[:, 0] * span[:, 1]
    owner = np.repeat(np.arange(len(shapes)), count)
    offset = np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)
    column = first[owner, 0] + offset % span[owner, 0]
    row = first[owner, 1] + offset // span[owner, 0]
    x, y = origin[0] + (column + 0.5) * step, origin[1] + (row + 0.5) * step
    if shapes.form == CIRCLES:
        inside = np.hypot(x - shapes.centers[owner, 0], y - shapes.centers[owner, 1]) <= shapes.radius[owner]
    else:
        inside = shapely.contains_xy(shapes.polygons[owner], x, y)
    inside |= small[owner]
    owner, column, row = owner[inside], column[inside], row[inside]
    # a sliver between pixel centres still colours the pixel of its centre
    missed = np.flatnonzero(np.bincount(owner, minlength=len(shapes)) == 0)
    owner = np.concatenate([owner, missed])
    column, row = np.concatenate([column, centre[missed, 0]]), np.concatenate([row, centre[missed, 1]])
    pixel = row * n_x + column
    hits = np.bincount(pixel, minlength=n_x * n_y)
    image = np.zeros((n_y * n_x, 4))
    for channel in range(3):
        image[:, channel] = np.bincount(pixel, weights=colors[owner, channel], minlength=n_x * n_y)
    image[:, :3] /= np.maximum(hits, 1)[:, None]
    image[:, 3] = np.where(hits > 0, alpha, 0.0)
    ax.imshow(
        image.reshape(n_y, n_x, 4),
        extent=(x0, x0 + n_x * step, y0 + n_y * step, y0),
        interpolation="nearest",
        zorder=2,
    )


def palette(table, key: str, categories: list[str]) -> dict[str, str]:
    """A colour per category: the table's ``uns[f"{key}_colors"]`` (scanpy's), else scanpy's default palettes."""
    stored = table.uns.get(f"{key}_colors")
    if stored is not None and len(stored) >= len(categories):
        return dict(zip(categories, stored, strict=False))
    from scanpy.plotting.palettes import default_20, default_102

    colors = default_20 if len(categories) <= 20 else default_102
    return {c: colors[i % len(colors)] for i, c in enumerate(categories)}


def draw_categories(
    ax: Axes, sdata: SpatialData, geometry: SpotGeometry, labels, colors: dict[str, str], alpha: float
) -> None:
    """The shapes coloured by a categorical ``labels`` series (in the geometry's order); unlabelled ones left out."""
    from matplotlib.colors import to_rgba_array

    labels = labels.astype("category")
    codes = labels.cat.codes.to_numpy()
    known = codes >= 0
    # each category's colour by its code: no per-shape strings at 500,000 shapes
    lookup = to_rgba_array([colors[str(c)] for c in labels.cat.categories])
    draw_shapes(ax, sdata, geometry, lookup[codes[known]], known, alpha)


def legend(ax: Axes, colors: dict[str, str], title: str) -> None:
    """A legend of the categories beside the panel."""
    from matplotlib.patches import Patch

    handles = [Patch(color=color, label=category) for category, color in colors.items()]
    ax.legend(handles=handles, title=title, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def slide_names(geometries: list[SpotGeometry]) -> list[str]:
    """A name for each slide's panel: its image, numbered when slides share an image name."""
    names = [g.image_key for g in geometries]
    if len(set(names)) == len(names):
        return names
    return [f"{i + 1}. {name}" for i, name in enumerate(names)]
