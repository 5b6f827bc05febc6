"""Whole-slide scale: features stream in chunks, the cache is written incrementally, embedding memory stays bounded."""

from __future__ import annotations

import tracemalloc

import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity

import spade_sd as sd
from spade_sd.encoders import features as _features
from spade_sd.encoders.features import extract_features, iter_features
from spade_sd.model import spade_model as _model
from spade_sd.model.clustering import ExpertClustering
from spade_sd.model.heads import ExpertMixture
from spade_sd.model.standardization import FeatureScaler
from spade_sd.spots.genes import GenePanel
from spade_sd.spots.patches import resolve_patches

DIM = 1280
# a plain function's features are cached only under a version (its stable identity)
VERSION = "pixel_statistics 1"
TILE_PX = 224  # 112 µm at 0.5 µm/px


def _tiled_slide(n_side: int, chunk: int = 896) -> SpatialData:
    """A lazily generated single-scale slide covered by ``n_side²`` 112-µm square tiles, as tile_image makes them.

    Each chunk is one grey level plus vertical stripes, one row broadcast over the chunk, so generating pixels costs
    nothing; the stripes make every patch more than one flat colour (a flat patch reads as glass or a failed scan).
    """

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
        row = ((y0 // 7 + x0 // 11) % 180 + 30 + np.arange(x0, x1) % 16).astype(np.uint8)
        return np.broadcast_to(row, (3, y1 - y0, x1 - x0))

    side = n_side * TILE_PX
    blocks = (chunk,) * (side // chunk) + ((side % chunk,) if side % chunk else ())
    lazy = da.map_blocks(block, dtype=np.uint8, chunks=((3,), blocks, blocks))
    image = Image2DModel.parse(lazy, dims=("c", "y", "x"))
    x0, y0 = (a.ravel() for a in np.meshgrid(np.arange(n_side) * TILE_PX, np.arange(n_side) * TILE_PX))
    ids = np.arange(len(x0)).astype(str)
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=shapely.box(x0, y0, x0 + TILE_PX, y0 + TILE_PX), index=ids),
        transformations={"global": Identity()},
    )
    obs = pd.DataFrame({"tile_id": ids, "region": pd.Categorical(["tiles"] * len(ids))}, index=ids)
    table = TableModel.parse(AnnData(obs=obs), region="tiles", region_key="region", instance_key="tile_id")
    table.uns["spade_sd"] = {"mpp": 0.5}
    return SpatialData(images={"slide": image}, shapes={"tiles": shapes}, tables={"table": table})


def pixel_statistics(patches: np.ndarray) -> np.ndarray:
    """A fast stand-in backbone: per-channel means and quartiles, spread over 1280 dimensions."""
    flat = patches.reshape(len(patches), -1, 3).astype(np.float32)
    stats = np.concatenate([flat.mean(axis=1), *np.percentile(flat, [25, 50, 75], axis=1)], axis=1)
    return np.tile(stats, DIM // stats.shape[1] + 1)[:, :DIM] * np.linspace(0.5, 1.5, DIM, dtype=np.float32)


def _model_for(backbone, size_px: int, n_experts: int = 3) -> _model.SpadeModel:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    return _model.SpadeModel(
        backbone=backbone,
        panel=GenePanel(genes=["g0", "g1"]),
        scaler=FeatureScaler(np.full(DIM, 100.0), np.full(DIM, 30.0)),
        clustering=ExpertClustering(
            centroids=rng.normal(size=(6, DIM)).astype(np.float32),
            centroid_expert=np.arange(6) % n_experts,
            centroid_group=np.zeros(6, dtype=int),
            n_experts=n_experts,
        ),
        mixture=ExpertMixture(n_experts, DIM, 2, out_dim=16),
        tau=5.0,
        config={"patches": {"size_um": 112.0, "size_px": size_px}},
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPADE_SD_CACHE_DIR", str(tmp_path))
    return tmp_path / "features"


def test_features_stream_in_chunks_and_cache_incrementally(cache):
    _, patches = resolve_patches(_tiled_slide(7), size_px=32)
    backbone = sd.Backbone(pixel_statistics, dim=DIM, version=VERSION)
    whole = extract_features(patches, backbone, cache=False)
    chunks = list(iter_features(patches, backbone, batch_size=8, chunk_size=20))
    assert [start for start, _ in chunks] == [0, 24, 48]  # chunks are whole batches
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), whole)
    (cached,) = cache.glob("*.npy")
    assert not list(cache.glob("*.partial.npy"))
    np.testing.assert_array_equal(np.load(cached), whole)
    again = list(iter_features(patches, backbone, chunk_size=30))
    assert [start for start, _ in again] == [0, 30]
    np.testing.assert_array_equal(np.concatenate([c for _, c in again]), whole)


def test_interrupted_extraction_leaves_no_cache(cache):
    _, patches = resolve_patches(_tiled_slide(4), size_px=32)
    stream = iter_features(patches, sd.Backbone(pixel_statistics, dim=DIM, version=VERSION), batch_size=4, chunk_size=4)
    next(stream)
    stream.close()
    assert not list(cache.glob("*.npy"))


def test_embed_features_in_chunks_equals_at_once(monkeypatch):
    model = _model_for(sd.Backbone(pixel_statistics, dim=DIM), 32)
    features = np.random.default_rng(1).normal(100, 30, size=(50, DIM)).astype(np.float32)
    expected = model.embed_features(features)
    monkeypatch.setattr(_model, "_CHUNK", 7)
    found = model.embed_features(features)
    for a, b in zip(found, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert [a.shape for a in model.embed_features(features[:0])] == [(0, 16), (0, 3)]


def _embed_peak(n_side: int) -> tuple[SpatialData, int]:
    sdata = _tiled_slide(n_side)
    model = _model_for(sd.Backbone(pixel_statistics, dim=DIM, version=VERSION), 32)
    tracemalloc.start()
    sd.tl.embed(sdata, model, genes=False, batch_size=16)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return sdata, peak


def test_embedding_a_slide_never_holds_all_features(cache, monkeypatch):
    """tl.embed's peak memory grows with the (n, out_dim) embedding, not with the (n_tiles × 1280) features."""
    monkeypatch.setattr(_features, "CHUNK_SIZE", 128)
    _, small = _embed_peak(8)
    sdata, large = _embed_peak(48)  # 2304 tiles, whose features alone take 11.8 MB
    table = sdata.tables["table"]
    embedding = table.obsm["X_spade"]
    assert embedding.shape == (table.n_obs, 16) and np.isfinite(embedding).all()
    features_bytes = table.n_obs * DIM * 4
    assert large - small < features_bytes / 2, (
        f"peak traced memory grew by {(large - small) / 1e6:.1f} MB from 64 to {table.n_obs} tiles; "
        f"their features take {features_bytes / 1e6:.1f} MB"
    )
    # a second run reads the cache chunk by chunk and gives the same embedding
    sd.tl.embed(
        sdata, _model_for(sd.Backbone(pixel_statistics, dim=DIM, version=VERSION), 32), genes=False, key_added="X_again"
    )
    np.testing.assert_array_equal(table.obsm["X_again"], embedding)


def test_reader_processes_read_the_same_patches_in_order(cache, mob1):
    """num_workers > 0 reads batches in DataLoader processes: same patches, same order, same features and cache."""
    _, patches = resolve_patches(mob1, size_px=64)
    batches = list(_features.iter_batches(patches, 48, num_workers=2))
    assert [int(i[0]) for i, _ in batches] == list(range(0, len(patches), 48))
    np.testing.assert_array_equal(np.concatenate([i for i, _ in batches]), np.arange(len(patches)))
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), patches.read(np.arange(len(patches))))
    backbone = sd.Backbone(pixel_statistics, dim=DIM, version=VERSION)
    threaded = extract_features(patches, backbone, batch_size=48, cache=False)
    assert threaded.std(axis=0).max() > 0  # real tissue: patches differ
    np.testing.assert_array_equal(extract_features(patches, backbone, batch_size=48, num_workers=2), threaded)
    assert len(list(cache.glob("*.npy"))) == 1 and not list(cache.glob("*.partial.npy"))


