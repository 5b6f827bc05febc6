"""Outputs never overwrite what the call reads or what another call recorded (issue 21).

Every writer refuses, before any work, a key the call reads, the tables' metadata, another tool's output or the
user's own data, and says which; a tool rerun over its own earlier output replaces it and logs that. Which tool wrote
which key is recorded in ``table.uns['spade_sd']['outputs']``, which survives writing the SpatialData.
``predict_expression`` leaves each spot out of its own prediction when the reference holds that very spot.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import spatialdata
from helpers import CountingMeans

import spade_sd as sd
from spade_sd import metrics

PATCH = {"size_um": 64.0, "size_px": 64}


@pytest.fixture(scope="module")
def counted(synthetic_slides):
    counter = CountingMeans()
    options = {"n_experts": 2, "n_fine": 4, "max_epochs": 1, "quiet": True, "cache": False, **PATCH}
    model = sd.tl.pretrain(synthetic_slides(), backbone=sd.Backbone(counter), seed=0, **options)
    return counter, model


@pytest.fixture(scope="module")
def written(counted, synthetic_slides):
    """A slide every tool has written to once: features, embed, query, transfer_labels, predict_expression."""
    counter, model = counted
    sdata = synthetic_slides(1, seed=3)[0]
    sd.tl.features(sdata, backbone=model.backbone, cache=False, **PATCH)
    sd.tl.embed(sdata, model, cache=False)
    sd.tl.query(sdata, model, genes=model.panel.genes[:1], cache=False)
    sd.tl.transfer_labels(sdata, model, reference=sdata, label_key="tissue_type", k=3, cache=False)
    sd.tl.predict_expression(sdata, model, k=5, cache=False)
    return sdata


def _snapshot(sdata) -> tuple:
    """Every table's keys and the objects they hold: a refused call replaces none of them."""
    return {
        name: (
            {k: table.obs[k].to_numpy(copy=True) for k in table.obs},
            {k: id(v) for k, v in table.obsm.items()},
            {k: id(v) for k, v in table.uns.items()},
            repr(table.uns.get("spade_sd")),
        )
        for name, table in sdata.tables.items()
    }


def _assert_unchanged(sdata, before: dict) -> None:
    after = _snapshot(sdata)
    assert after.keys() == before.keys()
    for name, (obs, obsm, uns, meta) in before.items():
        assert after[name][0].keys() == obs.keys(), name
        for key, values in obs.items():
            np.testing.assert_array_equal(after[name][0][key], values, err_msg=f"{name}.obs[{key!r}]")
        assert after[name][1:] == (obsm, uns, meta), name


def test_transfer_labels_refuses_to_write_over_the_labels_it_reads(counted, synthetic_slides):
    counter, model = counted
    sdata = synthetic_slides(1, seed=3)[0]  # no X_spade: the call would embed both sides
    table = sdata.tables["table"]
    labels = table.obs["tissue_type"].copy()
    before = _snapshot(sdata)
    counter.calls = 0
    with pytest.raises(ValueError, match=r"cannot write \.obs\['tissue_type'\].*this call reads it \(label_key"):
        sd.tl.transfer_labels(
            sdata, model, reference=sdata, label_key="tissue_type", key_added="tissue_type", k=3, cache=False
        )
    assert counter.calls == 0, "the backbone ran before the error"
    _assert_unchanged(sdata, before)
    pd.testing.assert_series_equal(table.obs["tissue_type"], labels)
    # its own earlier output, read as the labels of the next transfer (a view of the same table), is kept too
    sd.tl.transfer_labels(sdata, model, reference=sdata, label_key="tissue_type", key_added="guess", k=3, cache=False)
    guess = table.obs["guess"].copy()
    with pytest.raises(ValueError, match=r"cannot write \.obs\['guess'\].*this call reads it \(label_key"):
        sd.tl.transfer_labels(
            sdata, model, reference=table[table.obs["guess"].notna()], label_key="guess", key_added="guess", k=3
        )
    pd.testing.assert_series_equal(table.obs["guess"], guess)


