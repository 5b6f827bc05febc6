"""The default X_spade adds to the backbone: its features next to the expression read from the image.

The heads keep every direction from the backbone's start; the expression tools compare within the expression
subspace; X_spade is the backbone's features, lifted along what the read-out predicts, followed by the read-out.
"""

from __future__ import annotations

import numpy as np
import pytest

import spade_sd as sd
from spade_sd.encoders.morphology import MorphologyFeatures
from spade_sd.metrics import knn_predict
from spade_sd.model.readout import ExpressionReadout, slide_variance
from spade_sd.model.spade_model import FORMAT_2, FORMAT_3, FORMAT_4, FORMAT_5, _saved_config
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


def _heads(model, sdata) -> np.ndarray:
    """The heads' image embedding of a slide's spots, from its backbone features."""
    sd.tl.features(sdata, backbone=model.backbone, **PATCH)
    return model.embed_features(sdata.tables["table"].obsm["X_backbone"])[0]


@pytest.fixture(scope="module")
def projected(morphology):
    """A model of the design before spade_sd 0.2: every embedding projected onto 16 directions."""
    return sd.tl.pretrain(_slides(), backbone=morphology, n_comps=16, expression_comps=None, **TRAIN)


def test_the_default_heads_start_at_the_backbone_and_keep_every_direction(default):
    model, slides = default
    training = model.config.training
    assert training.head_init == "backbone" and training.n_comps is None and training.expression_comps == 16
    assert model.subspace is None and model.expression_subspace.n_comps == 16
    table = slides[0].tables["table"]
    embedding, tools = _heads(model, slides[0]), table.obsm["X_spade_expr"]
    assert np.linalg.matrix_rank(embedding - embedding.mean(axis=0), tol=1e-3) > 16
    assert np.linalg.matrix_rank(tools - tools.mean(axis=0), tol=1e-3) == 16
    np.testing.assert_allclose(tools, model.expression_space(embedding), rtol=1e-5, atol=1e-5)
    assert table.uns["spade"]["subspace"]["projects"] == "expression tools"
    assert "X_spade_expr" in table.uns["spade"]["outputs"]


def test_predict_expression_and_query_compare_within_the_expression_subspace(default):
    model, slides = default
    target = slides[0]
    sd.tl.predict_expression(target, model, genes=model.reference.genes[:5], k=10)
    table = target.tables["table"]
    bank = model.reference
    expected = knn_predict(
        table.obsm["X_spade_expr"],
        model.expression_space(bank.embedding),
        bank.expression[:, :5].astype(np.float32),
        k=10,
        metric="cosine",
    )
    np.testing.assert_allclose(target.tables["spade_predicted"].X, expected, rtol=1e-4, atol=1e-4)
    # over whole embeddings the prediction differs: the subspace is really used
    whole = knn_predict(_heads(model, slides[0]), bank.embedding, bank.expression[:, :5].astype(np.float32), k=10)
    assert np.abs(whole - expected).max() > 1e-3

    genes = model.panel.genes[:2]
    sd.tl.query(target, model, genes=genes)
    profile = np.asarray(table.uns["spade_query"]["profile"], dtype=np.float32)
    weights = table.obsm["X_spade_weights"]
    gene = model.embed_expression(np.repeat(profile[None], table.n_obs, axis=0), weights)
    image = table.obsm["X_spade_expr"]
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
    # 0.2's format: the heads' output was X_spade
    recorded = {"format": FORMAT_3, "config": {"training": {"head_init": "backbone", "expression_comps": 16}}}
    assert _saved_config(recorded, config).training.representation == "heads"
    # 0.3.0's format: the backbone's features unchanged next to the read-out (no lift)
    recorded = {"format": FORMAT_4, "config": {"training": {"representation": "backbone+readout"}}}
    training = _saved_config(recorded, config).training
    assert (training.representation, training.readout_lift) == ("backbone+readout", 0.0)
    # 0.4.0's format: lifted, the block as read (no emphasis)
    recorded = {"format": FORMAT_5, "config": {"training": {"readout_lift": 0.5}}}
    training = _saved_config(recorded, config).training
    assert (training.readout_lift, training.readout_emphasis) == (0.5, 0.0)