def test_a_failing_reader_process_raises_and_caches_nothing(cache, mob1, monkeypatch):
    _, patches = resolve_patches(mob1, size_px=32)
    read = type(patches).read

    def read_until_64(self, indices, *, scheduler="threads"):
        if indices[0] >= 64:
            raise OSError(f"unreadable patches from {indices[0]}")
        return read(self, indices, scheduler=scheduler)

    monkeypatch.setattr(type(patches), "read", read_until_64)
    with pytest.raises(OSError, match="unreadable patches from 64"):
        extract_features(patches, sd.Backbone(pixel_statistics, dim=DIM, version=VERSION), batch_size=32, num_workers=2)
    assert not list(cache.glob("*.npy"))


@pytest.mark.parametrize("num_workers", [-1, 1.5, True])
def test_bad_num_workers_fails_before_any_work(mob1, num_workers):
    table = mob1.tables["table"]
    before = set(table.obsm)
    with pytest.raises(ValueError, match="num_workers must be a non-negative integer"):
        sd.tl.embed(mob1, _model_for(sd.Backbone(pixel_statistics, dim=DIM), 32), num_workers=num_workers)
    with pytest.raises(ValueError, match="num_workers must be a non-negative integer"):
        sd.tl.features(mob1, backbone=sd.Backbone(pixel_statistics, dim=DIM), num_workers=num_workers)
    assert set(table.obsm) == before


def test_embedding_with_a_saved_model_imports_no_training_libraries(tmp_path):
    """Loading a model and embedding a real slide needs neither Lightning, scikit-learn nor scanpy (~240 MB RSS)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import torch
        import spade_sd as sd
        from spade_sd.model.clustering import ExpertClustering
        from spade_sd.model.heads import ExpertMixture
        from spade_sd.model.standardization import FeatureScaler
        from spade_sd.spots.genes import GenePanel
        from spade_sd.model.spade_model import SpadeModel

        def means(patches):
            return np.repeat(patches.reshape(len(patches), -1, 3).mean(axis=1, dtype=np.float32), 8, axis=1)[:, :16]

        rng = np.random.default_rng(0)
        torch.manual_seed(0)
        backbone = sd.Backbone(means, dim=16)
        model = SpadeModel(
            backbone=backbone,
            panel=GenePanel(genes=["g0"]),
            scaler=FeatureScaler(np.full(16, 128.0), np.full(16, 40.0)),
            clustering=ExpertClustering(
                centroids=rng.normal(size=(4, 16)).astype(np.float32),
                centroid_expert=np.arange(4) % 2,
                centroid_group=np.zeros(4, dtype=int),
                n_experts=2,
            ),
            mixture=ExpertMixture(2, 16, 1, out_dim=8),
            tau=1.0,
            config={{"patches": {{"size_um": 112.0, "size_px": 32}}}},
        )
        model.save({str(tmp_path / "model")!r})
        loaded = SpadeModel.load({str(tmp_path / "model")!r}, backbone=backbone)
        sdata = sd.datasets.mouse_olfactory_bulb("MOB1")
        sd.tl.embed(sdata, loaded, genes=False, cache=False)
        assert np.isfinite(sdata.tables["table"].obsm["X_spade"]).all()
        print(sorted(m for m in ("lightning", "sklearn", "scanpy") if m in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
