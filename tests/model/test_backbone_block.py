"""BackboneBlock: the standardized backbone features a joint embedding keeps next to its aligned coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from spade_sd.model.backbone_block import BackboneBlock


def _standardized(n: int = 300, d: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)) * 3 + rng.normal(size=(n, d))
    return ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)


def test_the_block_keeps_the_leading_components_at_the_asked_share_of_variance():
    x = _standardized()
    aligned = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32) * 0.5 + 3.0
    block = BackboneBlock.fit(x, aligned, n_comps=3, weight=2.0)
    out = block.transform(x)
    assert out.shape == (300, 3) and out.dtype == np.float32 and block.width(20) == 3
    np.testing.assert_allclose(block.basis.T @ block.basis, np.eye(3), atol=1e-5)
    # total variance of the block = weight × that of the aligned coordinates (their mean does not count)
    np.testing.assert_allclose(out.var(axis=0).sum(), 2.0 * aligned.var(axis=0).sum(), rtol=1e-4)
    # three components hold nearly all of a rank-3-plus-noise signal: the features are recoverable from them
    recovered = (out / block.scale) @ block.basis.T
    assert np.mean((recovered - x) ** 2) < 0.15 * np.mean(x**2)


def test_none_keeps_every_feature_up_to_one_scale():
    x = _standardized()
    block = BackboneBlock.fit(x, x[:, :4], n_comps=None)
    assert block.basis is None and block.width(20) == 20
    np.testing.assert_allclose(block.transform(x), x * block.scale, rtol=1e-6)


@pytest.mark.cpu_paths
def test_the_fit_is_deterministic_and_round_trips_through_arrays():
    x = _standardized()
    first, again = BackboneBlock.fit(x, x, n_comps=5), BackboneBlock.fit(x.copy(), x, n_comps=5)
    np.testing.assert_array_equal(first.basis, again.basis)
    for block in (first, BackboneBlock.fit(x, x, n_comps=None)):
        restored = BackboneBlock.from_arrays({k: np.array(v) for k, v in block.to_arrays().items()})
        np.testing.assert_array_equal(restored.transform(x), block.transform(x))


def test_more_components_than_spots_or_features_is_refused():
    with pytest.raises(ValueError, match=r"backbone_comps must be at most min\(training spots, backbone features\)"):
        BackboneBlock.fit(_standardized(n=10), np.zeros((10, 4)), n_comps=11)


@pytest.mark.parametrize("n_comps", [3, None])
def test_blocks_of_rows_fit_the_block_the_rows_fit(n_comps):
    x = _standardized(n=500) + 50.0  # an offset: the scatter must not cancel digits away
    aligned = np.random.default_rng(1).normal(size=(500, 8)).astype(np.float32) * 0.5 + 1e3
    whole = BackboneBlock.fit(x, aligned, n_comps=n_comps, weight=0.7)
    pairs = ((x[start : start + 64], aligned[start : start + 64]) for start in range(0, 500, 64))
    blocks = BackboneBlock.fit_blocks(pairs, n_comps=n_comps, weight=0.7)
    assert blocks.width(20) == whole.width(20)
    if n_comps is not None:
        assert blocks.basis.dtype == np.float32
        np.testing.assert_allclose(blocks.basis, whole.basis, atol=1e-5)  # the same signs as well
    np.testing.assert_allclose(blocks.scale, whole.scale, rtol=1e-6)
    with pytest.raises(ValueError, match=r"backbone_comps must be at most min\(training spots, backbone features\)"):
        BackboneBlock.fit_blocks(iter([(x[:10], aligned[:10])]), n_comps=11)
