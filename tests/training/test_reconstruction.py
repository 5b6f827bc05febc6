"""reconstruction > 0: a decoder term keeps the backbone features recoverable from the image embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import latent_data

from spade_sd.config import TrainingConfig
from spade_sd.model.heads import ExpertMixture
from spade_sd.training.experts import train_experts

pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    """Expression explains 5 of the features' directions; 20 more carry image-only signal."""
    x_good, _, y, slide = latent_data(n_slides=4, n_per_slide=100, d_x=64, n_genes=20, seed=0)
    rng = np.random.default_rng(1)
    image_only = rng.normal(size=(len(x_good), 20)) @ np.linalg.qr(rng.normal(size=(64, 20)))[0].T
    x = x_good + image_only
    x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    return x, ((y - y.mean(axis=0)) / y.std(axis=0)).astype(np.float32), slide


def _recoverable(mixture: ExpertMixture, x: np.ndarray) -> float:
    """Share of the features' variance a least-squares map from the image embedding recovers."""
    with torch.no_grad():
        image = mixture.embed_image(torch.from_numpy(x), np.ones((len(x), 1), np.float32)).numpy()
    design = np.c_[image, np.ones(len(x))]
    fitted = design @ np.linalg.lstsq(design, x, rcond=None)[0]
    return 1 - float(((x - fitted) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum())


def _train(x, y, slide, reconstruction):
    config = TrainingConfig(
        out_dim=16, max_epochs=100, patience=100, batch_size=64, lr=1e-2, reconstruction=reconstruction
    )
    mixture, history = train_experts(x, y, np.zeros(len(x), dtype=int), slide, n_experts=1, config=config, quiet=True)
    return mixture.eval(), history


def test_the_reconstruction_term_keeps_more_of_the_features_in_the_embedding():
    x, y, slide = _data()
    plain, _ = _train(x, y, slide, 0.0)
    kept, _ = _train(x, y, slide, 10.0)
    assert not hasattr(plain, "decoders") and "decoder" not in plain.config
    assert kept.config["decoder"] is True and len(kept.decoders) == 1
    with torch.no_grad():
        image = kept.embed_image(torch.from_numpy(x), np.ones((len(x), 1), np.float32))
        error = float(kept.reconstruction_error(torch.from_numpy(x), image, 0))
    assert error < 0.6  # a decoder that knew nothing would score ~1 on standardized features; observed 0.35
    assert _recoverable(kept, x) > _recoverable(plain, x) + 0.1  # observed 0.66 vs 0.43


def test_a_mixture_with_decoders_round_trips_its_state_and_copies_the_generalist():
    generalist = ExpertMixture(1, 12, 5, out_dim=8, decoder=True)
    mixture = ExpertMixture(3, 12, 5, out_dim=8, decoder=True)
    mixture.start_from(generalist)
    for decoder in mixture.decoders:
        torch.testing.assert_close(decoder.weight, generalist.decoders[0].weight)
    config = dict(mixture.config)
    again = ExpertMixture(config.pop("n_experts"), config.pop("image_dim"), config.pop("gene_dim"), **config)
    again.load_state_dict(mixture.state_dict(), strict=True)
    torch.testing.assert_close(again.decoders[2].bias, mixture.decoders[2].bias)
