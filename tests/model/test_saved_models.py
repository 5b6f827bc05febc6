"""Models saved by earlier versions of spade_sd load and embed as they did."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import spade_sd as sd

DATA = Path(__file__).parents[1] / "data"
KEYS = ("X_spade", "X_spade_gene", "X_spade_weights")

# The stored embedding was computed on another machine. Bit-identity holds within one machine (checked below and in
# tests/test_bad_input.py across processes), not across CPUs: onnxruntime's and the BLAS's kernels sum in another
# order under other instruction sets. Seen between machines: up to 2e-5 on values of order 1 (AVX512 vs AVX2); a
# wrong panel order, a wrong standardization or other weights move them by 0.1 or more.
ACROSS_CPUS = {"rtol": 1e-4, "atol": 1e-4}


def _embed(model) -> dict[str, np.ndarray]:
    probe = sd.datasets.synthetic(grid=(8, 8), mpp=1.0, n_genes=60, seed=5)
    sd.tl.embed(probe, model, cache=False)
    return {key: probe.tables["table"].obsm[key] for key in KEYS}


@pytest.mark.cpu_paths
def test_a_model_saved_before_the_weights_digest_loads_and_embeds_as_it_did(caplog):
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        model = sd.SpadeModel.load(DATA / "model_ca61673")
    assert "were not verified" in caplog.text
    # format 1 had no reference bank, and its configuration says so once migrated
    assert model.reference is None and model.config.training.reference_size == 0
    embedded = _embed(model)
    expected = np.load(DATA / "model_ca61673_embedding.npz")
    for key in KEYS:
        np.testing.assert_allclose(embedded[key], expected[key], err_msg=key, **ACROSS_CPUS)
    # on this machine, a second load embeds bit for bit as the first
    again = _embed(sd.SpadeModel.load(DATA / "model_ca61673"))
    for key in KEYS:
        np.testing.assert_array_equal(again[key], embedded[key], err_msg=key)


def test_the_tolerance_across_cpus_still_tells_a_changed_model_apart():
    """A change of one part in a thousand to the weights moves the embedding past the tolerance across CPUs."""
    import torch

    model = sd.SpadeModel.load(DATA / "model_ca61673")
    with torch.no_grad():
        for parameter in model.mixture.parameters():
            parameter.mul_(1.001)
    embedded = _embed(model)
    expected = np.load(DATA / "model_ca61673_embedding.npz")
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(embedded["X_spade"], expected["X_spade"], **ACROSS_CPUS)
