"""A cohort's features spread over processes: ``spade-sd features`` run at once on two slides sharing one cache.

As SLURM array tasks do (``docs/cli.md``, "A 1,000-slide cohort on SLURM"): each process encodes its own slide
into the shared ``SPADE_SD_CACHE_DIR``, each slide's file is written once and appears whole, and a later
``spade-sd pretrain`` over the cohort reads every feature from the cache and encodes nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import spatialdata
from lightning.fabric.utilities.rank_zero import rank_zero_only
from spatialdata.models import ShapesModel
from typer.testing import CliRunner

import spade_sd as sd
from spade_sd import cli
from spade_sd.encoders.onnx_engine import onnx_path

# Spots kept per section: above the 30 a slide needs for per-slide standardization, few enough to encode quickly
N_SPOTS = 40
# The child runs the command line as installed (the default backbone, convolutional, stays float32: no precision gate)
CHILD = """
import sys
from spade_sd import cli

cli.app(sys.argv[1:], prog_name="spade-sd")
"""


def _files(store: Path) -> dict[str, str]:
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest() for p in store.rglob("*") if p.is_file()
    }


def _small_section(name: str, path: Path) -> Path:
    """A mouse olfactory bulb section cut to its first N_SPOTS spots (image whole), written to ``path``."""
    sdata = sd.datasets.mouse_olfactory_bulb(name)
    table = sdata.tables["table"]
    keep = table.obs.sort_values(["array_col", "array_row"]).index[:N_SPOTS]
    table = table[keep].copy()
    (shapes_key,) = sdata.shapes
    shapes = ShapesModel.parse(sdata.shapes[shapes_key].loc[table.obs["spot_id"]])
    spatialdata.SpatialData(images=dict(sdata.images), shapes={shapes_key: shapes}, tables={"table": table}).write(path)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """Two small sections' stores, and an empty feature cache holding the default backbone's ONNX export.

    The export is copied from the session's cache (made there once if missing), as a cohort's first task leaves it
    for the others: this test is about the features, not about exporting the model.
    """
    folder = tmp_path_factory.mktemp("cohort")
    for name in ("MOB1", "MOB2"):
        _small_section(name, folder / f"{name}.zarr")
    backbone = sd.Backbone()
    export = onnx_path(backbone.identity())
    if not export.is_file():
        backbone(np.zeros((1, 224, 224, 3), dtype=np.uint8))
    cache = folder / "cache"
    (cache / "onnx").mkdir(parents=True)
    shutil.copy2(export, cache / "onnx" / export.name)
    return folder, cache


def _features_process(cache: Path, cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "SPADE_SD_CACHE_DIR": str(cache)}
    command = [sys.executable, "-c", CHILD, "--verbose", "--no-progress", "features", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cache_state(cache: Path) -> dict[str, tuple[int, int]]:
    """Every file of the feature cache with its inode and modification time: a file written again changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cache / "features").iterdir()}


def test_two_processes_cache_each_slide_once_and_pretrain_encodes_nothing(cohort, monkeypatch, tmp_path):
    folder, cache = cohort
    untouched = _files(folder / "MOB2.zarr")
    # two processes at once on one cache, as two array tasks: one writes X_backbone back, one fills the cache only
    running = [
        _features_process(cache, folder, "MOB1.zarr"),
        _features_process(cache, folder, "MOB2.zarr", "--cache-only"),
    ]
    done = [process.communicate(timeout=600) for process in running]
    for process, (_, stderr) in zip(running, done, strict=True):
        assert process.returncode == 0, stderr
        assert stderr.count(f"Encoding {N_SPOTS} patches") == 1  # each process encoded its own slide, once
    cached = sorted((cache / "features").iterdir())
    assert [p.suffix for p in cached] == [".npy", ".npy"]  # one file per slide, and no partial file left
    assert not any("partial" in p.name for p in cached)

    written = spatialdata.read_zarr(folder / "MOB1.zarr").tables["table"].obsm["X_backbone"]
    assert written.shape == (N_SPOTS, 1280)
    assert sum(np.array_equal(np.load(p), written) for p in cached) == 1  # the store got what the cache holds
    assert _files(folder / "MOB2.zarr") == untouched  # --cache-only leaves its store as it was

    # pretrain over both stores, in this process: a backbone that encodes anything fails the test
    before = _cache_state(cache)

    def encode(self, patches):
        raise AssertionError(f"pretrain encoded {len(patches)} patches instead of reading the cache")

    monkeypatch.setattr(sd.Backbone, "__call__", encode)
    monkeypatch.setattr(sd.settings, "progress", sd.settings.progress)  # the command line sets it
    monkeypatch.setenv("SPADE_SD_CACHE_DIR", str(cache))
    stores = [str(folder / "MOB1.zarr"), str(folder / "MOB2.zarr")]
    options = ["--epochs", "1", "--n-experts", "1", "--accelerator", "cpu", "--devices", "1", "--seed", "0"]
    result = CliRunner().invoke(
        cli.app,
        ["--no-progress", "pretrain", *stores, "--out", str(tmp_path / "model"), *options, "-p", "val_fraction=0"],
    )
    assert result.exit_code == 0, result.output
    assert _cache_state(cache) == before  # no file written again, none added
    model = sd.SpadeModel.from_pretrained(tmp_path / "model")
    assert model.history["epochs"] == 1 and sum(model.history["train_spots_per_expert"]) == 2 * N_SPOTS


