"""Loaders of the real data sets into SpatialData objects.

Every loader returns the same layout for a sample ``S``: a multiscale H&E image, the spots as circles, and a table
of raw counts annotating the circles. The table's ``uns["spade_sd"]`` records the technology; legacy ST tables also
record the spot diameter in µm (in ``uns`` and, as ``spatialdata.concatenate`` drops ``uns``, in ``obs``), from
which with the circles' radius the µm per pixel follows; Visium's follows from its spot pitch on the array grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
from scipy import sparse
from spatialdata import SpatialData

from spade_sd.datasets._images import multiscale_from_file
from spade_sd.datasets._registry import check_registered, fetch, registered_names, registry
from spade_sd.utils.constants import (
    SAMPLE,
    SAMPLE_KEY,
    SPATIAL_KEY,
    SPOT_DIAMETER_UM,
    SPOT_DIAMETERS_UM,
    TECHNOLOGY,
    UNS_KEY,
)
from spade_sd.utils.logging import logger

LEGACY_ST_SPOT_DIAMETER_UM = SPOT_DIAMETERS_UM["legacy_ST"]
# Center-to-center distance between spots one array column apart. The her2st arrays step x by one per 200 µm;
# the MOB arrays are a staggered grid whose columns step by two per 200 µm.
HER2ST_UM_PER_ARRAY_COLUMN = 200.0
MOB_UM_PER_ARRAY_COLUMN = 100.0


def _um_per_pixel(spots: pd.DataFrame, um_per_array_column: float) -> float:
    """µm per image pixel from the spot file: a least-squares fit of pixel position on array position."""
    design = np.c_[spots[["x", "y"]].to_numpy(float), np.ones(len(spots))]
    coef, *_ = np.linalg.lstsq(design, spots[["pixel_x", "pixel_y"]].to_numpy(float), rcond=None)
    pixels_per_column = float(np.hypot(*coef[0]))
    return um_per_array_column / pixels_per_column


def _legacy_st(
    *,
    dataset: str,
    sample: str,
    counts_key: str,
    spots_key: str,
    image_key: str,
    um_per_array_column: float,
    data_dir: str | os.PathLike | None,
) -> SpatialData:
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    counts = pd.read_csv(fetch(counts_key, data_dir), sep="\t", index_col=0)
    spots = pd.read_csv(fetch(spots_key, data_dir), sep="\t")
    mpp = _um_per_pixel(spots, um_per_array_column)
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    selected = spots[spots["selected"] == 1]
    keep = selected.index[selected.index.isin(counts.index)]
    if len(keep) < len(selected):
        logger.info(
            "%s %s: %d selected spots have no counts and are left out", dataset, sample, len(selected) - len(keep)
        )
    spots, counts = selected.loc[keep], counts.loc[keep]

    radius = LEGACY_ST_SPOT_DIAMETER_UM / 2 / mpp
    centers = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    region = f"{sample}_spots"
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"radius": np.full(len(spots), radius)},
            geometry=gpd.points_from_xy(centers[:, 0], centers[:, 1]),
            index=pd.Index(spots.index, name="spot_id"),
        ),
        transformations={"global": Identity()},
    )
    obs = pd.DataFrame(
        {
            "spot_id": spots.index.to_numpy(),
            "region": pd.Categorical([region] * len(spots)),
            "array_row": spots["y"].to_numpy(int),
            "array_col": spots["x"].to_numpy(int),
            SAMPLE_KEY: pd.Categorical([sample] * len(spots)),
            # uns is dropped by spatialdata.concatenate; a column keeps the scale of every slide's spots
            SPOT_DIAMETER_UM: np.full(len(spots), LEGACY_ST_SPOT_DIAMETER_UM),
        },
        index=pd.Index(spots.index, name=None),
    )
    var_names = pd.Index(counts.columns.astype(str))
    table = ad.AnnData(X=sparse.csr_matrix(counts.to_numpy(np.float32)), obs=obs, var=pd.DataFrame(index=var_names))
    table.var_names_make_unique()
    table.obsm[SPATIAL_KEY] = centers
    table.uns[UNS_KEY] = {
        "dataset": dataset,
        SAMPLE: sample,
        TECHNOLOGY: "legacy_ST",
        SPOT_DIAMETER_UM: LEGACY_ST_SPOT_DIAMETER_UM,
    }
    table = TableModel.parse(table, region=region, region_key="region", instance_key="spot_id")
    image_path = fetch(image_key, data_dir)
    image = multiscale_from_file(image_path, registry()[image_key].sha256, {"global": Identity()})
    return SpatialData(images={f"{sample}_image": image}, shapes={region: shapes}, tables={"table": table})


def her2st(section: str = "C2", *, data_dir: str | os.PathLike | None = None) -> SpatialData:
    """HER2-positive breast cancer sections, legacy Spatial Transcriptomics (Andersson et al. 2021).

    Parameters
    ----------
    section
        Section name, e.g. ``"C2"``; the registry holds the sections with images (B4, C2–C6).
    data_dir
        Folder laid out like ``<dataset>/<path>`` holding the files (default: ``SPADE_SD_DATA_DIR``, else download).

    Returns
    -------
    A SpatialData with ``f"{section}_image"`` (multiscale H&E, ~0.69 µm/px), ``f"{section}_spots"`` (100 µm circles)
    and ``"table"`` (raw counts of the spots under tissue, gene symbols, array coordinates in ``obs``).
    """
    check_registered(section, registered_names("her2st/data/ST-imgs/", r"/(\w+)/[^/]+\.jpg$"), "her2st section")
    (image_key,) = [k for k in registry() if k.startswith("her2st/data/ST-imgs/") and f"/{section}/" in k]
    return _legacy_st(
        dataset="her2st",
        sample=section,
        counts_key=f"her2st/data/ST-cnts/{section}.tsv.gz",
        spots_key=f"her2st/data/ST-spotfiles/{section}_selection.tsv",
        image_key=image_key,
        um_per_array_column=HER2ST_UM_PER_ARRAY_COLUMN,
        data_dir=data_dir,
    )


def mouse_olfactory_bulb(section: str = "MOB1", *, data_dir: str | os.PathLike | None = None) -> SpatialData:
    """Mouse olfactory bulb sections, legacy Spatial Transcriptomics (STUtility, Bergenstråhle et al. 2020).

    Parameters
    ----------
    section
        ``"MOB1"`` … ``"MOB4"``.
    data_dir
        Folder laid out like ``<dataset>/<path>`` holding the files (default: ``SPADE_SD_DATA_DIR``, else download).

    Returns
    -------
    A SpatialData with ``f"{section}_image"`` (multiscale H&E, ~4.6 µm/px), ``f"{section}_spots"`` (100 µm circles
    under tissue) and ``"table"`` (raw counts, Ensembl ids, array coordinates in ``obs``).
    """
    folder = "stutility_mob/inst/extdata/counts"
    check_registered(section, registered_names(f"{folder}/", r"/(MOB\d)\.jpg$"), "olfactory bulb section")
    return _legacy_st(
        dataset="stutility_mob",
        sample=section,
        counts_key=f"{folder}/{section}.tsv",
        spots_key=f"{folder}/alignment_table_{section}.tsv",
        image_key=f"{folder}/{section}.jpg",
        um_per_array_column=MOB_UM_PER_ARRAY_COLUMN,
        data_dir=data_dir,
    )


def visium_muscle(sample: str = "Vis5A_2dpi", *, data_dir: str | os.PathLike | None = None) -> SpatialData:
    """Mouse tibialis anterior after injury, 10x Visium v1 (McKellar et al. 2021), read by spatialdata-io.

    Only the low-resolution H&E (600 px) exists upstream; it becomes a two-level multiscale image.

    Parameters
    ----------
    sample
        ``"Vis5A_2dpi"`` or ``"Vis7B_5dpi"``.
    data_dir
        Folder laid out like ``<dataset>/<path>`` holding the files (default: ``SPADE_SD_DATA_DIR``, else download).

    Returns
    -------
    spatialdata-io's Visium layout: ``f"{sample}_lowres_image"`` (now multiscale), ``sample`` (circles in
    full-resolution pixels, as wide as Space Ranger's ``spot_diameter_fullres``, a 65 µm spot) and ``"table"`` (raw
    counts, gene symbols made unique, ``array_row``/``array_col``). The table records the technology, so the µm per
    pixel follows from Visium's 100 µm spot pitch on the spots' grid (~13.3 µm per pixel of the low-resolution
    image).
    """
    from spatialdata.models import Image2DModel, TableModel
    from spatialdata.transformations import get_transformation
    from spatialdata_io import visium

    folder = "scmuscle_visium/visium_data"
    check_registered(sample, registered_names(f"{folder}/", rf"{folder}/(\w+)/spatial/"), "Visium muscle sample")
    files = [k for k in registry() if k.startswith(f"{folder}/{sample}/")]
    paths = {k: fetch(k, data_dir) for k in files}
    (counts_key,) = [k for k in files if k.endswith(".h5")]
    sample_dir = Path(paths[counts_key]).parent
    sdata = visium(sample_dir, dataset_id=sample, counts_file=Path(counts_key).name)

    image_name = f"{sample}_lowres_image"
    lowres = sdata.images[image_name]
    sdata.images[image_name] = Image2DModel.parse(
        lowres.data,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2],
        transformations=get_transformation(lowres, get_all=True),
    )
    table = sdata.tables["table"]
    table.var_names_make_unique()
    table.obs[SAMPLE_KEY] = pd.Categorical([sample] * table.n_obs)
    table.uns[UNS_KEY] = {
        "dataset": "scmuscle_visium",
        SAMPLE: sample,
        TECHNOLOGY: "Visium",
    }
    sdata.tables["table"] = TableModel.parse(table)
    return sdata
