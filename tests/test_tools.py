"""What the aligned space knows: expression predicted from H&E, gene → image queries, label transfer, their plots.

End to end on the mouse olfactory bulb (a model trained on MOB1 + MOB2, used on MOB3's spots and on tiles of its
H&E), and hostile input refused before any work on synthetic slides, with a backbone that counts its calls.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import spatialdata
from helpers import CountingMeans
from sklearn.metrics import balanced_accuracy_score

import spade_sd as sd
from spade_sd import metrics

DATA = Path(__file__).parent / "data"
PATCH = {"size_um": 64.0, "size_px": 64}


def _pearson(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    true, pred = y_true - y_true.mean(axis=0), y_pred - y_pred.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (true * pred).sum(axis=0) / np.sqrt((true**2).sum(axis=0) * (pred**2).sum(axis=0))


# --- real data: MOB1 + MOB2 teach, MOB3's spots and tiles are predicted, queried and labelled


@pytest.fixture(scope="module")
def mob(data_dir):
    slides = [sd.datasets.mouse_olfactory_bulb(s) for s in ("MOB1", "MOB2", "MOB3")]
    model = sd.tl.pretrain(slides[:2], n_experts=2, max_epochs=5, quiet=True)
    mob3 = slides[2]
    sd.pp.tile_image(mob3, size_um=112.0)
    sd.tl.embed(mob3, model, shapes_key="MOB3_spots")
    measured = sd.GenePanel(model.reference.genes).transform(mob3.tables["table"])
    return model, slides, measured


def test_the_bank_keeps_training_spots_embedded_as_embed_embeds_them(mob):
    model, slides, _ = mob
    bank = model.reference
    n_training = sum(s.tables["table"].n_obs for s in slides[:2])
    assert len(bank) == n_training == 786  # fewer spots than reference_size: all of them
    assert bank.genes[: len(model.panel)] == model.panel.genes and len(model.panel) < len(bank.genes) <= 2000
    assert bank.expression.dtype == np.float16 and bank.embedding.dtype == np.float32
    assert set(bank.slide) == {"MOB1", "MOB2"} and set(np.unique(bank.expert)) == {0, 1}
    mob1 = slides[0]
    sd.tl.embed(mob1, model, cache=True)
    table = mob1.tables["table"]
    mine = bank.slide == "MOB1"
    rows = table.obs_names.get_indexer(np.asarray(bank.obs_names)[mine])
    # the bank holds the heads' embeddings: X_spade_expr is their projection onto the expression subspace
    np.testing.assert_array_equal(model.expression_space(bank.embedding[mine]), table.obsm["X_spade_expr"][rows])
    np.testing.assert_array_equal(bank.expert[mine], table.obsm["X_spade_weights"][rows].argmax(axis=1))
    expected = sd.GenePanel(bank.genes).transform(table)[rows].astype(np.float16)
    np.testing.assert_array_equal(bank.expression[mine], expected)


def test_knn_prediction_is_what_metrics_knn_expression_scores(mob):
    model, slides, measured = mob
    mob3, bank = slides[2], model.reference
    sd.tl.predict_expression(mob3, model, shapes_key="MOB3_spots")
    predicted = mob3.tables["spade_predicted"]
    spots = mob3.tables["table"]
    assert predicted.uns["spatialdata_attrs"]["region"] == "MOB3_spots"
    assert list(predicted.obs_names) == list(spots.obs_names) and list(predicted.var_names) == bank.genes
    np.testing.assert_array_equal(predicted.obs["spot_id"].to_numpy(), spots.obs["spot_id"].to_numpy())
    # tl.embed's projection onto the expression subspace: the query side is computed the same way
    X, reference = spots.obsm["X_spade_expr"], model.expression_space(bank.embedding)
    np.testing.assert_array_equal(
        predicted.X, metrics.knn_predict(X, reference, bank.expression, k=50).astype(np.float32)
    )
    scored = metrics.knn_expression(X, reference, bank.expression, measured, k=50, genes=bank.genes)
    np.testing.assert_allclose(_pearson(measured, predicted.X), scored["value"], rtol=1e-4, atol=1e-6)
    panel = scored["gene"].isin(model.panel.genes)
    assert scored.loc[panel, "value"].mean() > 0.25  # measured 0.39: the H&E predicts the panel genes
    assert np.nanmean(scored.loc[~panel, "value"]) > 0.1  # and the genes outside it (measured 0.21)
    sd.tl.predict_expression(
        mob3, model, method="ridge", genes=model.panel.genes[:10], key_added="ridge", shapes_key="MOB3_spots"
    )
    ridge = mob3.tables["ridge"]
    assert ridge.n_vars == 10 and ridge.uns["ridge"]["params"]["alpha"] > 0
    assert np.nanmean(_pearson(measured[:, :10], ridge.X)) > 0.15


def test_a_query_finds_where_its_marker_is_expressed(mob):
    model, slides, measured = mob
    mob3 = slides[2]
    scored = metrics.knn_expression(
        mob3.tables["table"].obsm["X_spade_expr"],
        model.expression_space(model.reference.embedding),
        model.reference.expression,
        measured,
    )
    panel = scored["value"].to_numpy()[: len(model.panel)]
    best = int(np.argmax(panel))  # a gene whose pattern the H&E shows
    marker = model.panel.genes[best]
    sd.tl.query(mob3, model, genes=[marker], shapes_key="MOB3_spots")
    score = mob3.tables["table"].obs["spade_query"].to_numpy()
    assert np.isfinite(score).all() and np.abs(score).max() <= 1 + 1e-6
    assert np.corrcoef(score, measured[:, best])[0, 1] > 0.25  # measured 0.4
    uns = mob3.tables["table"].uns["spade_query"]
    assert uns["params"]["genes"] == [marker] and uns["profile_genes"] == model.panel.genes
    profile = pd.Series(measured[np.argmax(measured[:, best]), : len(model.panel)], index=model.panel.genes)
    sd.tl.query(mob3, model, profile=profile, shapes_key="MOB3_spots", key_added="measured_query")
    assert np.corrcoef(mob3.tables["table"].obs["measured_query"], measured[:, best])[0, 1] > 0


def test_labels_transfer_between_slides(mob):
    model, slides, measured = mob
    mob1, mob3 = slides[0], slides[2]
    sd.tl.embed(mob1, model)
    reference = mob1.tables["table"]
    panel = sd.GenePanel(model.panel.genes)
    domains = metrics.expression_domains(panel.transform(reference), seed=0)
    reference.obs["domain"] = pd.Categorical(domains.astype(str))
    # the truth on MOB3: the MOB1 domain whose mean expression is nearest
    centroids = np.stack([panel.transform(reference)[domains == d].mean(axis=0) for d in np.unique(domains)])
    own = measured[:, : len(model.panel)]
    truth = np.argmin(((own[:, None] - centroids[None]) ** 2).sum(axis=2), axis=1).astype(str)
    for method in ("knn", "logistic"):
        sd.tl.transfer_labels(
            mob3, model, reference=reference, label_key="domain", method=method, k=10, shapes_key="MOB3_spots"
        )
        table = mob3.tables["table"]
        labels, probabilities = table.obs["spade_labels"], table.obsm["spade_labels_probabilities"]
        assert labels.dtype == "category" and list(probabilities.columns) == list(labels.cat.categories)
        assert probabilities.index.equals(table.obs_names)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
        chance = 1 / len(centroids)
        assert balanced_accuracy_score(truth, labels.astype(str)) > 1.4 * chance, method  # measured 2 × chance
        assert table.uns["spade_labels"]["params"]["method"] == method


def test_tiles_of_the_h_and_e_get_everything_and_it_survives_writing(mob, tmp_path):
    model, slides, _ = mob
    mob1, mob3 = slides[0], slides[2]
    sd.tl.embed(mob1, model)
    reference = mob1.tables["table"]
    reference.obs["half"] = pd.Categorical(
        np.where(reference.obsm["spatial"][:, 0] < np.median(reference.obsm["spatial"][:, 0]), "left", "right")
    )
    tiles = {"shapes_key": "tiles"}
    sd.tl.predict_expression(mob3, model, genes=model.panel.genes[:5], key_added="tile_expression", **tiles)
    sd.tl.query(mob3, model, genes=model.panel.genes[:2], key_added="tile_query", **tiles)
    sd.tl.transfer_labels(mob3, model, reference=mob1, label_key="half", key_added="tile_labels", **tiles)
    sd.tl.predict_expression(
        mob3, model, genes=model.panel.genes[:5], key_added="spot_expression", shapes_key="MOB3_spots"
    )
    mob3.write(tmp_path / "mob3.zarr")
    again = spatialdata.read_zarr(tmp_path / "mob3.zarr")
    predicted, tile_table = again.tables["tile_expression"], again.tables["tiles_table"]
    assert predicted.uns["spatialdata_attrs"]["region"] == "tiles" and predicted.n_obs == tile_table.n_obs
    assert list(predicted.obs_names) == list(tile_table.obs_names) and predicted.n_vars == 5
    np.testing.assert_array_equal(predicted.X, mob3.tables["tile_expression"].X)
    assert again.tables["spot_expression"].uns["spatialdata_attrs"]["region"] == "MOB3_spots"
    assert np.isfinite(tile_table.obs["tile_query"]).all()
    assert set(tile_table.obs["tile_labels"].cat.categories) == {"left", "right"}
    assert list(tile_table.obsm["tile_labels_probabilities"].columns) == ["left", "right"]
    assert tile_table.uns["tile_labels"]["params"]["shapes_key"] == "tiles"
    # element inference still finds each shapes element's own table, not the predictions beside it
    sd.tl.query(again, model, genes=model.panel.genes[:1], shapes_key="MOB3_spots")
    assert "spade_query" in again.tables["table"].obs
    fig = sd.pl.query(mob3, "tile_query", return_fig=True, show=False)
    assert fig.axes[0].images and fig.axes[0].collections
    fig = sd.pl.expression(mob3, model.panel.genes[:2], predicted_key="spot_expression", return_fig=True, show=False)
    assert len([ax for ax in fig.axes if ax.images]) == 4  # predicted and measured, two genes
    fig = sd.pl.expression(mob3, model.panel.genes[0], predicted_key="tile_expression", return_fig=True, show=False)
    assert len([ax for ax in fig.axes if ax.images]) == 1  # tiles have nothing measured


def test_a_model_with_its_bank_saves_and_loads_identically(mob, tmp_path):
    model, slides, _ = mob
    mob3 = slides[2]
    model.save(tmp_path / "model")
    loaded = sd.SpadeModel.load(tmp_path / "model")
    for name in ("embedding", "expression", "expert", "slide"):
        np.testing.assert_array_equal(getattr(loaded.reference, name), getattr(model.reference, name), err_msg=name)
    assert loaded.reference.genes == model.reference.genes and loaded.reference.obs_names == model.reference.obs_names
    assert loaded.identity() == model.identity()
    genes = model.reference.genes[-20:]  # outside the panel
    sd.tl.predict_expression(mob3, model, genes=genes, key_added="before", shapes_key="MOB3_spots")
    sd.tl.predict_expression(mob3, loaded, genes=genes, key_added="after", shapes_key="MOB3_spots")
    np.testing.assert_array_equal(mob3.tables["before"].X, mob3.tables["after"].X)


def test_a_model_saved_before_banks_loads_without_one():
    model = sd.SpadeModel.load(DATA / "model_ca61673")
    assert model.reference is None


# --- hostile input: refused before any work, nothing written


@pytest.fixture(scope="module")
def counted(synthetic_slides):
    counter = CountingMeans()
    options = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "quiet": True, "cache": False, **PATCH}
    model = sd.tl.pretrain(synthetic_slides(), backbone=sd.Backbone(counter), seed=0, **options)
    return counter, model


def _labelled(synthetic_slides, model, counter, **change):
    reference = synthetic_slides(1, seed=7)[0]
    sd.tl.embed(reference, model, cache=False)
    table = reference.tables["table"]
    table.obs["kind"] = table.obs["tissue_type"].astype(str).to_numpy()
    for column, values in change.items():
        table.obs[column] = values(table)
    counter.calls = 0
    return table


def test_a_good_call_does_the_work_the_refused_ones_do_not(counted, synthetic_slides):
    counter, model = counted
    sdata = synthetic_slides(1, seed=3)[0]
    counter.calls = 0
    sd.tl.predict_expression(sdata, model, cache=False)
    assert counter.calls > 0 and "spade_predicted" in sdata.tables


REFUSED = [
    ("no bank", "predict", {"model": "no bank"}, ValueError, r"The model has no reference bank"),
    ("unknown genes", "predict", {"genes": ["gene_0001", "Xist"]}, KeyError, r"not measured by the reference.*Xist"),
    ("k too large", "predict", {"k": 1000}, ValueError, r"k=1000 exceeds the 128 reference spots"),
    ("bad method", "predict", {"method": "mlp"}, ValueError, r"method must be one of \['knn', 'ridge'\]"),
    ("taken name", "predict", {"key_added": "table"}, ValueError, r"already has an element 'table'"),
    ("unembedded AnnData", "predict", {"reference": "raw table"}, KeyError, r"has no .obsm\['X_spade_expr'\]"),
    ("empty query", "query", {"genes": []}, ValueError, r"The query is empty"),
    ("unknown query gene", "query", {"genes": ["Xist"]}, KeyError, r"not in the model's reference bank.*Xist"),
    (
        "raised gene outside the panel",
        "query",
        {"genes": ["Xist"], "markers": "raised"},
        KeyError,
        r"not in the model's gene panel.*Xist",
    ),
    ("both", "query", {"genes": ["g"], "profile": [1.0]}, ValueError, r"exactly one of them; found both"),
    ("neither", "query", {}, ValueError, r"exactly one of them; found neither"),
    ("query without bank", "query", {"genes": "panel", "model": "no bank"}, ValueError, r"needs the model's reference"),
    ("short profile", "query", {"profile": [1.0, 2.0]}, ValueError, r"one value per panel gene"),
    ("empty profile", "query", {"profile": pd.Series(dtype=float)}, ValueError, r"The query profile is empty"),
    ("no label column", "transfer", {"label_key": "region_name"}, KeyError, r"no .obs\['region_name'\]"),
    ("few examples", "transfer", {"k": 40}, ValueError, r"needs at least 40 examples of every class.*type_"),
    ("NaN labels", "transfer", {"nan": True}, ValueError, r"spots have no 'kind' label"),
    ("one class", "transfer", {"one": True}, ValueError, r"at least 2 classes"),
    ("no model", "transfer", {"model": None, "k": 5}, ValueError, r"transfer_labels.*needs a trained model"),
]


def _call(kind, model, counter, synthetic_slides, sdata, arguments):
    arguments = dict(arguments)
    chosen = arguments.pop("model", model)
    if chosen == "no bank":
        chosen = dataclasses.replace(model, reference=None)
    if arguments.get("genes") == "panel":
        arguments["genes"] = model.panel.genes[:1]
    if kind == "predict":
        if arguments.get("reference") == "raw table":
            arguments["reference"] = synthetic_slides(1, seed=8)[0].tables["table"]
        return lambda: sd.tl.predict_expression(sdata, chosen, cache=False, **arguments)
    if kind == "query":
        return lambda: sd.tl.query(sdata, chosen, cache=False, **arguments)
    change = {}
    if arguments.pop("nan", False):
        change["kind"] = lambda t: np.where(np.arange(t.n_obs) == 3, None, t.obs["kind"].to_numpy())
    if arguments.pop("one", False):
        change["kind"] = lambda t: np.full(t.n_obs, "only")
    reference = _labelled(synthetic_slides, model, counter, **change)
    options = {"label_key": "kind", **arguments}
    return lambda: sd.tl.transfer_labels(sdata, chosen, reference=reference, cache=False, **options)


@pytest.mark.parametrize(("kind", "arguments", "error", "match"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_bad_input_is_refused_before_any_work(counted, synthetic_slides, kind, arguments, error, match):
    counter, model = counted
    sdata = synthetic_slides(1, seed=3)[0]  # no X_spade yet: transfer_labels would have to embed it
    table = sdata.tables["table"]
    before = (set(sdata.tables), set(table.obs), set(table.obsm), set(table.uns))
    call = _call(kind, model, counter, synthetic_slides, sdata, arguments)
    counter.calls = 0
    with pytest.raises(error, match=match):
        call()
    assert counter.calls == 0, "the backbone ran before the error"
    assert (set(sdata.tables), set(table.obs), set(table.obsm), set(table.uns)) == before


def test_an_anndata_reference_must_come_from_the_same_model(counted, synthetic_slides):
    counter, model = counted
    other = sd.tl.pretrain(
        synthetic_slides(),
        backbone=sd.Backbone(CountingMeans()),
        seed=1,
        n_experts=2,
        n_fine=4,
        max_epochs=1,
        quiet=True,
        cache=False,
        **PATCH,
    )
    reference = synthetic_slides(1, seed=7)[0]
    sd.tl.embed(reference, other, cache=False)
    sdata = synthetic_slides(1, seed=3)[0]
    counter.calls = 0
    with pytest.raises(ValueError, match="not by this one"):
        sd.tl.predict_expression(sdata, model, reference=reference.tables["table"], cache=False)
    assert counter.calls == 0
    sd.tl.embed(reference, model, cache=False)  # the same model: accepted, and predicts the reference's genes
    sd.tl.predict_expression(sdata, model, reference=reference.tables["table"], genes=["gene_0001"], cache=False)
    assert sdata.tables["spade_predicted"].uns["spade_predicted"]["params"]["reference"] == "AnnData"


def test_a_model_trained_without_a_bank_has_none(synthetic_slides):
    options = {"n_experts": 2, "n_fine": 4, "max_epochs": 1, "quiet": True, "cache": False, **PATCH}
    # without a bank X_spade is the heads' output: the read-out is fitted on the bank
    no_bank = {"reference_size": 0, "representation": "heads"}
    model = sd.tl.pretrain(synthetic_slides(), backbone=sd.Backbone(CountingMeans()), **no_bank, **options)
    assert model.reference is None and model.config.training.reference_size == 0
    small = sd.tl.pretrain(synthetic_slides(), backbone=sd.Backbone(CountingMeans()), reference_size=10, **options)
    assert len(small.reference) == 10 and len(set(small.reference.obs_names)) == 10


def test_the_bank_is_drawn_per_expert_in_proportion():
    from spade_sd.model.reference import stratified_sample

    experts = np.r_[np.zeros(90, int), np.ones(7, int), np.full(3, 2)]
    drawn = stratified_sample(experts, 20, seed=0)
    assert len(drawn) == len(set(drawn)) == 20 and np.bincount(experts[drawn]).tolist() == [18, 1, 1]
    np.testing.assert_array_equal(drawn, stratified_sample(experts, 20, seed=0))  # seeded
    np.testing.assert_array_equal(stratified_sample(experts, 500, seed=0), np.arange(100))
