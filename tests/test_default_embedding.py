"""The default embedding keeps every direction; the expression tools compare within the expression subspace."""

from __future__ import annotations

import numpy as np
import pytest

import spade_sd as sd
from spade_sd.encoders.morphology import MorphologyFeatures
from spade_sd.metrics import knn_predict
from spade_sd.model.spade_model import FORMAT_2, _saved_config
from spade_sd.tl._common import unit_rows

PATCH = {"size_um": 64.0, "size_px": 64}
TRAIN = {"n_experts": 2, "n_fine": 4, "max_epochs": 8, "quiet": True, "seed": 0, **PATCH}


@pytest.fixture(scope="module")
def morphology():
    return sd.Backbone(MorphologyFeatures())


def _slides():
    return sd.datasets.synthetic(n_slides=3, grid=(10, 10), mpp=1.0, n_genes=120, seed=1)


@pytest.fixture(scope="module")
def default(morphology):
    slides = _slides()
    model = sd.tl.pretrain(slides, backbone=morphology, **TRAIN)
    for sdata in slides:
        sd.tl.embed(sdata, model)
    return model, slides


@pytest.fixture(scope="module")
def projected(morphology):
    """A model of the design before spade_sd 0.2: every embedding projected onto 16 directions."""
    return sd.tl.pretrain(_slides(), backbone=morphology, n_comps=16, expression_comps=None, **TRAIN)


def test_the_default_starts_at_the_backbone_and_keeps_every_direction(default):
    model, slides = default
    training = model.config.training
    assert training.head_init == "backbone" and training.n_comps is None and training.expression_comps == 16
    assert model.subspace is None and model.expression_subspace.n_comps == 16
    table = slides[0].tables["table"]
    embedding, tools = table.obsm["X_spade"], table.obsm["X_spade_expr"]
    assert np.linalg.matrix_rank(embedding - embedding.mean(axis=0), tol=1e-3) > 16
    assert np.linalg.matrix_rank(tools - tools.mean(axis=0), tol=1e-3) == 16
    np.testing.assert_array_equal(tools, model.expression_space(embedding))
    assert table.uns["spade"]["subspace"]["projects"] == "expression tools"
    assert "X_spade_expr" in table.uns["spade"]["outputs"]


def test_predict_expression_and_query_compare_within_the_expression_subspace(default):
    model, slides = default
    target = slides[0]
    sd.tl.predict_expression(target, model, genes=model.reference.genes[:5], k=10)
    table = target.tables["table"]
    bank = model.reference
    expected = knn_predict(
        model.expression_space(table.obsm["X_spade"]),
        model.expression_space(bank.embedding),
        bank.expression[:, :5].astype(np.float32),
        k=10,
        metric="cosine",
    )
    np.testing.assert_allclose(target.tables["spade_predicted"].X, expected, rtol=1e-4, atol=1e-4)
    # over whole embeddings the prediction differs: the subspace is really used
    whole = knn_predict(table.obsm["X_spade"], bank.embedding, bank.expression[:, :5].astype(np.float32), k=10)
    assert np.abs(whole - expected).max() > 1e-3

    genes = model.panel.genes[:2]
    sd.tl.query(target, model, genes=genes)
    profile = np.asarray(table.uns["spade_query"]["profile"], dtype=np.float32)
    weights = table.obsm["X_spade_weights"]
    gene = model.embed_expression(np.repeat(profile[None], table.n_obs, axis=0), weights)
    image = model.expression_space(table.obsm["X_spade"])
    score = (unit_rows(image) * unit_rows(model.expression_space(gene))).sum(axis=1)
    np.testing.assert_allclose(table.obs["spade_query"], score, atol=1e-5)


def test_the_full_rank_copy_of_a_projected_model_keeps_its_tools(projected):
    full = projected.full_rank()
    assert full.subspace is None and full.expression_subspace is projected.subspace
    assert full.reference is projected.reference and full.identity() != projected.identity()
    answers = []
    for model in (projected, full):
        target = _slides()[0]
        sd.tl.embed(target, model)
        sd.tl.predict_expression(target, model, k=10)
        sd.tl.query(target, model, genes=model.panel.genes[:2])
        answers.append((target.tables["spade_predicted"].X, target.tables["table"].obs["spade_query"].to_numpy()))
    (predicted, scored), (predicted_full, scored_full) = answers
    np.testing.assert_allclose(predicted_full, predicted, atol=1e-4)
    np.testing.assert_allclose(scored_full, scored, atol=1e-5)


def test_a_marker_query_takes_any_gene_of_the_reference_bank(default):
    model, slides = default
    outside = [g for g in model.reference.genes if g not in model.panel.genes]
    assert outside, "the bank holds genes beyond the panel"
    target = slides[1]
    sd.tl.query(target, model, genes=[outside[0], model.panel.genes[0]], key_added="marker_query")
    assert np.isfinite(target.tables["table"].obs["marker_query"]).all()
    with pytest.raises(KeyError, match="not in the model's gene panel"):
        sd.tl.query(target, model, genes=[outside[0]], markers="raised", key_added="raised_query")
    with pytest.raises(KeyError, match="not in the model's reference bank"):
        sd.tl.query(target, model, genes=["NOT_A_GENE"], key_added="missing_query")


def test_a_model_saved_before_the_new_defaults_keeps_the_options_it_was_trained_with(tmp_path):
    config = tmp_path / "config.json"
    saved = {"format": FORMAT_2, "config": {"training": {"n_comps": 16, "lr": 1e-3}}}
    training = _saved_config(saved, config).training
    assert (training.n_comps, training.head_init, training.expression_comps) == (16, "random", None)
    recorded = {"format": FORMAT_2, "config": {"training": {"head_init": "backbone", "expression_comps": 8}}}
    training = _saved_config(recorded, config).training
    assert (training.head_init, training.expression_comps) == ("backbone", 8)


def test_the_expression_subspace_saves_and_reloads(default, morphology, tmp_path):
    model, slides = default
    model.save(tmp_path / "model")
    loaded = sd.SpadeModel.load(tmp_path / "model", backbone=morphology)
    assert loaded.identity() == model.identity()
    np.testing.assert_array_equal(loaded.expression_subspace.basis, model.expression_subspace.basis)
    embedding = slides[0].tables["table"].obsm["X_spade"]
    np.testing.assert_array_equal(loaded.expression_space(embedding), model.expression_space(embedding))


def test_bad_expression_comps_is_refused_before_training(morphology):
    with pytest.raises(ValueError, match=r"expression_comps must be at most out_dim \(32\)"):
        sd.tl.pretrain(_slides(), backbone=morphology, out_dim=32, expression_comps=33, **TRAIN)


def test_the_default_outputs_are_the_measured_variants(default, morphology):
    """X_spade is the ``head_init="backbone", n_comps=None`` model's embedding and X_spade_expr the
    ``head_init="backbone", n_comps=16`` model's: the benchmarks of those variants measure the default's outputs."""
    model, slides = default
    table = slides[0].tables["table"]
    variants = {"n_comps": None, "expression_comps": None}, {"n_comps": 16, "expression_comps": None}
    full, projected = (sd.tl.pretrain(_slides(), backbone=morphology, **v, **TRAIN) for v in variants)
    for variant, key in ((full, "X_spade"), (projected, "X_spade_expr")):
        assert variant.config.training.head_init == "backbone"
        target = _slides()[0]
        sd.tl.embed(target, variant)
        np.testing.assert_allclose(table.obsm[key], target.tables["table"].obsm["X_spade"], atol=1e-5, err_msg=key)