def _store_stub(folder: Path) -> Path:
    """What the command line takes for a store before reading it: enough to reach the checks of the options."""
    store = folder / "s.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{}")
    return store


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--devices", "two"], "--devices expects a number of devices per node"),
        (["--devices", "0"], "found '0'"),
        (["--devices", "-1,2"], "device indices (e.g. 0,1)"),
        (["--strategy", "dpp"], "Did you mean ddp?"),
        (["--accelerator", "gpus"], "--accelerator expects one of auto, cpu, gpu"),
        (["--num-nodes", "0"], "--num-nodes"),
        (["--param", "devices=2"], "'devices' has its own option"),
    ],
)
def test_lightning_options_are_checked_before_any_work(tmp_path, options, message):
    store = _store_stub(tmp_path)
    result = CliRunner().invoke(cli.app, ["pretrain", str(store), "--out", str(tmp_path / "model"), *options])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "model").exists()


def test_devices_that_srun_did_not_start_are_refused_before_any_work(tmp_path, monkeypatch):
    # what srun sets in each of the 2 processes of `srun --nodes=1 --ntasks-per-node=2`
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "pretrain"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    store = _store_stub(tmp_path)
    result = CliRunner().invoke(cli.app, ["pretrain", str(store), "--out", str(tmp_path / "model"), "--devices", "4"])
    assert result.exit_code == 2 and "--ntasks-per-node=2" in result.output and "devices=2" in result.output
    assert cli._lightning("gpu", "2", 1, "ddp") == {
        "accelerator": "gpu",
        "devices": 2,
        "num_nodes": 1,
        "strategy": "ddp",
    }


def test_lightning_options_reach_the_trainer_as_lightning_takes_them():
    assert cli._lightning("gpu", "4", 2, "ddp") == {
        "accelerator": "gpu",
        "devices": 4,
        "num_nodes": 2,
        "strategy": "ddp",
    }
    assert cli._lightning(None, "0,2", None, None) == {"devices": [0, 2]}
    assert cli._lightning(None, "auto", None, "auto") == {"devices": "auto", "strategy": "auto"}
    assert cli._lightning(None, "-1", None, "ddp_fork") == {"devices": -1, "strategy": "ddp_fork"}
    assert cli._lightning(None, None, None, None) == {}


def test_features_cache_only_refuses_to_keep_the_features_nowhere(tmp_path):
    store = _store_stub(tmp_path)
    result = CliRunner().invoke(cli.app, ["features", str(store), "--cache-only", "--param", "cache=False"])
    assert result.exit_code == 2 and "would keep them nowhere" in result.output
    assert _files(store) == {"zarr.json": hashlib.sha256(b"{}").hexdigest()}


def test_only_the_first_training_process_saves_the_model(tmp_path, monkeypatch):
    class Model:
        def save_pretrained(self, out, overwrite):
            Path(out).mkdir()

    monkeypatch.setattr(rank_zero_only, "rank", 1)  # as Lightning sets it in the second process of a DDP job
    cli._save(Model(), tmp_path / "by_rank_1", overwrite=False)
    assert not (tmp_path / "by_rank_1").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    cli._save(Model(), tmp_path / "by_rank_0", overwrite=False)
    assert (tmp_path / "by_rank_0").is_dir()


def test_threads_set_the_backbone_threads_and_a_bad_number_exits_2(tmp_path, monkeypatch):
    for name in ("n_jobs", "progress"):  # the command line sets both for the whole process
        monkeypatch.setattr(sd.settings, name, getattr(sd.settings, name))
    store = _store_stub(tmp_path)
    bad = CliRunner().invoke(cli.app, ["--threads", "0", "features", str(store)])
    assert bad.exit_code == 2 and "Invalid value for --threads" in bad.output
    refused = CliRunner().invoke(
        cli.app, ["--threads", "3", "features", str(store), "--cache-only", "-p", "cache=False"]
    )
    assert refused.exit_code == 2 and sd.settings.n_jobs == 3  # set before the command ran