def test_query_refuses_embeds_record_and_a_users_column(counted, synthetic_slides):
    counter, model = counted
    sdata = synthetic_slides(1, seed=3)[0]
    sd.tl.embed(sdata, model, cache=False)
    table = sdata.tables["table"]
    record, categories = table.uns["spade"], table.obs["tissue_type"].cat.categories
    before = _snapshot(sdata)
    counter.calls = 0
    with pytest.raises(ValueError, match=r"tl.query cannot write \.uns\['spade'\].*holds the output of tl.embed"):
        sd.tl.query(sdata, model, genes=model.panel.genes[:1], key_added="spade", cache=False)
    with pytest.raises(ValueError, match=r"cannot write \.obs\['tissue_type'\].*spade_sd did not write"):
        sd.tl.query(sdata, model, genes=model.panel.genes[:1], key_added="tissue_type", cache=False)
    assert counter.calls == 0, "the backbone ran before the error"
    _assert_unchanged(sdata, before)
    assert table.uns["spade"] is record  # the record transfer_labels checks models against
    assert table.obs["tissue_type"].dtype == "category" and table.obs["tissue_type"].cat.categories.equals(categories)


def _call(kind: str, sdata, model, key: str):
    options = {"cache": False}
    if kind == "features":
        return lambda: sd.tl.features(sdata, backbone=model.backbone, key_added=key, **options, **PATCH)
    if kind == "embed":
        return lambda: sd.tl.embed(sdata, model, key_added=key, **options)
    if kind == "query":
        return lambda: sd.tl.query(sdata, model, genes=model.panel.genes[:1], key_added=key, **options)
    if kind == "transfer":
        labels = {"reference": sdata, "label_key": "tissue_type", "k": 3}
        return lambda: sd.tl.transfer_labels(sdata, model, **labels, key_added=key, **options)
    return lambda: sd.tl.predict_expression(sdata, model, reference=sdata, k=5, key_added=key, **options)


REFUSED = [
    ("features", "X_spade", r"\.obsm\['X_spade'\].*output of tl.embed"),
    ("features", "spatial", r"\.obsm\['spatial'\].*spade_sd did not write"),
    ("features", "spade_sd", r"\.uns\['spade_sd'\].*the table's metadata"),
    ("embed", "X_backbone", r"tl.embed cannot write \.obsm\['X_backbone'\].*output of tl.features"),
    ("embed", "X_spade_query", r"tl.embed cannot write \.uns\['spade_query'\].*output of tl.query"),
    ("embed", "X_spade_sd", r"\.uns\['spade_sd'\].*the table's metadata"),
    ("query", "spade_expert", r"\.obs\['spade_expert'\].*output of tl.embed"),
    ("query", "spade_labels", r"\.obs\['spade_labels'\].*output of tl.transfer_labels"),
    ("query", "sample", r"\.obs\['sample'\].*spade_sd did not write"),
    ("query", "spatialdata_attrs", r"\.uns\['spatialdata_attrs'\].*the table's metadata"),
    ("transfer", "spade_query", r"tl.transfer_labels cannot write \.obs\['spade_query'\].*output of tl.query"),
    ("transfer", "spade", r"\.uns\['spade'\].*this call reads it \(the record of use_rep='X_spade'\)"),
    ("transfer", "region", r"\.obs\['region'\].*spade_sd did not write"),
    ("predict", "table", r"element 'table' \(table\), which this call reads \(the spots' table and the reference\)"),
    ("predict", "spade_sd", r"cannot name its table 'spade_sd'"),
]


@pytest.mark.parametrize(("kind", "key", "match"), REFUSED, ids=[f"{kind}-{key}" for kind, key, _ in REFUSED])
def test_every_writer_refuses_what_it_does_not_own_before_any_work(counted, written, kind, key, match):
    counter, model = counted
    before = _snapshot(written)
    counter.calls = 0
    with pytest.raises(ValueError, match=match):
        _call(kind, written, model, key)()
    assert counter.calls == 0, "the backbone ran before the error"
    _assert_unchanged(written, before)


def test_tables_made_by_one_tool_are_not_replaced_by_another(counted, written):
    counter, model = counted
    tiled = sd.pp.tile_image(written, tissue_only=False, copy=True)  # shares the spots' elements
    before = _snapshot(tiled)
    counter.calls = 0
    with pytest.raises(ValueError, match=r"element 'tiles_table' \(table\), written by pp.tile_image"):
        sd.tl.predict_expression(
            tiled, model, shapes_key=next(iter(written.shapes)), key_added="tiles_table", cache=False
        )
    with pytest.raises(ValueError, match=r"element 'spade_predicted' \(table, written by tl.predict_expression\)"):
        sd.pp.tile_image(tiled, tissue_only=False, key_added="spade_predicted")
    with pytest.raises(ValueError, match=r"element 'tiles' \(shape\); tile_image does not overwrite"):
        sd.pp.tile_image(tiled, tissue_only=False)  # not even its own tiles: tables may annotate them
    assert counter.calls == 0
    _assert_unchanged(tiled, before)


