from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale

import spade_sd as sd
from spade_sd.spots.geometry import resolve_geometry


def _image(system: str = "global"):
    pixels = np.full((3, 100, 120), 200, dtype=np.uint8)
    return Image2DModel.parse(pixels, dims=("c", "y", "x"), scale_factors=[2], transformations={system: Identity()})


def _circles(xy, system: str = "global", radius: float = 10.0):
    xy = np.asarray(xy, dtype=float)
    ids = [f"c{i}" for i in range(len(xy))]
    frame = gpd.GeoDataFrame({"radius": np.full(len(xy), radius)}, geometry=gpd.points_from_xy(*xy.T), index=ids)
    return ShapesModel.parse(frame, transformations={system: Identity()})


def _table(region: str, n: int, uns: dict | None = None):
    ids = [f"c{i}" for i in range(n)]
    obs = pd.DataFrame({"id": ids, "region": pd.Categorical([region] * n)}, index=[f"{region}-{i}" for i in ids])
    table = TableModel.parse(
        AnnData(np.ones((n, 2), np.float32), obs=obs), region=region, region_key="region", instance_key="id"
    )
    table.uns["spade_sd"] = uns if uns is not None else {"spot_diameter_um": 55.0}
    return table


XY = [[20, 30], [60, 50], [100, 80]]


def test_resolves_unique_elements_and_scale_from_spot_diameter():
    sdata = SpatialData(images={"he": _image()}, shapes={"spots": _circles(XY)}, tables={"counts": _table("spots", 3)})
    geometry = resolve_geometry(sdata)
    assert (geometry.image_key, geometry.shapes_key, geometry.table_key) == ("he", "spots", "counts")
    assert geometry.mpp == pytest.approx(55.0 / 20.0) and "spot_diameter_um" in geometry.mpp_source
    np.testing.assert_allclose(geometry.centers, XY)
    assert geometry.level_downsample == ((1.0, 1.0), (2.0, 2.0))
    np.testing.assert_allclose(geometry.centers_at(1), np.asarray(XY) / 2)
    assert resolve_geometry(sdata, mpp=2.5).mpp == 2.5  # a given scale within 20 % of the spots' is taken as given


def test_scale_from_technology_or_explicit_mpp_metadata():
    for uns, expected in (({"technology": "legacy_ST"}, 100.0 / 20.0), ({"mpp": 0.7}, 0.7)):
        sdata = SpatialData(images={"he": _image()}, shapes={"s": _circles(XY)}, tables={"t": _table("s", 3, uns)})
        assert resolve_geometry(sdata).mpp == pytest.approx(expected)


def test_scaled_shapes_are_mapped_into_pixels():
    shapes = _circles(np.asarray(XY) * 4, radius=40.0)
    from spatialdata.transformations import set_transformation

    set_transformation(shapes, Scale([0.25, 0.25], axes=("x", "y")), to_coordinate_system="global")
    sdata = SpatialData(images={"he": _image()}, shapes={"s": shapes}, tables={"t": _table("s", 3)})
    geometry = resolve_geometry(sdata)
    np.testing.assert_allclose(geometry.centers, XY)
    np.testing.assert_allclose(geometry.radius, 10.0)


def test_missing_names_are_listed():
    sdata = SpatialData(images={"he": _image()}, shapes={"spots": _circles(XY)}, tables={"counts": _table("spots", 3)})
    with pytest.raises(KeyError, match=r"image 'HE'.*\['he'\]"):
        sd.pp.spot_patches(sdata, image_key="HE")
    with pytest.raises(KeyError, match=r"table 'table'.*\['counts'\]"):
        sd.pp.spot_patches(sdata, table_key="table")


def test_ambiguous_elements_list_the_candidates():
    sdata = SpatialData(
        images={"he": _image(), "he2": _image()},
        shapes={"a": _circles(XY), "b": _circles(XY)},
        tables={"ta": _table("a", 3), "tb": _table("b", 3)},
    )
    with pytest.raises(ValueError, match=r"Several shapes.*\['a', 'b'\].*shapes_key"):
        resolve_geometry(sdata)
    with pytest.raises(ValueError, match=r"Several images.*\['he', 'he2'\].*image_key"):
        resolve_geometry(sdata, shapes_key="a")
    assert resolve_geometry(sdata, table_key="tb", image_key="he2").shapes_key == "b"


def test_table_that_annotates_nothing():
    sdata = SpatialData(images={"he": _image()}, shapes={"spots": _circles(XY)}, tables={"t": _table("elsewhere", 3)})
    with pytest.raises(ValueError, match="annotates no shapes"):
        resolve_geometry(sdata, table_key="t")
    with pytest.raises(
        ValueError, match=r"No table annotates a shapes element \(table 't' annotates 'elsewhere' \(not in it\)"
    ):
        resolve_geometry(sdata)


