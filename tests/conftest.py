"""Shared fixtures: the real data sets from ../shared/data (or SPADE_SD_DATA_DIR), a persistent cache, small
synthetic slides and a small model trained on them once per session.

The tests mirror the package's tiers: ``tests/spots``, ``tests/encoders``, ``tests/model`` and ``tests/training``
test those subpackages; the files at the top test the public ``pp``/``tl``/``pl``, ``metrics``, ``datasets`` and
the package as a whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SPADE_SD_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("SPADE_SD_CACHE_DIR", str(ROOT / ".cache"))
DATA_DIR = Path(os.environ["SPADE_SD_DATA_DIR"])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "her2st").is_dir():
        raise RuntimeError(f"The real data sets are expected at {DATA_DIR}; set SPADE_SD_DATA_DIR.")
    return DATA_DIR


@pytest.fixture(scope="session")
def mob1(data_dir):
    import spade_sd as sd

    return sd.datasets.mouse_olfactory_bulb("MOB1")


@pytest.fixture(scope="session")
def her2st_c2(data_dir):
    import spade_sd as sd

    return sd.datasets.her2st("C2")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A fresh, empty feature cache (``SPADE_SD_CACHE_DIR``) for the tests of one module."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("SPADE_SD_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one BLAS/OpenMP thread for the tests of one module.

    Several per process oversubscribe a shared 2-core runner and slow training and k-means ~10x; results do not
    depend on the thread count.
    """
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(previous)


SMALL_PATCH = {"size_um": 64.0, "size_px": 64}


@pytest.fixture(scope="session")
def synthetic_slides():
    """A factory of fresh small synthetic slides (two of 8 × 8 spots by default), which a test may change."""
    import spade_sd as sd

    def make(n_slides: int = 2, *, seed: int = 0, grid: tuple[int, int] = (8, 8), n_genes: int = 60) -> list:
        slides = sd.datasets.synthetic(n_slides=n_slides, grid=grid, mpp=1.0, n_genes=n_genes, seed=seed)
        return slides if n_slides > 1 else [slides]

    return make


@pytest.fixture(scope="session")
def small_model(synthetic_slides):
    """A small model (MorphologyFeatures backbone, 2 experts, 32-d, 3 epochs) on two synthetic slides; do not change it."""
    import spade_sd as sd

    backbone = sd.Backbone(sd.MorphologyFeatures())
    options = {"n_experts": 2, "n_fine": 4, "max_epochs": 3, "out_dim": 32, "n_comps": 8, "quiet": True}
    return sd.tl.pretrain(synthetic_slides(), backbone=backbone, seed=0, **options, **SMALL_PATCH)
