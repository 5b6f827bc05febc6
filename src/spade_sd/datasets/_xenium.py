"""A real Xenium sample with its H&E, laid out as spatialdata-io's ``xenium`` reader lays out a Xenium run.

spatialdata-io's reader keeps the cells in µm (``cells.parquet``'s centroids and areas) and maps them into the
``"global"`` coordinate system, which is in pixels of Xenium's morphology image (0.2125 µm), by a scale; an H&E image
registered to the run (``he_image``) reaches the same system through the affine of its alignment file. With
``cells_as_circles=True`` the table annotates ``cell_circles``: one circle per cell, its radius that of a disc as
large as the cell, in µm.
"""

from __future__ import annotations

import json
import os

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
from scipy import sparse
from spatialdata import SpatialData

from spade_sd.datasets._images import multiscale_from_file
from spade_sd.datasets._registry import check_registered, fetch, registered_names, registry
from spade_sd.utils.constants import (
    MPP,
    SAMPLE,
    SAMPLE_KEY,
    SPATIAL_KEY,
    TECHNOLOGY,
    UNS_KEY,
    XENIUM_CELL_ID,
    XENIUM_CIRCLES,
    XENIUM_HE_IMAGE,
)
from spade_sd.utils.logging import logger

DEEPSPOT_FOLDER = "deepspot_xenium/example_data/data"
# µm per pixel of Xenium's morphology image: the unit of spatialdata-io's "global" coordinate system for Xenium
# (experiment.xenium's pixel_size, which its reader turns into the cells' Scale(1 / pixel_size)).
XENIUM_PIXEL_SIZE_UM = 0.2125
# DeepSpot's example images are HEST's H&E downsampled 10-fold: its Visium example's meta json records
# downsample_factor 10, the Xenium one leaves the field as the placeholder "scale_factor". No file of the sample
# stores its scale; nuclei measure ~2.5 px across in the image, ~5 µm at this factor, as nuclei are.
DEEPSPOT_DOWNSAMPLE = 10
# spatialdata-io's region key of the cell table
REGION_KEY = "region"


