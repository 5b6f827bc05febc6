"""The ``spade-sd`` command line: end to end in a subprocess on a mouse olfactory bulb store, as a scheduler runs it.

A store is written back element by element, all or nothing: the tests compare every file of the store (its images
above all) before and after a run, and after a failure injected midway.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import spatialdata
from typer.testing import CliRunner

import spade_sd as sd
from spade_sd import cli

STAGING = cli.STAGING_PREFIX
# in a child process: the metadata is consolidated, then the disk fails; the CLI must put the store back
FAILING_DISK = """
import sys
from spatialdata import SpatialData
from spade_sd import cli

consolidate = SpatialData.write_consolidated_metadata

def fail(self):
    consolidate(self)
    raise OSError("injected: the disk failed after the metadata was written")

SpatialData.write_consolidated_metadata = fail
cli.app(sys.argv[1:], prog_name="spade-sd")
"""


def _run(*args: str, cwd: Path, script: str | None = None) -> subprocess.CompletedProcess:
    start = [sys.executable, "-m", "spade_sd.cli"] if script is None else [sys.executable, "-c", script]
    return subprocess.run([*start, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def _files(store: Path, under: str = "") -> dict[str, str]:
    """Every file of the store (or of one folder of it) and its SHA-256."""
    root = store / under
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _staging_left(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if STAGING in p.name]


@pytest.fixture(scope="module")
def mob_folder(tmp_path_factory, data_dir) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    sd.datasets.mouse_olfactory_bulb("MOB1").write(folder / "pristine.zarr")
    return folder


def _fresh_store(folder: Path, name: str) -> Path:
    shutil.copytree(folder / "pristine.zarr", folder / name)
    return folder / name


def test_help_lists_the_commands_with_examples_and_the_version(tmp_path):
    top = _run("--help", cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    for command in ("features", "pretrain", "finetune", "embed", "tile", "predict", "evaluate"):
        assert command in top.stdout
    embed = _run("embed", "--help", cwd=tmp_path)
    assert embed.returncode == 0 and "spade-sd embed MOB3.zarr --model mob_model" in embed.stdout
    version = _run("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.split() == ["spade-sd", sd.__version__]


@pytest.mark.slow
def test_pretrain_embed_predict_write_back_only_their_elements(mob_folder):
    store = _fresh_store(mob_folder, "MOB1.zarr")
    before = _files(store)
    model = mob_folder / "mob_model"
    trained = _run(
        *("pretrain", "MOB1.zarr", "--out", "mob_model", "--epochs", "1", "--n-experts", "1"),
        *("--param", "val_fraction=0", "--accelerator", "cpu"),
        cwd=mob_folder,
    )
    assert trained.returncode == 0, trained.stderr
    assert {"config.json", "model.safetensors"} <= {p.name for p in model.iterdir()}
    assert _files(store) == before  # pretrain only reads its stores

    embedded = _run("embed", "MOB1.zarr", "--model", "mob_model", cwd=mob_folder)
    assert embedded.returncode == 0, embedded.stderr
    after = _files(store)
    # images and shapes untouched: only the table and the store's consolidated metadata change
    untouched = {k for k in before if not k.startswith("tables/") and k != "zarr.json"}
    assert {k: after.get(k) for k in untouched} == {k: before[k] for k in untouched}
    assert after["zarr.json"] != before["zarr.json"]
    table = spatialdata.read_zarr(store).tables["table"]
    assert table.obsm["X_spade"].shape[0] == table.n_obs == 379 and np.isfinite(table.obsm["X_spade"]).all()
    assert table.uns["spade"]["model"]["source"]["path"] == str(model.resolve())  # a later embed finds it

    genes = list(table.var_names[:2])
    predicted = _run("predict", "MOB1.zarr", "-m", "mob_model", "--genes", ",".join(genes), cwd=mob_folder)
    assert predicted.returncode == 0, predicted.stderr
    sdata = spatialdata.read_zarr(store)
    prediction = sdata.tables["spade_predicted"]
    assert list(prediction.var_names) == genes and list(prediction.obs_names) == list(table.obs_names)
    assert "X_spade" in sdata.tables["table"].obsm
    assert _files(store, "images") == {k: v for k, v in before.items() if k.startswith("images/")}
    assert not _staging_left(mob_folder)


@pytest.mark.slow
def test_a_failure_midway_leaves_the_store_readable_and_unchanged(mob_folder):
    store = _fresh_store(mob_folder, "failing.zarr")
    before = _files(store)
    failed = _run("tile", "failing.zarr", cwd=mob_folder, script=FAILING_DISK)
    assert failed.returncode == 1
    assert "injected: the disk failed" in failed.stderr and "Traceback" in failed.stderr
    assert _files(store) == before and not _staging_left(mob_folder)
    sdata = spatialdata.read_zarr(store)
    assert sorted(sdata.shapes) == ["MOB1_spots"] and sorted(sdata.tables) == ["table"]

    tiled = _run("tile", "failing.zarr", "--size-um", "112", cwd=mob_folder)
    assert tiled.returncode == 0, tiled.stderr
    sdata = spatialdata.read_zarr(store)
    assert sdata.tables["tiles_table"].n_obs == len(sdata.shapes["tiles"]) > 0


@pytest.mark.slow
def test_evaluate_and_finetune_only_read_their_stores(mob_folder):
    first = _fresh_store(mob_folder, "eval_MOB1.zarr")
    sd.datasets.mouse_olfactory_bulb("MOB2").write(mob_folder / "eval_MOB2.zarr")
    stores = ["eval_MOB1.zarr", "eval_MOB2.zarr"]
    before = {store: _files(mob_folder / store) for store in stores}
    trained = _run(
        *("pretrain", *stores, "--out", "eval_model", "--max-epochs", "1", "--n-experts", "1"),
        *("--param", "val_fraction=0"),
        cwd=mob_folder,
    )
    assert trained.returncode == 0, trained.stderr

    evaluated = _run(
        *("evaluate", *stores, "--model", "eval_model", "--tasks", "knn", "--out", "results/knn.json"),
        *("--param", "n_top_genes=20"),
        cwd=mob_folder,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    results = pd.read_json(mob_folder / "results" / "knn.json", orient="records")
    # leave one slide out: each section is predicted from the other, for the backbone and the embedding
    assert set(results["encoder"]) == {"X_backbone", "X_spade"} and set(results["task"]) == {"knn"}
    assert results.groupby("encoder")["gene"].nunique().eq(20).all() and results["fold"].nunique() == 2
    assert results["value"].between(-1, 1).all() and results["value"].notna().any()
    again = _run("evaluate", *stores, "--model", "eval_model", "--out", "results/knn.json", cwd=mob_folder)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr

    tuned = _run(
        *("finetune", "eval_MOB1.zarr", "--out", "eval_seal", "--max-epochs", "1", "--n-blocks", "1"),
        *("--param", "size_px=64", "--param", "batch_size=64"),
        cwd=mob_folder,
    )
    assert tuned.returncode == 0, tuned.stderr
    backbone = sd.FineTunedBackbone.from_pretrained(mob_folder / "eval_seal")
    assert (mob_folder / "eval_seal" / "README.md").exists()  # the model card
    patches = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    features = backbone(patches)
    assert features.shape == (2, backbone.dim) and np.isfinite(features).all()
    assert {store: _files(mob_folder / store) for store in stores} == before  # both commands only read
    assert first.exists() and not _staging_left(mob_folder)


def test_bad_input_exits_2_with_the_message_before_any_work(tmp_path):
    missing = _run("embed", "nowhere.zarr", "--model", "mob_model", cwd=tmp_path)
    assert missing.returncode == 2 and "Expected a SpatialData .zarr store" in missing.stderr
    assert "Traceback" not in missing.stderr

    store = tmp_path / "plain.zarr"
    store.mkdir()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("mine")
    taken = _run("pretrain", "plain.zarr", "--out", "kept", cwd=tmp_path)
    assert taken.returncode == 2 and "--out kept exists; pass --overwrite" in taken.stderr
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["mine.txt"]
    not_zarr = _run("pretrain", "plain.zarr", "--out", "new_model", cwd=tmp_path)
    assert not_zarr.returncode == 2 and "found a folder without zarr.json" in not_zarr.stderr
    assert not (tmp_path / "new_model").exists()


def test_the_tools_own_errors_exit_2_and_leave_the_store_alone(tmp_path):
    slide = sd.datasets.synthetic(grid=(6, 6), mpp=1.0, n_genes=20, seed=0)
    slide.write(tmp_path / "s.zarr")
    before = _files(tmp_path / "s.zarr")
    (tmp_path / "model").mkdir()
    runner = CliRunner()
    args = ["embed", str(tmp_path / "s.zarr"), "--model", str(tmp_path / "model")]
    unknown = runner.invoke(cli.app, [*args, "--param", "n_fine=3"])
    assert unknown.exit_code == 2 and "spade_sd.tl.embed has no keyword 'n_fine'" in unknown.stderr
    assert "hard" in unknown.stderr  # the keywords --param takes are listed
    bad_key = runner.invoke(cli.app, [*args, "--key-added", "X_"])
    assert bad_key.exit_code == 2 and "key_added must name something after the 'X_' prefix" in bad_key.stderr
    assert _files(tmp_path / "s.zarr") == before


def _changed_slide(store: Path) -> tuple[spatialdata.SpatialData, list[str], str]:
    """The store read back, its table given a new .obsm and a new table added: what write_back must write."""
    sdata = spatialdata.read_zarr(store)
    fingerprints = cli._fingerprints(sdata)
    (name,) = sdata.tables
    sdata.tables[name].obsm["X_new"] = np.ones((sdata.tables[name].n_obs, 2))
    sdata.tables["extra"] = sdata.tables[name].copy()
    return sdata, cli._changed(sdata, fingerprints), name


def test_write_back_is_all_or_nothing(tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    sd.datasets.synthetic(grid=(6, 6), mpp=1.0, n_genes=20, seed=0).write(store)
    before = _files(store)
    move, consolidate = cli._move, spatialdata.SpatialData.write_consolidated_metadata

    def failing_consolidate(self):
        consolidate(self)
        raise OSError("injected")

    # the new table moved in; the old table moved aside; the new one moved in its place; the metadata rewritten
    for fail_at in (1, 2, 3, "consolidate"):
        sdata, changed, name = _changed_slide(store)
        assert changed == ["tables/extra", f"tables/{name}"]
        moves = []

        def failing_move(source, target, moves=moves, fail_at=fail_at):
            moves.append(source)
            if len(moves) == fail_at:
                raise OSError("injected")
            move(source, target)

        with monkeypatch.context() as patch:
            patch.setattr(cli, "_move", failing_move)
            if fail_at == "consolidate":
                patch.setattr(spatialdata.SpatialData, "write_consolidated_metadata", failing_consolidate)
            with pytest.raises(OSError, match="injected"):
                cli.write_back(sdata, changed)
        assert _files(store) == before and not _staging_left(tmp_path), fail_at
        assert sorted(spatialdata.read_zarr(store).tables) == [name]

    cli.write_back(sdata, changed)
    written = spatialdata.read_zarr(store)
    assert "X_new" in written.tables[name].obsm and "extra" in written.tables
    assert _files(store, "images") == {k: v for k, v in before.items() if k.startswith("images/")}
