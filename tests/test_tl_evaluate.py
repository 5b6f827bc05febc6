"""sd.tl.evaluate on small synthetic slides with planted tissue types, and sd.pl.benchmark, which plots results."""

from __future__ import annotations

import logging

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from helpers import latent_data
from threadpoolctl import threadpool_limits

import spade_sd as sd
from spade_sd.encoders.morphology import MorphologyFeatures
from spade_sd.metrics import gene_to_image_recall, knn_expression_cv, ridge_probe, summarize

PATCH = {"size_um": 64.0, "size_px": 64}
FAST = {"n_repeats": 2, "k_shots": (1, 3)}


# --- tl.evaluate ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slides():
    slides = sd.datasets.synthetic(n_slides=3, grid=(10, 10), mpp=1.0, seed=0)
    backbone = sd.Backbone(MorphologyFeatures())
    model = sd.tl.pretrain(slides, backbone=backbone, n_experts=2, n_fine=4, max_epochs=10, quiet=True, **PATCH)
    for sdata in slides:
        sd.tl.features(sdata, backbone=backbone, **PATCH)
        sd.tl.embed(sdata, model)
    return slides


@pytest.fixture(scope="module")
def result(slides):
    return sd.tl.evaluate(slides, **FAST)


def test_every_task_for_every_representation(result):
    assert {"encoder", "task", "metric", "value"} <= set(result.columns)
    tasks = result.groupby("encoder")["task"].unique().map(set).to_dict()
    assert tasks["X_backbone"] == {"probe", "probe_cv", "few_shot", "knn", "classification", "domains"}
    # only the SPADE embedding has a gene side, so only it gets gene → image retrieval
    assert tasks["X_spade"] == tasks["X_backbone"] | {"gene_to_image"}


def test_probes_hold_out_whole_slides(result, slides):
    samples = {s.tables["table"].obs["sample"].iloc[0] for s in slides}
    probe = result.query("task == 'probe' and encoder == 'X_spade'")
    assert set(probe["fold"]) == samples
    n_spots = {s.tables["table"].obs["sample"].iloc[0]: s.tables["table"].n_obs for s in slides}
    for fold, rows in probe.groupby("fold"):
        assert (rows["n_test"] == n_spots[fold]).all()
        assert (rows["n_train"] == sum(n_spots.values()) - n_spots[fold]).all()
    assert probe.groupby("fold")["gene"].nunique().eq(50).all()


def test_scores_are_in_range_and_summarise(result):
    values = result["value"].dropna()
    # a perfect partition's NMI can exceed 1 by rounding (sklearn's arithmetic mean of entropies)
    assert values.between(-1, 1 + 1e-9).all()
    summary = summarize(result)
    assert {"X_backbone", "X_spade"} == set(summary["encoder"])
    assert summary["n"].ge(1).all()


def test_signal_is_found_on_planted_structure(slides):
    # the planted tissue types drive both morphology and expression, so both representations should find them
    df = sd.tl.evaluate(slides, tasks=("knn", "classification"), labels="tissue_type", **FAST)
    knn = summarize(df.query("task == 'knn'")).set_index("encoder")["mean"]
    assert (knn > 0.2).all(), knn
    accuracy = summarize(df.query("metric == 'balanced_accuracy@3'")).set_index("encoder")["mean"]
    n_types = slides[0].tables["table"].obs["tissue_type"].nunique()
    assert (accuracy > 1.5 / n_types).all(), accuracy


def test_tables_and_spatialdata_give_the_same_result(slides):
    tables = [s.tables["table"] for s in slides]
    options = {"use_rep": "X_spade", "tasks": ("probe", "knn")}
    a = sd.tl.evaluate(slides, **options)
    b = sd.tl.evaluate(tables, **options)
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy())