def test_a_tool_rerun_replaces_its_own_output_and_logs_it(counted, written, caplog):
    _, model = counted
    table = written.tables["table"]
    first = table.obs["spade_query"].to_numpy(copy=True)
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        sd.tl.query(written, model, genes=model.panel.genes[-1:], cache=False)
        sd.tl.embed(written, model, genes=False, cache=False)
        sd.tl.predict_expression(written, model, k=7, cache=False)
    assert "tl.query replaced its earlier .obs['spade_query'], .uns['spade_query'] of table 'table'" in caplog.text
    assert "tl.embed replaced its earlier .obsm['X_spade'], .obsm['X_spade_weights']" in caplog.text
    assert "tl.predict_expression replaced its earlier table 'spade_predicted'" in caplog.text
    assert not np.array_equal(table.obs["spade_query"].to_numpy(), first)  # another gene, another score
    assert table.uns["spade_query"]["params"]["genes"] == model.panel.genes[-1:]
    assert written.tables["spade_predicted"].uns["spade_predicted"]["params"]["k"] == 7
    # the gene side this run did not compute is gone, and so is its record
    outputs = table.uns["spade_sd"]["outputs"]
    assert "X_spade_gene" not in table.obsm and "X_spade_gene" not in outputs["obsm"]


def test_the_record_survives_writing_and_reading(counted, written, tmp_path):
    _, model = counted
    outputs = written.tables["table"].uns["spade_sd"]["outputs"]
    assert outputs["obsm"]["X_backbone"] == "tl.features" and outputs["uns"]["spade"] == "tl.embed"
    assert outputs["obs"]["spade_labels"] == "tl.transfer_labels" and outputs["obs"]["spade_query"] == "tl.query"
    predicted = written.tables["spade_predicted"].uns["spade_sd"]
    assert predicted["written_by"] == "tl.predict_expression" and "outputs" not in predicted  # not the spots' record
    written.write(tmp_path / "written.zarr")
    again = spatialdata.read_zarr(tmp_path / "written.zarr")
    table = again.tables["table"]
    assert table.uns["spade_sd"]["outputs"] == outputs
    assert again.tables["spade_predicted"].uns["spade_sd"]["written_by"] == "tl.predict_expression"
    with pytest.raises(ValueError, match=r"\.uns\['spade'\].*output of tl.embed"):
        sd.tl.query(again, model, genes=model.panel.genes[:1], key_added="spade", cache=False)
    with pytest.raises(ValueError, match=r"element 'spade_predicted' \(table, written by tl.predict_expression\)"):
        sd.pp.tile_image(again, key_added="spade_predicted")
    saved, genes = table.obs["spade_query"].to_numpy(copy=True), list(table.uns["spade_query"]["params"]["genes"])
    sd.tl.query(again, model, genes=genes, cache=False)  # its own: replaced, by the same scores
    sd.tl.predict_expression(again, model, k=5, cache=False)
    np.testing.assert_allclose(table.obs["spade_query"], saved, atol=1e-6)


def test_outputs_of_an_earlier_spade_sd_without_the_record_are_still_the_tools_own(counted, written, tmp_path):
    """Zarr stores embedded before ownership was recorded: each tool's own .uns entry tells what it wrote."""
    _, model = counted
    written.write(tmp_path / "earlier.zarr")
    earlier = spatialdata.read_zarr(tmp_path / "earlier.zarr")
    table = earlier.tables["table"]
    del table.uns["spade_sd"]["outputs"]
    sd.tl.embed(earlier, model, cache=False)  # replaces its own earlier embedding
    sd.tl.query(earlier, model, genes=model.panel.genes[:1], cache=False)
    assert table.uns["spade_sd"]["outputs"]["obsm"]["X_spade"] == "tl.embed"
    with pytest.raises(ValueError, match=r"\.obs\['spade_labels'\].*output of tl.transfer_labels"):
        sd.tl.query(earlier, model, genes=model.panel.genes[:1], key_added="spade_labels", cache=False)
    table.obs["mine"] = 1.0  # a column with no spade_sd record stays the user's
    with pytest.raises(ValueError, match="spade_sd did not write"):
        sd.tl.query(earlier, model, genes=model.panel.genes[:1], key_added="mine", cache=False)


