"""sd.tl.finetune (SEAL) on the real olfactory bulb sections: what trains, what is reproducible, what is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spade_sd as sd
from spade_sd.encoders import finetuned
from spade_sd.model.seal_heads import SealAlignment

# a smaller input than the default 224 px keeps the prefix pass fast; the weights are the default's
FAST = {"max_epochs": 2, "batch_size": 128, "n_genes": 300, "quiet": True}


@pytest.fixture(scope="module")
def base():
    return sd.Backbone(engine="torch", input_size=128)


@pytest.fixture(scope="module")
def mob12(data_dir):
    return [sd.datasets.mouse_olfactory_bulb(name) for name in ("MOB1", "MOB2")]


@pytest.fixture(scope="module")
def tuned(mob12, base):
    return sd.tl.finetune(mob12, backbone=base, seed=0, **FAST)


def _base_weights(tuned_backbone) -> dict[str, torch.Tensor]:
    """The tuned module's frozen weights under the base model's names."""
    state = tuned_backbone.module.state_dict()
    return {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}


def test_finetune_trains_only_the_adapters(tuned, base):
    assert isinstance(tuned, sd.FineTunedBackbone) and tuned.identity() != base.identity()
    frozen, original = _base_weights(tuned), base.module.state_dict()
    assert frozen.keys() == original.keys()
    assert all(torch.equal(frozen[k], original[k]) for k in original)  # bit-identical, BatchNorm statistics included
    adapters = tuned.adapter_tensors()
    assert {k.split(".lora_")[0] for k in adapters} == set(tuned.plan.targets)
    assert tuned.plan.blocks == ("blocks.5.3", "blocks.6.0")  # the default: the last two blocks
    assert all(float(v.abs().max()) > 0 for k, v in adapters.items() if "lora_B" in k)  # B starts at zero
    history = SealAlignment.from_backbone(tuned).history
    assert history["epochs"] >= 1 and np.isfinite(history["val_loss"]).all()


def test_the_same_seed_gives_identical_adapters(tuned, mob12, base):
    again = sd.tl.finetune(mob12, backbone=base, seed=0, **FAST)
    first, second = tuned.adapter_tensors(), again.adapter_tensors()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.identity() == tuned.identity()
    other = sd.tl.finetune(mob12, backbone=base, seed=1, **FAST)
    assert other.identity() != tuned.identity()


def test_features_from_the_cached_prefix_equal_full_passes(tuned, mob12):
    section = mob12[0]
    sd.tl.features(section, backbone=tuned, key_added="X_tuned")
    cached = np.asarray(section.tables["table"].obsm["X_tuned"])[:6]
    full = tuned(sd.pp.spot_patches(section).read(np.arange(6)))
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)


def test_features_of_a_finetuned_backbone_come_with_seals_image_embedding(tuned, mob12, base):
    section = mob12[1]
    sd.tl.features(section, backbone=tuned, key_added="X_tuned")
    table = section.tables["table"]
    expected = SealAlignment.from_backbone(tuned).embed_images(table.obsm["X_tuned"])
    np.testing.assert_array_equal(table.obsm["X_seal"], expected)
    assert table.uns["spade_sd"]["outputs"]["obsm"]["X_seal"] == "tl.features"
    sd.tl.features(section, backbone=base, key_added="X_base")  # a backbone without SEAL's heads writes none
    assert set(table.obsm) >= {"X_tuned", "X_seal", "X_base"} and "X_base_seal" not in table.obsm
    with pytest.raises(ValueError, match="seal_key and key_added must differ"):
        sd.tl.features(section, backbone=tuned, key_added="X_seal", seal_key="X_seal")


def test_a_finetuned_backbone_trains_and_embeds_with_spade(tuned, mob12, tmp_path):
    model = sd.tl.pretrain(mob12, backbone=tuned, max_epochs=2, quiet=True, seed=0)
    assert model.backbone.identity() == tuned.identity()
    for section in mob12:
        sd.tl.embed(section, model)
        assert np.isfinite(section.tables["table"].obsm["X_spade"]).all()
    embedding = np.asarray(mob12[0].tables["table"].obsm["X_spade"])
    model.save(tmp_path / "model")
    with pytest.raises(ValueError, match="finetuned backbone"):
        sd.SpadeModel.load(tmp_path / "model")
    tuned.save(tmp_path / "adapters")
    reloaded = sd.SpadeModel.load(
        tmp_path / "model", backbone=sd.FineTunedBackbone.load(tmp_path / "adapters", base=tuned_base(tuned))
    )
    sd.tl.embed(mob12[0], reloaded, key_added="X_again")
    np.testing.assert_allclose(np.asarray(mob12[0].tables["table"].obsm["X_again"]), embedding, rtol=1e-5, atol=1e-5)


def tuned_base(tuned_backbone):
    """The base the fixture's backbone was tuned from (rebuilt: same weights, same input size)."""
    return sd.Backbone(engine="torch", input_size=tuned_backbone.input_size)


