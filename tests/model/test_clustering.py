from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from safetensors.numpy import load, save
from sklearn.metrics import adjusted_rand_score

from spade_sd.model.clustering import ExpertClustering, two_stage_kmeans
from spade_sd.model.standardization import FeatureScaler, fit_slide_scaler

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(n=100, n_types=4, n_slides=3, d=64, seed=0):
    """Separated Gaussian "tissue types" with a within-type continuous factor, spread over slides."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (n_types, d))
    loadings = rng.normal(0, 1, (n_types, d, 4))
    X, types, slides = [], [], []
    for s in range(n_slides):
        shift = rng.normal(0, 0.3, d)
        for t in range(n_types):
            z = rng.normal(size=(n, 4))
            X.append(centers[t] + z @ loadings[t].T + rng.normal(0, 1, (n, d)) + shift)
            types += [t] * n
            slides += [f"slide{s}"] * n
    return np.vstack(X).astype(np.float32), np.array(types), np.array(slides)


@pytest.fixture(scope="module")
def data():
    X, types, slides = planted()
    return FeatureScaler().fit(X).transform(X), types, slides


@pytest.fixture(scope="module")
def clustering(data):
    X, _, slides = data
    return two_stage_kmeans(X, slides, n_fine=16, n_experts=4, seed=0)


def test_recovers_planted_types(data, clustering):
    X, types, _ = data
    _, expert = clustering.assign(X)
    ari = adjusted_rand_score(types, expert)
    assert ari > 0.8, ari
    assert clustering.n_fine == 3 * 16
    assert clustering.n_experts == 4
    assert set(clustering.centroid_group) == {"slide0", "slide1", "slide2"}


def test_spot_goes_to_expert_of_nearest_centroid_over_all_groups(data, clustering):
    X, _, _ = data
    brute = np.linalg.norm(clustering.project(X)[:, None, :].astype(np.float64) - clustering.centroids[None], axis=-1)
    fine, expert = clustering.assign(X)
    np.testing.assert_array_equal(fine, brute.argmin(1))
    np.testing.assert_array_equal(expert, clustering.centroid_expert[brute.argmin(1)])
    np.testing.assert_allclose(clustering.distances(X), brute, rtol=1e-5, atol=1e-4)


@pytest.mark.cpu_paths
def test_same_seed_same_clustering(data, clustering):
    X, _, slides = data
    again = two_stage_kmeans(X, slides, n_fine=16, n_experts=4, seed=0)
    np.testing.assert_array_equal(again.centroids, clustering.centroids)
    np.testing.assert_array_equal(again.centroid_expert, clustering.centroid_expert)


def test_small_group_uses_all_its_spots_and_tiny_group_errors():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(23, 5)).astype(np.float32)
    groups = np.array(["big"] * 20 + ["small"] * 3)
    clustering = two_stage_kmeans(X, groups, n_fine=8, n_experts=2, seed=0)
    assert (clustering.centroid_group == "small").sum() == 3
    assert (clustering.centroid_group == "big").sum() == 8

    with pytest.raises(ValueError, match=r"Group 'lonely' has 1 spot"):
        two_stage_kmeans(X[:21], np.array(["big"] * 20 + ["lonely"]), n_fine=8, n_experts=2)


def test_too_many_experts_names_the_numbers():
    X = np.random.default_rng(2).normal(size=(30, 4)).astype(np.float32)
    groups = np.repeat(["a", "b"], 15)
    with pytest.raises(ValueError, match=r"n_experts=9 .* found 6 .*6 centroids over 2 groups"):
        two_stage_kmeans(X, groups, n_fine=3, n_experts=9)


def test_elbow_finds_planted_number_of_clusters():
    rng = np.random.default_rng(3)
    centers = rng.normal(0, 10, (4, 8))
    X = np.vstack([c + rng.normal(size=(30, 8)) for _ in range(3) for c in centers]).astype(np.float32)
    groups = np.repeat(["a", "b", "c"], 120)
    clustering = two_stage_kmeans(X, groups, n_fine="elbow", n_experts="elbow", max_k=10, seed=0)
    assert clustering.n_fine == 3 * 4
    assert clustering.n_experts == 4


def test_small_expert_is_merged_into_nearest_and_renumbered(caplog):
    clustering = ExpertClustering(
        centroids=np.array([[0.0, 0.0], [100.0, 0.0], [10.0, 0.0], [11.0, 0.0]]),
        centroid_expert=np.array([0, 1, 2, 2]),
        centroid_group=np.array(["a", "a", "b", "b"]),
        n_experts=3,
    )
    X = np.array([[0.1, 0.0], [9.9, 0.0], [11.2, 0.0]], dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        kept = clustering.without_small_experts(X)
    assert "Merging expert 1 (0 spots, fewer than 1) into expert 2" in caplog.text
    assert kept.n_experts == 2
    np.testing.assert_array_equal(kept.centroid_expert, [0, 1, 1, 1])  # the empty expert's centroid joined expert 2
    np.testing.assert_array_equal(kept.assign(X)[1], [0, 1, 1])
    assert clustering.without_small_experts(np.array([[100.0, 0.0]] + X.tolist())) is clustering
    merged = clustering.without_small_experts(np.array([[100.0, 0.0]] + X.tolist()), min_spots=2)
    assert merged.n_experts == 1  # experts 0 and 1 hold one spot each: both are merged away


def test_expert_without_centroid_is_rejected():
    with pytest.raises(ValueError, match="must own at least one fine centroid"):
        ExpertClustering(np.zeros((2, 3)), np.array([0, 2]), np.array(["a", "a"]), n_experts=3)


@pytest.mark.parametrize("labels", [np.array(["s1", "s2"]), np.array([3, 7])])
def test_arrays_roundtrip_through_safetensors_and_json(labels):
    X = np.random.default_rng(4).normal(size=(40, 6)).astype(np.float32)
    clustering = two_stage_kmeans(X, np.repeat(labels, 20), n_fine=4, n_experts=3, seed=0)
    arrays, metadata = clustering.to_arrays()
    restored = ExpertClustering.from_arrays(load(save(arrays)), json.loads(json.dumps(metadata)))
    np.testing.assert_array_equal(restored.centroids, clustering.centroids)
    np.testing.assert_array_equal(restored.centroid_expert, clustering.centroid_expert)
    np.testing.assert_array_equal(restored.centroid_group, clustering.centroid_group)
    assert restored.n_experts == clustering.n_experts
    np.testing.assert_array_equal(restored.assign(X)[1], clustering.assign(X)[1])


def test_scaler_standardises_and_roundtrips():
    rng = np.random.default_rng(5)
    X = rng.normal(3.0, 5.0, size=(200, 4)).astype(np.float32)
    X[:, 2] = 7.0  # a constant feature must not divide by zero
    scaler = FeatureScaler().fit(X)
    Z = scaler.transform(X)
    assert Z.dtype == np.float32
    np.testing.assert_allclose(Z[:, [0, 1, 3]].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(Z[:, [0, 1, 3]].std(0), 1, atol=1e-4)
    np.testing.assert_array_equal(Z[:, 2], 0)
    restored = FeatureScaler.from_dict(load(save(scaler.to_dict())))
    np.testing.assert_array_equal(restored.transform(X), Z)
    with pytest.raises(ValueError, match="X has 3 features, but the scaler was fitted on 4"):
        scaler.transform(X[:, :3])
    with pytest.raises(RuntimeError, match="not fitted"):
        FeatureScaler().transform(X)


def test_scaler_fitted_in_chunks_equals_fitted_at_once():
    X = np.random.default_rng(0).normal(5, 3, size=(100, 7)).astype(np.float32)
    X[:, 2] = 1.0  # constant: only centred
    whole, chunked = FeatureScaler().fit(X), FeatureScaler().fit_chunks([X[:33], X[33:90], X[90:]])
    np.testing.assert_allclose(chunked.mean, whole.mean, rtol=1e-6)
    np.testing.assert_allclose(chunked.std, whole.std, rtol=1e-5)
    assert chunked.std[2] == 1.0
    with pytest.raises(ValueError, match="found 0 patches"):
        FeatureScaler().fit_chunks([])
    with pytest.raises(ValueError, match="at least 30 patches of the slide; found 29"):
        fit_slide_scaler([X[:20], X[20:29]])
    np.testing.assert_allclose(fit_slide_scaler([X[:40]]).transform(X[:40]).mean(axis=0), 0, atol=1e-5)