# --- predict_expression with the target as its own reference


def _pearson(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    true, pred = y_true - y_true.mean(axis=0), y_pred - y_pred.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (true * pred).sum(axis=0) / np.sqrt((true**2).sum(axis=0) * (pred**2).sum(axis=0))
    return float(np.nanmean(r))


@pytest.fixture(scope="module")
def own_reference(counted, synthetic_slides):
    """A slide embedded by the model, its embedding and its log1p-normalized expression."""
    _, model = counted
    sdata = synthetic_slides(1, seed=5)[0]
    sd.tl.embed(sdata, model, cache=False)
    table = sdata.tables["table"]
    expression = sd.GenePanel(list(table.var_names), target_sum=model.panel.target_sum).transform(table)
    # predict_expression compares within the model's expression subspace: what tl.embed writes as X_spade_expr
    embedding = table.obsm["X_spade_expr"]
    return sdata, np.asarray(embedding, dtype=np.float64), np.asarray(expression, dtype=np.float64)


def _left_out_knn(X_query, X, Y, k, own):
    """Each query's knn prediction from the reference without its own spot, one refit at a time."""
    return np.stack(
        [
            metrics.knn_predict(q[None], np.delete(X, j, 0), np.delete(Y, j, 0), k=k)[0]
            for q, j in zip(X_query, own, strict=True)
        ]
    )


def test_a_spot_is_left_out_of_its_own_neighbours(counted, own_reference):
    _, model = counted
    sdata, X, Y = own_reference
    n, k = len(X), 5
    sd.tl.predict_expression(sdata, model, reference=sdata, k=k, key_added="itself", cache=False)
    predicted = np.asarray(sdata.tables["itself"].X, dtype=np.float64)
    np.testing.assert_allclose(predicted, _left_out_knn(X, X, Y, k, range(n)), rtol=1e-4, atol=1e-5)
    leaky = metrics.knn_predict(X, X, Y, k=k)  # each spot among its own neighbours
    assert _pearson(Y, predicted) < _pearson(Y, leaky) - 0.05
    # a view of the table: its spots are left out of their own predictions, the others see every reference spot
    table = sdata.tables["table"]
    half = n // 2
    sd.tl.predict_expression(sdata, model, reference=table[:half], k=k, key_added="half", cache=False)
    predicted = np.asarray(sdata.tables["half"].X, dtype=np.float64)
    np.testing.assert_allclose(
        predicted[:half], _left_out_knn(X[:half], X[:half], Y[:half], k, range(half)), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(predicted[half:], metrics.knn_predict(X[half:], X[:half], Y[:half], k=k), rtol=1e-4)
    with pytest.raises(ValueError, match=rf"k={half} exceeds the {half - 1} reference spots left.*Pass k ≤ {half - 1}"):
        sd.tl.predict_expression(sdata, model, reference=table[:half], k=half, key_added="half", cache=False)


def test_ridge_predicts_each_spot_from_the_fit_without_it(counted, own_reference):
    from sklearn.linear_model import Ridge

    _, model = counted
    sdata, X, Y = own_reference
    table = sdata.tables["table"]
    sd.tl.predict_expression(sdata, model, reference=table, method="ridge", key_added="ridge_itself", cache=False)
    predicted = sdata.tables["ridge_itself"]
    alpha = predicted.uns["ridge_itself"]["params"]["alpha"]
    rows = [0, 17, len(X) - 1]
    refit = [Ridge(alpha=alpha).fit(np.delete(X, i, 0), np.delete(Y, i, 0)).predict(X[[i]])[0] for i in rows]
    np.testing.assert_allclose(np.asarray(predicted.X, dtype=np.float64)[rows], refit, rtol=1e-3, atol=1e-4)
    in_sample = Ridge(alpha=alpha).fit(X, Y).predict(X)
    assert _pearson(Y, np.asarray(predicted.X, dtype=np.float64)) < _pearson(Y, in_sample)