def test_no_shared_coordinate_system():
    sdata = SpatialData(
        images={"he": _image("microscope")}, shapes={"s": _circles(XY, "global")}, tables={"t": _table("s", 3)}
    )
    with pytest.raises(ValueError, match="No images fits"):
        resolve_geometry(sdata)
    with pytest.raises(ValueError, match=r"\['microscope'\].*\['global'\]\) share no coordinate system"):
        resolve_geometry(sdata, image_key="he")


def test_unknown_scale_says_what_to_pass():
    sdata = SpatialData(images={"he": _image()}, shapes={"s": _circles(XY)}, tables={"t": _table("s", 3, {})})
    with pytest.raises(ValueError, match="Pass mpp="):
        sd.pp.spot_patches(sdata)
    with pytest.raises(ValueError, match=r"mpp must be a finite number of µm per pixel ≥ 0.001 and ≤ 1000; found -1.0"):
        sd.pp.spot_patches(sdata, mpp=-1.0)


def test_spots_outside_the_image():
    sdata = SpatialData(
        images={"he": _image()}, shapes={"s": _circles([[20, 30], [500, 40]])}, tables={"t": _table("s", 2)}
    )
    with pytest.raises(ValueError, match=r"1 of 2 spots.*outside image 'he'.*c1"):
        sd.pp.spot_patches(sdata)


def test_real_data_scales(her2st_c2, mob1):
    her2st, mob = resolve_geometry(her2st_c2), resolve_geometry(mob1)
    assert 0.6 < her2st.mpp < 0.75  # ~291 px per 200 µm pitch
    assert 4.2 < mob.mpp < 5.0  # ~43 px per 200 µm pitch
    assert len(her2st.level_shapes) > 3 and her2st.level_shapes[0] == (9911, 9274)


def test_spots_a_fraction_of_a_pixel_past_the_edge_are_read_and_farther_ones_named_with_their_distance():
    edge = [[20, 30], [-0.6, 50], [119.9, 99.5]]  # the image is 120 × 100 px
    sdata = SpatialData(images={"he": _image()}, shapes={"s": _circles(edge)}, tables={"t": _table("s", 3)})
    np.testing.assert_allclose(resolve_geometry(sdata).centers, edge)
    far = SpatialData(
        images={"he": _image()}, shapes={"s": _circles([[20, 30], [-12.5, 50]])}, tables={"t": _table("s", 2)}
    )
    with pytest.raises(
        ValueError, match=r"1 of 2 spots .* up to 12.5 px \(34.4 µm\) past its edge.*bounding_box_query"
    ):
        resolve_geometry(far)


def test_a_scale_disagreeing_with_the_spot_size_is_refused_with_the_actual_one():
    sdata = SpatialData(images={"he": _image()}, shapes={"s": _circles(XY)}, tables={"t": _table("s", 3)})
    # 55 µm spots 20 px across: 2.75 µm per pixel
    with pytest.raises(ValueError, match=r"The mpp argument gives 0.5 µm .* 2.75 µm per pixel .* pass mpp=2.75"):
        resolve_geometry(sdata, mpp=0.5)
    assert resolve_geometry(sdata, mpp=3.2).mpp == 3.2  # 16 % off: the user's own scale
    sdata.tables["t"].uns["spade_sd"]["mpp"] = 10.0
    with pytest.raises(
        ValueError, match=r"uns\['spade_sd'\]\['mpp'\] gives 10 µm .* correct uns\['spade_sd'\]\['mpp'\]"
    ):
        resolve_geometry(sdata)


def test_the_spot_diameter_in_obs_survives_a_table_without_uns():
    table = _table("s", 3, {})
    table.obs["spot_diameter_um"] = 100.0
    sdata = SpatialData(images={"he": _image()}, shapes={"s": _circles(XY)}, tables={"t": table})
    geometry = resolve_geometry(sdata)
    assert geometry.mpp == pytest.approx(5.0) and "obs['spot_diameter_um']" in geometry.mpp_source
    table.obs["spot_diameter_um"] = [100.0, 55.0, 100.0]
    with pytest.raises(ValueError, match=r"obs\['spot_diameter_um'\] must hold one positive spot diameter"):
        resolve_geometry(sdata)


def test_visium_hd_scale_factors_are_not_taken_for_visium():
    table = _table("s", 3, {})
    table.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 20.0, "bin_size_um": 8.0}}}
    sdata = SpatialData(images={"he": _image()}, shapes={"s": _circles(XY)}, tables={"t": table})
    with pytest.raises(ValueError, match="physical scale is unknown"):
        resolve_geometry(sdata)
    del table.uns["spatial"]["lib"]["scalefactors"]["bin_size_um"]  # Visium: Space Ranger's 55 µm spots
    assert resolve_geometry(sdata).mpp == pytest.approx(55 / 20)
