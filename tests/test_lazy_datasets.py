"""The real data sets' images load lazily: no level is held in memory, and the pixels are those of the JPEG.

A JPEG is decoded once into per-level array files in the cache; loading then builds dask arrays that read those
files chunk by chunk. dask's ``from_array`` copies any array it is given, so handing it memory maps would put a copy
of every level in memory on each load: these tests would see it in ``tracemalloc`` and in the pickled graph.
"""

from __future__ import annotations

import pickle
import tracemalloc

import dask.array as da
import numpy as np
import pytest
from PIL import Image

from spade_sd.datasets._images import NpyLevel, _write_strips, multiscale_from_file, pyramid_scale_factors
from spade_sd.datasets._registry import fetch, registry
from spade_sd.utils.settings import settings

MOB1_JPEG = "stutility_mob/inst/extdata/counts/MOB1.jpg"
C2_JPEG = "her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg"


def _decoded(key: str) -> np.ndarray:
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(fetch(key)) as image:
        return np.asarray(image.convert("RGB"))


def _halved(pixels: np.ndarray) -> np.ndarray:
    """2 × 2 block means, rounded: how each pyramid level follows from the one above."""
    height, width = pixels.shape[0] // 2, pixels.shape[1] // 2
    block = pixels[: 2 * height, : 2 * width].astype(np.float32).reshape(height, 2, width, 2, -1)
    return np.rint(block.mean(axis=(1, 3))).astype(np.uint8)


def _levels(image) -> list[da.Array]:
    return [next(iter(image[f"scale{i}"].values())).data for i in range(len(image.children))]


def _load(key: str):
    return multiscale_from_file(fetch(key), registry()[key].sha256)


@pytest.fixture
def fresh_cache(tmp_path):
    before = settings._cache_dir
    settings.cache_dir = tmp_path
    yield tmp_path
    settings.cache_dir = before


def test_first_decode_writes_every_level_from_the_jpeg(data_dir, fresh_cache):
    image = _load(MOB1_JPEG)
    expected = _decoded(MOB1_JPEG)
    levels = _levels(image)
    assert len(levels) == 1 + len(pyramid_scale_factors(expected.shape[:2]))
    for level in levels:
        found = level.compute().transpose(1, 2, 0)
        assert found.shape == expected.shape and found.dtype == np.uint8
        np.testing.assert_array_equal(found, expected)
        expected = _halved(expected)
    folder = fresh_cache / "decoded" / registry()[MOB1_JPEG].sha256
    assert sorted(p.name for p in folder.iterdir()) == [f"scale{i}.npy" for i in range(len(levels))]  # no partials
    assert np.load(folder / "scale0.npy").shape == _decoded(MOB1_JPEG).shape


def test_her2st_windows_equal_the_jpeg_and_no_level_is_held(data_dir):
    _load(C2_JPEG)  # decoded into the cache, if not already
    tracemalloc.start()
    image = _load(C2_JPEG)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    levels = _levels(image)
    level0_bytes = levels[0].nbytes
    assert level0_bytes > 250e6  # a 9,911 × 9,274 px section
    assert peak < level0_bytes / 20, f"loading allocated {peak / 1e6:.0f} MB; level 0 is {level0_bytes / 1e6:.0f} MB"
    for level in levels:
        assert isinstance(level, da.Array)
        graph = dict(level.__dask_graph__())
        held = sum(v.nbytes for v in graph.values() if isinstance(v, np.ndarray))
        assert held < 1e6, f"the dask graph holds {held / 1e6:.0f} MB of pixels"
        assert len(pickle.dumps(level)) < 1e6  # reader processes receive file names, not pixels

    expected = _decoded(C2_JPEG)
    for y, x in [(0, 0), (4_000, 5_000), (9_911 - 300, 9_274 - 500)]:
        window = levels[0][:, y : y + 300, x : x + 500].compute().transpose(1, 2, 0)
        np.testing.assert_array_equal(window, expected[y : y + 300, x : x + 500])
    # level 2 of a window aligned to 4 pixels follows from the JPEG by two rounds of 2 × 2 means
    y, x = 4_000, 5_000
    window = levels[2][:, y // 4 : y // 4 + 100, x // 4 : x // 4 + 150].compute().transpose(1, 2, 0)
    np.testing.assert_array_equal(window, _halved(_halved(expected[y : y + 400, x : x + 600])))


def test_reads_touch_only_the_chunks_asked_for(data_dir, monkeypatch):
    image = _load(MOB1_JPEG)
    reads = []
    original = NpyLevel.__getitem__
    monkeypatch.setattr(NpyLevel, "__getitem__", lambda self, key: reads.append(key) or original(self, key))
    level0 = _levels(image)[0]
    level0[:, 10:20, 30:50].compute(scheduler="synchronous")
    assert len(reads) == 1, f"a 10 × 20 px window read {len(reads)} chunks"
    level0[:, :, :].compute(scheduler="synchronous")
    assert len(reads) == 1 + level0.numblocks[1] * level0.numblocks[2]


def test_a_failed_write_leaves_no_cache_file(tmp_path):
    target = tmp_path / "scale0.npy"
    with pytest.raises(RuntimeError, match="Wrote 2 rows of scale0.npy, expected 3"):
        _write_strips(target, (3, 4, 3), [np.zeros((2, 4, 3), np.uint8)])
    assert list(tmp_path.iterdir()) == []
    _write_strips(target, (3, 4, 3), [np.zeros((2, 4, 3), np.uint8), np.full((1, 4, 3), 7, np.uint8)])
    np.testing.assert_array_equal(np.load(target)[2], 7)
    assert [p.name for p in tmp_path.iterdir()] == ["scale0.npy"]