def test_seal_heads_embed_both_sides_and_travel_with_the_adapters(tuned, mob12, tmp_path):
    alignment = SealAlignment.from_backbone(tuned)
    table = mob12[0].tables["table"]
    sd.tl.features(mob12[0], backbone=tuned, key_added="X_tuned")
    features = np.asarray(table.obsm["X_tuned"])
    image = alignment.embed_images(features)
    gene = alignment.embed_expression(table)
    assert image.shape == gene.shape == (table.n_obs, alignment.config.embed_dim)
    predicted = alignment.predict_expression(features)
    assert predicted.shape == (table.n_obs, len(alignment.panel)) and np.isfinite(predicted).all()
    tuned.save(tmp_path / "adapters")
    loaded = SealAlignment.from_backbone(sd.FineTunedBackbone.load(tmp_path / "adapters", base=tuned_base(tuned)))
    np.testing.assert_array_equal(loaded.embed_images(features), image)
    assert loaded.panel.genes == alignment.panel.genes


@pytest.fixture
def no_work(monkeypatch):
    """Any prefix computation fails the test: bad input must be refused before the first patch is encoded."""

    def refuse(self, patches):
        raise AssertionError("a patch was encoded before the input was checked")

    monkeypatch.setattr(finetuned.PrefixEncoder, "__call__", refuse)


def _disjoint_genes(sections):
    renamed = sections[1].tables["table"].copy()
    renamed.var_names = [f"other_{g}" for g in renamed.var_names]
    return renamed


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"rank": 0}, ValueError, "rank must be an integer ≥ 1; found 0"),
        ({"rank": 2.5}, TypeError, "rank"),
        ({"n_blocks": 40}, ValueError, r"n_blocks must lie in 1\.\.16"),
        ({"backbone": sd.MorphologyFeatures()}, ValueError, "plain callable"),
        ({"lora_dropout": 1.0}, ValueError, "lora_dropout"),
        ({"min_spots": 5000}, ValueError, "at least min_spots=5000 spots"),
        ({"val_slides": ["MOB9"]}, ValueError, "val_slides must name some of the slides"),
        ({"max_steps": 3, "max_epochs": 1}, None, None),
    ],
)
def test_bad_input_is_refused_before_any_work(mob12, base, no_work, options, error, match):
    options = {"backbone": base, **FAST, **options}
    if error is None:  # a Trainer argument that is fine: it gets past the checks, to the first encoded patch
        with pytest.raises(AssertionError, match="encoded"):
            sd.tl.finetune(mob12, cache=False, **options)
        return
    with pytest.raises(error, match=match):
        sd.tl.finetune(mob12, **options)


def test_slides_sharing_no_genes_are_refused_before_any_work(mob12, base, no_work):
    import copy

    other = copy.deepcopy(mob12[1])
    other.tables["table"] = _disjoint_genes(mob12)
    with pytest.raises(ValueError, match="share no gene"):
        sd.tl.finetune([mob12[0], other], backbone=base, **FAST)


def test_augmentation_runs_full_passes_without_the_prefix_cache(mob12, base, no_work, caplog):
    options = {**FAST, "max_epochs": 1, "max_steps": 2}
    with caplog.at_level("WARNING", logger="spade_sd"):
        augmented = sd.tl.finetune(mob12, backbone=base, augment=True, seed=0, **options)
    assert "cannot be cached" in caplog.text  # no_work: the prefix encoder was never called
    assert any(float(v.abs().max()) > 0 for k, v in augmented.adapter_tensors().items() if "lora_B" in k)
    frozen, original = _base_weights(augmented), base.module.state_dict()
    assert all(torch.equal(frozen[k], original[k]) for k in original)


def test_finetune_defaults_are_the_seal_configuration():
    import inspect

    from spade_sd.config import SealConfig

    parameters = inspect.signature(sd.tl.finetune).parameters
    for name, default in SealConfig().to_dict().items():
        assert name in parameters, name
        expected = parameters[name].default
        assert (list(expected) if isinstance(expected, tuple) else expected) == default, name


def test_a_float16_prefix_cache_tunes_as_the_float32_one(tuned, mob12, base, monkeypatch, tmp_path):
    monkeypatch.setenv("SPADE_SD_CACHE_DIR", str(tmp_path))
    sd.settings.feature_cache_dtype = "float16"
    try:
        half = sd.tl.finetune(mob12, backbone=base, seed=0, **FAST)
    finally:
        sd.settings.feature_cache_dtype = "float32"
    stored = list((tmp_path / "features").glob("*.npy"))
    assert len(stored) == 2 and all(np.load(path, mmap_mode="r").dtype == np.float16 for path in stored)
    assert np.isfinite(SealAlignment.from_backbone(half).history["val_loss"]).all()
    patches = sd.pp.spot_patches(mob12[1]).read(np.arange(64))
    ours, theirs = half(patches), tuned(patches)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() > 0.999  # 0.99998 here: the prefixes' rounding (2**-12 of each value) carried through training
