"""Shared fixtures: the real data sets from ../shared/data (or SPADE_SD_DATA_DIR) and a persistent cache."""

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
