"""Low-precision CPU engines of the Backbone: fidelity to float32, their own cache identity, and the auto gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from spade_sd import Backbone
from spade_sd.encoders import precision as low
from spade_sd.encoders.features import cache_key
from spade_sd.encoders.onnx_engine import onnx_path


def _patches(n: int, side: int, seed: int = 0) -> np.ndarray:
    """Blocky patches with noise: smooth regions and edges, closer to tissue than white noise."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, side // 8, side // 8, 3)).astype(np.float32)
    smooth = np.kron(blocks, np.ones((1, 8, 8, 1)))
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1),
    )


# tiny random timm models, 64-px input: a convolutional one (static int8) and a transformer (dynamic int8)
_MODELS = {"test_efficientnet": {}, "test_vit": {"img_size": 64}}


@pytest.fixture(scope="module")
def reference(cache_dir):
    """Per model: its float32 features of 8 held-out patches, and 16 calibration patches."""
    patches = _patches(24, 64)
    found = {}
    for name, kwargs in _MODELS.items():
        torch.manual_seed(0)
        fp32 = Backbone(name, pretrained=False, engine="onnxruntime", input_size=64, **kwargs)
        found[name] = (fp32, fp32(patches[16:]))
    return found, patches[:16], patches[16:]


@pytest.mark.parametrize("engine", ["int8", "bf16"])
@pytest.mark.parametrize("name", list(_MODELS))
def test_low_precision_engines_keep_the_cosine_gate(reference, name, engine):
    found, calibration, held_out = reference
    fp32, expected = found[name]
    torch.manual_seed(0)
    backbone = Backbone(name, pretrained=False, engine=engine, input_size=64, calibration=calibration, **_MODELS[name])
    assert backbone.identity() == fp32.identity()  # same weights
    features = backbone(held_out)
    assert features.dtype == np.float32 and features.shape == expected.shape
    # bf16 is emulated (slow but correct) on CPUs without AVX512-BF16: requested explicitly, it still runs
    assert low.median_cosine(features, expected) >= low.GATE_COSINE
    # not a copy of the float32 features: the precision is lower
    assert not np.allclose(features, expected, rtol=0, atol=1e-6)
    # a batch of another size than the int8 graph's fixed one (padded inside) gives the same rows
    np.testing.assert_allclose(backbone(held_out[:3]), features[:3], rtol=0, atol=1e-4 * np.abs(features).max())


def test_engine_arguments_are_checked(cache_dir):
    with pytest.raises(ValueError, match=r"expected engine to be one of \('auto', 'torch', 'onnxruntime', 'int8'"):
        Backbone(_tiny_cnn(), engine="fp16", input_size=16)
    with pytest.raises(ValueError, match="needs a torch model"):
        Backbone(np.mean, engine="int8")
    with pytest.raises(ValueError, match="calibration apply to torch models"):
        Backbone(np.mean, dim=1, version="1", calibration=_patches(16, 16))
    with pytest.raises(ValueError, match=r"at least 16 real uint8 RGB patches.*found float64 \(16, 16, 16, 3\)"):
        Backbone(_tiny_cnn(), input_size=16, calibration=_patches(16, 16).astype(float))
    with pytest.raises(ValueError, match=r"found uint8 \(8, 16, 16, 3\)"):
        Backbone(_tiny_cnn(), input_size=16, calibration=_patches(8, 16))
    # static int8 of a convolutional model calibrates on real patches: refused without them, before any work
    with pytest.raises(ValueError, match="pass Backbone\\(..., calibration=patches\\)"):
        Backbone(_tiny_cnn(), engine="int8", input_size=16)


