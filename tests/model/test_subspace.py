"""EmbeddingSubspace: the principal subspace that SPADE's embeddings are kept in."""

from __future__ import annotations

import numpy as np
import pytest

from spade_sd.model.subspace import (
    EmbeddingSubspace,
    KeptShare,
    check_n_comps,
    principal_directions,
    principal_directions_of_blocks,
)


def _low_rank_plus_noise(rank: int, dim: int = 32, n: int = 500, noise: float = 0.01, seed: int = 0):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, rank)))
    codes = rng.normal(size=(n, rank)) * np.linspace(3, 1, rank)
    return 5.0 + codes @ basis.T + noise * rng.normal(size=(n, dim)), basis


def test_fit_recovers_the_leading_directions():
    embedding, truth = _low_rank_plus_noise(rank=4)
    subspace = EmbeddingSubspace.fit(embedding, 4)
    assert subspace.basis.shape == (32, 4) and subspace.n_comps == 4
    np.testing.assert_allclose(subspace.basis.T @ subspace.basis, np.eye(4), atol=1e-5)
    # the fitted span is the planted one: the cosines of the principal angles are all ~1
    np.testing.assert_allclose(np.linalg.svd(truth.T @ subspace.basis, compute_uv=False), 1, atol=1e-3)
    np.testing.assert_allclose(subspace.mean, embedding.mean(axis=0), rtol=1e-6)


def test_project_keeps_shape_removes_the_rest_and_is_idempotent():
    embedding, _ = _low_rank_plus_noise(rank=4, noise=0.5)
    subspace = EmbeddingSubspace.fit(embedding, 4)
    projected = subspace.project(embedding)
    assert projected.shape == embedding.shape and projected.dtype == np.float32
    singular = np.linalg.svd(projected - projected.mean(axis=0), compute_uv=False)
    assert singular[4] < 1e-4 * singular[0] < singular[3]
    np.testing.assert_allclose(subspace.project(projected), projected, atol=1e-4)
    # distances within the subspace are the distances between the kept coordinates
    coords = (embedding - subspace.mean) @ subspace.basis
    np.testing.assert_allclose(
        np.linalg.norm(projected[0] - projected[1]), np.linalg.norm(coords[0] - coords[1]), rtol=1e-4
    )


@pytest.mark.cpu_paths
def test_fit_is_deterministic_and_round_trips_through_arrays():
    embedding, _ = _low_rank_plus_noise(rank=6)
    first, again = EmbeddingSubspace.fit(embedding, 6), EmbeddingSubspace.fit(embedding.copy(), 6)
    np.testing.assert_array_equal(first.basis, again.basis)
    restored = EmbeddingSubspace.from_arrays(first.to_arrays())
    np.testing.assert_array_equal(restored.project(embedding), first.project(embedding))


@pytest.mark.parametrize(
    ("n_comps", "message"),
    [
        (0, "positive int or None; found 0"),
        (1.5, "positive int or None; found 1.5"),
        (True, "positive int or None; found True"),
        (300, r"at most out_dim \(256\); found 300"),
        (200, r"at most the number of training spots \(100\); found 200"),
    ],
)
def test_bad_n_comps_is_rejected(n_comps, message):
    with pytest.raises(ValueError, match=message):
        check_n_comps(n_comps, 256, 100)


def test_none_keeps_everything():
    check_n_comps(None, 256, 10)


def test_a_fitted_subspace_projects_exactly_like_its_saved_copy():
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(300, 256)).astype(np.float32)
    subspace = EmbeddingSubspace.fit(embedding, 16)
    copy = EmbeddingSubspace.from_arrays({k: np.array(v) for k, v in subspace.to_arrays().items()})
    assert subspace.basis.flags.c_contiguous
    np.testing.assert_array_equal(subspace.project(embedding), copy.project(embedding))


def test_kept_share_is_the_variance_inside_the_subspace():
    embedding, _ = _low_rank_plus_noise(rank=4, noise=0.5)
    subspace = EmbeddingSubspace.fit(embedding, 4)
    centered = embedding - embedding.mean(axis=0)
    inside = np.square(centered @ subspace.basis).sum() / np.square(centered).sum()
    assert 0.5 < subspace.kept < 1 and subspace.kept == pytest.approx(inside, rel=1e-5)
    # projecting in chunks accumulates the same share as one call on all rows
    share = KeptShare()
    for start in range(0, len(embedding), 64):
        subspace.project(embedding[start : start + 64], share)
    assert share.share == pytest.approx(subspace.kept_share(embedding).share, rel=1e-5)
    # rows off the subspace lower it: isotropic noise around the mean keeps about n_comps / dim of its variance
    noise = subspace.mean + np.random.default_rng(1).normal(size=(2000, 32))
    assert subspace.kept_share(noise).share == pytest.approx(4 / 32, abs=0.02)
    assert KeptShare().share is None


def test_kept_share_round_trips_and_older_subspaces_have_none():
    embedding, _ = _low_rank_plus_noise(rank=4)
    subspace = EmbeddingSubspace.fit(embedding, 4)
    assert EmbeddingSubspace.from_arrays(subspace.to_arrays()).kept == subspace.kept
    older = {k: v for k, v in subspace.to_arrays().items() if k != "kept"}  # saved before the share was recorded
    restored = EmbeddingSubspace.from_arrays(older)
    assert restored.kept is None and "kept" not in restored.to_arrays()
    np.testing.assert_array_equal(restored.project(embedding), subspace.project(embedding))


def test_directions_of_blocks_match_the_rows_svd_in_bounded_memory():
    rng = np.random.default_rng(3)
    # a large common offset (it must not cancel digits away) on rows of distinct variances
    data = rng.normal(size=(500, 10)) * np.linspace(5, 0.5, 10) + 1e4
    mean, basis = principal_directions(data, 6)
    blocks = (data[start : start + 64] for start in range(0, len(data), 64))
    block_mean, block_basis = principal_directions_of_blocks(blocks, 6)
    np.testing.assert_allclose(block_mean, mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(block_basis, basis, atol=1e-8)  # same signs as well
    assert block_basis.flags.c_contiguous
    # fewer rows than directions asked: as many as the rows have
    assert principal_directions_of_blocks(iter([data[:4]]), 6)[1].shape == (10, 4)
    with pytest.raises(ValueError, match="at least one row"):
        principal_directions_of_blocks(iter([]), 6)
    with pytest.raises(ValueError, match=r"blocks of rows \(n_block, d\); found a block of shape \(10,\)"):
        principal_directions_of_blocks(iter([data[0]]), 6)
