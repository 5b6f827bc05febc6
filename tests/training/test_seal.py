"""SEAL's training pieces: losses, rows over several slides, augmentation, and DDP on two processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_sd.config import SealConfig
from spade_sd.encoders.backbone import Backbone
from spade_sd.encoders.finetuned import FineTunedBackbone, PrefixEncoder
from spade_sd.training.seal import PrefixRows, random_dihedral, reconstruction_loss, train_seal

# a fresh, empty feature cache for this module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("cache_dir")


def test_reconstruction_loss_is_zero_for_a_perfect_prediction_and_two_for_its_negative():
    y = torch.randn(32, 5)
    y = (y - y.mean(0)) / y.std(0)
    assert float(reconstruction_loss(y, y, mse_weight=5.0)) == pytest.approx(0.0, abs=1e-5)
    # r = −1 for every gene; MSE of (−y − y) = 4 · mean(y²)
    expected = 2.0 + 5.0 * float((4 * y**2).mean())
    assert float(reconstruction_loss(-y, y, mse_weight=5.0)) == pytest.approx(expected, rel=1e-5)


def test_prefix_rows_read_the_right_slide_and_row():
    prefixes = [
        np.arange(3 * 2, dtype=np.float32).reshape(3, 2),
        100 + np.arange(4 * 2, dtype=np.float32).reshape(4, 2),
    ]
    expression = np.arange(7, dtype=np.float32)[:, None]
    rows = PrefixRows(prefixes, expression, np.array([6, 0, 3]))
    h, y = rows.__getitems__([0, 1, 2])
    np.testing.assert_array_equal(h.numpy(), [[106, 107], [0, 1], [100, 101]])
    np.testing.assert_array_equal(y.numpy().ravel(), [6, 0, 3])


def test_random_dihedral_only_moves_pixels():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    y = random_dihedral(x)
    assert y.shape == x.shape
    for a, b in zip(x, y, strict=True):
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
    assert not torch.equal(x, y)


@pytest.fixture(scope="module")
def small():
    """A tiny fine-tuned EfficientNet-Lite0 (64 px input) and synthetic prefixes with learnable expression."""
    base = Backbone(engine="torch", input_size=64, pretrained=False)
    tuned = FineTunedBackbone(base, rank=2)
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (48, 64, 64, 3), dtype=np.uint8)
    encoder = PrefixEncoder(tuned)
    prefix = encoder(patches).reshape(len(patches), *encoder.shape)
    expression = rng.standard_normal((48, 12)).astype(np.float32)
    return tuned, [prefix[:24], prefix[24:]], expression, base


def test_training_moves_only_the_adapters_and_is_seeded(small):
    tuned, prefixes, expression, base = small
    config = SealConfig(n_genes=12, embed_dim=8, batch_size=8, max_epochs=2, min_val_slides=2)
    before = {k: v.clone() for k, v in tuned.module.state_dict().items() if "lora_" not in k}
    _, history = train_seal(tuned, prefixes, expression, np.repeat(["a", "b"], 24), config=config)
    assert history["val_slides"] and history["epochs"] == 2
    after = tuned.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    first = {k: v.clone() for k, v in tuned.adapter_tensors().items()}
    assert any(float(v.abs().max()) > 0 for k, v in first.items() if "lora_B" in k)
    twin = FineTunedBackbone(base, rank=2)
    train_seal(twin, prefixes, expression, np.repeat(["a", "b"], 24), config=config)
    assert all(torch.equal(first[k], v) for k, v in twin.adapter_tensors().items())


def test_ddp_on_two_processes_trains(small):
    _, prefixes, expression, base = small
    tuned = FineTunedBackbone(base, rank=2)
    config = SealConfig(n_genes=12, embed_dim=8, batch_size=8, max_epochs=1, val_fraction=0)
    strategy = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
    _, history = train_seal(
        tuned,
        prefixes,
        expression,
        np.repeat(["a", "b"], 24),
        config=config,
        trainer_kwargs={"accelerator": "cpu", "devices": 2, "strategy": strategy},
    )
    assert history["epochs"] == 1 and np.isfinite(history["train_loss"]).all()


def test_garbage_is_collected_before_training_forks_processes():
    """A dropped onnxruntime session in a reference cycle hung a forked DDP process that collected it."""
    import gc
    import weakref

    from spade_sd.training.lightning_loop import fit_trainer

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    def dropped() -> weakref.ref:
        return weakref.ref(Cycle())  # garbage at once, freed only by the collector

    seen = {}

    class FakeTrainer:
        def __init__(self, world_size: int) -> None:
            self.world_size = world_size

        def fit(self, module, **data) -> None:
            seen[self.world_size] = (garbage() is None, module, data)

    gc.disable()
    try:
        garbage = dropped()
        fit_trainer(FakeTrainer(1), "module", datamodule="data")
        assert seen[1] == (False, "module", {"datamodule": "data"})  # one process: nothing collected
        fit_trainer(FakeTrainer(2), "module", datamodule="data")
        assert seen[2][0]  # several: collected before fit forks
    finally:
        gc.enable()
