"""LoRA adapters on real backbones: where they go, the frozen-prefix split, merging, saving and loading."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from spade_sd.encoders.backbone import Backbone
from spade_sd.encoders.finetuned import ADAPTERS_WEIGHTS, FineTunedBackbone, PrefixEncoder
from spade_sd.encoders.lora import plan_adapters

TINY_VIT = {"depth": 3, "img_size": 32, "patch_size": 8, "embed_dim": 64, "num_heads": 2}


# a fresh, empty feature cache for this module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return Backbone(engine="torch", input_size=96)


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """A tiny timm ViT, randomly initialised, saved locally as a safetensors file (no hub needed)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
    path = tmp_path_factory.mktemp("vit") / "tiny_vit.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def vit(vit_weights) -> Backbone:
    return Backbone("vit_tiny_patch16_224", weights=vit_weights, engine="torch", input_size=32, **TINY_VIT)


def _patches(n: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _perturbed(backbone: Backbone, *, seed: int = 1, **options) -> FineTunedBackbone:
    """A fine-tuned backbone whose adapters are non-zero (as after training)."""
    tuned = FineTunedBackbone(backbone, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in tuned.module.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return tuned


def test_adapters_go_on_the_last_blocks_of_lite0_not_on_depthwise_convolutions(lite0):
    plan = plan_adapters(lite0.module, 1)
    assert plan.family == "efficientnet" and plan.depth == 16
    assert plan.targets == ("blocks.6.0.conv_pw", "blocks.6.0.conv_pwl", "conv_head")
    two = plan_adapters(lite0.module, 2)
    assert two.blocks == ("blocks.5.3", "blocks.6.0")
    assert "blocks.5.3.conv_pw" in two.targets and not any("conv_dw" in t for t in two.targets)


def test_adapters_go_on_attention_and_mlp_of_the_last_vit_blocks(vit):
    plan = plan_adapters(vit.module, 2)
    assert plan.family == "vit" and plan.depth == 3 and plan.blocks == ("blocks.1", "blocks.2")
    assert set(plan.targets) == {
        f"blocks.{b}.{layer}" for b in (1, 2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }


def test_only_adapters_train_and_the_base_backbone_is_not_modified(lite0):
    before = {k: v.clone() for k, v in lite0.module.state_dict().items()}
    tuned = FineTunedBackbone(lite0, rank=4)
    trainable = [name for name, p in tuned.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * 3  # A and B of three layers
    after = lite0.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in name for name, _ in lite0.module.named_modules())


@pytest.mark.parametrize("which", ["lite0", "vit"])
def test_cached_prefix_then_suffix_equals_the_full_forward_pass(which, request):
    base = request.getfixturevalue(which)
    tuned = _perturbed(base, n_blocks=2)
    x = _patches(5, base.input_size)
    full = tuned(x)
    encoder = PrefixEncoder(tuned)
    prefix = encoder(x).reshape(len(x), *encoder.shape)
    np.testing.assert_allclose(tuned.features_from_prefix(prefix), full, rtol=1e-5, atol=1e-5)
    assert np.abs(full - base(x)).max() > 1e-3  # the adapters do change the features
    # zero-initialised adapters compute exactly what the base does
    np.testing.assert_array_equal(FineTunedBackbone(base)(x), base(x))


@pytest.mark.parametrize("which", ["lite0", "vit"])
def test_the_prefix_runs_in_onnxruntime_as_in_pytorch(which, request, cache_dir):
    from spade_sd.encoders.onnx_engine import onnx_path

    tuned = _perturbed(request.getfixturevalue(which), n_blocks=2)
    x = _patches(11, tuned.input_size)  # more than one of the engine's sub-batches of 8
    encoder, eager = PrefixEncoder(tuned), PrefixEncoder(tuned, engine="torch")
    found, expected = encoder(x), eager(x)
    assert found.shape == expected.shape == (11, encoder.dim) and found.dtype == np.float32
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert encoder.engine == "auto" and onnx_path(encoder.identity()).is_file()
    assert str(cache_dir) in str(onnx_path(encoder.identity()))


def test_a_prefix_that_cannot_be_exported_runs_in_pytorch_with_a_warning(lite0, monkeypatch, caplog):
    from spade_sd.encoders.onnx_engine import OnnxEngine

    def fails(self):
        raise RuntimeError("no exporter for this operator")

    monkeypatch.setattr(OnnxEngine, "load", fails)
    tuned = _perturbed(lite0, n_blocks=2)
    encoder = PrefixEncoder(tuned)
    x = _patches(3, tuned.input_size)
    with caplog.at_level("WARNING", logger="spade_sd"):
        found = encoder(x)
    assert "onnxruntime unavailable (RuntimeError: no exporter for this operator)" in caplog.text
    assert encoder.engine == "torch"
    np.testing.assert_array_equal(found, PrefixEncoder(tuned, engine="torch")(x))
    with pytest.raises(ValueError, match="engine must be 'auto' or 'torch'; found 'int8'"):
        PrefixEncoder(tuned, engine="int8")


def test_the_prefix_identity_names_base_and_split_only(lite0):
    one, other = _perturbed(lite0, seed=1, rank=4), _perturbed(lite0, seed=2, rank=8)
    assert PrefixEncoder(one).identity() == PrefixEncoder(other).identity()
    assert PrefixEncoder(_perturbed(lite0, n_blocks=2)).identity() != PrefixEncoder(one).identity()
    assert len({lite0.identity(), one.identity(), other.identity()}) == 3


@pytest.mark.cpu_paths
def test_merged_weights_give_the_same_features_and_run_on_onnxruntime(lite0):
    tuned = _perturbed(lite0)
    x = _patches(4, 96)
    merged = tuned.merge()
    assert merged.kind == "module" and not any("lora" in name for name in merged.module.state_dict())
    np.testing.assert_allclose(merged(x), tuned(x), rtol=1e-4, atol=1e-4)
    assert merged._engine_in_use == "onnxruntime"
    assert merged.identity() != tuned.identity() != lite0.identity()


@pytest.mark.cpu_paths
@pytest.mark.parametrize("which", ["lite0", "vit"])
def test_adapters_save_and_load_to_identical_features(which, request, tmp_path):
    base = request.getfixturevalue(which)
    tuned = _perturbed(base, rank=4, alpha=16.0)
    tuned.attach("extra", {"note": "kept"}, {"w": np.arange(3, dtype=np.float32)})
    tuned.save(tmp_path / "adapters")
    loaded = FineTunedBackbone.load(tmp_path / "adapters", base=base)
    x = _patches(3, base.input_size)
    np.testing.assert_array_equal(loaded(x), tuned(x))
    assert loaded.identity() == tuned.identity() and loaded.lora == tuned.lora
    assert loaded.attachments["extra"][0] == {"note": "kept"}
    np.testing.assert_array_equal(loaded.attachments["extra"][1]["w"], np.arange(3))


def test_the_default_base_is_rebuilt_from_the_file(tmp_path):
    base = Backbone(engine="torch")
    tuned = _perturbed(base)
    tuned.save(tmp_path / "a")
    loaded = FineTunedBackbone.load(tmp_path / "a")
    assert loaded.identity() == tuned.identity()


def test_loading_on_another_base_or_from_damaged_files_is_refused(lite0, vit, tmp_path):
    tuned = _perturbed(lite0)
    tuned.save(tmp_path / "a")
    with pytest.raises(ValueError, match="trained on backbone 'efficientnet_lite0'"):
        FineTunedBackbone.load(tmp_path / "a", base=Backbone(engine="torch", input_size=96, pretrained=False))
    with pytest.raises(ValueError, match="trained on backbone"):
        FineTunedBackbone.load(tmp_path / "a", base=vit)
    weights = tmp_path / "a" / ADAPTERS_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match"):
        FineTunedBackbone.load(tmp_path / "a", base=lite0)


def test_saving_never_replaces_user_files(lite0, tmp_path):
    tuned = _perturbed(lite0)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="notes.txt"):
        tuned.save(folder, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    tuned.save(tmp_path / "a")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tuned.save(tmp_path / "a")
    tuned.save(tmp_path / "a", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapters.json", "adapters.safetensors"]


def test_what_cannot_be_adapted_is_refused_with_what_was_found(lite0):
    with pytest.raises(ValueError, match=r"n_blocks must lie in 1\.\.16.*found 17"):
        FineTunedBackbone(lite0, n_blocks=17)
    with pytest.raises(ValueError, match="plain callable"):
        FineTunedBackbone(Backbone(lambda x: np.zeros((len(x), 2), np.float32), dim=2))
    conv = Backbone(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), input_size=32)
    with pytest.raises(ValueError, match=r"found Sequential with children \[0 \(Conv2d\)"):
        FineTunedBackbone(conv)
    with pytest.raises(ValueError, match="already fine-tuned"):
        FineTunedBackbone(FineTunedBackbone(lite0))