def test_the_expression_subspace_saves_and_reloads(default, morphology, tmp_path):
    model, slides = default
    model.save(tmp_path / "model")
    loaded = sd.SpadeModel.load(tmp_path / "model", backbone=morphology)
    assert loaded.identity() == model.identity()
    np.testing.assert_array_equal(loaded.expression_subspace.basis, model.expression_subspace.basis)
    embedding = _heads(model, slides[0])
    np.testing.assert_array_equal(loaded.expression_space(embedding), model.expression_space(embedding))
    np.testing.assert_array_equal(loaded.readout.projection, model.readout.projection)
    np.testing.assert_array_equal(loaded.readout.lift, model.readout.lift)
    target = _slides()[0]
    sd.tl.embed(target, loaded)
    np.testing.assert_array_equal(target.tables["table"].obsm["X_spade"], slides[0].tables["table"].obsm["X_spade"])


def test_bad_expression_comps_is_refused_before_training(morphology):
    with pytest.raises(ValueError, match=r"expression_comps must be at most out_dim \(32\)"):
        sd.tl.pretrain(_slides(), backbone=morphology, out_dim=32, expression_comps=33, **TRAIN)


def test_the_default_outputs_are_the_measured_variants(default, morphology):
    """The heads are the ``head_init="backbone", n_comps=None`` model's and X_spade_expr the
    ``head_init="backbone", n_comps=16`` model's: the benchmarks of those variants measure the default's parts."""
    model, slides = default
    table = slides[0].tables["table"]
    heads = {"expression_comps": None, "representation": "heads"}
    variants = {"n_comps": None, **heads}, {"n_comps": 16, **heads}
    full, projected = (sd.tl.pretrain(_slides(), backbone=morphology, **v, **TRAIN) for v in variants)
    for variant, ours in ((full, _heads(model, slides[0])), (projected, table.obsm["X_spade_expr"])):
        assert variant.config.training.head_init == "backbone" and variant.readout is None
        target = _slides()[0]
        sd.tl.embed(target, variant)
        np.testing.assert_allclose(ours, target.tables["table"].obsm["X_spade"], atol=1e-5)


def test_x_spade_is_the_lifted_backbone_features_then_the_expression_readout(default):
    model, slides = default
    assert model.config.training.representation == "backbone+readout" and model.readout is not None
    sdata = slides[0]
    table = sdata.tables["table"]
    X = table.obsm["X_spade"]
    assert (
        X.shape == (table.n_obs, model.backbone.dim + model.readout.n_comps) == (table.n_obs, model.representation_dim)
    )
    assert 1 <= model.readout.n_comps <= model.config.training.expression_comps
    sd.tl.features(sdata, backbone=model.backbone, **PATCH)
    # the backbone's features, moved along what the block predicts: nothing of them is projected away
    block = X[:, model.backbone.dim :]
    np.testing.assert_allclose(
        X[:, : model.backbone.dim], table.obsm["X_backbone"] + block @ model.readout.lift, rtol=1e-5, atol=1e-5
    )
    # the block's spread next to the (lifted) features', on the training slides, is what readout_weight sets
    ratios = []
    for sdata in slides:
        values = sdata.tables["table"].obsm["X_spade"]
        spread = [np.square(v - v.mean(axis=0)).sum(axis=1).mean() for v in np.split(values, [model.backbone.dim], 1)]
        ratios.append(np.sqrt(spread[1] / spread[0]))
    assert np.mean(ratios) == pytest.approx(model.config.training.readout_weight, rel=0.25)


def test_the_lift_weighs_what_the_readout_predicts_more_and_keeps_the_rest(default):
    """On the training spots, the lifted features' part predicted by the block is 1 + readout_lift times the
    features' own, and their residual (what the block does not predict) is the features' residual, unchanged."""
    model, slides = default
    lift = model.config.training.readout_lift
    assert lift > 0 and model.readout.lift.shape == (model.readout.n_comps, model.backbone.dim)
    for sdata in slides:
        sd.tl.features(sdata, backbone=model.backbone, **PATCH)
    X = np.concatenate([s.tables["table"].obsm["X_spade"] for s in slides]).astype(np.float64)
    features = np.concatenate([s.tables["table"].obsm["X_backbone"] for s in slides]).astype(np.float64)
    block = X[:, model.backbone.dim :] - X[:, model.backbone.dim :].mean(axis=0)

    def split(values):
        centred = values - values.mean(axis=0)
        predicted = block @ np.linalg.lstsq(block, centred, rcond=None)[0]
        return predicted, centred - predicted

    (ours, rest), (theirs, their_rest) = split(X[:, : model.backbone.dim]), split(features)
    np.testing.assert_allclose(ours, (1 + lift) * theirs, atol=1e-3 * np.abs(theirs).max())
    np.testing.assert_allclose(rest, their_rest, atol=1e-3 * np.abs(their_rest).max())
    assert np.linalg.norm(theirs) > 0.05 * np.linalg.norm(features - features.mean(axis=0))


