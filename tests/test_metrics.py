"""spade_sd.metrics: probes, retrieval, few-shot classification and summaries on plain arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import latent_data
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from spade_sd import metrics

MOB_DIR = Path("/work/shared/data/stutility_mob/inst/extdata/counts")


@pytest.fixture(autouse=True)
def _single_blas_thread():
    # These matrices are tiny: multithreaded BLAS only adds contention (10x slower on a busy 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def latent():
    return latent_data()


def _mean(df):
    return metrics.summarize(df)["mean"].iloc[0]


# --- ridge probe ----------------------------------------------------------------------------------------------


def test_ridge_probe_separates_informative_from_noise(latent):
    x_good, x_bad, y, slide = latent
    good = metrics.ridge_probe(x_good, y, slide, label="good")
    bad = metrics.ridge_probe(x_bad, y, slide, label="bad")
    assert _mean(good) > 0.5
    assert abs(_mean(bad)) < 0.1
    assert list(good.columns) == ["encoder", "fold", "gene", "metric", "value", "n_train", "n_test", "alpha"]
    assert len(good) == 4 * y.shape[1]


def test_ridge_probe_holds_out_whole_folds(latent):
    x_good, _, y, slide = latent
    df = metrics.ridge_probe(x_good, y, slide)
    per_fold = df.groupby("fold")[["n_train", "n_test"]].first()
    counts = pd.Series(slide).value_counts()
    assert set(per_fold.index) == set(counts.index)
    for fold, row in per_fold.iterrows():
        assert row["n_test"] == counts[fold]
        assert row["n_train"] == len(slide) - counts[fold]


def test_ridge_probe_slide_folds_do_not_leak():
    # Each slide has its own random X → Y map: only a probe that has seen the test slide can predict it.
    rng = np.random.default_rng(1)
    n_per_slide, n_slides = 100, 4
    x = rng.normal(size=(n_slides * n_per_slide, 10))
    slide = np.repeat(np.arange(n_slides), n_per_slide)
    y = np.concatenate([x[slide == s] @ rng.normal(size=(10, 8)) for s in range(n_slides)])
    y += 0.3 * rng.normal(size=y.shape)
    by_slide = _mean(metrics.ridge_probe(x, y, slide))
    by_spot = _mean(metrics.ridge_probe(x, y, rng.integers(0, n_slides, size=len(slide))))
    assert abs(by_slide) < 0.1
    assert by_spot > 0.3


def test_ridge_probe_hest_alpha_matches_hand_fit(latent):
    x_good, _, y, slide = latent
    df = metrics.ridge_probe(x_good, y, slide, seed=3)
    test = slide == "s1"
    scaler = StandardScaler().fit(x_good[~test])
    pca = PCA(n_components=64, random_state=3).fit(scaler.transform(x_good[~test]))
    alpha = 100 / (64 * y.shape[1])
    ridge = Ridge(alpha=alpha, fit_intercept=False, solver="lsqr", max_iter=1000)
    ridge.fit(pca.transform(scaler.transform(x_good[~test])), y[~test])
    prediction = ridge.predict(pca.transform(scaler.transform(x_good[test])))
    expected = [pearsonr(y[test, g], prediction[:, g])[0] for g in range(y.shape[1])]
    fold = df[df["fold"] == "s1"]
    np.testing.assert_allclose(fold["value"], expected, rtol=1e-6)
    assert np.allclose(df["alpha"], alpha)
    assert metrics.hest_alpha(256, 50) == pytest.approx(100 / (256 * 50))


def test_ridge_probe_cv_alpha_beats_badly_scaled_hest():
    # Barely more spots than dimensions and noisy targets: HEST's tiny penalty overfits, a tuned one does not.
    rng = np.random.default_rng(0)
    n, d = 180, 150
    z = rng.normal(size=(n, 2))
    x = 0.3 * z @ rng.normal(size=(2, d)) + rng.normal(size=(n, d))
    y = z @ rng.normal(size=(2, 10)) + rng.normal(size=(n, 10))
    slide = np.repeat(np.arange(3), 60)
    hest = _mean(metrics.ridge_probe(x, y, slide))
    tuned = metrics.ridge_probe(x, y, slide, alpha="cv")
    assert _mean(tuned) > hest + 0.1
    assert (tuned["alpha"] > metrics.hest_alpha(120, 10)).all()


def test_ridge_probe_marks_constant_genes_undefined(latent):
    x_good, _, y, slide = latent
    y = y.copy()
    y[slide == "s0", 0] = 1.0
    df = metrics.ridge_probe(x_good, y, slide)
    undefined = df[df["value"].isna()]
    assert list(zip(undefined["fold"], undefined["gene"], strict=True)) == [("s0", 0)]
    summary = metrics.summarize(df)
    assert summary["n_undefined"].iloc[0] == 1
    assert np.isfinite(summary["mean"].iloc[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"Y": np.ones((10, 3))}, "same number of spots"),
        ({"folds": np.zeros(600)}, "at least 2 folds"),
        ({"alpha": "auto"}, "alpha"),
        ({"folds": np.zeros(5)}, r"one entry per spot, shape \(600,\)"),
    ],
)
def test_ridge_probe_rejects_bad_input(latent, kwargs, message):
    x_good, _, y, slide = latent
    arguments = {"X": x_good, "Y": y, "folds": slide, **kwargs}
    with pytest.raises(ValueError, match=message):
        metrics.ridge_probe(arguments.pop("X"), arguments.pop("Y"), arguments.pop("folds"), **arguments)


def test_ridge_probe_rejects_nan(latent):
    x_good, _, y, slide = latent
    x = x_good.copy()
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="found 1 NaN"):
        metrics.ridge_probe(x, y, slide)


# --- few-shot probe -------------------------------------------------------------------------------------------


def test_few_shot_probe(latent):
    x_good, x_bad, y, slide = latent
    good = metrics.few_shot_probe(x_good, y, slide, test_slide="s2", n_repeats=3, n_components=16, label="good")
    bad = metrics.few_shot_probe(x_bad, y, slide, test_slide="s2", n_repeats=3, n_components=16, label="bad")
    assert _mean(good) > 0.5
    assert abs(_mean(bad)) < 0.1
    assert set(good["fold"]) == {"s2"}
    assert set(good["repeat"]) == {0, 1, 2}
    assert (good["n_train"] == 30).all() and (good["n_test"] == 120).all()
    again = metrics.few_shot_probe(x_good, y, slide, test_slide="s2", n_repeats=3, n_components=16, label="good")
    pd.testing.assert_frame_equal(good, again)
    by_count = metrics.few_shot_probe(x_good, y, slide, n_train=10, n_repeats=1, n_components=16)
    assert set(by_count["fold"]) == set(slide) and (by_count["n_train"] == 10).all()


def test_few_shot_probe_rejects_bad_input(latent):
    x_good, _, y, slide = latent
    with pytest.raises(ValueError, match="either `fraction` or `n_train`"):
        metrics.few_shot_probe(x_good, y, slide, fraction=0.1, n_train=5)
    with pytest.raises(ValueError, match="not among the slides"):
        metrics.few_shot_probe(x_good, y, slide, test_slide="nope")
    with pytest.raises(ValueError, match="at least 2 training and 2 test"):
        metrics.few_shot_probe(x_good, y, slide, n_train=149)


# --- retrieval ------------------------------------------------------------------------------------------------


def test_knn_expression_perfect_and_random():
    rng = np.random.default_rng(0)
    x_ref, y_ref = rng.normal(size=(300, 16)), rng.normal(size=(300, 12))
    rows = rng.choice(300, size=100, replace=False)
    exact = metrics.knn_expression(x_ref[rows], x_ref, y_ref, y_ref[rows], k=1)
    np.testing.assert_allclose(exact["value"], 1.0)
    random = metrics.knn_expression(rng.normal(size=(200, 16)), x_ref, y_ref, rng.normal(size=(200, 12)), k=10)
    assert abs(random["value"].mean()) < 0.05
    assert list(exact.columns) == ["encoder", "gene", "metric", "value", "k", "n_ref", "n_query"]


def test_knn_expression_cv(latent):
    x_good, x_bad, y, slide = latent
    good = metrics.knn_expression_cv(x_good, y, slide, k=20, label="good")
    bad = metrics.knn_expression_cv(x_bad, y, slide, k=20, label="bad")
    assert _mean(good) > 0.5
    assert abs(_mean(bad)) < 0.1
    assert (good.groupby("fold")["n_query"].first() == 150).all()
    with pytest.raises(ValueError, match="exceeds the 450 reference spots"):
        metrics.knn_expression_cv(x_good, y, slide, k=451)


def test_gene_to_image_recall():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(400, 32))
    groups = np.repeat(["a", "b"], 200)
    same = metrics.gene_to_image_recall(emb, emb, ks=(1, 5), groups=groups)
    assert (same.loc[same["metric"] == "recall@1", "value"] == 1.0).all()
    assert set(same["group"]) == {"a", "b"}
    chance = same.loc[same["metric"] == "chance@5", "value"]
    np.testing.assert_allclose(chance, 5 / 200)

    random = metrics.gene_to_image_recall(rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32)), ks=(1, 50, 200))
    by_metric = random.set_index("metric")["value"]
    for k in (50, 200):
        assert by_metric[f"recall@{k}"] == pytest.approx(by_metric[f"chance@{k}"], abs=0.03)
    assert by_metric["recall@1"] < 0.005


# --- few-shot classification ----------------------------------------------------------------------------------


def _classes(separation, n_per_class=60, n_classes=3, d=20, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"c{i}" for i in range(n_classes)], n_per_class)
    centres = separation * rng.normal(size=(n_classes, d))
    x = centres[np.searchsorted(np.unique(labels), labels)] + rng.normal(size=(labels.size, d))
    return x, labels


def test_few_shot_classification_separable_and_random():
    x, labels = _classes(separation=3.0)
    df = metrics.few_shot_classification(x, labels, k=(1, 5, 10), n_repeats=5)
    assert (df["value"] > 0.9).all()
    assert list(df["metric"].unique()) == ["balanced_accuracy@1", "balanced_accuracy@5", "balanced_accuracy@10"]
    x_noise, labels = _classes(separation=0.0)
    noise = metrics.few_shot_classification(x_noise, labels, k=(1, 5, 10), n_repeats=10)
    assert noise["value"].mean() == pytest.approx(1 / 3, abs=0.07)


def test_few_shot_classification_skips_small_classes():
    x, labels = _classes(separation=3.0)
    labels = labels.copy()
    # c0 keeps 8 spots: enough for k=5, too few for k=10.
    labels[:52] = np.concatenate([np.full(47, "c1"), np.full(5, "c2")])
    df = metrics.few_shot_classification(x, labels, k=(5, 10), n_repeats=2)
    at_5 = df[df["k"] == 5]
    assert (at_5["n_classes"] == 3).all() and (at_5["note"] == "").all()
    at_10 = df[df["k"] == 10]
    assert (at_10["n_classes"] == 2).all()
    assert at_10["note"].str.contains("c0").all()
    assert (at_10["n_train"] == 20).all()


def test_expression_domains_recovers_clusters():
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(3), 100)
    y = 3 * rng.normal(size=(3, 30))[truth] + rng.normal(size=(300, 30))
    domains = metrics.expression_domains(y, seed=0)
    assert adjusted_rand_score(truth, domains) > 0.8
    np.testing.assert_array_equal(domains, metrics.expression_domains(y, seed=0))


# --- summary --------------------------------------------------------------------------------------------------


def test_summarize_averages_genes_then_folds():
    df = pd.DataFrame(
        {
            "encoder": "a",
            "fold": [0, 0, 1, 1],
            "gene": ["g1", "g2", "g1", "g2"],
            "metric": "pearson",
            "value": [0.2, 0.4, 0.6, np.nan],
        }
    )
    summary = metrics.summarize(df)
    row = summary.iloc[0]
    assert row["mean"] == pytest.approx((0.3 + 0.6) / 2)
    assert row["std"] == pytest.approx(0.15)
    assert (row["n"], row["n_undefined"]) == (2, 1)
    with pytest.raises(ValueError, match="missing"):
        metrics.summarize(df.drop(columns="value"))


# --- real data ------------------------------------------------------------------------------------------------


def _mouse_olfactory_bulb(n_genes=20):
    counts = pd.read_csv(MOB_DIR / "MOB1.tsv", sep="\t", index_col=0)
    spots = pd.read_csv(MOB_DIR / "alignment_table_MOB1.tsv", sep="\t").query("selected == 1")
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    shared = spots.index.intersection(counts.index)
    raw = counts.loc[shared].to_numpy(dtype=float)
    expression = np.log1p(raw / raw.sum(axis=1, keepdims=True) * 1e4)
    expression = expression[:, np.argsort(expression.var(axis=0))[::-1][:n_genes]]
    return spots.loc[shared, ["pixel_x", "pixel_y"]].to_numpy(dtype=float), expression


@pytest.mark.slow
def test_position_predicts_expression_in_the_layered_olfactory_bulb():
    position, y = _mouse_olfactory_bulb()
    assert len(y) > 300
    rng = np.random.default_rng(0)
    standardised = (position - position.mean(axis=0)) / position.std(axis=0)
    # Random Fourier features: a smooth function of position, with no spot identity one-hot encoded.
    frequencies, phases = rng.normal(size=(2, 64)) / 0.3, rng.uniform(0, 2 * np.pi, size=64)
    fourier = np.cos(standardised @ frequencies + phases)
    noise = rng.normal(size=fourier.shape)
    slide = np.full(len(y), "MOB1")
    smooth = _mean(metrics.few_shot_probe(fourier, y, slide, n_repeats=3, label="position"))
    random = _mean(metrics.few_shot_probe(noise, y, slide, n_repeats=3, label="noise"))
    assert smooth > 0.2
    assert abs(random) < 0.1
