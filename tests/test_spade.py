"""SPADE end to end: pretrain, embed, routing, save/load, errors; synthetic planted structure and real data."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scanpy as sc
from sklearn.metrics import adjusted_rand_score

import spade_sd as sd
from spade_sd.encoders.morphology import MorphologyFeatures
from spade_sd.metrics import gene_to_image_recall
from spade_sd.model.routing import expert_weights

PATCH = {"size_um": 64.0, "size_px": 64}
# the design before spade_sd 0.2 (still an option): every embedding projected onto 16 directions, heads from random
# the design before 0.2, whose X_spade was the heads' output projected onto 16 directions
PROJECTED = {"n_comps": 16, "expression_comps": None, "head_init": "random", "representation": "heads"}
TRAIN = {"n_experts": 4, "n_fine": 8, "max_epochs": 40, "quiet": True, **PATCH}


@pytest.fixture(scope="module")
def morphology():
    return sd.Backbone(MorphologyFeatures())


def _slides():
    return sd.datasets.synthetic(n_slides=3, grid=(12, 12), mpp=1.0, n_genes=150, genes_dropped_per_slide=5, seed=0)


@pytest.fixture(scope="module")
def trained(morphology):
    slides = _slides()
    model = sd.tl.pretrain(slides, backbone=morphology, seed=0, **PROJECTED, **TRAIN)
    for sdata in slides:
        sd.tl.embed(sdata, model)
    return model, slides


def test_outputs_are_written(trained):
    model, slides = trained
    table = slides[0].tables["table"]
    assert table.obsm["X_spade"].shape == (table.n_obs, 256) and np.isfinite(table.obsm["X_spade"]).all()
    weights = table.obsm["X_spade_weights"]
    assert weights.shape == (table.n_obs, model.n_experts)
    np.testing.assert_allclose(weights.sum(axis=1), 1, rtol=1e-5)
    assert table.obsm["X_spade_gene"].shape == (table.n_obs, 256)
    assert table.obs["spade_expert"].dtype == "category"
    np.testing.assert_array_equal(table.obs["spade_expert"].astype(int), weights.argmax(axis=1))
    uns = table.uns["spade"]
    assert uns["model"]["identity"] == model.identity() and uns["params"]["size_um"] == 64.0
    assert "torch" in uns["versions"] and uns["params"]["tau"] == pytest.approx(model.tau)


def test_panel_spans_slides_with_different_gene_sets(trained):
    model, slides = trained
    gene_sets = [set(s.tables["table"].var_names) for s in slides]
    assert len(set.union(*gene_sets)) > len(set.intersection(*gene_sets))  # the slides do differ
    assert set(model.panel.genes) <= set.intersection(*gene_sets)


def test_experts_recover_planted_tissue_types(trained):
    _, slides = trained
    types = np.concatenate([s.tables["table"].obs["tissue_type"].astype(str) for s in slides])
    experts = np.concatenate([s.tables["table"].obs["spade_expert"].astype(str) for s in slides])
    assert adjusted_rand_score(types, experts) > 0.5


def test_image_to_gene_retrieval_beats_chance(trained):
    _, slides = trained
    for sdata in slides:
        table = sdata.tables["table"]
        recall = gene_to_image_recall(table.obsm["X_spade_gene"], table.obsm["X_spade"], ks=(10,))
        observed = recall.query("metric == 'recall@10'")["value"].mean()
        chance = recall.query("metric == 'chance@10'")["value"].mean()
        assert observed > 3 * chance, (observed, chance)


def test_soft_and_hard_routing_agree_on_confident_spots(trained, morphology):
    model, slides = trained
    features = sd.pp.spot_patches(slides[1], **PATCH)
    X = morphology(features.read(np.arange(len(features))))
    standardized = model.standardize(X)
    soft = expert_weights(standardized, model.clustering, tau=model.tau)
    hard = expert_weights(standardized, model.clustering, hard=True)
    confident = soft.max(axis=1) > 0.9
    assert confident.mean() > 0.5
    np.testing.assert_array_equal(soft[confident].argmax(axis=1), hard[confident].argmax(axis=1))
    assert set(np.unique(hard)) <= {0.0, 1.0}


@pytest.mark.cpu_paths
def test_same_seed_same_model_other_seed_differs(trained, morphology):
    model, slides = trained
    again = sd.tl.pretrain(_slides(), backbone=morphology, seed=0, **PROJECTED, **TRAIN)
    other = sd.tl.pretrain(_slides(), backbone=morphology, seed=1, **PROJECTED, **TRAIN)
    X = np.random.default_rng(0).normal(size=(40, morphology.dim)).astype(np.float32) + model.scaler.mean
    np.testing.assert_array_equal(model.embed_features(X)[0], again.embed_features(X)[0])
    assert again.identity() == model.identity() and other.identity() != model.identity()


@pytest.mark.cpu_paths
def test_save_and_load_give_identical_embeddings(trained, morphology, tmp_path):
    model, slides = trained
    model.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="pass it as backbone="):
        sd.SpadeModel.load(tmp_path / "model")
    loaded = sd.SpadeModel.load(tmp_path / "model", backbone=morphology)
    assert loaded.identity() == model.identity()
    copy = _slides()[0]
    sd.tl.embed(copy, loaded)
    np.testing.assert_array_equal(copy.tables["table"].obsm["X_spade"], slides[0].tables["table"].obsm["X_spade"])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "model")


def test_damaged_or_foreign_model_files(trained, morphology, tmp_path):
    model, _ = trained
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["format"] = "spade_sd.model/99"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model/99.*reads 'spade_sd.model/6'"):
        sd.SpadeModel.load(tmp_path / "m", backbone=morphology)
    model.save(tmp_path / "d")
    weights = tmp_path / "d" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="damaged"):
        sd.SpadeModel.load(tmp_path / "d", backbone=morphology)
    model.save(tmp_path / "e")
    other = sd.Backbone(MorphologyFeatures(nuclear_threshold=0.1))
    with pytest.raises(ValueError, match="not the one the model was trained on"):
        sd.SpadeModel.load(tmp_path / "e", backbone=other)


def test_panel_or_backbone_that_does_not_fit(trained):
    model, _ = trained
    sdata = _slides()[0]
    sd.tl.embed(sdata, model)  # an earlier run, with the gene side
    table = sdata.tables["table"]
    missing = model.panel.genes[0]
    sdata.tables["table"] = table[:, [g for g in table.var_names if g != missing]].copy()
    with pytest.raises(ValueError, match=rf"lacks 1 of the model's .*{missing}"):
        sd.tl.embed(sdata, model, genes=True)
    assert "X_spade_gene" in sdata.tables["table"].obsm
    sd.tl.embed(sdata, model)  # genes=None: image side only
    assert "X_spade" in sdata.tables["table"].obsm and "X_spade_gene" not in sdata.tables["table"].obsm
    with pytest.raises(ValueError, match="trained on .*-d features"):
        model.embed_features(np.zeros((3, 7), dtype=np.float32))


def test_failed_embed_leaves_previous_results(trained):
    model, slides = trained
    sdata = _slides()[0]
    sd.tl.embed(sdata, model)
    before = sdata.tables["table"].obsm["X_spade"].copy()
    with pytest.raises(ValueError):
        sd.tl.embed(sdata, model, mpp=-1.0)
    np.testing.assert_array_equal(sdata.tables["table"].obsm["X_spade"], before)


def test_embed_without_model_uses_attached_or_trains(trained, morphology, caplog):
    model, slides = trained
    sd.tl.embed(slides[2])  # pretrain attached the model to every slide it saw
    assert slides[2].tables["table"].uns["spade"]["model"]["identity"] == model.identity()
    lone = sd.datasets.synthetic(grid=(10, 10), mpp=1.0, n_genes=100, seed=3)
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        sd.tl.pretrain(lone, backbone=morphology, n_experts=2, n_fine=4, max_epochs=3, quiet=True, **PATCH)
        fresh = sd.datasets.synthetic(grid=(10, 10), mpp=1.0, n_genes=100, seed=4)
    assert "X_spade" not in fresh.tables["table"].obsm
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        sd.tl.embed(fresh)
    assert "training one on it" in caplog.text and "X_spade" in fresh.tables["table"].obsm


def test_scanpy_downstream(trained):
    _, slides = trained
    table = slides[0].tables["table"]
    sc.pp.neighbors(table, use_rep="X_spade")
    sc.tl.leiden(table, flavor="igraph", n_iterations=2)
    sc.tl.umap(table)
    assert table.obs["leiden"].nunique() > 1 and table.obsm["X_umap"].shape == (table.n_obs, 2)


@pytest.mark.parametrize(("loader", "sections"), [("mouse_olfactory_bulb", ["MOB1", "MOB2"]), ("her2st", ["C2", "C3"])])
def test_real_data_end_to_end(loader, sections, data_dir):
    slides = [getattr(sd.datasets, loader)(s) for s in sections]
    model = sd.tl.pretrain(slides, n_experts=2, max_epochs=15, quiet=True)
    assert model.backbone.name == "efficientnet_lite0" and model.n_experts == 2
    for sdata in slides:
        sd.tl.embed(sdata, model)
        table = sdata.tables["table"]
        assert np.isfinite(table.obsm["X_spade"]).all() and np.isfinite(table.obsm["X_spade_gene"]).all()
        assert table.obs["spade_expert"].nunique() == 2
        # X_spade keeps every direction; the tools' projection, the 16 leading ones of the training spots
        centered = table.obsm["X_spade_expr"] - model.expression_subspace.mean
        singular = np.linalg.svd(centered, compute_uv=False)
        assert singular[16] < 1e-4 * singular[0]
        assert np.linalg.matrix_rank(table.obsm["X_spade"] - table.obsm["X_spade"].mean(0), tol=1e-3) > 16
        # X_spade is the backbone's features next to the read-out; the heads' image side is in X_spade_expr
        recall = gene_to_image_recall(table.obsm["X_spade_gene"], table.obsm["X_spade_expr"], ks=(10,))
        assert (
            recall.query("metric == 'recall@10'")["value"].mean()
            > recall.query("metric == 'chance@10'")["value"].mean()
        )


def test_slides_unlike_the_training_data_are_flagged(data_dir, caplog):
    # trained on the mouse olfactory bulb, the subspace keeps far less of a human breast section's embedding
    training = [sd.datasets.mouse_olfactory_bulb(s) for s in ("MOB1", "MOB2")]
    model = sd.tl.pretrain(training, n_experts=2, max_epochs=15, quiet=True, seed=0)
    held_out, other = sd.datasets.mouse_olfactory_bulb("MOB3"), sd.datasets.her2st("C2")
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        sd.tl.embed(held_out, model)
    assert "unlike the training slides" not in caplog.text
    same = held_out.tables["table"].uns["spade"]["subspace"]
    assert same["kept_variance"] > 0.85 * same["training_kept_variance"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        sd.tl.embed(other, model)
    # the default embedding keeps every direction: the warning is about the expression tools
    assert "unlike the training slides" in caplog.text and "expression tools" in caplog.text
    # and it says what the default X_spade holds
    assert "every direction of the backbone's features" in caplog.text and "weigh 1.5 times" in caplog.text
    unlike = other.tables["table"].uns["spade"]["subspace"]
    assert unlike["projects"] == "expression tools" == same["projects"]
    assert unlike["kept_variance"] < 0.85 * unlike["training_kept_variance"] < same["kept_variance"]


def test_embeddings_lie_in_the_training_spots_principal_subspace(trained, morphology):
    model, slides = trained
    assert model.subspace is not None and model.subspace.n_comps == model.config.training.n_comps == 16
    for key in ("X_spade", "X_spade_gene"):  # the gene side is kept in the same subspace
        embedding = np.concatenate([s.tables["table"].obsm[key] for s in slides])
        singular = np.linalg.svd(embedding - model.subspace.mean, compute_uv=False)
        assert singular[16] < 1e-4 * singular[0] and singular[15] > 1e-2 * singular[0], key
    # without the subspace the same seed trains the same heads, whose outputs span many more directions
    full = sd.tl.pretrain(_slides(), backbone=morphology, seed=0, **{**PROJECTED, "n_comps": None}, **TRAIN)
    assert full.subspace is None and full.config.training.n_comps is None
    X = morphology(sd.pp.spot_patches(slides[0], **PATCH).read(np.arange(slides[0].tables["table"].n_obs)))
    heads = full.embed_features(X)[0]
    assert np.linalg.matrix_rank(heads - heads.mean(axis=0), tol=1e-3) > 16
    np.testing.assert_allclose(model.subspace.project(heads), model.embed_features(X)[0], atol=1e-5)
    # the subspace is fitted after training: dropping it gives the n_comps=None model's embeddings, bit for bit
    unprojected = model.full_rank()
    assert unprojected.subspace is None and unprojected.expression_subspace is model.subspace
    assert unprojected.identity() != model.identity()
    np.testing.assert_array_equal(unprojected.embed_features(X)[0], heads)


def test_heads_started_at_the_backbone_train_save_and_reload(trained, morphology, tmp_path):
    model, slides = trained
    started = sd.tl.pretrain(
        _slides(), backbone=morphology, seed=0, **{**PROJECTED, "head_init": "backbone"}, **{**TRAIN, "max_epochs": 3}
    )
    assert started.config.training.head_init == "backbone" and model.config.training.head_init == "random"
    assert started.identity() != model.identity()
    started.save(tmp_path / "started")
    again = sd.SpadeModel.load(tmp_path / "started", backbone=morphology)
    assert again.config.training.head_init == "backbone" and again.identity() == started.identity()
    X = morphology(sd.pp.spot_patches(slides[0], **PATCH).read(np.arange(slides[0].tables["table"].n_obs)))
    np.testing.assert_array_equal(again.embed_features(X)[0], started.embed_features(X)[0])


def test_kept_share_of_the_training_spots_is_recorded_and_reported(trained, morphology):
    model, slides = trained
    unprojected = model.full_rank()
    heads = [  # each training slide standardized by its own statistics, as training did
        unprojected.embed_features(morphology(sd.pp.spot_patches(s, **PATCH).read(np.arange(s.tables["table"].n_obs))))[
            0
        ]
        for s in slides
    ]
    centered = np.concatenate(heads) - model.subspace.mean
    inside = np.square(centered @ model.subspace.basis).sum() / np.square(centered).sum()
    assert 0.3 < model.subspace.kept < 1 and model.subspace.kept == pytest.approx(inside, rel=1e-3)
    report = slides[0].tables["table"].uns["spade"]["subspace"]
    assert report["n_comps"] == 16 and report["training_kept_variance"] == model.subspace.kept
    one = heads[0] - model.subspace.mean
    assert report["kept_variance"] == pytest.approx(
        np.square(one @ model.subspace.basis).sum() / np.square(one).sum(), rel=1e-3
    )


@pytest.mark.parametrize(
    ("n_comps", "out_dim", "message"),
    [(0, 256, "positive int"), (257, 256, "at most out_dim"), (433, 512, r"training spots \(432\)")],
)
def test_bad_n_comps_is_refused_before_training(morphology, n_comps, out_dim, message, caplog):
    with caplog.at_level(logging.INFO, logger="spade_sd"), pytest.raises(ValueError, match=message):
        sd.tl.pretrain(_slides(), backbone=morphology, n_comps=n_comps, out_dim=out_dim, **TRAIN)
    assert "Two-stage k-means" not in caplog.text and "Trained" not in caplog.text


@pytest.mark.parametrize(
    ("factor", "error"), [(0, ValueError), (-0.1, ValueError), (True, TypeError), ("0.1", TypeError)]
)
def test_bad_expert_lr_factor_is_refused_before_any_work(morphology, factor, error, caplog):
    with caplog.at_level(logging.INFO, logger="spade_sd"), pytest.raises(error, match="expert_lr_factor must"):
        sd.tl.pretrain(_slides(), backbone=morphology, expert_lr_factor=factor, **TRAIN)
    assert "Pretraining on" not in caplog.text


def test_features_are_written_and_cached(morphology, caplog):
    sdata = sd.datasets.synthetic(grid=(8, 8), mpp=1.0, n_genes=60, seed=5)
    sd.tl.features(sdata, backbone=morphology, **PATCH)
    table = sdata.tables["table"]
    assert table.obsm["X_backbone"].shape == (table.n_obs, morphology.dim)
    assert table.uns["X_backbone"]["backbone"]["identity"] == morphology.identity()
    with caplog.at_level(logging.DEBUG, logger="spade_sd"):  # reading the cache is logged at debug
        sd.tl.features(sdata, backbone=morphology, key_added="X_again", **PATCH)
    assert "cached" in caplog.text
    np.testing.assert_array_equal(table.obsm["X_again"], table.obsm["X_backbone"])


def test_groupby_defines_the_stage_one_groups(morphology):
    slides = _slides()
    model = sd.tl.pretrain(slides, backbone=morphology, groupby="tissue_type", **{**TRAIN, "max_epochs": 2})
    assert set(model.clustering.centroid_group) == {
        str(t) for t in slides[0].tables["table"].obs["tissue_type"].unique()
    }
    with pytest.raises(KeyError, match="groupby column 'organ'"):
        sd.tl.pretrain(slides, backbone=morphology, groupby="organ", **TRAIN)


def test_slide_standardisation_removes_a_slide_wide_shift(trained, morphology):
    model, slides = trained
    assert model.standardization == "slide" and model.config.training.warm_start is True
    assert model.config.training.expert_lr_factor == 0.1 and model.config.training.lr == 1e-3
    patches = sd.pp.spot_patches(slides[1], **PATCH)
    X = morphology(patches.read(np.arange(len(patches))))
    rng = np.random.default_rng(0)
    shifted = (X * rng.uniform(0.5, 2.0, X.shape[1]) + rng.normal(0, 1, X.shape[1])).astype(np.float32)
    embedding = model.embed_features(X)[0]
    # a stain-like change of every feature over the whole slide is undone by the slide's own statistics ...
    np.testing.assert_allclose(model.embed_features(shifted)[0], embedding, atol=2e-3)
    # ... and matters when the statistics are not the slide's own
    other = model.embed_features(shifted, slide_scaler=model.slide_scaler(X))[0]
    assert np.abs(other - embedding).max() > 0.1
    # part of a slide embeds like the whole once given the whole slide's statistics
    part = model.embed_features(X[:10], slide_scaler=model.slide_scaler(X))[0]
    np.testing.assert_allclose(part, embedding[:10], rtol=1e-5, atol=1e-5)


def test_embedding_without_the_cache_equals_the_cached_one(trained):
    model, slides = trained
    sd.tl.embed(slides[0], model, cache=False, key_added="X_nocache")
    table = slides[0].tables["table"]
    np.testing.assert_allclose(table.obsm["X_nocache"], table.obsm["X_spade"], rtol=1e-4, atol=1e-5)


def test_slide_standardisation_refuses_too_few_patches_before_any_work(trained):
    model, _ = trained
    small = sd.datasets.synthetic(grid=(5, 5), mpp=1.0, n_genes=150, seed=3)
    with pytest.raises(ValueError, match="at least 30 patches of the slide; found 25"):
        sd.tl.embed(small, model)
    assert "X_spade" not in small.tables["table"].obsm
