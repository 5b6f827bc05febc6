"""SpatialData objects laid out as spatialdata-io's ``visium_hd`` and ``xenium`` readers write them, small, on a
synthetic H&E with planted structure (importable from any test: pyproject sets pytest's ``pythonpath = ["tests"]``).

Both start from :func:`spade_sd.datasets.synthetic`: its image (Voronoi tissue types, nucleus density fields) and
its spots' counts on a grid of ``pitch_um`` squares. A bin or cell takes its expected counts from the synthetic spot
whose square holds its centre, scaled by its area, so the expression follows the image's types as the spots' does.

What the readers write (spatialdata-io 0.7, ``src/spatialdata_io/readers/visium_hd.py`` and ``xenium.py``):

- ``visium_hd``: per bin size, shapes ``f"{dataset_id}_square_{size:03}um"`` (squares made by
  ``circles.buffer(spot_diameter_fullres / 2, cap_style=3)`` in full-resolution pixels, indexed by an integer
  ``location_id``) and a table ``f"square_{size:03}um"`` (obs ``in_tissue``, ``array_row``, ``array_col``,
  ``location_id``, ``region``; ``obsm['spatial']`` the bins' centres in pixels; ``uns`` only
  ``spatialdata_attrs``). The bins carry ``{dataset_id: Identity, f"{dataset_id}_downscaled_hires": Scale(hires),
  f"{dataset_id}_downscaled_lowres": Scale(lowres)}``; the H&E ``f"{dataset_id}_full_image"`` ``{dataset_id:
  Identity}``; the hires and lowres PNGs ``{f"{dataset_id}_downscaled_*": Identity, dataset_id: Scale(1 /
  scalef)}``. Nothing records µm but the names.
- ``xenium``: the ``"global"`` coordinate system is the morphology image's pixels (``pixel_size`` µm, 0.2125);
  ``cell_boundaries`` polygons (and ``cell_circles``, radius √(cell_area/π)) are in µm with ``{"global":
  Scale(1 / pixel_size)}``, indexed by ``cell_id`` strings; the table ``"table"`` has obs from ``cells.parquet``
  (``cell_id``, ``transcript_counts``, …, ``cell_area`` and ``nucleus_area`` in µm², ``region``) and
  ``obsm['spatial']`` the centroids in µm; the H&E ``he_image`` maps into ``"global"`` by the affine of
  ``he_imagealignment.csv``. The reader's table annotates ``cell_circles`` (``cells_as_circles=True``) or the
  ``cell_labels`` raster, which users re-point at ``cell_boundaries`` with
  ``set_table_annotates_spatialelement`` as its docstring shows; no labels are made here.
"""

from __future__ import annotations

import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, Identity, Scale, set_transformation

import spade_sd as sd

XENIUM_PIXEL_UM = 0.2125
_HIRES, _LOWRES = 0.25, 0.0625


def _synthetic(grid: tuple[int, int], pitch_um: float, mpp: float, n_genes: int, seed: int):
    """The synthetic slide, its spots' counts and a lookup of the spot whose pitch square holds a point (in µm)."""
    base = sd.datasets.synthetic(grid=grid, spot_pitch_um=pitch_um, mpp=mpp, n_genes=n_genes, seed=seed)
    table = base.tables["table"]
    counts = table.X.toarray()
    rows, cols = table.obs["array_row"].to_numpy(), table.obs["array_col"].to_numpy()
    by_position = np.full(grid, -1)
    by_position[rows, cols] = np.arange(len(rows))

    def spot_at(xy_um: np.ndarray) -> np.ndarray:
        # spot (r, c) is centred at (c + 1.5, r + 1.5) pitches: its square spans [c + 1, c + 2) pitches
        col = np.clip(np.floor(xy_um[:, 0] / pitch_um - 1).astype(int), 0, grid[1] - 1)
        row = np.clip(np.floor(xy_um[:, 1] / pitch_um - 1).astype(int), 0, grid[0] - 1)
        return by_position[row, col]

    return base, table, counts, spot_at


def _counts(expected_per_spot: np.ndarray, spot: np.ndarray, fraction: np.ndarray, rng) -> sparse.csr_matrix:
    """Poisson counts with the mean of each shape's spot, scaled by the share of the spot's square it covers."""
    return sparse.csr_matrix(rng.poisson(expected_per_spot[spot] * fraction[:, None]).astype(np.float32))


def _var(genes: pd.Index) -> pd.DataFrame:
    # sc.read_10x_h5's columns
    return pd.DataFrame({"gene_ids": genes, "feature_types": "Gene Expression", "genome": "synthetic"}, index=genes)