def xenium_lung(sample: str = "NCBI858", *, data_dir: str | os.PathLike | None = None) -> SpatialData:
    """Human lung (pulmonary fibrosis), 10x Xenium cells with their H&E: HEST-1k's ``NCBI858`` as DeepSpot ships it.

    A tiny real sample (Vannan et al. 2025 via HEST-1k, Jaume et al. 2024; DeepSpot's example data): 200 cells of the
    338-gene Xenium panel with raw counts, a 1431 × 1249 px H&E and a meta json. It is laid out as spatialdata-io's
    :func:`spatialdata_io.xenium` (``cells_as_circles=True``) lays out a Xenium run, so that code written for one runs
    on the other; far too few cells to train a useful model, it exercises cells and a targeted panel end to end.

    The sample stores each cell's centre in image pixels and one cell diameter for all (20 µm), not the cells'
    outlines: the cells are the circles spatialdata-io draws (``cell_circles``; a disc of the cell's area, here
    20 µm across for every cell), not ``cell_boundaries`` polygons, which would have to be invented. Its meta json
    names no scale either (its ``downsample_factor`` is the placeholder ``"scale_factor"``), and its cell diameter is
    no measurement of the image: the µm per pixel is taken as DeepSpot's 10-fold downsampling of Xenium's
    0.2125 µm pixels, 2.125 µm per pixel (logged), which makes the nuclei in the image ~5 µm across.

    Parameters
    ----------
    sample
        ``"NCBI858"``, the one sample in the registry.
    data_dir
        Folder laid out like ``<dataset>/<path>`` holding the files (default: ``SPADE_SD_DATA_DIR``, else download).

    Returns
    -------
    A SpatialData as spatialdata-io's Xenium reader writes it:

    - ``"he_image"``: the H&E, multiscale, with an affine to ``"global"`` (Xenium's 0.2125 µm pixels).
    - ``"cell_circles"``: the cells as circles in µm, index ``cell_id``, radius 10 µm, ``Scale(1 / 0.2125)`` to
      ``"global"``.
    - ``"table"``: the raw counts (``X``, as the sample has them), ``obs`` with ``cell_id``, ``transcript_counts``,
      ``region`` (``"cell_circles"``, the region key; ``cell_id`` is the instance key) and ``sample``, the cell
      centres in µm in ``obsm["spatial"]``, and ``uns["spade_sd"]`` recording the technology and the image's µm per
      pixel (``mpp``).
    """
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Affine, Scale

    check_registered(sample, registered_names(f"{DEEPSPOT_FOLDER}/h5ad/", r"/h5ad/(\w+)\.h5ad$"), "Xenium lung sample")
    keys = {
        part: f"{DEEPSPOT_FOLDER}/{part}/{sample}.{suffix}"
        for part, suffix in (("h5ad", "h5ad"), ("image", "jpg"), ("meta", "json"))
    }
    paths = {part: fetch(key, data_dir) for part, key in keys.items()}
    meta = json.loads(paths["meta"].read_text())
    cells = ad.read_h5ad(paths["h5ad"])

    mpp = XENIUM_PIXEL_SIZE_UM * DEEPSPOT_DOWNSAMPLE
    logger.info(
        "xenium_lung %s: %.4g µm per H&E pixel, from DeepSpot's %d-fold downsampling of Xenium's %.4g µm pixels "
        "(the sample stores no scale)",
        sample,
        mpp,
        DEEPSPOT_DOWNSAMPLE,
        XENIUM_PIXEL_SIZE_UM,
    )
    # DeepSpot's x_pixel is the image row and y_pixel its column (it crops image.crop(y_pixel, x_pixel, ...))
    centers_um = cells.obs[["y_pixel", "x_pixel"]].to_numpy(float) * mpp
    cell_ids = pd.Index(cells.obs_names.astype(str), name=XENIUM_CELL_ID)
    radius_um = float(meta["cell_diameter"]) / 2
    to_global = Scale([1 / XENIUM_PIXEL_SIZE_UM] * 2, axes=("x", "y"))
    circles = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"radius": np.full(len(cell_ids), radius_um)},
            geometry=gpd.points_from_xy(*centers_um.T),
            index=cell_ids,
        ),
        transformations={"global": to_global},
    )

    counts = sparse.csr_matrix(np.asarray(cells.X, dtype=np.float32))
    obs = pd.DataFrame(
        {
            XENIUM_CELL_ID: cell_ids.to_numpy(),
            "transcript_counts": np.asarray(counts.sum(axis=1)).ravel().astype(np.int64),
            REGION_KEY: pd.Categorical([XENIUM_CIRCLES] * len(cell_ids)),
            SAMPLE_KEY: pd.Categorical([sample] * len(cell_ids)),
        },
        index=pd.Index(cell_ids.to_numpy(), name=None),
    )
    # the sample's var columns count the whole run's cells, not these 200; spatialdata-io's var says what a feature is
    var = pd.DataFrame({"feature_types": "Gene Expression"}, index=pd.Index(cells.var_names.astype(str)))
    table = ad.AnnData(X=counts, obs=obs, var=var)
    table.obsm[SPATIAL_KEY] = centers_um
    table.uns[UNS_KEY] = {"dataset": "deepspot_xenium", SAMPLE: sample, TECHNOLOGY: "Xenium", MPP: mpp}
    table = TableModel.parse(table, region=XENIUM_CIRCLES, region_key=REGION_KEY, instance_key=XENIUM_CELL_ID)

    # the H&E's pixels are DEEPSPOT_DOWNSAMPLE morphology pixels wide, and HEST registered it to the run already
    he_to_global = Affine(
        np.diag([mpp / XENIUM_PIXEL_SIZE_UM, mpp / XENIUM_PIXEL_SIZE_UM, 1.0]),
        input_axes=("x", "y"),
        output_axes=("x", "y"),
    )
    image = multiscale_from_file(paths["image"], registry()[keys["image"]].sha256, {"global": he_to_global})
    return SpatialData(images={XENIUM_HE_IMAGE: image}, shapes={XENIUM_CIRCLES: circles}, tables={"table": table})
