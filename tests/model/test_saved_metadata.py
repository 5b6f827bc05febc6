"""What a saved model or saved adapters read back besides their weights is checked like the weights.

A hand-edited ``config.json`` or ``adapters.json`` (another panel order, another ``n_comps``, a deleted entry) is
refused with the field and the file named, instead of loading with the same identity and other outputs. Models and
adapters saved before the configuration was checked still load, with a log line saying what was not verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import spade_sd as sd
from spade_sd.config import SealConfig
from spade_sd.model.seal_heads import SealAlignment, SealHeads

# a fresh, empty feature cache for this module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.fixture(scope="module")
def model(small_model) -> sd.SpadeModel:
    return small_model


@pytest.fixture
def features(model) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(64, model.backbone.dim)).astype(np.float32) + model.scaler.mean


def _edit(path: Path, change) -> None:
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _delete(*keys):
    def change(config):
        for key in keys[:-1]:
            config = config[key]
        del config[keys[-1]]

    return change


def _set(*keys, value):
    def change(config):
        for key in keys[:-1]:
            config = config[key]
        config[keys[-1]] = value(config[keys[-1]]) if callable(value) else value

    return change


def _reversed(values):
    return values[::-1]


def _older_format(folder: Path, config_name: str, weights_name: str, found_format: str) -> None:
    """Rewrite a folder as an older spade_sd wrote it: no copy of the configuration inside the weights file."""
    arrays = load_file(folder / weights_name)
    save_file(arrays, folder / weights_name)
    digest = hashlib.sha256((folder / weights_name).read_bytes()).hexdigest()
    _edit(folder / config_name, lambda config: config.update(format=found_format, weights_sha256=digest))


MODEL_EDITS = {
    "panel order": (_set("panel", "genes", value=_reversed), r"panel\.genes.*other order"),
    "n_comps": (_set("config", "training", "n_comps", value=2), r"config\.training\.n_comps.*2.*8"),
    "no tau": (_delete("tau"), r"'tau'.*missing"),
    "standardization": (_set("config", "clustering", "standardize", value="global"), "config.clustering.standardize"),
    "normalisation": (_set("panel", "target_sum", value=1e6), r"panel\.target_sum"),
    "no panel": (_delete("panel"), r"'panel'.*missing"),
    "tau": (_set("tau", value=lambda tau: 2 * tau), r"'tau'"),
    "out_dim": (_set("mixture", "out_dim", value=16), r"mixture\.out_dim.*16.*32"),
}


@pytest.mark.parametrize("edit", list(MODEL_EDITS))
def test_a_hand_edited_config_is_refused_naming_the_field_and_the_file(model, tmp_path, edit):
    change, match = MODEL_EDITS[edit]
    model.save(tmp_path / "m")
    _edit(tmp_path / "m" / "config.json", change)
    with pytest.raises(ValueError, match=match) as refused:
        sd.SpadeModel.load(tmp_path / "m", backbone=model.backbone)
    assert str(tmp_path / "m" / "config.json") in str(refused.value)


def test_an_unedited_model_loads_verified_and_embeds_identically(model, features, tmp_path, caplog):
    model.save(tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        loaded = sd.SpadeModel.load(tmp_path / "m", backbone=model.backbone)
    assert "not verified" not in caplog.text
    assert loaded.identity() == model.identity()
    np.testing.assert_array_equal(loaded.embed_features(features)[0], model.embed_features(features)[0])


def test_the_identity_covers_the_panel_and_the_routing_temperature(model):
    panel = replace(model.panel, genes=list(model.panel.genes)[::-1])
    assert replace(model, panel=panel).identity() != model.identity()
    assert replace(model, tau=model.tau * 2).identity() != model.identity()
    assert replace(model, panel=replace(model.panel)).identity() == model.identity()


def test_a_full_rank_model_records_that_it_keeps_every_direction(model, tmp_path):
    full = model.full_rank()
    assert full.config.training.n_comps is None and model.config.training.n_comps == 8
    full.save(tmp_path / "full")
    assert sd.SpadeModel.load(tmp_path / "full", backbone=model.backbone).identity() == full.identity()


def test_a_model_saved_before_the_configuration_was_checked_loads_saying_so(model, features, tmp_path, caplog):
    model.save(tmp_path / "m")
    _older_format(tmp_path / "m", "config.json", "model.safetensors", "spade_sd.model/2")
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        loaded = sd.SpadeModel.load(tmp_path / "m", backbone=model.backbone)
    assert "config.json was not verified" in caplog.text and "the weights were not verified" not in caplog.text
    assert loaded.identity() == model.identity()
    np.testing.assert_array_equal(loaded.embed_features(features)[0], model.embed_features(features)[0])
    loaded.save(tmp_path / "again")  # saving again records the copy: the current format
    assert json.loads((tmp_path / "again" / "config.json").read_text())["format"] == "spade_sd.model/6"


OLDER_MODEL_EDITS = {
    "n_comps": (_set("config", "training", "n_comps", value=2), r"config\.training\.n_comps.*2.*8 principal"),
    "no tau": (_delete("tau"), r"no entry 'tau'"),
    "no panel genes": (_delete("panel", "genes"), r"no entry 'panel\.genes'"),
    "panel length": (_set("panel", "genes", value=lambda genes: genes[:-3]), r"panel\.genes.*gene heads"),
    "gene_dim": (_set("mixture", "gene_dim", value=lambda n: n - 3), r"mixture\.gene_dim"),
    "out_dim": (_set("mixture", "out_dim", value=16), r"mixture\.out_dim.*16.*32"),
    "n_experts": (_set("mixture", "n_experts", value=3), r"mixture\.n_experts.*3.*2"),
    "bad value": (_set("config", "training", "out_dim", value=-1), r"'config'.*out_dim"),
    "decoder": (_set("mixture", "decoder", value=True), r"'mixture'.*does not fit the expert heads.*decoders"),
}


@pytest.mark.parametrize("edit", list(OLDER_MODEL_EDITS))
def test_what_an_older_model_cannot_hold_is_refused_naming_the_field_and_the_file(model, tmp_path, edit):
    change, match = OLDER_MODEL_EDITS[edit]
    model.save(tmp_path / "m")
    _older_format(tmp_path / "m", "config.json", "model.safetensors", "spade_sd.model/2")
    _edit(tmp_path / "m" / "config.json", change)
    with pytest.raises(ValueError, match=match) as refused:
        sd.SpadeModel.load(tmp_path / "m", backbone=model.backbone)
    assert str(tmp_path / "m" / "config.json") in str(refused.value)


# ---- adapters (SEAL) -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base() -> sd.Backbone:
    """The default weights at a non-default input size (what tests/test_finetune.py tunes)."""
    return sd.Backbone(engine="torch", input_size=96)


def _patches(n: int, side: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tuned(base) -> sd.FineTunedBackbone:
    """Adapters moved away from zero (as after training), carrying SEAL heads over a small gene panel."""
    tuned = sd.FineTunedBackbone(base, rank=2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in tuned.module.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    genes = [f"gene_{i}" for i in range(6)]
    panel = sd.GenePanel(genes, "global", 6, None, 3, 0.0)
    heads = SealHeads(tuned.dim, len(genes), 4)
    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=6).astype(np.float32), rng.uniform(1, 2, size=6).astype(np.float32)
    SealAlignment(heads, panel, mean, std, SealConfig(n_genes=6, embed_dim=4), {"epochs": 1}).attach_to(tuned, "seal")
    return tuned


@pytest.fixture(scope="module")
def saved(tuned, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapters") / "a"
    tuned.save(folder)
    return folder


def test_adapters_on_a_base_of_another_input_size_reload_without_base_and_embed_identically(tuned, saved, caplog):
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        loaded = sd.FineTunedBackbone.load(saved)
    assert "not verified" not in caplog.text
    assert loaded.input_size == 96 and loaded.identity() == tuned.identity()
    x = _patches(3, 120)
    np.testing.assert_array_equal(loaded(x), tuned(x))
    alignment = SealAlignment.from_backbone(loaded)
    assert alignment.panel.genes == SealAlignment.from_backbone(tuned).panel.genes


def test_another_base_is_refused_saying_what_differs(saved):
    with pytest.raises(ValueError, match=r"input_size: 96 recorded, 128 found") as refused:
        sd.FineTunedBackbone.load(saved, base=sd.Backbone(engine="torch", input_size=128))
    assert str(refused.value).count("'efficientnet_lite0'") <= 1
    random = sd.Backbone(engine="torch", input_size=96, pretrained=False)
    with pytest.raises(ValueError, match="same name and configuration but other weights"):
        sd.FineTunedBackbone.load(saved, base=random)


ADAPTER_EDITS = {
    "SEAL panel order": (
        _set("attachments", "seal", "panel", "genes", value=_reversed),
        r"attachments\.seal\.panel\.genes.*other order",
    ),
    "no lora": (_delete("lora"), r"'lora'.*missing"),
    "lora alpha": (_set("lora", "alpha", value=1.0), r"lora\.alpha"),
    "input size": (_set("base", "input_size", value=224), r"base\.input_size.*224.*96"),
}


@pytest.mark.parametrize("edit", list(ADAPTER_EDITS))
def test_hand_edited_adapters_are_refused_naming_the_field_and_the_file(tuned, saved, tmp_path, edit):
    change, match = ADAPTER_EDITS[edit]
    folder = tmp_path / "a"
    tuned.save(folder)
    _edit(folder / "adapters.json", change)
    with pytest.raises(ValueError, match=match) as refused:
        # a base that is refused in its turn: the entry must be named first, before any base is looked at
        sd.FineTunedBackbone.load(folder, base=tuned)
    assert str(folder / "adapters.json") in str(refused.value)


def test_adapters_saved_before_the_configuration_was_checked_load_saying_so(tuned, tmp_path, caplog):
    folder = tmp_path / "a"
    tuned.save(folder)
    _older_format(folder, "adapters.json", "adapters.safetensors", "spade_sd.adapters/1")
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        loaded = sd.FineTunedBackbone.load(folder)
    assert "adapters.json was not verified" in caplog.text
    assert loaded.identity() == tuned.identity()


OLDER_ADAPTER_EDITS = {
    "no lora": (_delete("lora"), r"no entry 'lora'"),
    "no SEAL panel": (_delete("attachments", "seal", "panel"), r"no entry 'attachments\.seal\.panel'"),
    "SEAL panel length": (
        _set("attachments", "seal", "panel", "genes", value=lambda genes: genes[:-1]),
        r"attachments\.seal\.panel\.genes.*5 genes.*6",
    ),
    "SEAL heads": (_set("attachments", "seal", "heads", "embed_dim", value=8), r"attachments\.seal\.heads"),
}


@pytest.mark.parametrize("edit", list(OLDER_ADAPTER_EDITS))
def test_what_older_adapters_cannot_hold_is_refused_naming_the_field_and_the_file(tuned, tmp_path, edit):
    change, match = OLDER_ADAPTER_EDITS[edit]
    folder = tmp_path / "a"
    tuned.save(folder)
    _older_format(folder, "adapters.json", "adapters.safetensors", "spade_sd.adapters/1")
    _edit(folder / "adapters.json", change)
    with pytest.raises(ValueError, match=match) as refused:
        SealAlignment.from_backbone(sd.FineTunedBackbone.load(folder, base=tuned_base(tuned)))
    assert str(folder / "adapters.json") in str(refused.value)


def tuned_base(tuned_backbone) -> sd.Backbone:
    return sd.Backbone(engine="torch", input_size=tuned_backbone.input_size)
