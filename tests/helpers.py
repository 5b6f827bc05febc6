"""Small helpers several test files share (importable because pyproject sets pytest's ``pythonpath = ["tests"]``)."""

from __future__ import annotations

import numpy as np


class CountingMeans:
    """A cheap backbone (channel means and standard deviations) that counts the batches it encodes.

    A test that a call was refused before any work asserts that ``calls`` stayed at 0; ``patches`` counts the
    patches encoded.
    """

    dim = 6

    def __init__(self) -> None:
        self.calls = 0
        self.patches = 0

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.patches += len(patches)
        x = patches.astype(np.float32) / 255
        return np.c_[x.mean(axis=(1, 2)), x.std(axis=(1, 2))]

    def to_config(self) -> dict:
        return {"features": "channel means and standard deviations"}


def latent_data(n_slides=4, n_per_slide=150, d_latent=5, d_x=64, n_genes=20, seed=0):
    """Y linear in a latent Z (offset like uncentred log1p values); X_good a rotated Z, X_bad pure noise."""
    rng = np.random.default_rng(seed)
    n = n_slides * n_per_slide
    z = rng.normal(size=(n, d_latent))
    y = 5 + z @ rng.normal(size=(d_latent, n_genes)) + 0.5 * rng.normal(size=(n, n_genes))
    rotation, _ = np.linalg.qr(rng.normal(size=(d_x, d_latent)))
    x_good = z @ rotation.T + 0.1 * rng.normal(size=(n, d_x))
    x_bad = rng.normal(size=(n, d_x))
    slide = np.repeat([f"s{i}" for i in range(n_slides)], n_per_slide)
    return x_good, x_bad, y, slide


def pretrain_at_scale(monkeypatch, slides, backbone, *, max_epochs: int, **options):
    """``tl.pretrain`` forced onto the bounded-memory path (as if past ``SCALE_SPOTS``): the model and the features it
    trained on, checked to be memory maps."""
    from conftest import SMALL_PATCH

    import spade_sd as sd
    import spade_sd.training.fit as fit
    from spade_sd.tl import _pretrain

    seen = {}
    fit_model_as_is = fit.fit_model

    def recording(features, *args, **kwargs):
        seen["features"], seen["scalable"] = features, kwargs["scalable"]
        return fit_model_as_is(features, *args, **kwargs)

    monkeypatch.setattr(_pretrain, "SCALE_SPOTS", 60)  # a few slides' spots count as many
    monkeypatch.setattr(fit, "fit_model", recording)
    config = {"n_experts": 2, "n_fine": 3, "out_dim": 16, "reference_size": 40, "quiet": True}
    model = sd.tl.pretrain(
        slides, backbone=backbone, warm_start=False, max_epochs=max_epochs, **config, **options, **SMALL_PATCH
    )
    assert seen["scalable"] and all(isinstance(f, np.memmap) for f in seen["features"])
    return model, seen["features"]
