"""Bins or cells summed into the squares of a grid: pseudo-spots of known size, which train like spots.

A bin or cell belongs to the square that holds its centre. The squares are laid out in the shapes' own coordinates
from the corner of their bounding box, so they keep the shapes' transformations; their side in µm is recorded on
their table, which gives the image's scale to :mod:`spade_sd.spots.geometry` as any bin size does. The sums are one
sparse product (a squares × bins indicator matrix times the counts), with no loop over bins.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from anndata import AnnData
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import get_transformation

from spade_sd.spots.geometry import SpotGeometry, linear_scale, pixels_from_shapes
from spade_sd.utils.constants import BIN_SIZE_UM, N_AGGREGATED, SAMPLE, SAMPLE_KEY, SPATIAL_KEY, UNS_KEY, WRITTEN_BY

REGION_KEY, INSTANCE_KEY = "region", "square_id"


@dataclass(frozen=True)
class Squares:
    """The squares holding at least one bin or cell, as a shapes element and the table annotating it."""

    shapes: gpd.GeoDataFrame
    table: AnnData


def count_matrices(table: AnnData) -> tuple[list[str | None], list[str]]:
    """Which of ``X`` (``None``) and the layers hold raw counts (finite, non-negative integers), and which do not."""
    counts, other = [], []
    for name in [None, *sorted(key for key in table.layers.keys() if key is not None)]:
        matrix = table.X if name is None else table.layers[name]
        if matrix is None:
            continue
        values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix)
        integral = np.issubdtype(values.dtype, np.integer) or bool(
            np.isfinite(values).all() and (values == np.round(values)).all()
        )
        (counts if integral and not (values < 0).any() else other).append(name)
    return counts, [("X" if name is None else name) for name in other]


def _grid(centers: np.ndarray, origin: np.ndarray, side: float, groups: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each centre's square (``inverse``) and every occupied square's id, group, row and column."""
    col, row = np.floor((centers - origin) / side).astype(np.int64).T
    n_rows, n_cols = int(row.max()) + 1, int(col.max()) + 1
    key = (groups * n_rows + row) * n_cols + col
    ids, inverse = np.unique(key, return_inverse=True)
    group, cell = np.divmod(ids, n_rows * n_cols)
    return inverse, ids, group, *np.divmod(cell, n_cols)


def _summed(matrix, inverse: np.ndarray, n_squares: int):
    """Rows of ``matrix`` summed per square; sparse stays sparse (CSR), dense stays dense."""
    dtype = matrix.dtype if np.issubdtype(matrix.dtype, np.number) else np.float64
    indicator = sparse.csr_matrix(
        (np.ones(len(inverse), dtype=dtype), (inverse, np.arange(len(inverse)))), shape=(n_squares, len(inverse))
    )
    summed = indicator @ matrix
    return summed.tocsr() if sparse.issparse(summed) else np.asarray(summed)


def aggregate_shapes(
    sdata: SpatialData,
    geometry: SpotGeometry,
    *,
    size_um: float,
    matrices: list[str | None],
    region: str,
    tool: str,
) -> Squares:
    """Sum the counts of ``geometry``'s bins or cells into squares of ``size_um`` µm.

    Parameters
    ----------
    sdata
        The SpatialData holding the bins or cells.
    geometry
        Their resolved geometry, with a known scale (``geometry.mpp``).
    size_um
        The squares' side in µm.
    matrices
        What to sum: ``None`` for ``X``, else layer names (:func:`count_matrices`).
    region
        The name the squares will have (the table's region).
    tool
        Recorded as the table's maker.
    """
    shapes = sdata.shapes[geometry.shapes_key]
    table = sdata.tables[geometry.table_key]
    instance_key = table.uns["spatialdata_attrs"]["instance_key"]
    to_pixels = pixels_from_shapes(sdata, geometry.image_key, geometry.shapes_key, geometry.coordinate_system)
    to_units = np.linalg.inv(to_pixels)
    centers = geometry.centers @ to_units[:2, :2].T + to_units[:2, 2]
    side = size_um / (geometry.mpp * linear_scale(to_pixels))
    origin = shapes.geometry.loc[table.obs[instance_key].to_numpy()[geometry.table_rows]].total_bounds[:2]

    rows = geometry.table_rows
    whole = len(rows) == table.n_obs and bool((rows == np.arange(table.n_obs)).all())
    obs = table.obs if whole else table.obs.iloc[rows]
    samples = obs[SAMPLE_KEY] if SAMPLE_KEY in obs else pd.Series(0, index=obs.index)
    codes, sample_names = pd.factorize(samples, use_na_sentinel=False)
    inverse, ids, group, grid_row, grid_col = _grid(centers, origin, side, codes)
    n_squares = len(ids)

    def summed(name: str | None):
        matrix = table.X if name is None else table.layers[name]
        return _summed(matrix if whole else matrix[rows], inverse, n_squares)

    corner = origin + np.c_[grid_col, grid_row] * side
    index = pd.Index([str(i) for i in ids])
    square_obs = pd.DataFrame(
        {
            INSTANCE_KEY: ids,
            REGION_KEY: pd.Categorical([region] * n_squares),
            "grid_row": grid_row,
            "grid_col": grid_col,
            N_AGGREGATED: np.bincount(inverse, minlength=n_squares),
        },
        index=index,
    )
    if SAMPLE_KEY in obs:
        square_obs[SAMPLE_KEY] = pd.Categorical(np.asarray(sample_names)[group])
    meta = table.uns.get(UNS_KEY, {})
    uns = {
        WRITTEN_BY: tool,
        BIN_SIZE_UM: float(size_um),
        "aggregated_from": {"shapes_key": geometry.shapes_key, "table_key": geometry.table_key},
        "grid_origin": [float(v) for v in origin],
        "grid_side": float(side),
        "mpp_source": geometry.mpp_source,
        **({SAMPLE: meta[SAMPLE]} if isinstance(meta, dict) and SAMPLE in meta else {}),
    }
    squares_table = AnnData(
        X=summed(None) if None in matrices else None,
        obs=square_obs,
        var=table.var.copy(),
        layers={name: summed(name) for name in matrices if name is not None},
        obsm={SPATIAL_KEY: corner + side / 2},
        uns={UNS_KEY: uns},
    )
    boxes = shapely.box(corner[:, 0], corner[:, 1], corner[:, 0] + side, corner[:, 1] + side)
    return Squares(
        shapes=ShapesModel.parse(
            gpd.GeoDataFrame(geometry=boxes, index=ids),
            transformations=deepcopy(get_transformation(shapes, get_all=True)),
        ),
        table=TableModel.parse(squares_table, region=region, region_key=REGION_KEY, instance_key=INSTANCE_KEY),
    )