def visium_hd_like(
    *,
    dataset_id: str = "hd",
    bin_sizes: tuple[int, ...] = (2, 8, 16),
    grid: tuple[int, int] = (4, 4),
    pitch_um: float = 100.0,
    mpp: float = 0.8,
    n_genes: int = 40,
    downscaled_images: bool = True,
    bins_as_squares: bool = True,
    cells: bool = False,
    seed: int = 0,
) -> SpatialData:
    """A Visium HD slide as ``spatialdata_io.visium_hd(path, dataset_id=dataset_id)`` reads it.

    The bins of every size in ``bin_sizes`` (µm) tile the tissue, ``grid × pitch_um`` µm; the H&E has ``mpp`` µm
    per full-resolution pixel, recorded nowhere (as in Space Ranger's output read by spatialdata-io). With
    ``downscaled_images`` the hires and lowres images (``1/4`` and ``1/16`` of full resolution) come too, so the
    image must be chosen by ``image_key``. With ``cells``, Space Ranger's cell segmentation comes too: polygons
    ``f"{dataset_id}_cell_segmentations"`` in full-resolution pixels, indexed ``cellid_000000001-1``, …, and their
    table ``"cell_segmentations"`` (obs ``cell_id`` and ``region``).
    """
    base, spots, counts, spot_at = _synthetic(grid, pitch_um, mpp, n_genes, seed)
    rng = np.random.default_rng(seed)
    transformations = {
        dataset_id: Identity(),
        f"{dataset_id}_downscaled_hires": Scale([_HIRES, _HIRES], axes=("x", "y")),
        f"{dataset_id}_downscaled_lowres": Scale([_LOWRES, _LOWRES], axes=("x", "y")),
    }
    shapes, tables = {}, {}
    extent = np.asarray(grid[::-1]) * pitch_um  # (x, y) µm
    for size in bin_sizes:
        n_cols, n_rows = (extent // size).astype(int)
        rows, cols = (a.ravel() for a in np.mgrid[0:n_rows, 0:n_cols])
        centers_um = pitch_um + (np.c_[cols, rows] + 0.5) * size
        centers_px = centers_um / mpp
        name = f"square_{size:03}um"
        ids = np.arange(len(rows))
        obs = pd.DataFrame(
            {"in_tissue": 1, "array_row": rows, "array_col": cols, "location_id": ids},
            index=[f"s_{size:03}um_{r:05}_{c:05}-1" for r, c in zip(rows, cols, strict=True)],
        )
        obs["region"] = pd.Categorical([f"{dataset_id}_{name}"] * len(obs))
        table = AnnData(
            _counts(counts, spot_at(centers_um), np.full(len(rows), (size / pitch_um) ** 2), rng),
            obs=obs,
            var=_var(spots.var_names),
            obsm={"spatial": centers_px},
        )
        tables[name] = TableModel.parse(
            table, region=f"{dataset_id}_{name}", region_key="region", instance_key="location_id"
        )
        radius = size / mpp / 2
        circles = gpd.GeoDataFrame({"radius": radius}, geometry=gpd.points_from_xy(*centers_px.T), index=ids)
        frame = gpd.GeoDataFrame(geometry=circles.geometry.buffer(radius, cap_style=3)) if bins_as_squares else circles
        shapes[f"{dataset_id}_{name}"] = ShapesModel.parse(frame, transformations=transformations)

    if cells:
        name = f"{dataset_id}_cell_segmentations"
        centers_um, polygons_um = _cells_over(extent, pitch_um, 15.0, rng)
        polygons = shapely.transform(polygons_um, lambda xy: xy / mpp)
        ids = pd.Index([f"cellid_{i + 1:09d}-1" for i in range(len(polygons))])
        area = shapely.area(polygons_um)
        obs = pd.DataFrame({"cell_id": ids, "region": pd.Categorical([name] * len(ids))}, index=ids)
        x = _counts(counts, spot_at(centers_um), area / pitch_um**2, rng)
        tables["cell_segmentations"] = TableModel.parse(
            AnnData(x, obs=obs, var=_var(spots.var_names)), region=name, region_key="region", instance_key="cell_id"
        )
        shapes[name] = ShapesModel.parse(
            gpd.GeoDataFrame(geometry=polygons, index=ids), transformations=transformations
        )

    full = next(iter(base.images.values()))
    set_transformation(full, {dataset_id: Identity()}, set_all=True)
    images = {f"{dataset_id}_full_image": full}
    if downscaled_images:
        pixels = np.asarray(full["scale0"]["image"])
        for suffix, factor in (("hires", _HIRES), ("lowres", _LOWRES)):
            step = round(1 / factor)
            images[f"{dataset_id}_{suffix}_image"] = Image2DModel.parse(
                pixels[:, ::step, ::step],
                dims=("c", "y", "x"),
                transformations={
                    f"{dataset_id}_downscaled_{suffix}": Identity(),
                    dataset_id: Scale([1 / factor, 1 / factor], axes=("x", "y")),
                },
            )
    sdata = SpatialData(images=images, shapes=shapes, tables=tables)
    sdata.attrs["spatialdata_io_reader"] = "visium_hd"
    return sdata


def _cells_over(extent: np.ndarray, pitch_um: float, spacing_um: float, rng, n_vertices: int = 12):
    """Cell centres about ``spacing_um`` apart over the tissue (µm) and irregular star-shaped cells 4–8 µm in radius."""
    n_side = (extent // spacing_um).astype(int)
    rows, cols = (a.ravel() for a in np.mgrid[0 : n_side[1], 0 : n_side[0]])
    centers = pitch_um + (np.c_[cols, rows] + rng.uniform(0.2, 0.8, (len(rows), 2))) * spacing_um
    radii = rng.uniform(4.0, 8.0, len(rows))
    angles = np.sort(rng.uniform(0, 2 * np.pi, (len(centers), n_vertices)), axis=1)
    reach = radii[:, None] * rng.uniform(0.75, 1.25, (len(centers), n_vertices))
    rings = centers[:, None, :] + reach[..., None] * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return centers, shapely.polygons(np.concatenate([rings, rings[:, :1]], axis=1))


def xenium_like(
    *,
    grid: tuple[int, int] = (4, 4),
    pitch_um: float = 100.0,
    he_mpp: float = 0.9,
    rotation_deg: float = 12.0,
    cell_spacing_um: float = 15.0,
    n_genes: int = 40,
    annotates: str = "cell_boundaries",
    morphology: bool = True,
    reader_attrs: bool = True,
    seed: int = 0,
) -> SpatialData:
    """A Xenium run with a post-Xenium H&E as ``spatialdata_io.xenium(path, cells_as_circles=True)`` reads it.

    Cells (irregular polygons 4–8 µm in radius, about ``cell_spacing_um`` apart) cover the tissue; the Xenium frame
    is the H&E's µm frame turned by ``rotation_deg`` and shifted, so the H&E (``he_mpp`` µm per pixel, recorded
    nowhere) maps into ``"global"`` (the morphology image's 0.2125 µm pixels) by a rotating affine, as its alignment
    file gives it. ``annotates`` is the shapes the table annotates: ``"cell_circles"`` (the reader's with
    ``cells_as_circles=True``) or ``"cell_boundaries"`` (re-pointed with ``set_table_annotates_spatialelement``).
    ``reader_attrs`` records ``attrs['spatialdata_io_reader'] = 'xenium'`` as the reader does.
    """
    base, spots, counts, spot_at = _synthetic(grid, pitch_um, he_mpp, n_genes, seed)
    rng = np.random.default_rng(seed)
    he_um, cells_he_um = _cells_over(np.asarray(grid[::-1]) * pitch_um, pitch_um, cell_spacing_um, rng)

    angle = np.deg2rad(rotation_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = np.array([120.0, 60.0])
    to_xenium = np.eye(3)
    to_xenium[:2, :2], to_xenium[:2, 2] = rotation, shift
    cells = shapely.transform(cells_he_um, lambda xy: xy @ rotation.T + shift)
    centroids = shapely.get_coordinates(shapely.centroid(cells))
    area = shapely.area(cells)

    cell_ids = pd.Index([f"cell{i:05d}-1" for i in range(len(he_um))])
    cell_area = area * rng.uniform(0.93, 1.07, len(area))  # the mask's area, not the simplified polygon's
    x = _counts(counts, spot_at(he_um), area / pitch_um**2, rng)
    obs = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "transcript_counts": np.asarray(x.sum(axis=1)).ravel().astype(int),
            "control_probe_counts": 0,
            "cell_area": cell_area,
            "nucleus_area": 0.35 * cell_area,
            "region": pd.Categorical([annotates] * len(cell_ids)),
        },
        index=cell_ids,
    )
    table = AnnData(x, obs=obs, var=_var(spots.var_names), obsm={"spatial": centroids})
    table = TableModel.parse(table, region=annotates, region_key="region", instance_key="cell_id")

    to_global = Scale([1 / XENIUM_PIXEL_UM, 1 / XENIUM_PIXEL_UM], axes=("x", "y"))
    boundaries = gpd.GeoDataFrame(geometry=cells, index=cell_ids)
    boundaries.index.name = "cell_id"
    shapes = {"cell_boundaries": ShapesModel.parse(boundaries, transformations={"global": to_global})}
    if annotates == "cell_circles":
        circles = gpd.GeoDataFrame(
            {"radius": np.sqrt(cell_area / np.pi)}, geometry=gpd.points_from_xy(*centroids.T), index=cell_ids
        )
        shapes["cell_circles"] = ShapesModel.parse(circles, transformations={"global": to_global})

    he = next(iter(base.images.values()))
    he_to_global = np.diag([1 / XENIUM_PIXEL_UM, 1 / XENIUM_PIXEL_UM, 1.0]) @ to_xenium @ np.diag([he_mpp, he_mpp, 1])
    set_transformation(
        he, {"global": Affine(he_to_global, input_axes=("x", "y"), output_axes=("x", "y"))}, set_all=True
    )
    images = {"he_image": he}
    if morphology:
        corner = np.ceil((centroids.max(axis=0) + 20) / XENIUM_PIXEL_UM).astype(int)
        dapi = da.zeros((1, corner[1], corner[0]), dtype=np.uint16, chunks=(1, 1024, 1024))
        images["morphology_focus"] = Image2DModel.parse(
            dapi, dims=("c", "y", "x"), c_coords=["DAPI"], transformations={"global": Identity()}
        )
    sdata = SpatialData(images=images, shapes=shapes, tables={"table": table})
    if reader_attrs:
        sdata.attrs["spatialdata_io_reader"] = "xenium"
    return sdata
