"""SpatialData made by other tools, as a new user gets it: spatialdata-io's Visium reader on the shared Visium muscle
folders (a Space Ranger layout it reads as is), spatialdata's blobs, crops, concatenations and zarr round trips, and
sopa's layout (rebuilt here: sopa is too heavy a test dependency). Nothing is silently wrong, and every refusal names
the element and the fix."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import spatialdata
from anndata import AnnData
from helpers import CountingMeans
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, set_transformation

import spade_sd as sd
from spade_sd.spots.geometry import resolve_geometry

VISIUM = "scmuscle_visium/visium_data"


def _read_visium(data_dir, sample: str = "Vis5A_2dpi") -> spatialdata.SpatialData:
    from spatialdata_io import visium

    return visium(data_dir / VISIUM / sample)


@pytest.fixture(scope="module")
def visium_sdata(data_dir):
    return _read_visium(data_dir)


def _row_neighbour_px(sdata, geometry) -> float:
    """Median distance in image pixels between spots next to each other in a row of the Visium grid (100 µm)."""
    obs = sdata.tables[geometry.table_key].obs.iloc[geometry.table_rows]
    where = {(r, c): i for i, (r, c) in enumerate(zip(obs["array_row"], obs["array_col"], strict=True))}
    pairs = [(i, where[r, c + 2]) for (r, c), i in where.items() if (r, c + 2) in where]
    return float(np.median([np.hypot(*(geometry.centers[i] - geometry.centers[j])) for i, j in pairs]))


def _refused(match: str, call) -> None:
    fn = CountingMeans()
    with pytest.raises(ValueError, match=match):
        call(sd.Backbone(fn))
    assert fn.calls == 0


# --- spatialdata-io's Visium


def test_spatialdata_io_visium_is_recognised_and_keeps_its_scale_through_zarr_and_concatenation(
    visium_sdata, data_dir, tmp_path
):
    geometry = resolve_geometry(visium_sdata)
    assert "spade_sd" not in visium_sdata.tables["table"].uns  # the reader records no technology
    # Visium's spots are 100 µm apart in a row; Space Ranger's circles are 65 µm, not 55 µm, across on that scale
    assert geometry.mpp == pytest.approx(100 / _row_neighbour_px(visium_sdata, geometry), rel=0.01)
    assert geometry.mpp * 2 * geometry.radius[0] == pytest.approx(65, rel=0.02)
    assert "Visium" in geometry.mpp_source

    visium_sdata.write(tmp_path / "visium.zarr")
    assert resolve_geometry(spatialdata.read_zarr(tmp_path / "visium.zarr")).mpp == geometry.mpp

    loaded = [sd.datasets.visium_muscle(name) for name in ("Vis5A_2dpi", "Vis7B_5dpi")]
    alone = [resolve_geometry(sdata).mpp for sdata in loaded]
    assert alone[0] == pytest.approx(geometry.mpp)  # the loader and the reader agree
    both = spatialdata.concatenate(loaded, concatenate_tables=True)
    assert "spade_sd" not in both.tables["table"].uns  # concatenation drops uns: the scale is found again
    for name, mpp in zip(("Vis5A_2dpi", "Vis7B_5dpi"), alone, strict=True):
        assert resolve_geometry(both, shapes_key=name).mpp == pytest.approx(mpp)


def test_concatenated_legacy_st_slides_keep_their_scale(her2st_c2, mob1):
    alone = {name: resolve_geometry(sdata) for name, sdata in (("C2", her2st_c2), ("MOB1", mob1))}
    both = spatialdata.concatenate([her2st_c2, mob1], concatenate_tables=True)
    assert "spade_sd" not in both.tables["table"].uns
    for name, geometry in alone.items():
        found = resolve_geometry(both, image_key=f"{name}_image", shapes_key=f"{name}_spots")
        assert found.mpp == pytest.approx(geometry.mpp) and found.n_spots == geometry.n_spots


def test_spatialdata_io_visium_trains_and_embeds_with_no_extra_argument(data_dir, one_thread):
    sdata = _read_visium(data_dir, "Vis7B_5dpi")
    options = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "out_dim": 16, "n_comps": 4, "quiet": True}
    sd.tl.pretrain(sdata, backbone=sd.Backbone(CountingMeans()), **options)
    sd.tl.embed(sdata)
    table = sdata.tables["table"]
    assert len(table.obsm["X_spade"]) == table.n_obs and np.isfinite(table.obsm["X_spade"]).all()


def test_a_scale_for_another_image_level_is_refused_with_the_actual_one(visium_sdata, data_dir):
    factors = json.loads((data_dir / VISIUM / "Vis5A_2dpi/spatial/scalefactors_json.json").read_text())
    fullres_mpp = 55 / factors["spot_diameter_fullres"]  # what a Visium user naturally passes: 0.305 µm/px
    actual = resolve_geometry(visium_sdata).mpp
    match = (
        rf"The mpp argument gives 0.305\d µm per pixel, but the spots of shapes 'Vis5A' give image "
        rf"'Vis5A_lowres_image' {actual:.4g} µm per pixel .*image element's own full-resolution level"
        rf".*pass mpp={actual:.4g}"
    )
    _refused(match, lambda backbone: sd.tl.features(visium_sdata, backbone=backbone, mpp=fullres_mpp))
    tagged = spatialdata.SpatialData(images=visium_sdata.images, shapes=visium_sdata.shapes, tables={})
    tagged.tables["table"] = visium_sdata.tables["table"].copy()
    tagged.tables["table"].uns["spade_sd"] = {"technology": "Visium"}
    _refused(match, lambda backbone: sd.tl.features(tagged, backbone=backbone, mpp=fullres_mpp))
    assert resolve_geometry(visium_sdata, mpp=actual * 1.1).mpp == actual * 1.1  # within 20 %: the user's own


def _grid_table(rows, cols, centers, radius: float, *, polygons: bool = False) -> spatialdata.SpatialData:
    ids = np.arange(len(centers))
    points = gpd.points_from_xy(*np.asarray(centers, float).T)
    frame = (
        gpd.GeoDataFrame(geometry=points.buffer(radius, cap_style=3), index=ids)
        if polygons
        else gpd.GeoDataFrame({"radius": np.full(len(ids), radius)}, geometry=points, index=ids)
    )
    shapes = ShapesModel.parse(frame, transformations={"global": Identity()})
    obs = pd.DataFrame(
        {"in_tissue": 1, "array_row": rows, "array_col": cols, "spot_id": ids, "region": "bins"}, index=ids.astype(str)
    )
    obs["region"] = obs["region"].astype("category")
    table = TableModel.parse(
        AnnData(np.ones((len(ids), 2), np.float32), obs=obs), region="bins", region_key="region", instance_key="spot_id"
    )
    image = Image2DModel.parse(np.full((3, 400, 400), 200, np.uint8), dims=("c", "y", "x"))
    return spatialdata.SpatialData(images={"he": image}, shapes={"bins": shapes}, tables={"table": table})


def test_visium_hd_bins_and_odd_circles_are_not_taken_for_visium():
    rows, cols = (a.ravel() for a in np.mgrid[0:10, 0:10])
    square = np.c_[cols, rows] * 20.0 + 100
    with pytest.raises(ValueError, match=r"scale is unknown.*not as positions on Visium's hexagonal grid"):
        resolve_geometry(_grid_table(rows, cols, square, 10.0))  # bins read as circles
    with pytest.raises(ValueError, match=r"scale is unknown.*shapes 'bins' are polygons"):
        resolve_geometry(_grid_table(rows, cols, square, 10.0, polygons=True))  # bins read as squares
    hexagonal = cols % 2 == rows % 2
    rows, cols = rows[hexagonal], cols[hexagonal]
    centers = np.c_[cols * 10.0, rows * 10.0 * np.sqrt(3)] + 100
    with pytest.raises(ValueError, match=r"its circles would be 11 µm across .*Visium's circles are 55 to 65 µm"):
        resolve_geometry(_grid_table(rows, cols, centers, 1.1))  # cells that happen to carry array positions
    geometry = resolve_geometry(_grid_table(rows, cols, centers, 5.5))
    assert geometry.mpp == pytest.approx(5.0)  # 20 px between row neighbours are 100 µm


def test_a_bounding_box_crop_is_read_and_spots_really_outside_are_refused(data_dir):
    from shapely import Point

    from spade_sd.spots.geometry import affine_to, image_levels

    sdata = sd.datasets.visium_muscle("Vis5A_2dpi")
    full = resolve_geometry(sdata)
    # a box in full-resolution pixels: the image is cropped to whole low-resolution pixels, the spots by their centre
    crop = spatialdata.bounding_box_query(
        sdata,
        axes=("x", "y"),
        min_coordinate=[7336.2, 7878.2],
        max_coordinate=[10809.4, 13766.1],
        target_coordinate_system="Vis5A_2dpi",
        filter_table=True,
    )
    geometry = resolve_geometry(crop)
    height, width = geometry.level_shapes[0]
    x, y = geometry.centers.T
    past = np.max([-x, -y, x - width, y - height], axis=0)
    assert (past > 0).sum() == 12 and past.max() < 1  # centred in the box, a fraction of a pixel past the crop
    assert geometry.mpp == pytest.approx(full.mpp, rel=1e-3)
    patches = sd.pp.spot_patches(crop)
    assert len(patches) == crop.tables["table"].n_obs == 303
    assert (patches[int(np.argmax(past))] == 255).any()  # padded with white beyond the edge

    level0 = image_levels(crop.images["Vis5A_2dpi_lowres_image"])[0]
    to_system = affine_to(level0, "Vis5A_2dpi")
    shapes = crop.shapes["Vis5A_2dpi"]
    shapes.loc[shapes.index[0], "geometry"] = Point(to_system[:2, :2] @ [-30.0, 50.0] + to_system[:2, 2])
    with pytest.raises(ValueError, match=r"1 of 303 spots of 'Vis5A_2dpi' lie outside .* up to 30.0 px \(\d+ µm\)"):
        resolve_geometry(crop)


def test_a_crop_of_a_pyramid_is_read_although_its_levels_round_differently(her2st_c2):
    geometry = resolve_geometry(her2st_c2)
    (x0, y0), (x1, y1) = geometry.centers.min(axis=0), geometry.centers.max(axis=0)
    crop = spatialdata.bounding_box_query(
        her2st_c2,
        axes=("x", "y"),
        min_coordinate=[x0 + 0.1 * (x1 - x0), y0 + 0.5 * (y1 - y0)],
        max_coordinate=[x0 + 0.37 * (x1 - x0), y0 + 0.8 * (y1 - y0)],
        target_coordinate_system="global",
        filter_table=True,
    )
    cropped = resolve_geometry(crop)
    factors = np.asarray(cropped.level_downsample)
    assert (abs(factors[:, 0] / factors[:, 1] - 1) > 1e-2).any()  # rounding: refused as anisotropic before
    assert cropped.mpp == pytest.approx(geometry.mpp)
    assert sd.pp.spot_patches(crop).read(np.arange(4)).shape == (4, 224, 224, 3)


# --- sopa's layout and spatialdata's blobs


@pytest.fixture
def sopa_like():
    """sopa's toy data after aggregation: a 4-marker image, an H&E at half resolution, cells with a table, and the
    image patches sopa makes for segmentation (shapes without a table)."""
    rng = np.random.default_rng(0)
    markers = Image2DModel.parse(
        rng.integers(0, 40, (4, 256, 256)).astype(np.uint8),
        dims=("c", "y", "x"),
        c_coords=["DAPI", "CK", "CD3", "CD20"],
    )
    pink = np.clip(rng.normal((230, 150, 190), 15, (128, 128, 3)), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    he = Image2DModel.parse(pink, dims=("c", "y", "x"), transformations={"global": Scale([2, 2], axes=("x", "y"))})
    centers = rng.uniform(40, 216, (30, 2))
    cells = ShapesModel.parse(gpd.GeoDataFrame(geometry=gpd.points_from_xy(*centers.T).buffer(8)))
    patches = ShapesModel.parse(gpd.GeoDataFrame(geometry=gpd.GeoSeries.from_xy([64, 192], [128, 128]).buffer(64)))
    obs = pd.DataFrame({"cell_id": cells.index, "region": pd.Categorical(["cellpose_boundaries"] * len(cells))})
    table = TableModel.parse(
        AnnData(rng.poisson(3, (len(cells), 5)).astype(np.float32), obs=obs.set_index(obs.index.astype(str))),
        region="cellpose_boundaries",
        region_key="region",
        instance_key="cell_id",
    )
    return spatialdata.SpatialData(
        images={"image": markers, "he_image": he},
        shapes={"cellpose_boundaries": cells, "image_patches": patches},
        tables={"table": table},
    )


def test_sopa_markers_are_refused_and_its_he_image_is_read(sopa_like):
    patch = {"mpp": 1.0, "size_um": 32.0, "size_px": 32}
    _refused(
        r"Image 'image' has channels named \['DAPI', 'CK', 'CD3', 'CD20'\].*not H&E.*Pass image_key=",
        lambda backbone: sd.tl.features(sopa_like, backbone=backbone, image_key="image", **patch),
    )
    sd.tl.features(sopa_like, backbone=sd.Backbone(CountingMeans()), image_key="he_image", **patch)
    assert np.isfinite(sopa_like.tables["table"].obsm["X_backbone"]).all()


def test_shapes_without_a_table_name_the_element_and_the_fix(sopa_like):
    _refused(
        r"No table annotates shapes 'image_patches' \(table 'table' annotates shape 'cellpose_boundaries'\)\. "
        r".*TableModel.parse.*region='image_patches'.*sd.pp.tile_image\(sdata\)",
        lambda backbone: sd.tl.features(sopa_like, backbone=backbone, shapes_key="image_patches", mpp=1.0),
    )
    blobs = spatialdata.datasets.blobs()
    _refused(
        r"No table annotates shapes 'blobs_circles' \(table 'table' annotates label 'blobs_labels'\)",
        lambda backbone: sd.tl.features(blobs, backbone=backbone, shapes_key="blobs_circles", mpp=1.0),
    )


def test_an_image_in_another_coordinate_system_names_the_fix():
    blobs = spatialdata.datasets.blobs()
    table = TableModel.parse(
        AnnData(
            np.ones((5, 2), np.float32),
            obs=pd.DataFrame(
                {"id": blobs.shapes["blobs_circles"].index, "region": pd.Categorical(["blobs_circles"] * 5)}
            ).set_index(pd.Index([str(i) for i in range(5)])),
        ),
        region="blobs_circles",
        region_key="region",
        instance_key="id",
    )
    del blobs.tables["table"]
    blobs.tables["spots"] = table
    for name in list(blobs.images):
        set_transformation(blobs.images[name], {"scan": Identity()}, set_all=True)
    _refused(
        r"No images fits: .*'blobs_circles' \(\['global'\]\)\. The images' coordinate systems are .*'scan'.* "
        r"give the H&E image a transformation to one of \['global'\]",
        lambda backbone: sd.tl.features(blobs, backbone=backbone, mpp=1.0),
    )


def test_a_table_without_genes_is_named_by_its_key_and_told_what_it_lacks():
    blobs = spatialdata.datasets.blobs()
    ids = blobs.shapes["blobs_circles"].index
    obs = pd.DataFrame({"id": ids, "region": pd.Categorical(["blobs_circles"] * len(ids))}, index=ids.astype(str))
    blobs.tables["spots"] = TableModel.parse(
        AnnData(obs=obs), region="blobs_circles", region_key="region", instance_key="id"
    )
    fn = CountingMeans()
    with pytest.raises(ValueError, match=r"""Table "spots\[shapes='blobs_circles'\]" holds no genes""") as error:
        sd.tl.pretrain(blobs, backbone=sd.Backbone(fn), image_key="blobs_image", table_key="spots", mpp=1.0)
    assert "layer=" not in str(error.value) and fn.calls == 0
