from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from spade_sd.model.clustering import ExpertClustering, two_stage_kmeans
from spade_sd.model.routing import default_tau, expert_weights
from spade_sd.model.standardization import FeatureScaler


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 4, (4, 32))
    X = np.vstack([c + rng.normal(0, 1.5, (150, 32)) for c in centers])
    slides = np.tile(np.repeat(["s0", "s1", "s2"], 50), 4)
    X = FeatureScaler().fit(X).transform(X)
    # one OpenMP thread: several oversubscribe a shared 2-core runner and slow k-means ~10x
    with threadpool_limits(1):
        clustering = two_stage_kmeans(X, slides, n_fine=8, n_experts=4, seed=0)
    return X, clustering


def test_soft_weights_are_distributions_over_experts(fitted):
    X, clustering = fitted
    w = expert_weights(X, clustering, tau=default_tau(X, clustering))
    assert w.shape == (len(X), 4)
    assert w.dtype == np.float32
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(1), 1, atol=1e-5)


def test_hard_weights_are_the_nearest_centroids_expert(fitted):
    X, clustering = fitted
    w = expert_weights(X, clustering, hard=True)
    np.testing.assert_array_equal(w.sum(1), 1)
    np.testing.assert_array_equal(w.max(1), 1)
    np.testing.assert_array_equal(w.argmax(1), clustering.assign(X)[1])


def test_soft_and_hard_routing_agree_on_confident_spots(fitted):
    X, clustering = fitted
    soft = expert_weights(X, clustering, tau=default_tau(X, clustering))
    hard = expert_weights(X, clustering, hard=True)
    confident = soft.max(axis=1) > 0.9
    # the default temperature routes most training spots almost hard, but not all of them
    assert 0.5 < confident.mean() < 1.0, confident.mean()
    np.testing.assert_array_equal(soft[confident].argmax(1), hard[confident].argmax(1))


def test_temperature_interpolates_between_hard_and_centroid_share(fitted):
    X, clustering = fitted
    near_zero = expert_weights(X, clustering, tau=1e-6)
    np.testing.assert_allclose(near_zero, expert_weights(X, clustering, hard=True), atol=1e-6)
    # a huge temperature weighs all centroids alike, so an expert gets its share of the fine centroids
    share = np.bincount(clustering.centroid_expert, minlength=clustering.n_experts) / clustering.n_fine
    np.testing.assert_allclose(expert_weights(X, clustering, tau=1e9), np.tile(share, (len(X), 1)), atol=1e-6)


def test_default_tau_is_scaled_median_margin_to_other_experts(fitted):
    X, clustering = fitted
    d = clustering.distances(X)
    own = clustering.centroid_expert[d.argmin(1)]
    other = np.where(clustering.centroid_expert[None, :] == own[:, None], np.inf, d).min(1)
    expected = 0.25 * np.median(other - d.min(1))
    assert default_tau(X, clustering) == pytest.approx(expected, rel=1e-9)
    assert default_tau(X, clustering, scale=1.0) == pytest.approx(4 * expected, rel=1e-9)
    # upstream's tau = 0.1 on raw distances is far sharper than the data-relative default
    assert default_tau(X, clustering) > 0.1


def test_soft_routing_needs_a_positive_tau(fitted):
    X, clustering = fitted
    with pytest.raises(ValueError, match="positive `tau`"):
        expert_weights(X, clustering)
    with pytest.raises(ValueError, match="positive `tau`"):
        expert_weights(X, clustering, tau=0.0)
    with pytest.raises(ValueError, match="`scale` must be positive"):
        default_tau(X, clustering, scale=0)


def test_single_expert_and_empty_input():
    clustering = ExpertClustering(np.eye(3), np.zeros(3, dtype=int), np.array(["a"] * 3), n_experts=1)
    X = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    assert default_tau(X, clustering) == 1.0
    np.testing.assert_array_equal(expert_weights(X, clustering, tau=1.0), np.ones((5, 1)))
    assert expert_weights(X[:0], clustering, tau=1.0).shape == (0, 1)


def test_routing_and_clustering_do_not_import_torch():
    code = "import sys, spade_sd.model.routing, spade_sd.model.clustering; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
