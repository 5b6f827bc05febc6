"""Models saved by earlier versions of spade_sd load and embed as they did."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

import spade_sd as sd

DATA = Path(__file__).parents[1] / "data"


def test_a_model_saved_before_the_weights_digest_loads_and_embeds_identically(caplog):
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        model = sd.SpadeModel.load(DATA / "model_ca61673")
    assert "the weights were not verified" in caplog.text
    # format 1 had no reference bank, and its configuration says so once migrated
    assert model.reference is None and model.config.training.reference_size == 0
    probe = sd.datasets.synthetic(grid=(8, 8), mpp=1.0, n_genes=60, seed=5)
    sd.tl.embed(probe, model, cache=False)
    expected = np.load(DATA / "model_ca61673_embedding.npz")
    table = probe.tables["table"]
    for key in ("X_spade", "X_spade_gene", "X_spade_weights"):
        np.testing.assert_array_equal(table.obsm[key], expected[key], err_msg=key)