def test_without_a_lift_x_spade_starts_with_the_backbone_features_themselves(morphology):
    model = sd.tl.pretrain(_slides(), backbone=morphology, readout_lift=0.0, **TRAIN)
    assert model.readout.lift is None
    target = _slides()[0]
    sd.tl.embed(target, model)
    sd.tl.features(target, backbone=model.backbone, **PATCH)
    table = target.tables["table"]
    np.testing.assert_array_equal(table.obsm["X_spade"][:, : model.backbone.dim], table.obsm["X_backbone"])


def test_the_readout_block_is_the_ridge_prediction_of_the_bank_genes(default):
    """The block is a linear function of the expression the ridge read-out predicts (its principal coordinates)."""
    model, _ = default
    target = sd.datasets.synthetic(n_slides=1, grid=(10, 10), mpp=1.0, n_genes=120, seed=7)
    sd.tl.embed(target, model)
    sd.tl.predict_expression(target, model, method="ridge", genes=model.reference.genes)
    predicted = np.asarray(target.tables["spade_predicted"].X, dtype=np.float64)
    predicted -= predicted.mean(axis=0)
    block = target.tables["table"].obsm["X_spade"][:, model.backbone.dim :].astype(np.float64)
    block -= block.mean(axis=0)
    residual = block - predicted @ np.linalg.lstsq(predicted, block, rcond=None)[0]
    assert np.linalg.norm(residual) < 1e-3 * np.linalg.norm(block)
    assert target.tables["spade_predicted"].uns["spade_predicted"]["params"]["alpha"] == pytest.approx(
        model.readout.alpha, rel=1e-6
    )


def test_readout_emphasis_weighs_each_column_by_its_spread():
    """Without emphasis, distances within the block are distances between predicted profiles (one scale factor);
    with it, each column is the same coordinate times its spread to the power, the block's total spread kept."""
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(0)
    space = rng.normal(size=(300, 12)) * np.linspace(3, 0.2, 12)
    expression = space @ rng.normal(size=(12, 40)) + 0.1 * rng.normal(size=(300, 40))
    slide = np.repeat(["a", "b"], 150)
    fit = {"backbone_variance": 50.0, "weight": 0.7}
    plain = ExpressionReadout.fit(space, expression, slide, **fit)
    emphasised = ExpressionReadout.fit(space, expression, slide, emphasis=0.5, **fit)
    predicted = space @ np.linalg.lstsq(np.c_[space, np.ones(300)], expression, rcond=None)[0][:12]
    ratio = pdist(plain.block(space)) / pdist(predicted)
    assert ratio.std() / ratio.mean() < 0.02  # the ridge's penalty is small next to these spreads
    block = plain.block(space)
    spread = np.sqrt([slide_variance([block[slide == name, j : j + 1] for name in "ab"]) for j in range(12)])
    factor = emphasised.block(space)[0] / block[0]
    np.testing.assert_allclose(factor / factor[0], (spread / spread[0]) ** 0.5, rtol=1e-4)
    np.testing.assert_allclose(emphasised.block(space) / factor, plain.block(space), rtol=1e-4, atol=1e-5)

    # the block's total spread is what weight sets, with or without emphasis
    def total(values):
        return slide_variance([values[slide == name] for name in "ab"])

    assert total(emphasised.block(space)) == pytest.approx(total(plain.block(space)), rel=1e-5)
    assert spread[0] > 2 * spread[-1]  # the columns' spreads differ, so the emphasis changes the block


def test_heads_representation_writes_the_heads_output(morphology):
    model = sd.tl.pretrain(_slides(), backbone=morphology, representation="heads", **TRAIN)
    assert model.readout is None and model.representation_dim == model.dim
    target = _slides()[0]
    sd.tl.embed(target, model)
    table = target.tables["table"]
    np.testing.assert_allclose(table.obsm["X_spade"], _heads(model, target), rtol=1e-5, atol=1e-5)


def test_a_readout_without_a_reference_bank_is_refused_before_training(morphology):
    with pytest.raises(ValueError, match=r"found reference_size=0\. Pass reference_size > 0 or representation='heads'"):
        sd.tl.pretrain(_slides(), backbone=morphology, reference_size=0, **TRAIN)
