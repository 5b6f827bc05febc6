"""SpadeModel.save/load under hostile conditions: nothing of the user's is lost, nothing damaged loads silently."""

from __future__ import annotations

import copy
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import spade_sd as sd
from spade_sd.encoders.morphology import MorphologyFeatures


@pytest.fixture(scope="module")
def model(small_model) -> sd.SpadeModel:
    return small_model


@pytest.fixture(scope="module")
def morphology(model) -> sd.Backbone:
    return model.backbone


@pytest.fixture(scope="module")
def other_model(model) -> sd.SpadeModel:
    """The same architecture with different weights: its model.safetensors has the same names and shapes."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.mixture.parameters():
            parameter.add_(0.5)
    return other


@pytest.fixture
def features(model, morphology) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(64, morphology.dim)).astype(np.float32) + model.scaler.mean


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_folder_of_user_files(model, tmp_path):
    target = tmp_path / "results"
    (target / "sub").mkdir(parents=True)
    (target / "notes.txt").write_text("precious")
    (target / "sub" / "data.csv").write_text("1,2,3")
    before = _tree(target)
    with pytest.raises(FileExistsError, match=r"results.*expected a folder holding only config\.json.*notes\.txt"):
        model.save(target, overwrite=True)
    assert _tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no staging folder was left


def test_overwrite_refuses_a_model_folder_holding_other_files(model, morphology, tmp_path):
    model.save(tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("my notes on this model")
    (tmp_path / "m" / "plots").mkdir()
    before = _tree(tmp_path / "m")
    with pytest.raises(FileExistsError, match=r"other entries as well: README\.md, plots"):
        model.save(tmp_path / "m", overwrite=True)
    assert _tree(tmp_path / "m") == before
    assert sd.SpadeModel.load(tmp_path / "m", backbone=morphology).identity() == model.identity()


def test_overwrite_refuses_a_regular_file(model, tmp_path):
    target = tmp_path / "model"
    target.write_text("not a model")
    with pytest.raises(FileExistsError, match=r"model.*found a file"):
        model.save(target, overwrite=True)
    assert target.read_text() == "not a model"


def test_overwrite_refuses_a_folder_whose_config_is_not_a_spade_model(model, tmp_path):
    target = tmp_path / "hf"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"format": "someone.else/1"}))
    (target / "model.safetensors").write_bytes(b"other weights")
    before = _tree(target)
    with pytest.raises(FileExistsError, match=r"'someone\.else/1'.*not a spade_sd model folder"):
        model.save(target, overwrite=True)
    assert _tree(target) == before


@pytest.mark.parametrize("where", [".", "..", ""])
def test_overwrite_refuses_the_current_directory(model, tmp_path, monkeypatch, where):
    cwd = tmp_path / "work"
    cwd.mkdir()
    # even a current directory that looks like a model folder is never renamed away
    model.save(cwd / "model")
    for name in ("config.json", "model.safetensors"):
        (cwd / "model" / name).rename(cwd / name)
    (cwd / "model").rmdir()
    before = _tree(tmp_path)
    monkeypatch.chdir(cwd)
    with pytest.raises(FileExistsError, match="current directory"):
        model.save(where, overwrite=True)
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in cwd.iterdir()) == ["config.json", "model.safetensors"]


def test_overwrite_replaces_a_model_folder(model, other_model, morphology, features, tmp_path):
    other_model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)
    loaded = sd.SpadeModel.load(tmp_path / "m", backbone=morphology)
    assert loaded.identity() == model.identity()
    np.testing.assert_array_equal(loaded.embed_features(features)[0], model.embed_features(features)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "m")


def test_failed_rename_into_place_keeps_the_old_model(model, other_model, morphology, features, tmp_path, monkeypatch):
    target = tmp_path / "m"
    other_model.save(target)
    before = _tree(target)
    real_replace = os.replace
    moved_into_place = []

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == target and not moved_into_place:  # the first rename onto the target: the new model
            moved_into_place.append(src)
            raise OSError("simulated failure of the final rename")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated failure"):
        model.save(target, overwrite=True)
    monkeypatch.undo()
    assert moved_into_place
    assert _tree(target) == before
    loaded = sd.SpadeModel.load(target, backbone=morphology)
    assert loaded.identity() == other_model.identity()
    np.testing.assert_array_equal(loaded.embed_features(features)[0], other_model.embed_features(features)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging or backup folder remains


def test_failed_write_keeps_the_old_model(model, other_model, morphology, tmp_path, monkeypatch):
    import safetensors.numpy

    other_model.save(tmp_path / "m")
    before = _tree(tmp_path / "m")

    def save_file(*args, **kwargs):
        raise OSError("simulated full disk")

    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
    with pytest.raises(OSError, match="simulated full disk"):
        model.save(tmp_path / "m", overwrite=True)
    assert _tree(tmp_path / "m") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _flip_tensor_bytes(weights: Path) -> None:
    data = bytearray(weights.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    start = 8 + header_size
    middle = start + (len(data) - start) // 2
    for i in range(middle, middle + 4):
        data[i] ^= 0x10
    weights.write_bytes(bytes(data))


def test_flipped_weight_bytes_are_refused(model, morphology, tmp_path):
    model.save(tmp_path / "m")
    _flip_tensor_bytes(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*SHA-256 [0-9a-f]{12}… found, [0-9a-f]{12}… expected"):
        sd.SpadeModel.load(tmp_path / "m", backbone=morphology)


def test_a_model_of_the_current_format_without_digest_is_refused(model, morphology, tmp_path):
    model.save(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    del config["weights_sha256"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json has no entry 'weights_sha256'"):
        sd.SpadeModel.load(tmp_path / "m", backbone=morphology)


def test_weights_of_another_model_are_refused(model, other_model, morphology, tmp_path):
    model.save(tmp_path / "a")
    other_model.save(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(ValueError, match="damaged or belongs to another model"):
        sd.SpadeModel.load(tmp_path / "a", backbone=morphology)


def test_model_saved_without_digest_loads_unverified(model, morphology, features, tmp_path, caplog):
    model.save(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["format"] == "spade_sd.model/6"
    config.pop("weights_sha256", None)  # as an older spade_sd wrote it
    config["format"] = "spade_sd.model/2"
    config_path.write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        loaded = sd.SpadeModel.load(tmp_path / "m", backbone=morphology)
    assert "the weights were not verified" in caplog.text and "config.json was not verified" in caplog.text
    assert loaded.identity() == model.identity()
    np.testing.assert_array_equal(loaded.embed_features(features)[0], model.embed_features(features)[0])


def test_other_callable_backbone_names_the_stable_identity_fix(model, tmp_path):
    model.save(tmp_path / "m")
    other = sd.Backbone(MorphologyFeatures(nuclear_threshold=0.1))
    with pytest.raises(ValueError, match=r"not the one the model was trained on.*Backbone\(fn, version=\"\.\.\.\"\)"):
        sd.SpadeModel.load(tmp_path / "m", backbone=other)