def test_each_precision_has_its_own_feature_identity(cache_dir):
    calibration, other = _patches(16, 16, seed=1), _patches(16, 16, seed=2)
    make = lambda **kw: Backbone(_tiny_cnn(), input_size=16, **kw)
    fp32 = make(engine="onnxruntime")
    names = {
        "torch": make(engine="torch").feature_identity(),
        "onnxruntime": fp32.feature_identity(),
        "auto without calibration": make().feature_identity(),
        "int8": make(engine="int8", calibration=calibration).feature_identity(),
        "int8, other calibration": make(engine="int8", calibration=other).feature_identity(),
        "bf16": make(engine="bf16", calibration=calibration).feature_identity(),
    }
    # the float32 engines share the weights' identity (and a saved model's check); nothing was built to tell
    assert names["torch"] == names["onnxruntime"] == names["auto without calibration"] == fp32.identity()
    assert not onnx_path(fp32.identity()).exists()
    low_names = [names["int8"], names["int8, other calibration"], names["bf16"]]
    assert len(set(low_names)) == 3 and fp32.identity() not in low_names
    assert make(engine="bf16").feature_identity() == names["bf16"]  # bf16 needs no calibration

    class SamePatches:
        def fingerprint(self) -> str:
            return "the same patches"

    # the feature cache is keyed by it: another precision never reads float32 features, nor the reverse
    keys = {
        cache_key(SamePatches(), make(engine=engine, calibration=calibration)) for engine in ("torch", "onnxruntime")
    }
    assert len(keys) == 1
    keys |= {cache_key(SamePatches(), make(engine=engine, calibration=calibration)) for engine in low.LOW_PRECISIONS}
    assert len(keys) == 3


def _fake_measure(results: dict, calls: list):
    def measure(encode, patches, candidates):
        calls.append(candidates)
        return {engine: found for engine, found in results.items() if engine in ("onnxruntime", *candidates)}

    return measure


def test_auto_never_picks_an_engine_that_failed_the_gate(cache_dir, monkeypatch):
    calibration = _patches(16, 16)
    # int8 is the fastest but under the cosine gate; bf16 passes both tests
    results = {
        "onnxruntime": {"median_cosine": 1.0, "patches_per_s": 100.0},
        "int8": {"median_cosine": 0.99, "patches_per_s": 400.0},
        "bf16": {"median_cosine": 0.999, "patches_per_s": 200.0},
    }
    calls: list = []
    monkeypatch.setattr(low, "measure", _fake_measure(results, calls))
    monkeypatch.setattr(low, "bf16_native", lambda: True)
    backbone = Backbone(_tiny_cnn(), input_size=16, calibration=calibration)
    patches = _patches(3, 16, seed=5)
    found = backbone(patches)
    assert backbone._engine_in_use == "bf16" and calls == [("int8", "bf16")]
    np.testing.assert_array_equal(found, Backbone(_tiny_cnn(), engine="bf16", input_size=16)(patches))
    assert backbone.feature_identity() == Backbone(_tiny_cnn(), engine="bf16", input_size=16).feature_identity()
    # measured once per backbone, calibration and machine: stored next to the ONNX export, read back
    stored = json.loads(onnx_path(backbone.identity()).with_suffix(".gate.json").read_text())
    assert stored["measurements"] == results
    again = Backbone(_tiny_cnn(), input_size=16, calibration=calibration)
    again(patches)
    assert again._engine_in_use == "bf16" and len(calls) == 1

    # on a CPU without native bfloat16, bf16 is not even measured; int8 still fails the gate: float32 onnxruntime
    monkeypatch.setattr(low, "bf16_native", lambda: False)
    emulated = Backbone(_tiny_cnn(), input_size=16, calibration=_patches(16, 16, seed=9))
    assert emulated.feature_identity() == emulated.identity()
    assert emulated._engine_in_use == "onnxruntime" and calls[-1] == ("int8",)


def test_choose_needs_both_fidelity_and_speed():
    base = {"onnxruntime": {"median_cosine": 1.0, "patches_per_s": 100.0}}
    assert low.choose(base) == "onnxruntime"
    faithful_but_slow = {"int8": {"median_cosine": 0.9999, "patches_per_s": 105.0}}  # under GATE_SPEEDUP
    assert low.choose(base | faithful_but_slow) == "onnxruntime"
    failed = {"int8": {"error": "RuntimeError: broken"}, "bf16": {"median_cosine": 0.9992, "patches_per_s": 150.0}}
    assert low.choose(base | failed) == "bf16"
    both = {"int8": {"median_cosine": 0.9991, "patches_per_s": 300.0}, "bf16": failed["bf16"]}
    assert low.choose(base | both) == "int8"
    assert low.choose(base | {"int8": {"median_cosine": 0.9989, "patches_per_s": 300.0}}) == "onnxruntime"
    # faithful enough to be asked for explicitly, not to be chosen: EfficientNet-Lite0's int8 (0.9978) moved a probe
    assert low.GATE_COSINE <= 0.9978 < low.AUTO_COSINE
    assert low.choose(base | {"int8": {"median_cosine": 0.9978, "patches_per_s": 300.0}}) == "onnxruntime"
