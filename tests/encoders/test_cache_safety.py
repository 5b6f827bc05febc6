"""Nothing lost, nothing silent: the feature cache never serves one backbone's features to another, never serves a
damaged file, and does not keep what killed processes left behind."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from spade_sd.encoders import features as _features
from spade_sd.encoders.backbone import Backbone
from spade_sd.encoders.features import cache_key, extract_features, iter_features, rereadable_features
from spade_sd.encoders.morphology import MorphologyFeatures
from spade_sd.spots.patches import resolve_patches

NOT_CACHED = "no stable identity"


def channel_means(patches: np.ndarray) -> np.ndarray:
    """A fast stand-in backbone: the mean of each colour channel."""
    return patches.reshape(len(patches), -1, 3).mean(axis=1, dtype=np.float32)


@pytest.fixture
def features_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPADE_SD_CACHE_DIR", str(tmp_path))
    return tmp_path / "features"


@pytest.fixture(scope="module")
def patches(mob1):
    return resolve_patches(mob1, size_px=32)[1]


@pytest.fixture(scope="module")
def means(patches):
    return extract_features(patches, Backbone(channel_means), cache=False)


def _messages(caplog, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


# 1. A backbone's identity changes whenever its outputs can


def test_two_lambdas_never_share_cached_features(features_dir, patches, means, caplog):
    first, second = Backbone(lambda p: channel_means(p)), Backbone(lambda p: channel_means(p) * 2)
    assert not first.stable_identity and not second.stable_identity
    assert first.identity() != second.identity() and first.identity() == first.identity()
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        np.testing.assert_array_equal(extract_features(patches, first), means)
        np.testing.assert_array_equal(extract_features(patches, second), means * 2)
    assert not features_dir.exists() or not any(features_dir.iterdir())
    # one message per extraction, saying why and how to cache
    (said, _) = _messages(caplog, logging.INFO, NOT_CACHED)
    assert 'Backbone(fn, version="...")' in said


def test_an_edited_function_is_not_served_its_old_features(features_dir, patches, means):
    """Two versions of ``user.features`` (same module and qualified name), as when a function is edited."""
    source = "def features(p):\n    return channel_means(p) * {}\n"
    backbones = []
    for factor in (1, 3):
        namespace = {"__name__": "user", "channel_means": channel_means}
        exec(compile(source.format(factor), "user.py", "exec"), namespace)
        backbones.append(Backbone(namespace["features"]))
    assert backbones[0].identity() != backbones[1].identity()
    np.testing.assert_array_equal(extract_features(patches, backbones[0]), means)
    np.testing.assert_array_equal(extract_features(patches, backbones[1]), means * 3)


class _Scaled:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        return channel_means(patches) * self.factor


def test_callable_objects_with_other_parameters_differ(features_dir, patches, means):
    one, two = Backbone(_Scaled(1)), Backbone(_Scaled(2))
    assert not one.stable_identity and one.identity() != two.identity()
    np.testing.assert_array_equal(extract_features(patches, one), means)
    np.testing.assert_array_equal(extract_features(patches, two), means * 2)
    # to_config() still makes a stable identity, as before
    assert Backbone(MorphologyFeatures()).stable_identity
    assert Backbone(MorphologyFeatures()).identity() == Backbone(MorphologyFeatures()).identity()


def test_version_gives_a_stable_cached_identity(features_dir, patches, means, caplog):
    versioned = Backbone(channel_means, version="means 1")
    assert versioned.stable_identity and versioned.version == "means 1"
    assert versioned.identity() == Backbone(channel_means, version="means 1").identity()
    assert versioned.identity() != Backbone(channel_means, version="means 2").identity()
    assert len(versioned.identity()) == 64
    np.testing.assert_array_equal(extract_features(patches, versioned), means)
    assert len(list(features_dir.glob("*.npy"))) == 1
    with caplog.at_level(logging.DEBUG, logger="spade_sd"):  # reading the cache is logged at debug
        np.testing.assert_array_equal(extract_features(patches, Backbone(channel_means, version="means 1")), means)
    assert _messages(caplog, logging.DEBUG, "Reading") and not _messages(caplog, logging.INFO, NOT_CACHED)
    with pytest.raises(ValueError, match="version= applies to a torch.nn.Module or a plain callable"):
        Backbone("resnet18", pretrained=False, version="1")
    with pytest.raises(TypeError, match="non-empty string"):
        Backbone(channel_means, version=1)


def test_unstable_backbone_rereads_a_temporary_file(features_dir, patches, means, caplog):
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        with rereadable_features(patches, Backbone(lambda p: channel_means(p))) as passes:
            for _ in range(2):
                np.testing.assert_array_equal(np.concatenate([c for _, c in passes()]), means)
    assert len(_messages(caplog, logging.INFO, NOT_CACHED)) == 1
    assert not features_dir.exists() or not any(features_dir.iterdir())


class _Power(nn.Module):
    def __init__(self, power: float) -> None:
        super().__init__()
        self.power = power
        self.offset = torch.zeros(3)  # a tensor that is neither a parameter nor a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.abs() + self.offset.view(1, 3, 1, 1)).pow(self.power).mean((2, 3))


def test_module_attributes_are_part_of_the_identity():
    def identity(module: nn.Module) -> str:
        return Backbone(module, engine="torch", input_size=8).identity()

    assert identity(_Power(1.0)) == identity(_Power(1.0))
    assert identity(_Power(1.0)) != identity(_Power(2.0))
    module = _Power(1.0)
    backbone = Backbone(module, engine="torch", input_size=8)
    before = backbone.identity()
    module.power = 3.0  # changed after the backbone was made: the cached identity follows
    assert backbone.identity() != before
    module.power = 1.0
    assert backbone.identity() == before
    module.offset += 1
    assert backbone.identity() != before


# 2. Damaged cache files are removed, with a warning naming them, and computed again


def _damage(path, how: str) -> None:
    data, rows = path.read_bytes(), np.load(path)
    header = data[: len(data) - rows.nbytes]
    if how in ("nan row", "inf value"):
        rows[7] = np.nan
        if how == "inf value":
            rows[7], rows[3, 1] = rows[6], -np.inf
    damaged = {
        "garbage": b"this is not a numpy file at all",
        "zero bytes": b"",
        "truncated": data[:-50],
        "trailing bytes": data + b"\0" * 12,
    }.get(how, header + rows.tobytes())
    path.write_bytes(damaged)


@pytest.mark.parametrize("how", ["garbage", "zero bytes", "truncated", "trailing bytes", "nan row", "inf value"])
def test_damaged_cache_is_removed_and_recomputed(features_dir, patches, means, caplog, how):
    backbone = Backbone(channel_means, version="means 1")
    extract_features(patches, backbone)
    path = features_dir / f"{cache_key(patches, backbone)}.npy"
    _damage(path, how)
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        np.testing.assert_array_equal(extract_features(patches, backbone), means)
    assert _messages(caplog, logging.WARNING, str(path))
    np.testing.assert_array_equal(np.load(path), means)  # written again, sound


def test_no_chunk_is_served_before_the_whole_file_is_checked(features_dir, patches, means, caplog):
    backbone = Backbone(channel_means, version="means 1")
    extract_features(patches, backbone)
    path = features_dir / f"{cache_key(patches, backbone)}.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-4] + np.float32(np.nan).tobytes())  # the very last value
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        stream = iter_features(patches, backbone, chunk_size=64)
        start, first = next(stream)
        assert _messages(caplog, logging.WARNING, str(path))  # found before the first chunk came
        chunks = [first, *(c for _, c in stream)]
    assert start == 0
    np.testing.assert_array_equal(np.concatenate(chunks), means)


# 3. Partial files of killed processes are removed; those of live writers are not


def test_partials_of_killed_processes_are_removed(features_dir, patches, means, caplog):
    features_dir.mkdir(parents=True)
    # a process killed (kill -9) while writing its partial file, through the writer's own code path
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import os, signal
                from pathlib import Path
                from spade_sd.encoders.features import open_locked_npy
                file = open_locked_npy(Path({str(features_dir)!r}) / f"{{'a' * 40}}.{{os.getpid()}}.partial.npy", (9, 3))
                file.write(b"\\0" * 12)
                file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
                """
            ),
        ],
        check=False,
    )
    assert killed.returncode == -9
    (dead,) = features_dir.glob("*.partial.npy")
    dead_pid = int(dead.name.split(".")[1])
    live = features_dir / f"{'b' * 40}.{os.getpid()}.partial.npy"  # this process, writing now
    live.write_bytes(b"\0" * 100)
    reused = features_dir / f"{'c' * 40}.{os.getpid()}.partial.npy"  # written before this process started
    reused.write_bytes(b"\0" * 100)
    day_ago = time.time() - 86400
    os.utime(reused, (day_ago, day_ago))
    elsewhere = features_dir / f"{'d' * 40}.{dead_pid}.partial.npy"  # pid free here, but its writer holds the lock
    other = features_dir / "notes.partial.npy"  # not named by this package
    other.write_bytes(b"")
    with _features.open_locked_npy(elsewhere, (9, 3)), caplog.at_level(logging.INFO, logger="spade_sd"):
        np.testing.assert_array_equal(extract_features(patches, Backbone(channel_means, version="means 1")), means)
        assert elsewhere.exists()
    assert not dead.exists() and not reused.exists()
    assert live.exists() and other.exists()
    (said,) = _messages(caplog, logging.INFO, "partial feature file")
    assert dead.name in said and reused.name in said and live.name not in said
