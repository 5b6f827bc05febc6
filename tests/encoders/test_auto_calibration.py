"""engine="auto" judged on real patches of the first slide a tool encodes: stored once, reused, recorded in .uns."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import spade_sd as sd
from spade_sd.encoders import auto_calibration as auto
from spade_sd.encoders import precision as low
from spade_sd.encoders.onnx_engine import onnx_path


def _tiny_vit(**options) -> sd.Backbone:
    """A random 64-px timm transformer: quantized dynamically, so every engine is quick to build."""
    torch.manual_seed(0)
    return sd.Backbone("test_vit", pretrained=False, input_size=64, img_size=64, **options)


@pytest.fixture
def mob1_small(mob1):
    """MOB1's spot patches at 64 px (real H&E), read lazily."""
    return sd.pp.spot_patches(mob1, size_um=100.0, size_px=64)


def test_tl_features_judges_auto_on_the_first_slide_and_records_the_precision(cache_dir, data_dir):
    mob1 = sd.datasets.mouse_olfactory_bulb("MOB1")  # its own copy: the tool writes to it
    backbone = _tiny_vit()
    assert backbone.calibration is None and not backbone.engine_settled
    sd.tl.features(mob1, backbone=backbone, size_um=100.0, size_px=64, key_added="X_tiny")
    stored = auto.calibration_path(backbone.identity())
    assert stored.is_file()
    # 64 real patches spread over the slide, half calibrating and half judging
    patches = np.load(stored)
    assert patches.shape == (auto.CALIBRATION_PATCHES, 64, 64, 3) and patches.dtype == np.uint8
    np.testing.assert_array_equal(backbone.calibration, patches)
    assert patches.std() > 5  # tissue, not one blank colour
    # the engine auto settled on is the gate's choice among what it measured on this CPU
    gate = json.loads(onnx_path(backbone.identity()).with_suffix(".gate.json").read_text())
    chosen = low.choose(gate["measurements"])
    assert backbone.precision == ("float32" if chosen == "onnxruntime" else chosen)
    record = mob1.tables["table"].uns["X_tiny"]["backbone"]
    assert record["precision"] == backbone.precision
    assert record["feature_identity"] == backbone.feature_identity()
    assert record["identity"] == backbone.identity()
    # the written features are the chosen engine's
    features = mob1.tables["table"].obsm["X_tiny"]
    again = backbone(sd.pp.spot_patches(mob1, size_um=100.0, size_px=64).read(np.arange(4)))
    np.testing.assert_allclose(features[:4], again, rtol=0, atol=1e-5 * np.abs(again).max())


def test_later_slides_and_backbones_reuse_the_stored_patches(cache_dir, mob1_small):
    first = _tiny_vit()
    auto.calibrate_from(first, mob1_small)
    stored = first.calibration.copy()
    second = _tiny_vit()
    other = type("Patches", (), {"__len__": lambda self: 50, "read": lambda self, i: pytest.fail("read again")})()
    auto.calibrate_from(second, other)
    np.testing.assert_array_equal(second.calibration, stored)
    # another slide's patches, taken first by another process, win over this one's: one calibration per backbone
    auto.calibration_path(second.identity()).unlink()
    np.save(auto.calibration_path(second.identity()), stored[::-1])
    third = _tiny_vit()
    auto.calibrate_from(third, mob1_small)
    np.testing.assert_array_equal(third.calibration, stored[::-1])
    np.testing.assert_array_equal(auto._store(auto.calibration_path(third.identity()), stored), stored[::-1])
    assert not list(auto.calibration_path(third.identity()).parent.glob("*.tmp"))


def test_backbones_that_do_not_want_patches_are_left_alone(cache_dir, mob1_small, monkeypatch):
    explicit = _tiny_vit(engine="onnxruntime")
    given = _tiny_vit(calibration=mob1_small.read(np.arange(16)))
    settled = _tiny_vit()
    settled(mob1_small.read(np.arange(2)))  # its engine is chosen (float32) before any tool saw a slide
    for backbone in (explicit, settled):
        auto.calibrate_from(backbone, mob1_small)
        assert backbone.calibration is None and backbone.precision == "float32"
    auto.calibrate_from(given, mob1_small)
    assert len(given.calibration) == 16
    torch.manual_seed(0)
    convolutional = sd.Backbone("test_efficientnet", pretrained=False, input_size=64)  # quantized statically: slow
    auto.calibrate_from(convolutional, mob1_small)
    assert convolutional.calibration is None and convolutional.precision == "float32"
    plain = sd.Backbone(sd.MorphologyFeatures())
    auto.calibrate_from(plain, mob1_small)
    assert plain.calibration is None and plain.precision == "float32"
    monkeypatch.setattr(sd.settings, "_low_precision", False)
    off = _tiny_vit()
    auto.calibrate_from(off, mob1_small)
    assert off.calibration is None and off.precision == "float32"
    too_few = _tiny_vit()
    auto.calibration_path(too_few.identity()).unlink(missing_ok=True)  # stored by the tests before
    small = type("Patches", (), {"__len__": lambda self: 15, "read": lambda self, i: pytest.fail("read")})()
    monkeypatch.setattr(sd.settings, "_low_precision", True)
    auto.calibrate_from(too_few, small)
    assert too_few.calibration is None
    assert not auto.calibration_path(too_few.identity()).exists()


def test_a_damaged_stored_file_is_replaced_with_a_warning(cache_dir, mob1_small, caplog):
    backbone = _tiny_vit()
    path = auto.calibration_path(backbone.identity())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a numpy file")
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        auto.calibrate_from(backbone, mob1_small)
    assert "unreadable calibration patches" in caplog.text
    assert backbone.calibration.shape == (auto.CALIBRATION_PATCHES, 64, 64, 3)
    np.testing.assert_array_equal(np.load(path), backbone.calibration)


def test_the_setting_is_checked():
    with pytest.raises(TypeError, match=r"sd.settings.low_precision must be True or False; found 'yes'"):
        sd.settings.low_precision = "yes"
    assert sd.settings.low_precision is True
