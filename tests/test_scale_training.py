"""Training at scale: the bounded-memory path of fit_model gives what the in-memory path would, on small data.

The slides here are built directly (features with planted types, sparse counts whose marker genes follow them):
fit_model takes cached features and tables, so no image is needed, and the sizes stay small enough for seconds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from anndata import AnnData
from scipy import sparse
from sklearn.metrics import adjusted_rand_score

from spade_sd.config import ClusteringConfig, SpadeConfig, TrainingConfig
from spade_sd.model import clustering as clustering_module
from spade_sd.model.clustering import two_stage_kmeans
from spade_sd.model.standardization import FeatureScaler, fit_slide_scaler
from spade_sd.training.data import StandardizedRows, release_pages
from spade_sd.training.fit import fit_model
from spade_sd.training.losses import chunked_contrastive_loss, contrastive_loss


def _slides(n_slides=3, n_per_slide=120, d=24, n_genes=80, n_types=3, seed=0):
    """Features around one centre per planted type (plus a shift per slide) and Poisson counts with type markers."""
    rng = np.random.default_rng(seed)
    centres = 3 * rng.normal(size=(n_types, d))
    markers = rng.permutation(n_genes)[: 5 * n_types].reshape(n_types, 5)
    features, tables, types = [], [], []
    for s in range(n_slides):
        kind = rng.integers(n_types, size=n_per_slide)
        features.append((centres[kind] + 0.5 * rng.normal(size=d) + rng.normal(size=(n_per_slide, d))).astype("f4"))
        rate = np.full((n_per_slide, n_genes), 0.3)
        rate[np.arange(n_per_slide)[:, None], markers[kind]] = 8.0
        counts = sparse.csr_matrix(rng.poisson(rate).astype(np.float32))
        tables.append(AnnData(counts, var={"gene": [f"g{i}" for i in range(n_genes)]}).copy())
        tables[-1].var_names = [f"g{i}" for i in range(n_genes)]
        tables[-1].obs_names = [f"s{s}_{i}" for i in range(n_per_slide)]
        types.append(kind)
    names = [f"s{s}" for s in range(n_slides)]
    return features, tables, names, [np.full(n_per_slide, n) for n in names], np.concatenate(types)


def _config(**training) -> SpadeConfig:
    options = {"max_epochs": 1, "out_dim": 16, "batch_size": 32, "reference_size": 50, "reference_genes": 40}
    return SpadeConfig(
        clustering=ClusteringConfig(n_experts=2, n_fine=4),
        training=dataclasses.replace(TrainingConfig(), **{**options, **training}),
    )


@pytest.mark.parametrize("loss", ["clip", "soft_target"])
def test_chunked_score_equals_the_whole_validation_set_at_once(loss):
    rng = torch.Generator().manual_seed(0)
    image, gene = torch.randn(301, 16, generator=rng), torch.randn(301, 16, generator=rng)
    options = {"loss": loss, "temperature": 0.7, "logit_scale": torch.tensor(2.3)}
    whole = contrastive_loss(image, gene, **options)
    for chunk_size in (3, 64, 300):  # blocks that divide n unevenly
        chunked = chunked_contrastive_loss(image, gene, chunk_size=chunk_size, **options)
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    # up to chunk_size spots it is the loss itself, bit for bit
    assert torch.equal(chunked_contrastive_loss(image, gene, chunk_size=301, **options), whole)


def test_rows_read_on_demand_equal_the_standardized_matrix(tmp_path):
    features, *_ = _slides()
    path = tmp_path / "features.npy"
    np.save(path, np.concatenate(features).astype(np.float16))
    on_disk = np.load(path, mmap_mode="r")
    offsets = np.cumsum([0, *map(len, features)])
    mapped = [on_disk[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    held = [np.asarray(f, dtype=np.float32) for f in mapped]
    # what the in-memory path computes: each slide by its own statistics, then all of them together
    per_slide = np.concatenate([fit_slide_scaler([f]).transform(f) for f in held])
    scaler = FeatureScaler().fit(per_slide)
    expected = scaler.transform(per_slide)
    rows = StandardizedRows(mapped, [fit_slide_scaler([f]) for f in held], scaler)
    assert rows.shape == expected.shape and len(rows) == len(expected)
    picked = np.array([300, 5, 121, 5, 0, 359])  # unsorted, repeated, across slides
    np.testing.assert_allclose(rows[picked], expected[picked], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rows[100:250], expected[100:250], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([b for _, b in rows.blocks(7)]), expected, rtol=1e-6, atol=1e-6)
    release_pages(mapped[1])  # the pages go; the values stay readable
    np.testing.assert_allclose(rows[picked], expected[picked], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one width"):
        StandardizedRows([held[0], held[1][:, :5]])


def test_memory_mapped_float16_features_train_the_same_model_as_in_memory(tmp_path):
    features, tables, names, groups, types = _slides()
    half = [f.astype(np.float16) for f in features]
    mapped = []
    for name, f in zip(names, half, strict=True):
        np.save(tmp_path / f"{name}.npy", f)
        mapped.append(np.load(tmp_path / f"{name}.npy", mmap_mode="r"))
    options = {"config": _config(), "quiet": True, "scalable": True}
    from_disk = fit_model(mapped, tables, names, groups, None, **options)
    in_memory = fit_model(half, tables, names, groups, None, **options)
    theirs = in_memory.mixture.state_dict()
    assert all(torch.equal(value, theirs[name]) for name, value in from_disk.mixture.state_dict().items())
    np.testing.assert_array_equal(from_disk.clustering.centroids, in_memory.clustering.centroids)
    assert from_disk.tau == in_memory.tau
    np.testing.assert_array_equal(from_disk.reference.embedding, in_memory.reference.embedding)
    assert from_disk.reference.genes == in_memory.reference.genes and len(from_disk.reference) == 50
    # and the experts follow the planted types, as they do in memory
    expert = np.concatenate([from_disk.embed_features(f)[1].argmax(axis=1) for f in mapped])
    assert adjusted_rand_score(types, expert) > 0.5


def test_scalable_clustering_is_deterministic_and_finds_the_planted_types(monkeypatch):
    features, _, _, groups, types = _slides(n_slides=2, n_per_slide=400)
    X = FeatureScaler().fit(np.concatenate(features)).transform(np.concatenate(features))
    # small thresholds, so that the sampled axes and the mini-batch k-means are the ones at work
    monkeypatch.setattr(clustering_module, "FIT_SPOTS", 200)
    monkeypatch.setattr(clustering_module, "MINIBATCH_SPOTS", 300)
    monkeypatch.setattr(clustering_module, "MAX_DISTANCES", 100)  # distances a few rows at a time
    options = {"n_fine": 6, "n_experts": 3, "n_pcs": 5, "scalable": True}
    first = two_stage_kmeans(X, np.concatenate(groups), seed=3, **options)
    again = two_stage_kmeans(X, np.concatenate(groups), seed=3, **options)
    other = two_stage_kmeans(X, np.concatenate(groups), seed=4, **options)
    np.testing.assert_array_equal(first.centroids, again.centroids)
    np.testing.assert_array_equal(first.centroid_expert, again.centroid_expert)
    np.testing.assert_array_equal(first.components, again.components)
    assert not np.array_equal(first.centroids, other.centroids)
    assert adjusted_rand_score(types, first.assign(X)[1]) > 0.9


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_sparse_expression_equals_the_dense_transform(smoothing):
    from spade_sd.spots.genes import GenePanel

    _, tables, *_ = _slides(n_slides=2, n_per_slide=90)
    rng = np.random.default_rng(1)
    for table in tables:  # a grid of spots, two samples in one table: neighbours never cross samples
        table.obsm["spatial"] = np.stack(np.divmod(np.arange(table.n_obs), 10), axis=1).astype(float)
        table.obs["sample"] = np.where(rng.random(table.n_obs) < 0.5, "a", "b")
    panel = GenePanel([f"g{i}" for i in range(0, 80, 3)], smoothing=smoothing)
    for table in tables:
        dense = panel.transform(table)
        held = panel.transform(table, as_sparse=True)
        assert sparse.isspmatrix_csr(held) and held.dtype == np.float32 and held.shape == dense.shape
        if smoothing == 0:  # the same float64 values cast once: bit for bit
            np.testing.assert_array_equal(held.toarray(), dense)
        else:  # the neighbours' mean as one operator: equal to float rounding
            np.testing.assert_allclose(held.toarray(), dense, rtol=1e-6, atol=1e-6)
            assert not np.allclose(dense, GenePanel(panel.genes).transform(table))  # smoothing did something


def test_expression_rows_read_as_the_dense_matrix():
    from spade_sd.training.data import ExpressionRows

    rng = np.random.default_rng(0)
    parts = [sparse.random(n, 12, density=0.2, format="csr", random_state=rng, dtype=np.float32) for n in (5, 9, 4)]
    dense = np.concatenate([p.toarray() for p in parts])
    rows = ExpressionRows(parts)
    assert rows.shape == dense.shape and len(rows) == 18 and rows.is_finite()
    picked = np.array([17, 0, 6, 6, 13, -1])  # unsorted, repeated, across slides, negative
    np.testing.assert_array_equal(rows[picked], dense[picked])
    np.testing.assert_array_equal(rows[3:15], dense[3:15])
    np.testing.assert_array_equal(rows[dense[:, 0] > 0], dense[dense[:, 0] > 0])
    with pytest.raises(IndexError, match="below 18"):
        rows[[18]]
    with pytest.raises(ValueError, match="one gene panel"):
        ExpressionRows([parts[0], parts[1][:, :5]])
    # 6 bytes per value (float32, the gene in 16 bits) and the rows' starts; an iterator is read slide by slide
    assert all(genes.dtype == np.uint16 for genes in rows.genes)
    assert rows.nbytes == sum(6 * p.nnz + 8 * (p.shape[0] + 1) for p in parts)
    np.testing.assert_array_equal(ExpressionRows(iter(parts))[picked], dense[picked])
    # a gene stored twice in a row (a non-canonical matrix) reads as its sum, as the dense matrix has it
    twice = sparse.csr_matrix((np.array([1, 2], dtype=np.float32), [3, 3], [0, 2]), shape=(1, 12))
    assert ExpressionRows([twice])[[0]][0, 3] == 3 and twice.nnz == 2  # the matrix given is left as it was
    parts[1].data[0] = np.nan
    assert not ExpressionRows(parts).is_finite()


def test_sparse_expression_trains_the_same_model_as_dense_on_the_scalable_path(monkeypatch):
    import spade_sd.training.fit as fit

    features, tables, names, groups, _ = _slides()
    options = {"config": _config(), "quiet": True, "scalable": True}
    held_sparse = fit_model(features, tables, names, groups, None, **options)
    dense_panel_expression = fit._panel_expression

    def dense(*args, held_sparse: bool = False):
        expression = dense_panel_expression(*args, held_sparse=False)
        assert isinstance(expression[1], np.ndarray)
        return expression

    monkeypatch.setattr(fit, "_panel_expression", dense)
    held_dense = fit_model(features, tables, names, groups, None, **options)
    theirs = held_dense.mixture.state_dict()
    assert all(torch.equal(value, theirs[name]) for name, value in held_sparse.mixture.state_dict().items())
    assert held_sparse.history == held_dense.history
    np.testing.assert_array_equal(held_sparse.reference.embedding, held_dense.reference.embedding)
    np.testing.assert_array_equal(held_sparse.reference.expression, held_dense.reference.expression)
    np.testing.assert_array_equal(held_sparse.embed_features(features[0])[0], held_dense.embed_features(features[0])[0])


def test_pretrain_at_scale_reads_the_feature_cache_as_memory_maps(monkeypatch, cache_dir, synthetic_slides):
    from helpers import pretrain_at_scale

    import spade_sd as sd

    slides = synthetic_slides(grid=(6, 6))  # 72 spots, past the lowered threshold of 60
    model, features = pretrain_at_scale(monkeypatch, slides, sd.Backbone(sd.MorphologyFeatures()), max_epochs=1)
    assert all(str(cache_dir) in str(f.filename) for f in features)
    assert model.history["epochs"] == 1 and len(model.reference) == 40


def test_scattered_rows_release_the_pages_they_map_as_they_go(tmp_path, monkeypatch):
    from spade_sd.training import data

    features = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float16)
    np.save(tmp_path / "features.npy", features)
    on_disk = np.load(tmp_path / "features.npy", mmap_mode="r")
    released = []
    monkeypatch.setattr(data, "release_pages", lambda array: released.append(array))
    monkeypatch.setattr(data, "RELEASE_BYTES", 4 * data.FAULT_AROUND_BYTES)
    rows = StandardizedRows([on_disk[:300], on_disk[300:]])  # two views of one file: one map to release
    picked = np.random.default_rng(1).permutation(600)[:41]
    np.testing.assert_array_equal(rows[picked], features[picked].astype(np.float32))
    # each scattered row counts as the 2 MB its page fault may map: a release every 4 to 7 rows, one per file
    assert 41 // 8 <= len(released) <= 41 // 4 and all(r is rows._pages._mapped[0] for r in released)
    released.clear()
    rows._pages._since_release = 0
    rows[0:300]  # a run of 300 rows of 16 bytes, counted as the 2 MB around it: nothing to release yet
    assert released == []
    # lone rows, one from each slide (a batch drawn over many slides), map as much as scattered rows
    many = StandardizedRows([on_disk[start : start + 4] for start in range(0, 600, 4)])
    np.testing.assert_array_equal(many[np.arange(0, 160, 4)], features[0:160:4].astype(np.float32))
    assert len(released) == 40 // 4


def test_drawn_rows_of_a_memory_map_are_copied_and_their_pages_released(tmp_path, monkeypatch):
    from spade_sd.training import fit

    features = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float16)
    np.save(tmp_path / "features.npy", features)
    on_disk = np.load(tmp_path / "features.npy", mmap_mode="r")
    released = []
    monkeypatch.setattr(fit, "release_pages", released.append)
    picked = np.array([499, 3, 200])
    drawn = fit._read_rows(on_disk[100:], picked)
    assert type(drawn) is np.ndarray and not isinstance(drawn, np.memmap)
    np.testing.assert_array_equal(drawn, features[100:][picked])
    assert len(released) == 1 and released[0].base is not None  # the slide's view of the map: its file is released


def test_streamed_slide_variance_equals_the_whole_slides_at_once(tmp_path, monkeypatch):
    from spade_sd.encoders import features as features_module
    from spade_sd.model.readout import slide_variance
    from spade_sd.training.fit import streamed_slide_variance

    rng = np.random.default_rng(0)
    slides = [rng.normal(loc=3.0, scale=s, size=(n, 12)).astype(np.float16) for n, s in ((70, 1.0), (45, 0.2), (0, 1))]
    mapped = []
    for i, values in enumerate(slides):
        np.save(tmp_path / f"{i}.npy", values)
        mapped.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    monkeypatch.setattr(features_module, "CHUNK_SIZE", 16)  # several blocks per slide
    assert streamed_slide_variance(mapped) == pytest.approx(slide_variance(slides), rel=1e-9)
    assert streamed_slide_variance(mapped[:1]) != pytest.approx(streamed_slide_variance(mapped[1:2]), rel=0.1)


def test_the_joint_output_fits_its_backbone_block_a_block_of_rows_at_a_time(monkeypatch):
    from spade_sd.model.backbone_block import BackboneBlock
    from spade_sd.training import fit

    monkeypatch.setattr(fit, "BLOCK_ROWS", 50)  # several blocks of the drawn rows
    seen = []
    fit_blocks = BackboneBlock.fit_blocks.__func__

    def spy(cls, blocks, n_comps, weight=1.0):
        blocks = list(blocks)
        seen.append([len(x) for x, _ in blocks])
        rows = np.concatenate([x for x, _ in blocks])
        whole = BackboneBlock.fit(rows, np.concatenate([a for _, a in blocks]), n_comps, weight)
        found = fit_blocks(cls, iter(blocks), n_comps, weight)
        np.testing.assert_allclose(found.basis, whole.basis, atol=1e-5)
        np.testing.assert_allclose(found.scale, whole.scale, rtol=1e-6)
        return found

    monkeypatch.setattr(BackboneBlock, "fit_blocks", classmethod(spy))
    features, tables, names, groups, _ = _slides()
    config = _config(output="joint", backbone_comps=5, backbone_weight=0.5)
    model = fit_model(features, tables, names, groups, None, config=config, quiet=True, scalable=True)
    assert seen == [[50] * 7 + [10]]  # all 360 spots (fewer than FIT_SPOTS) in blocks of 50
    assert model.block.basis.shape == (24, 5)
    assert model.embed_features(features[0])[0].shape == (120, 16 + 5)


def test_at_scale_the_slides_statistics_are_gathered_once_for_the_bank_and_the_readout(monkeypatch, tmp_path):
    from spade_sd.training import fit

    features, tables, names, groups, _ = _slides()
    mapped = []
    for name, f in zip(names, features, strict=True):
        np.save(tmp_path / f"{name}.npy", f.astype(np.float16))
        mapped.append(np.load(tmp_path / f"{name}.npy", mmap_mode="r"))
    gather = fit._slide_scalers

    def refused(*args):
        raise AssertionError("the slides' statistics were gathered again")

    monkeypatch.setattr(fit, "_slide_scalers", refused)
    config = _config(representation="backbone+readout", readout_lift=0.5)
    model = fit_model(mapped, tables, names, groups, None, config=config, quiet=True, scalable=True)
    monkeypatch.setattr(fit, "_slide_scalers", gather)
    # gathering them again, as the bank and the read-out did before, gives the same bank and read-out
    bank = fit.reference_bank(model, mapped, tables, names, scalable=True)
    np.testing.assert_array_equal(bank.embedding, model.reference.embedding)
    readout = fit.expression_readout(model, mapped, scalable=True)
    for name, value in readout.to_arrays().items():
        np.testing.assert_array_equal(value, model.readout.to_arrays()[name])


def test_expression_z_scored_as_it_is_read_equals_the_dense_standardization():
    from spade_sd.training.data import ExpressionRows, ZScoredRows
    from spade_sd.training.seal import MIN_GENE_STD, zscore_stats

    rng = np.random.default_rng(2)
    parts = [sparse.random(n, 9, density=0.3, format="csr", random_state=rng, dtype=np.float32) * 5 for n in (7, 30)]
    for part in parts:
        part[:, 4] = 0.0  # a gene never expressed (its zeros stored, even): its std is floored
    parts[1][:, 6] = 3.0  # one expressed everywhere: no zero left out
    dense = np.concatenate([p.toarray() for p in parts])
    mean, std = zscore_stats(dense)
    rows = ExpressionRows(parts)
    np.testing.assert_allclose(rows.column_mean_std()[0], dense.mean(0, dtype=np.float64), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rows.column_mean_std()[1], dense.std(0, dtype=np.float64), rtol=1e-12, atol=1e-15)
    sparse_mean, sparse_std = zscore_stats(rows)
    np.testing.assert_array_equal(sparse_mean, mean)
    np.testing.assert_array_equal(sparse_std, std)
    assert sparse_std[4] == np.float32(MIN_GENE_STD)
    z = ZScoredRows(rows, sparse_mean, sparse_std)
    assert z.shape == dense.shape and len(z) == 37
    picked = np.array([36, 0, 8, 8])
    np.testing.assert_array_equal(z[picked], ((dense - mean) / std)[picked])
    np.testing.assert_array_equal(z[:], (dense - mean) / std)
    with pytest.raises(ValueError, match=r"a mean and a std per gene \(9\)"):
        ZScoredRows(rows, mean[:3], std)


def test_seal_batches_of_memory_mapped_prefixes_release_the_pages_they_map(tmp_path, monkeypatch):
    from spade_sd.training import data
    from spade_sd.training.seal import PrefixRows

    prefixes = np.random.default_rng(0).normal(size=(90, 2, 3)).astype(np.float16)
    np.save(tmp_path / "prefixes.npy", prefixes)
    on_disk = np.load(tmp_path / "prefixes.npy", mmap_mode="r")
    released = []
    monkeypatch.setattr(data, "release_pages", lambda array: released.append(array))
    monkeypatch.setattr(data, "RELEASE_BYTES", 8 * data.FAULT_AROUND_BYTES)
    expression = np.arange(90 * 4, dtype=np.float32).reshape(90, 4)
    dataset = PrefixRows([on_disk[:50], on_disk[50:]], expression, np.arange(90))  # views of one file
    picked = [3, 70, 12, 55, 40, 89, 0, 61, 7, 33]
    x, y = dataset.__getitems__(picked)
    np.testing.assert_array_equal(x.numpy(), prefixes[picked].astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), expression[picked])
    # 10 scattered rows, each counted as the 2 MB its fault may map: one release (of the one file) after 8
    assert len(released) == 1 and released[0] is dataset._pages._mapped[0]
    # prefixes held in memory have no pages to release
    released.clear()
    PrefixRows([prefixes], expression, np.arange(90)).__getitems__(list(range(90)))
    assert released == []
