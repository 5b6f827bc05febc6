"""A grid of square tiles over an H&E image, and the fraction of tissue under each tile.

Tiles are boxes in the image's full-resolution (level-0) pixels that carry the image's own transformations, so they
share every coordinate system of the image. Their table records the µm per pixel, which makes the tiles spots that
:func:`spade_sd.pp.spot_patches` reads like any other. Tissue is detected on one coarse pyramid level only, so a slide
of any size is never loaded whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from anndata import AnnData
from scipy.ndimage import map_coordinates
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk, opening, remove_small_objects
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import get_transformation
from xarray import DataArray

from spade_sd.spots.geometry import (
    affine_to,
    annotated_regions,
    coordinate_systems,
    image_levels,
    pyramid_downsample,
    resolve_geometry,
)
from spade_sd.spots.patches import as_rgb_uint8, rgb_channel_order
from spade_sd.utils.constants import SPATIAL_KEY, UNS_KEY

# The tissue mask has pixels of at most size_um / 4, so a tile spans at least 4 × 4 of them.
MASK_PIXELS_PER_TILE = 4
# rgb2hsv works in float64 (24 bytes per pixel); strips keep that bounded whatever the mask's size.
HSV_STRIP_ROWS = 256
# Bounds on the saturation threshold between glass and tissue (HSV saturation, 0-1). Measured on the coarse levels
# tile_image reads from the real slides, her2st C2 (level 5, ~22 µm/px) and MOB1 (level 2 read every 2nd pixel,
# ~37 µm/px), with pixels farther than 3 spot pitches from any spot under tissue as glass and pixels within 0.3 pitch
# of one as tissue. Glass: median 0.017 and 0.056 (MOB1's glass is lavender), 99th percentile 0.071 and 0.088, 99.9th
# 0.091 and 0.13 (dust); 0 % and 0.3 % of it above 0.10. Tissue: 5th percentile 0.10 and 0.084, median 0.25 and 0.19;
# 4.7 % and 7.8 % of it below 0.10, 7.6 % and 12 % below 0.12 (pale stroma, mostly filled in by the closing). Otsu's
# threshold on those slides, 0.148 and 0.134, loses more pale tissue; 0.10 to 0.12 kept 97 % and 93 % of the spots'
# centers inside the mask at ~11 and ~18.5 µm/px (Otsu: 91 % and 89 %).
# Below GLASS_SATURATION nothing is tissue: glass stays under it, whatever Otsu makes of a histogram of glass alone.
GLASS_SATURATION = 0.10
# Above TISSUE_SATURATION everything is tissue: Otsu may neither split tissue in two nor cut off its pale parts.
TISSUE_SATURATION = 0.12
# Spot tables on one image may disagree by rounding (a fitted scale vs a spot radius); more is a real conflict.
MPP_AGREEMENT = 0.01


@dataclass(frozen=True)
class TileGrid:
    """Square tiles in level-0 pixels, in row-major order.

    Attributes
    ----------
    origins
        ``(n, 2)`` top-left corners ``(x, y)``.
    rows, cols
        Grid position of each tile.
    n_rows, n_cols
        Size of the full grid.
    size_px
        Side of a tile.
    """

    origins: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    n_rows: int
    n_cols: int
    size_px: float

    @property
    def ids(self) -> np.ndarray:
        """Grid-position ids ``row * n_cols + col``: a tile keeps its id whichever tiles are kept."""
        return self.rows * self.n_cols + self.cols

    @property
    def centers(self) -> np.ndarray:
        """``(n, 2)`` tile centers ``(x, y)``."""
        return self.origins + self.size_px / 2

    def subset(self, keep: np.ndarray) -> TileGrid:
        """The tiles selected by the boolean mask ``keep``."""
        return TileGrid(self.origins[keep], self.rows[keep], self.cols[keep], self.n_rows, self.n_cols, self.size_px)


def _starts(extent: int, size_px: float, stride_px: float) -> np.ndarray:
    # Only tiles whose center lies in the image: spot_patches (rightly) refuses spots centered outside it.
    count = max(math.ceil((extent - size_px / 2) / stride_px), 0)
    starts = np.arange(count) * stride_px
    return starts[starts + size_px / 2 < extent]


def tile_grid(height: int, width: int, size_px: float, stride_px: float) -> TileGrid:
    """Tiles of ``size_px`` every ``stride_px`` from the image's corner, keeping those whose center is in the image.

    Along an axis of ``extent`` pixels this gives ``ceil((extent - size_px / 2) / stride_px)`` tiles; the last ones
    may reach beyond the border, where :func:`spade_sd.pp.spot_patches` pads with white.
    """
    xs, ys = _starts(width, size_px, stride_px), _starts(height, size_px, stride_px)
    if len(xs) == 0 or len(ys) == 0:
        raise ValueError(
            f"A tile of {size_px:.1f} px is more than twice the image ({width} × {height} px): no tile is centered "
            "in it. Pass a smaller size_um."
        )
    rows, cols = np.divmod(np.arange(len(ys) * len(xs)), len(xs))
    origins = np.c_[xs[cols], ys[rows]]
    return TileGrid(origins, rows, cols, len(ys), len(xs), float(size_px))


def level_downsample(image) -> tuple[list[DataArray], np.ndarray]:
    """The pyramid levels of an image and their level-0 pixels per pixel ``(x, y)``, through its transformations."""
    levels = image_levels(image)
    system = min(coordinate_systems(levels[0]))  # any: a level's scale to level 0 is the same in all of them
    to_level0 = np.linalg.inv(affine_to(levels[0], system))
    return levels, np.asarray(pyramid_downsample(levels, system, to_level0))


def choose_tissue_level(downsample: np.ndarray, mpp: float, size_um: float) -> tuple[int, int]:
    """Where to find tissue: the coarsest level whose pixels are at most ``size_um / MASK_PIXELS_PER_TILE`` µm.

    Returns
    -------
    ``(level, step)``: read every ``step``-th pixel of that level, ``step > 1`` only when even the coarsest level is
    much finer than needed (an image without a pyramid).
    """
    target_um = size_um / MASK_PIXELS_PER_TILE
    pixel_um = mpp * downsample.max(axis=1)
    level = int(np.flatnonzero(pixel_um <= target_um * (1 + 1e-6)).max(initial=0))
    return level, max(1, math.floor(target_um / pixel_um[level] * (1 + 1e-6)))


def read_decimated(level: DataArray, step: int) -> np.ndarray:
    """Pixel ``(c, y, x)`` array of every ``step``-th pixel (the middle of each block), channels in RGB(A) order.

    Dask reads the level chunk by chunk.
    """
    offset = step // 2
    pixels = np.asarray(level.data[:, offset::step, offset::step].compute(scheduler="threads"))
    order = rgb_channel_order(level)
    return pixels if order is None else pixels[order]


def _annotated_pairs(sdata: SpatialData, image_key: str) -> list[tuple[str, str]]:
    """``(table, shapes)`` pairs where the table annotates shapes sharing a coordinate system with the image."""
    systems = coordinate_systems(sdata.images[image_key])
    return [
        (table_key, shapes_key)
        for table_key, table in sdata.tables.items()
        for shapes_key in annotated_regions(table)
        if shapes_key in sdata.shapes and coordinate_systems(sdata.shapes[shapes_key]) & systems
    ]


def mpp_from_spots(sdata: SpatialData, image_key: str) -> tuple[float, str]:
    """µm per level-0 pixel of an image, from the spot tables annotating shapes on it.

    Returns
    -------
    ``(mpp, source)``. No spot table with a known scale, or tables that disagree, are an error saying to pass ``mpp=``.
    """
    found, failures = {}, []
    for table_key, shapes_key in _annotated_pairs(sdata, image_key):
        try:
            geometry = resolve_geometry(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key)
        except ValueError as error:  # this pair gives no scale; another one may
            failures.append(f"table {table_key!r} on shapes {shapes_key!r}: {error}")
            continue
        found[f"table {table_key!r} on shapes {shapes_key!r} ({geometry.mpp_source})"] = geometry.mpp
    if not found:
        why = "; ".join(failures) or "no table annotates shapes that share a coordinate system with it"
        raise ValueError(
            f"The µm per pixel of image {image_key!r} is unknown ({why}). Pass mpp= (µm per pixel of the image's "
            "full-resolution level, e.g. 0.5 for a 20× scan)."
        )
    values = np.fromiter(found.values(), float)
    if np.ptp(values) > MPP_AGREEMENT * values.min():
        raise ValueError(f"The spot tables on image {image_key!r} disagree on the µm per pixel: {found}; pass mpp=.")
    source, value = next(iter(found.items()))
    return value, source


def _saturation(rgb: np.ndarray) -> np.ndarray:
    strips = [rgb2hsv(rgb[i : i + HSV_STRIP_ROWS])[..., 1] for i in range(0, len(rgb), HSV_STRIP_ROWS)]
    return np.concatenate(strips).astype(np.float32, copy=False)


def saturation_threshold(saturation: np.ndarray) -> float:
    """The saturation above which a pixel is tissue: Otsu's threshold, bounded by what glass and tissue look like.

    Otsu's threshold adapts to the slide's staining and scanner when the image shows both glass and tissue, within
    ``[GLASS_SATURATION, TISSUE_SATURATION]``. An image of one kind only has no glass mode or no tissue mode for Otsu
    to separate, and it would split that one mode in two; such an image is told by Otsu's two classes instead. When
    even the lower class is on average more saturated than glass, all is tissue (the threshold is
    ``GLASS_SATURATION``); when even the upper class is on average less saturated than that, all is glass (the
    threshold is ``TISSUE_SATURATION``, so only clearly stained pixels remain, which the cleanup drops as specks).
    """
    if saturation.size == 0:
        return GLASS_SATURATION
    otsu = float(threshold_otsu(saturation))
    upper = saturation > otsu
    n_upper = int(np.count_nonzero(upper))
    total = float(saturation.sum(dtype=np.float64))
    upper_total = float(saturation[upper].sum(dtype=np.float64))
    lower_mean = (total - upper_total) / max(saturation.size - n_upper, 1)
    upper_mean = upper_total / n_upper if n_upper else lower_mean
    if lower_mean >= GLASS_SATURATION:  # no glass: tissue only, which Otsu would split
        return GLASS_SATURATION
    if upper_mean < GLASS_SATURATION:  # no tissue: glass only, which Otsu would split
        return TISSUE_SATURATION
    return float(np.clip(otsu, GLASS_SATURATION, TISSUE_SATURATION))


def tissue_mask(pixels: np.ndarray, pixel_um: float, size_um: float) -> tuple[np.ndarray, float]:
    """Tissue pixels of a coarse image.

    H&E stains tissue pink and purple while glass is grey, so the HSV saturation separates them; the threshold
    (:func:`saturation_threshold`) is Otsu's, which adapts to each slide's staining, bounded by the saturation of glass
    and of tissue, so that an image of tissue only is all tissue and one of glass only is none. Closing then opening
    with a disk of an eighth of a tile fills the gaps between nuclei and fibres and drops specks; connected pieces
    smaller than a quarter of a tile (dust, debris) are removed.

    Parameters
    ----------
    pixels
        ``(c, y, x)`` pixels of a coarse level (any type :func:`spade_sd.pp.spot_patches` reads).
    pixel_um
        µm per pixel of ``pixels``.
    size_um
        Tile side in µm, which scales the cleanup.

    Returns
    -------
    The boolean ``(y, x)`` mask and the saturation threshold.
    """
    saturation = _saturation(as_rgb_uint8(pixels, pixels.dtype))
    threshold = saturation_threshold(saturation)
    tile_px = size_um / pixel_um
    footprint = disk(max(1, round(tile_px / 8)))
    mask = opening(closing(saturation > threshold, footprint), footprint)
    return remove_small_objects(mask, max_size=int(tile_px**2 / 4)), threshold


def tissue_fraction(mask: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Exact fraction of each box ``[lower, upper)`` (``(n, 2)`` corners ``(x, y)`` in mask pixels) that is tissue.

    Mask pixels are unit squares and the image's outside counts as glass. The integral image is exact at integer
    corners and bilinear inside each pixel, so interpolating it gives the covered area of boxes at any position.
    """
    height, width = mask.shape
    integral = np.zeros((height + 1, width + 1))
    integral[1:, 1:] = mask.cumsum(axis=0, dtype=float).cumsum(axis=1)

    def area_to(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return map_coordinates(integral, [np.clip(y, 0, height), np.clip(x, 0, width)], order=1)

    (x0, y0), (x1, y1) = lower.T, upper.T
    covered = area_to(x1, y1) - area_to(x0, y1) - area_to(x1, y0) + area_to(x0, y0)
    return np.clip(covered / ((x1 - x0) * (y1 - y0)), 0.0, 1.0)


def tile_shapes(grid: TileGrid, transformations: dict) -> gpd.GeoDataFrame:
    """The tiles as box polygons in level-0 pixels, indexed by tile id."""
    (x0, y0), (x1, y1) = grid.origins.T, (grid.origins + grid.size_px).T
    frame = gpd.GeoDataFrame(geometry=shapely.box(x0, y0, x1, y1), index=pd.Index(grid.ids, name="tile_id"))
    return ShapesModel.parse(frame, transformations=transformations)


def tile_table(grid: TileGrid, fraction: np.ndarray, region: str, metadata: dict) -> AnnData:
    """The tiles' table annotating ``region``, with ``metadata`` as ``uns['spade_sd']``."""
    obs = pd.DataFrame(
        {
            "tile_id": grid.ids,
            "region": pd.Categorical([region] * len(grid.ids)),
            "tile_row": grid.rows,
            "tile_col": grid.cols,
            "tissue_fraction": fraction,
        },
        index=grid.ids.astype(str),
    )
    table = AnnData(obs=obs, obsm={SPATIAL_KEY: grid.centers}, uns={UNS_KEY: metadata})
    return TableModel.parse(table, region=region, region_key="region", instance_key="tile_id")


@dataclass(frozen=True)
class Tiles:
    """The elements :func:`spade_sd.pp.tile_image` adds, and how many grid tiles there were."""

    shapes: gpd.GeoDataFrame
    table: AnnData
    n_grid: int


def make_tiles(
    sdata: SpatialData,
    image_key: str,
    *,
    region: str,
    size_um: float,
    stride_um: float,
    mpp: float | None,
    tissue_only: bool,
    tissue_level: int | None,
    min_tissue_fraction: float,
) -> Tiles:
    """Tile image ``image_key`` and measure the tissue under every tile (arguments as :func:`spade_sd.pp.tile_image`).

    Reads one coarse level of the image only. ``region`` names the shapes element the table will annotate.
    """
    image = sdata.images[image_key]
    levels, downsample = level_downsample(image)
    if tissue_level is not None and not 0 <= tissue_level < len(levels):
        raise ValueError(f"tissue_level must index one of the {len(levels)} pyramid levels, found {tissue_level}.")
    mpp, mpp_source = (mpp, "the mpp argument") if mpp is not None else mpp_from_spots(sdata, image_key)
    level, step = choose_tissue_level(downsample, mpp, size_um) if tissue_level is None else (tissue_level, 1)
    mask_downsample = downsample[level] * step

    height, width = levels[0].sizes["y"], levels[0].sizes["x"]
    grid = tile_grid(height, width, size_um / mpp, stride_um / mpp)
    pixels = read_decimated(levels[level], step)
    mask, threshold = tissue_mask(pixels, mpp * mask_downsample.max(), size_um)
    fraction = tissue_fraction(mask, grid.origins / mask_downsample, (grid.origins + grid.size_px) / mask_downsample)
    keep = fraction >= min_tissue_fraction if tissue_only else np.ones(len(fraction), dtype=bool)
    if not keep.any():
        raise ValueError(
            f"No tile of image {image_key!r} has a tissue fraction ≥ {min_tissue_fraction} (the largest is "
            f"{fraction.max():.2f}); lower min_tissue_fraction or pass tissue_only=False."
        )

    metadata = {
        "kind": "tiles",
        "image_key": image_key,
        "mpp": float(mpp),
        "mpp_source": mpp_source,
        "size_um": float(size_um),
        "stride_um": float(stride_um),
        "tissue_only": bool(tissue_only),
        "min_tissue_fraction": float(min_tissue_fraction),
        "tissue_level": level,
        "tissue_step": step,
        "tissue_threshold": threshold,
        "tissue_saturation_bounds": [GLASS_SATURATION, TISSUE_SATURATION],
    }
    kept = grid.subset(keep)
    transformations = get_transformation(levels[0], get_all=True)
    return Tiles(tile_shapes(kept, transformations), tile_table(kept, fraction[keep], region, metadata), len(fraction))