def test_rows_without_values_are_left_out(slides):
    tables = [s.tables["table"].copy() for s in slides]
    tables[0].obsm["X_backbone"] = tables[0].obsm["X_backbone"].copy()
    tables[0].obsm["X_backbone"][:5] = np.nan
    df = sd.tl.evaluate(tables, use_rep="X_backbone", tasks=("probe",))
    held_out_first = df[df["fold"] == tables[0].obs["sample"].iloc[0]]
    assert (held_out_first["n_test"] == tables[0].n_obs - 5).all()
    assert np.isfinite(df["value"].dropna()).all()


def test_a_gene_side_missing_on_one_slide_is_said(slides, caplog):
    tables = [s.tables["table"].copy() for s in slides]
    del tables[1].obsm["X_spade_gene"]
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        df = sd.tl.evaluate(tables, use_rep="X_spade", tasks=("gene_to_image",))
    assert df.empty
    assert "tables [1] of 3 lack .obsm['X_spade_gene']" in caplog.text


def test_errors_say_what_to_do(slides):
    with pytest.raises(ValueError, match="Unknown tasks"):
        sd.tl.evaluate(slides, tasks=("probe", "nonsense"))
    with pytest.raises(KeyError, match="X_missing"):
        sd.tl.evaluate(slides, use_rep="X_missing")
    with pytest.raises(ValueError, match="at least 2"):
        sd.tl.evaluate(slides[0], use_rep="X_spade", tasks=("probe",))
    with pytest.raises(TypeError, match="SpatialData or AnnData"):
        sd.tl.evaluate([slides[0], "not a table"])


# --- pl.benchmark ---------------------------------------------------------------------------------------------


@pytest.fixture
def single_blas_thread():
    # These matrices are tiny: multithreaded BLAS only adds contention (10x slower on a busy 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def latent():
    return latent_data()


def test_benchmark_plot(latent, single_blas_thread):
    x_good, x_bad, y, slide = latent
    probes = pd.concat([ridge_probe(x_good, y, slide, label="good"), ridge_probe(x_bad, y, slide, label="bad")])
    recall = pd.concat(
        [
            gene_to_image_recall(x_good, x_good, ks=(1, 10), groups=slide, label="good"),
            gene_to_image_recall(x_good, x_bad, ks=(1, 10), groups=slide, label="bad"),
        ]
    )
    results = pd.concat([probes, recall])
    fig = sd.pl.benchmark(results, return_fig=True, show=False)
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == ["pearson", "recall@1", "recall@10"]
    assert [ax.get_title() for ax in sd.pl.benchmark(results, show=False)] == ["pearson", "recall@1", "recall@10"]

    _, ax = plt.subplots()
    point = sd.pl.benchmark(summarize(results), metric="recall@10", kind="point", ax=ax, return_fig=True, show=False)
    assert point is ax.figure and len(point.axes) == 1
    with pytest.raises(ValueError, match="available"):
        sd.pl.benchmark(results, metric="auroc", show=False)
    with pytest.raises(ValueError, match="one panel"):
        sd.pl.benchmark(results, ax=ax, show=False)
    plt.close("all")


def test_tasks_sharing_a_metric_stay_apart(latent, single_blas_thread):
    # the ridge probe and kNN both report "pearson": one summary row and one panel each, never their mean
    x_good, _, y, slide = latent
    probe = ridge_probe(x_good, y, slide, label="good").assign(task="probe")
    knn = knn_expression_cv(x_good, y, slide, k=5, label="good").assign(task="knn")
    summary = summarize(pd.concat([probe, knn]))
    assert list(summary["task"]) == ["probe", "knn"] and set(summary["metric"]) == {"pearson"}
    by_task = summary.set_index("task")["mean"]
    assert by_task["probe"] == pytest.approx(summarize(probe)["mean"].iloc[0])
    assert by_task["knn"] == pytest.approx(summarize(knn)["mean"].iloc[0])
    assert by_task["probe"] != pytest.approx(by_task["knn"])
    axes = sd.pl.benchmark(pd.concat([probe, knn]), show=False)
    assert [ax.get_title() for ax in axes] == ["pearson (probe)", "pearson (knn)"]
    plt.close("all")
