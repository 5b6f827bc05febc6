"""The feature cache in float16 (``sd.settings.feature_cache_dtype``): its own files, float32 out, overflow refused."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
from conftest import SMALL_PATCH

import spade_sd as sd
from spade_sd.encoders.features import (
    CACHE_FORMAT,
    as_float32,
    cache_key,
    extract_features,
    iter_features,
    mapped_features,
)
from spade_sd.spots.patches import resolve_patches

DIM = 48
# float16 keeps 11 significant bits: a value rounds to within half a unit in the last place, 2**-11 of it
FLOAT16_RTOL = 2.0**-11


def channel_statistics(patches: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """A fast stand-in backbone: per-channel means and quartiles, spread over ``DIM`` columns of growing weight."""
    flat = patches.reshape(len(patches), -1, 3).astype(np.float32)
    stats = np.concatenate([flat.mean(axis=1), *np.percentile(flat, [25, 50, 75], axis=1)], axis=1)
    weights = scale * np.linspace(0.01, 1.5, DIM, dtype=np.float32)
    return (np.tile(stats, DIM // stats.shape[1])[:, :DIM] * weights).astype(np.float32)


def backbone(scale: float = 1.0) -> sd.Backbone:
    return sd.Backbone(lambda p: channel_statistics(p, scale), dim=DIM, version=f"channel statistics ×{scale}")


@pytest.fixture
def features_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPADE_SD_CACHE_DIR", str(tmp_path))
    yield tmp_path / "features"
    sd.settings.feature_cache_dtype = "float32"


@pytest.fixture(scope="module")
def patches(synthetic_slides):
    return resolve_patches(synthetic_slides(n_slides=1, grid=(6, 6))[0], **SMALL_PATCH)[1]


@pytest.mark.parametrize("value", ["float64", "fp16", "FLOAT16", np.float16, None, 16])
def test_an_invalid_setting_is_refused(value):
    with pytest.raises(ValueError, match=r"feature_cache_dtype must be one of \['float32', 'float16'\].*found"):
        sd.settings.feature_cache_dtype = value
    assert sd.settings.feature_cache_dtype == "float32"


def test_float16_files_have_their_own_key_and_the_float32_key_is_unchanged(features_dir, patches):
    encoder = backbone()
    digest = hashlib.blake2b(digest_size=20)  # the key as it was computed before float16 existed
    for part in (CACHE_FORMAT, patches.fingerprint(), encoder.feature_identity()):
        digest.update(part.encode())
    assert cache_key(patches, encoder) == cache_key(patches, encoder, "float32") == digest.hexdigest()
    sd.settings.feature_cache_dtype = "float16"
    assert cache_key(patches, encoder) == cache_key(patches, encoder, np.float16) != digest.hexdigest()


def test_float16_round_trip_equals_the_float32_features_to_float16_precision(features_dir, patches):
    encoder = backbone()
    exact = extract_features(patches, encoder, cache=False)
    sd.settings.feature_cache_dtype = "float16"
    computed = list(iter_features(patches, encoder, batch_size=8, chunk_size=16))
    read = list(iter_features(patches, encoder, chunk_size=16))
    (path,) = features_dir.glob("*.npy")
    assert path.name == f"{cache_key(patches, encoder, 'float16')}.npy"
    on_disk = np.load(path)
    assert on_disk.dtype == np.float16 and path.stat().st_size < exact.nbytes / 2 + 200  # half, and a header
    for chunks in (computed, read):  # served as float32: the stored values, whether computed now or read back
        assert all(chunk.dtype == np.float32 for _, chunk in chunks)
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), on_disk.astype(np.float32))
    np.testing.assert_allclose(on_disk.astype(np.float32), exact, rtol=FLOAT16_RTOL, atol=0)
    assert not np.array_equal(on_disk.astype(np.float32), exact)  # it was rounded
    mapped = mapped_features(patches, encoder)
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float16
    np.testing.assert_array_equal(mapped, on_disk)
    # back to float32: the other precision's file is never read; the float32 features are exact
    sd.settings.feature_cache_dtype = "float32"
    np.testing.assert_array_equal(extract_features(patches, encoder), exact)
    assert len(list(features_dir.glob("*.npy"))) == 2


def test_a_file_of_the_other_precision_under_the_key_is_removed_and_recomputed(features_dir, patches, caplog):
    encoder = backbone()
    sd.settings.feature_cache_dtype = "float16"
    stored = extract_features(patches, encoder)
    path = features_dir / f"{cache_key(patches, encoder)}.npy"
    np.save(path, stored)  # float32 values where float16 ones belong
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        np.testing.assert_array_equal(extract_features(patches, encoder), stored)
    assert any("expected float16" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert np.load(path).dtype == np.float16


def test_features_beyond_float16_are_refused_and_nothing_is_cached(features_dir, patches):
    large = backbone(scale=1000.0)  # up to 255 × 1.5 × 1000: beyond float16's 65,504
    sd.settings.feature_cache_dtype = "float16"
    with pytest.raises(OverflowError, match=r"beyond float16's largest finite value 65504.*'float32'"):
        extract_features(patches, large, batch_size=8)
    assert not list(features_dir.glob("*.npy"))  # neither a cache file nor a partial one
    with pytest.raises(OverflowError):
        mapped_features(patches, large)
    assert not list(features_dir.glob("*.npy"))
    sd.settings.feature_cache_dtype = "float32"  # float32 takes them
    assert np.abs(extract_features(patches, large)).max() > np.finfo(np.float16).max
    assert len(list(features_dir.glob("*.npy"))) == 1


def test_float16_rows_are_converted_exactly():
    every = np.arange(2**16, dtype=np.uint16).view(np.float16)  # every float16, subnormals, infinities and NaNs
    converted = as_float32(every.reshape(256, 256)[::2])  # a strided view, as a memory map's rows may be
    assert converted.dtype == np.float32
    np.testing.assert_array_equal(converted, every.reshape(256, 256)[::2].astype(np.float32))
    values = np.ones((3, 2), dtype=np.float32)
    assert as_float32(values) is values


def _pretrain_at_scale(monkeypatch, slides) -> tuple[sd.SpadeModel, list[np.ndarray], np.ndarray]:
    """tl.pretrain forced onto the bounded-memory path: the model, the memory maps it trained on, ``X_spade_expr``."""
    from helpers import pretrain_at_scale

    model, features = pretrain_at_scale(monkeypatch, slides, backbone(), max_epochs=2, seed=0)
    for sdata in slides:
        sd.tl.embed(sdata, model, genes=False)
    return model, features, np.concatenate([s.tables["table"].obsm["X_spade_expr"] for s in slides])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_pretrain_on_a_float16_cache_trains_and_embeds_as_on_float32(features_dir, monkeypatch, synthetic_slides):
    slides = synthetic_slides(grid=(6, 6))
    model32, features32, embedding32 = _pretrain_at_scale(monkeypatch, slides)
    sd.settings.feature_cache_dtype = "float16"
    model16, features16, embedding16 = _pretrain_at_scale(monkeypatch, slides)
    assert all(f.dtype == np.float32 for f in features32) and all(f.dtype == np.float16 for f in features16)
    assert len(list(features_dir.glob("*.npy"))) == 4  # each slide in each precision
    for f16, f32 in zip(features16, features32, strict=True):
        np.testing.assert_allclose(f16.astype(np.float32), f32, rtol=FLOAT16_RTOL, atol=0)
    # the same experts for every reference spot; the heads' embedding (spread 1 per coordinate) moved 0.03 at most
    # here, as 2 epochs from the same seed carry the features' rounding (2**-12 of each value, about 4e-3 of a
    # standardized feature) through training: 0.1 and a cosine of 0.999 leave room for other CPUs' rounding
    assert model16.n_experts == model32.n_experts
    np.testing.assert_array_equal(model16.reference.expert, model32.reference.expert)
    np.testing.assert_allclose(embedding16, embedding32, rtol=0, atol=0.1 * embedding32.std())
    assert _cosine(embedding16, embedding32).min() > 0.999
    heads = [model.embed_features(np.concatenate(features32))[0] for model in (model16, model32)]
    assert _cosine(*heads).min() > 0.999
