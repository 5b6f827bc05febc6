"""What the patches show is checked on patches already read: blank (glass, white, black, flat) patches are counted,
nearly all blank is refused before any encoding, NaN pixels and marker channels are refused, dark images warned of."""

from __future__ import annotations

import logging

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from helpers import CountingMeans
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity

import spade_sd as sd
from spade_sd.spots.content import BLANK_WARN_SHARE, blank_patches

SIDE, STEP, GRID = 160, 20, 8  # spots every 20 px from (10, 10): an 8 × 8 grid
PATCH = {"size_um": 16.0, "size_px": 32}
PINK, PURPLE = (230, 150, 190), (120, 60, 150)


def _tissue(shape=(SIDE, SIDE), seed: int = 0) -> np.ndarray:
    """``(3, y, x)`` uint8 H&E-like pixels: pink stroma with purple nuclei and some noise."""
    rng = np.random.default_rng(seed)
    nuclei = rng.random(shape) < 0.2
    pixels = np.where(nuclei[..., None], PURPLE, PINK) + rng.normal(0, 8, (*shape, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def _slide(pixels: np.ndarray, channels=None) -> SpatialData:
    image = Image2DModel.parse(pixels, dims=("c", "y", "x"), c_coords=channels, transformations={"global": Identity()})
    centers = np.stack(np.meshgrid(np.arange(GRID), np.arange(GRID)), -1).reshape(-1, 2) * STEP + STEP // 2
    ids = [f"s{i}" for i in range(len(centers))]
    circles = ShapesModel.parse(
        gpd.GeoDataFrame({"radius": np.full(len(ids), 5.0)}, geometry=gpd.points_from_xy(*centers.T), index=ids),
        transformations={"global": Identity()},
    )
    obs = pd.DataFrame({"spot": ids, "region": pd.Categorical(["spots"] * len(ids))}, index=ids)
    table = TableModel.parse(
        AnnData(np.ones((len(ids), 2), np.float32), obs=obs), region="spots", region_key="region", instance_key="spot"
    )
    table.uns["spade_sd"] = {"mpp": 1.0}
    return SpatialData(images={"he": image}, shapes={"spots": circles}, tables={"table": table})


def _refused_before_any_work(sdata, match: str, cache_dir, error=ValueError) -> None:
    fn, cached = CountingMeans(), set(cache_dir.rglob("*"))
    with pytest.raises(error, match=match):
        sd.tl.features(sdata, backbone=sd.Backbone(fn, version="1"), **PATCH)
    assert fn.calls == 0
    assert "X_backbone" not in sdata.tables["table"].obsm
    assert set(cache_dir.rglob("*")) == cached  # no feature file, not even a partial one


def test_blank_patches_tells_glass_black_flat_and_grey_from_tissue():
    rng = np.random.default_rng(1)
    tissue = _tissue((64, 64)).transpose(1, 2, 0)
    glass = np.clip(rng.normal((238, 236, 240), 1.5, (64, 64, 3)), 0, 255).astype(np.uint8)
    half = tissue.copy()
    half[:, :40] = 255  # a spot at the image's edge: padded with white, yet on tissue
    grey = np.repeat(rng.integers(60, 220, (64, 64, 1), dtype=np.uint8), 3, axis=2)
    flat = np.broadcast_to(np.uint8(PINK), (64, 64, 3))
    cases = {
        "white": (np.full((64, 64, 3), 255, np.uint8), True),
        "black": (np.zeros((64, 64, 3), np.uint8), True),
        "glass": (glass, True),
        "flat pink": (flat, True),
        "tissue": (tissue, False),
        "edge": (half, False),
        "grey texture": (grey, False),  # a grey image has no saturation: only uniform patches are blank
    }
    found = blank_patches(np.stack([patch for patch, _ in cases.values()]))
    assert dict(zip(cases, found.tolist(), strict=True)) == {name: blank for name, (_, blank) in cases.items()}


@pytest.mark.parametrize("fixture", ["her2st_c2", "mob1"])
def test_real_spots_show_tissue_and_look_like_he(fixture, request, caplog):
    from spade_sd.spots.content import check_sample

    patches = sd.pp.spot_patches(request.getfixturevalue(fixture))
    assert not blank_patches(patches.sample).any()
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        check_sample(patches)
    assert "brightfield" not in caplog.text


@pytest.mark.parametrize(("value", "looks"), [(255, "white"), (0, "black")])
def test_an_all_white_or_all_black_image_is_refused_before_any_encoding(value, looks, cache_dir):
    sdata = _slide(np.full((3, SIDE, SIDE), value, np.uint8))
    _refused_before_any_work(sdata, rf"16 of 16 patches sampled .* show no tissue .*\({looks}", cache_dir)


def test_a_model_refuses_to_embed_or_predict_from_a_blank_image(small_model):
    sdata = _slide(np.full((3, SIDE, SIDE), 255, np.uint8))
    for tool in (sd.tl.embed, sd.tl.predict_expression):
        with pytest.raises(ValueError, match="show no tissue"):
            tool(sdata, small_model)
    assert set(sdata.tables) == {"table"} and "X_spade" not in sdata.tables["table"].obsm


def test_nan_pixels_are_refused(cache_dir):
    pixels = _tissue().astype(np.float32) / 255
    pixels[:, :, : SIDE // 2] = np.nan  # half the slide was never scanned
    _refused_before_any_work(
        _slide(pixels),
        r"image 'he' under the spot of row 0 of table 'table' hold \d+ NaN values.*fillna\(1.0\)",
        cache_dir,
    )


def test_a_few_percent_blank_patches_are_counted_and_warned_of(caplog, cache_dir):
    pixels = _tissue()
    pixels[:, : 2 * STEP] = 255  # the first two rows of spots lie on glass: 16 of 64
    sdata = _slide(pixels)
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        sd.tl.features(sdata, backbone=sd.Backbone(CountingMeans()), **PATCH)
    assert 16 / 64 > BLANK_WARN_SHARE
    assert "16 of 64 patches (25.0 %) of image 'he'" in caplog.text and "rows [0, 1, 2, 3, 4]" in caplog.text
    assert np.isfinite(sdata.tables["table"].obsm["X_backbone"]).all()  # a warning: the features are written
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        sd.tl.features(_slide(_tissue()), backbone=sd.Backbone(CountingMeans()), **PATCH)
    assert "show no tissue" not in caplog.text and "brightfield" not in caplog.text


@pytest.mark.parametrize("dark", ["fluorescence", "one channel"])
def test_images_that_do_not_look_like_brightfield_he_are_warned_of(dark, caplog):
    rng = np.random.default_rng(2)
    if dark == "fluorescence":  # dark background, a few bright nuclei in one or two channels
        pixels = rng.integers(0, 25, (3, SIDE, SIDE)).astype(np.uint8)
        pixels[2][rng.random((SIDE, SIDE)) < 0.1] = 200
    else:
        pixels = _tissue()
        pixels[1] = rng.integers(0, 10, (SIDE, SIDE))
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        sd.tl.features(_slide(pixels), backbone=sd.Backbone(CountingMeans()), **PATCH)
    assert "do not look like brightfield H&E" in caplog.text


def test_marker_channels_are_refused_as_not_he(cache_dir):
    markers = _slide(np.concatenate([_tissue(), _tissue(seed=1)[:1]]), channels=["DAPI", "CK", "CD3", "CD20"])
    _refused_before_any_work(markers, r"Image 'he' has channels named .*'DAPI'.* not H&E.*image_key=", cache_dir)
    three = _slide(_tissue(), channels=["DAPI", "CD3", "CD8"])
    _refused_before_any_work(three, r"\['DAPI', 'CD3', 'CD8'\] name no colour.*c_coords=\['r', 'g', 'b'\]", cache_dir)
    with pytest.raises(ValueError, match=r"has 5 channels .* not H&E") as error:
        sd.pp.spot_patches(_slide(np.zeros((5, SIDE, SIDE), np.uint8)), **PATCH)
    assert "select three channels" not in str(error.value)


def test_four_unnamed_channels_are_rgba_only_when_the_fourth_is_constant(cache_dir):
    opaque = np.concatenate([_tissue(), np.full((1, SIDE, SIDE), 255, np.uint8)])
    rgb = sd.pp.spot_patches(_slide(_tissue()), **PATCH)[5]
    np.testing.assert_array_equal(sd.pp.spot_patches(_slide(opaque), **PATCH)[5], rgb)
    marker = np.concatenate([_tissue(), _tissue(seed=3)[:1]])
    _refused_before_any_work(_slide(marker), r"4th of the 4 unnamed channels .* varies .*no alpha channel", cache_dir)
    named = sd.pp.spot_patches(_slide(_tissue(), channels=["channel_0", "channel_1", "channel_2"]), **PATCH)
    np.testing.assert_array_equal(named[5], rgb)  # placeholder names are no markers
