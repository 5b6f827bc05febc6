from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2hed
from skimage.draw import disk

from spade_sd.encoders.morphology import MorphologyFeatures, lbp_histogram, rgb2hed_uint8

PINK = (230, 150, 200)  # eosin-stained stroma
PURPLE = (90, 60, 150)  # haematoxylin-stained nucleus
SIZE = 224
RADIUS = 6
GRID = range(16, SIZE - 8, 28)  # 8 x 8 well-separated nuclei


@pytest.fixture(scope="module")
def features() -> MorphologyFeatures:
    return MorphologyFeatures()


def _nuclei_patch() -> tuple[np.ndarray, int]:
    patch = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    patch[:] = PINK
    area = 0
    for row in GRID:
        for col in GRID:
            rr, cc = disk((row, col), RADIUS, shape=patch.shape[:2])
            patch[rr, cc] = PURPLE
            area = len(rr)
    return patch, area


def _column(features: MorphologyFeatures, values: np.ndarray, name: str) -> np.ndarray:
    return values[:, features.feature_names.index(name)]


def test_shape_dtype_and_names(features):
    patches = np.random.default_rng(0).integers(0, 256, (4, 64, 48, 3), dtype=np.uint8)
    values = features(patches)
    assert values.shape == (4, features.dim)
    assert values.dtype == np.float32
    assert 30 <= features.dim <= 60
    assert len(set(features.feature_names)) == features.dim
    assert np.isfinite(values).all()
    assert features(patches[:0]).shape == (0, features.dim)


def test_hed_matches_skimage():
    patches = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(rgb2hed_uint8(patches), rgb2hed(patches), rtol=0, atol=1e-6)


def test_nuclei_dense_patch_versus_eosin_only_and_white(features):
    nuclei, area = _nuclei_patch()
    eosin = np.empty_like(nuclei)
    eosin[:] = PINK
    white = np.full_like(nuclei, 250)
    values = features(np.stack([nuclei, eosin, white]))

    fraction = _column(features, values, "nuclear_fraction")
    count = _column(features, values, "nuclei_per_10k_px") * SIZE**2 / 1e4
    mean_area = _column(features, values, "nucleus_mean_area_px")
    assert fraction[0] == pytest.approx(len(GRID) ** 2 * area / SIZE**2, rel=1e-5)
    assert fraction[1] == fraction[2] == 0
    np.testing.assert_allclose(count, [len(GRID) ** 2, 0, 0], atol=1e-3)
    np.testing.assert_allclose(mean_area, [area, 0, 0], rtol=1e-5)

    assert _column(features, values, "H_mean")[0] > 5 * _column(features, values, "H_mean")[1]
    assert _column(features, values, "E_q50")[1] > 5 * _column(features, values, "E_q50")[2]
    np.testing.assert_allclose(_column(features, values, "tissue_fraction"), [1, 1, 0])


def test_small_specks_are_not_nuclei(features):
    patch = np.empty((1, 64, 64, 3), dtype=np.uint8)
    patch[:] = PINK
    patch[0, 10:12, 10:12] = PURPLE  # 4 pixels, below min_nucleus_area
    patch[0, 30:40, 30:40] = PURPLE
    values = features(patch)
    assert _column(features, values, "nuclei_per_10k_px")[0] * 64**2 / 1e4 == pytest.approx(1)
    assert _column(features, values, "nucleus_mean_area_px")[0] == pytest.approx(100)
    assert _column(features, values, "nuclear_fraction")[0] == pytest.approx(104 / 64**2)


def test_patches_are_described_independently(features):
    # nuclei touching the border of neighbouring patches must not merge across the batch
    rng = np.random.default_rng(2)
    patches = np.empty((5, 40, 40, 3), dtype=np.uint8)
    patches[:] = PINK
    patches[:, :6, :] = PURPLE
    patches[:, -6:, :] = PURPLE
    patches[2, 15:25, 15:25] = rng.integers(0, 256, (10, 10, 3))
    together = features(patches)
    alone = np.concatenate([features(p[None]) for p in patches])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert _column(features, together, "nuclei_per_10k_px")[0] * 40**2 / 1e4 == pytest.approx(2)


def test_texture(features):
    flat = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    stripes = flat.copy()
    stripes[:, :, ::2] = 20
    values = features(np.concatenate([flat, stripes]))
    contrast = _column(features, values, "glcm_contrast_d1")
    assert contrast[0] == 0
    assert contrast[1] > 10
    assert _column(features, values, "glcm_energy_d1")[0] == pytest.approx(1)
    lbp = values[:, [i for i, name in enumerate(features.feature_names) if name.startswith("lbp_")]]
    np.testing.assert_allclose(lbp.sum(1), 1, rtol=1e-5)
    assert lbp[0, 8] == pytest.approx(1)  # a flat image: every neighbour equals its centre


def test_lbp_codes():
    # a dark centre surrounded by brighter pixels is the uniform pattern with all 8 bits set
    spot = np.full((1, 3, 3), 200, dtype=np.uint8)
    spot[0, 1, 1] = 10
    np.testing.assert_array_equal(lbp_histogram(spot), [[0] * 8 + [1, 0]])
    # a bright centre with brighter pixels on alternate sides is not uniform
    chequer = np.array([[[0, 255, 0], [255, 100, 255], [0, 255, 0]]], dtype=np.uint8)
    np.testing.assert_array_equal(lbp_histogram(chequer), [[0] * 9 + [1]])


def test_invalid_input(features):
    with pytest.raises(ValueError, match="expected uint8 RGB patches"):
        features(np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="expected uint8 RGB patches"):
        features(np.zeros((2, 8, 8, 3), dtype=np.float32))


def test_chunked_calls_equal_whole_calls(features):
    patches = np.random.default_rng(3).integers(0, 256, (130, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(features(patches)[128:], features(patches[128:]), rtol=1e-5, atol=1e-6)


def test_repr_and_config():
    morphology = MorphologyFeatures(nuclear_threshold=0.08, glcm_distances=(1, 2, 4))
    assert morphology.to_config()["nuclear_threshold"] == 0.08
    assert "glcm_contrast_d4" in morphology.feature_names
    assert morphology.dim == 37 + 4
    assert repr(morphology).startswith("MorphologyFeatures(nuclear_threshold=0.08")
