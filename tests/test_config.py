"""Configuration as a value: defaults written once, validated once, saved with the model and migrated on load."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import spade_sd as sd
from spade_sd.config import (
    ClusteringConfig,
    PanelConfig,
    PatchConfig,
    SpadeConfig,
    TrainingConfig,
    check_trainer_kwargs,
    config_from_format_1,
)

SECTIONS = {"patches": PatchConfig, "panel": PanelConfig, "clustering": ClusteringConfig, "training": TrainingConfig}
# tl.pretrain keywords named otherwise than the field they set
KEYWORDS = {"flavor": "panel_flavor"}
# Fields tl.pretrain has no keyword for: they are set in the config given to fit_model
CONFIG_ONLY = {"min_val_slides"}
DATA = Path(__file__).parent / "data"
FAST = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "quiet": True, "cache": False, "size_um": 64.0, "size_px": 64}
ENCODED = []  # batches the backbone encoded


def _channel_statistics(patches: np.ndarray) -> np.ndarray:
    ENCODED.append(len(patches))
    pixels = patches.astype(np.float32) / 255
    return np.concatenate([pixels.mean(axis=(1, 2)), pixels.std(axis=(1, 2))], axis=1)


def _backbone() -> sd.Backbone:
    return sd.Backbone(_channel_statistics, dim=6, version="channel-statistics")


def _slides():
    return sd.datasets.synthetic(n_slides=2, grid=(8, 8), mpp=1.0, n_genes=60, seed=0)


@pytest.mark.parametrize("kind", [*SECTIONS.values(), SpadeConfig], ids=lambda kind: kind.__name__)
def test_every_config_builds_from_its_defaults(kind):
    config = kind()
    assert dataclasses.is_dataclass(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # frozen: a value, not a bag of settings


def test_pretrain_keywords_default_to_the_configs_defaults():
    parameters = inspect.signature(sd.tl.pretrain).parameters
    for kind in SECTIONS.values():
        for field in dataclasses.fields(kind):
            keyword = KEYWORDS.get(field.name, field.name)
            if field.name in CONFIG_ONLY:
                assert keyword not in parameters, keyword
                continue
            assert keyword in parameters, f"tl.pretrain has no keyword for {kind.__name__}.{field.name}"
            assert parameters[keyword].default == field.default, keyword


def test_lower_layers_take_the_config_not_its_fields():
    from spade_sd.training.experts import ExpertsModule, train_experts
    from spade_sd.training.fit import fit_model

    fields = {f.name for kind in SECTIONS.values() for f in dataclasses.fields(kind)}
    # train_experts' n_experts is the number of experts the clustering found, not the number asked for
    for function, allowed in ((fit_model, set()), (train_experts, {"n_experts"}), (ExpertsModule.__init__, set())):
        declared = set(inspect.signature(function).parameters) & fields
        assert declared <= allowed, f"{function.__qualname__} re-declares {sorted(declared - allowed)}"


def _custom() -> SpadeConfig:
    return SpadeConfig(
        patches=PatchConfig(size_um=64, size_px=32),
        panel=PanelConfig(n_top_genes=20, flavor="global", smoothing=0.5, layer="counts"),
        clustering=ClusteringConfig(n_experts=3, n_fine="elbow", groupby="organ", standardize="global", tau_scale=1),
        training=TrainingConfig(
            loss="soft_target",
            n_comps=None,
            output="joint",
            backbone_comps=None,
            backbone_weight=0.5,
            head_init="backbone",
            val_slides=["a", "b"],
            warmup_steps=5,
            seed=7,
        ),
        slides=("a", "b", "c"),
        n_spots=300,
        versions={"spade_sd": "0.1.0"},
    )


@pytest.mark.parametrize("config", [SpadeConfig(), _custom()], ids=["defaults", "custom"])
def test_to_dict_and_from_dict_round_trip_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert SpadeConfig.from_dict(data) == config
    for name, kind in SECTIONS.items():
        section = getattr(config, name)
        assert kind.from_dict(section.to_dict()) == section
    assert config.to_dict()["training"]["val_slides"] in (None, ["a", "b"])  # lists, as anndata writes them


def test_values_are_normalized_once_on_creation():
    custom = _custom()
    assert custom.patches.size_um == 64.0 and isinstance(custom.patches.size_um, float)
    assert custom.training.val_slides == ("a", "b") and custom.clustering.tau_scale == 1.0


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: TrainingConfig(loss="mse"), ValueError, r"loss must be one of \['soft_target', 'clip'\]"),
        (lambda: TrainingConfig(warmup_steps=-1), ValueError, r"warmup_steps must be an integer ≥ 0; found -1"),
        (lambda: TrainingConfig(val_fraction=1.5), ValueError, r"val_fraction must be a finite number ≥ 0 and ≤ 1"),
        (lambda: TrainingConfig(val_slides="s1"), TypeError, r"val_slides must be a list of slide names or None"),
        (lambda: TrainingConfig(n_comps=300), ValueError, r"n_comps must be at most out_dim \(256\); found 300"),
        (lambda: TrainingConfig(output="concat"), ValueError, r"output must be one of \['aligned', 'joint'\]"),
        (lambda: TrainingConfig(head_init="pca"), ValueError, r"head_init must be one of \['random', 'backbone'\]"),
        (lambda: TrainingConfig(backbone_comps=0), ValueError, r"backbone_comps must be an integer ≥ 1; found 0"),
        (lambda: TrainingConfig(backbone_comps=2.5), TypeError, r"backbone_comps must be an integer ≥ 1"),
        (lambda: TrainingConfig(backbone_weight=0), ValueError, r"backbone_weight must be a finite number > 0"),
        (lambda: ClusteringConfig(n_fine="auto"), ValueError, r"n_fine must be a positive integer or 'elbow'"),
        (lambda: PanelConfig(flavor="seurat"), ValueError, r"panel_flavor must be one of \['union', 'global'\]"),
        (lambda: PatchConfig(size_px=4), ValueError, r"size_px must be an integer in \[8, 4096\]; found 4"),
        (lambda: SpadeConfig(training={"lr": 1.0}), TypeError, r"training must be a TrainingConfig; found dict"),
        (lambda: TrainingConfig.from_dict({"lr": 1.0, "epochs": 3}), ValueError, r"no fields \['epochs'\]"),
    ],
)
def test_bad_values_are_refused_when_a_config_is_made(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_trainer_kwargs_that_are_training_options_are_refused():
    keywords = inspect.signature(sd.tl.pretrain).parameters
    assert check_trainer_kwargs({"gradient_clip_val": 1.0}, keywords) == {"gradient_clip_val": 1.0}
    with pytest.raises(
        TypeError, match=r"'warmup_steps' is not a lightning.Trainer argument.*pass it as warmup_steps="
    ):
        check_trainer_kwargs({"warmup_steps": 10}, keywords)
    with pytest.raises(TypeError, match=r"'flavor' is not a lightning.Trainer .*pass it as panel_flavor="):
        check_trainer_kwargs({"flavor": "global"}, keywords)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("min_val_slides", r"'min_val_slides' is not a lightning.Trainer argument.*TrainingConfig\(min_val_slides="),
        ("flavor", r"'flavor' is not a lightning.Trainer argument.*pass it as panel_flavor="),
    ],
)
def test_pretrain_refuses_a_training_option_among_trainer_kwargs_before_any_work(name, match):
    ENCODED.clear()
    with pytest.raises(TypeError, match=match):
        sd.tl.pretrain(_slides(), backbone=_backbone(), **FAST, **{name: 3})
    assert not ENCODED


def test_train_experts_refuses_a_training_option_among_trainer_kwargs():
    from spade_sd.training.experts import train_experts

    X, Y = np.zeros((10, 4), np.float32), np.zeros((10, 3), np.float32)
    with pytest.raises(TypeError, match=r"'val_fraction' is not a lightning.Trainer argument"):
        train_experts(
            X, Y, np.zeros(10), np.zeros(10), n_experts=1, config=TrainingConfig(), trainer_kwargs={"val_fraction": 0}
        )


def test_the_model_records_its_configuration_and_embed_writes_it(tmp_path):
    slides = _slides()
    model = sd.tl.pretrain(slides, backbone=_backbone(), seed=3, warmup_steps=2, val_fraction=0.5, **FAST)
    keywords = {**FAST, "seed": 3, "warmup_steps": 2, "val_fraction": 0.5}
    expected = SpadeConfig.from_keywords(keywords)
    assert dataclasses.replace(model.config, slides=(), n_spots=None, versions={}) == expected
    assert model.config.slides == ("synthetic_0", "synthetic_1") and model.config.n_spots == 128
    assert "torch" in model.config.versions
    sd.tl.embed(slides[0], model, cache=False)
    uns = slides[0].tables["table"].uns["spade"]
    assert uns["model"]["config"] == model.config.to_dict()
    slides[0].tables["table"].write_h5ad(tmp_path / "table.h5ad")  # the recorded configuration can be written
    assert ad.read_h5ad(tmp_path / "table.h5ad").uns["spade"]["model"]["config"]["training"]["seed"] == 3
    model.save(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["format"] == "spade_sd.model/6" and saved["config"] == model.config.to_dict()
    assert sd.SpadeModel.load(tmp_path / "model", backbone=model.backbone).config == model.config


def test_a_format_1_configuration_is_migrated():
    saved = json.loads((DATA / "model_ca61673" / "config.json").read_text())
    config = config_from_format_1(saved["config"], panel=saved["panel"], out_dim=saved["mixture"]["out_dim"])
    assert config.patches == PatchConfig(size_um=64.0, size_px=64)
    assert config.panel == PanelConfig(n_top_genes=50, flavor="union", smoothing=0.0, layer=None)
    assert config.clustering == ClusteringConfig(n_experts=2, n_fine=4, standardize="slide", tau_scale=0.25)
    expected = TrainingConfig(
        loss="clip",
        max_epochs=3,
        lr=1e-3,
        n_comps=16,
        warm_start=True,
        expert_lr_factor=0.1,
        reference_size=0,
        head_init="random",  # the defaults of its time, not today's
        expression_comps=None,
    )
    assert config.training == expected
    assert config.slides == ("synthetic_0", "synthetic_1") and config.n_spots == 128
    # keys a format-1 model lacks mean what the code of its time did without them
    bare = config_from_format_1({"patches": {"size_um": 112.0, "size_px": 224}})
    assert bare.clustering.standardize == "global" and bare.training.n_comps is None
    assert bare.training.warm_start is False and bare.training.expert_lr_factor == 1.0


def test_a_format_1_model_loads_migrated_and_saves_in_the_current_format(tmp_path, caplog):
    model = sd.SpadeModel.load(DATA / "model_ca61673")
    assert model.standardization == "slide" and model.config.training.loss == "clip"
    model.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["format"] == "spade_sd.model/6"
    again = sd.SpadeModel.load(tmp_path / "again")
    assert again.config == model.config and again.identity() == model.identity()
