"""Models that persist and can be shared: save_pretrained/from_pretrained with a model card, models found again after
sdata.write → read_zarr, clear messages when they cannot be, and scanpy's legacy spatial AnnData accepted."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import spatialdata
import timm
import torch
import yaml
from conftest import SMALL_PATCH
from spatialdata_io.experimental import from_legacy_anndata

import spade_sd as sd
from spade_sd.spots.patches import resolve_patches
from spade_sd.tl import _pretrain, _transfer
from spade_sd.utils.constants import SPOT_DIAMETER_UM, SPOT_DIAMETERS_UM

# a fresh, empty feature cache for this module (tests/conftest.py); one thread on the shared runner
pytestmark = pytest.mark.usefixtures("cache_dir", "one_thread")

FILES = ["README.md", "config.json", "model.safetensors"]


@pytest.fixture(scope="module")
def model(synthetic_slides):
    """A small model on the packaged backbone, which a saved model rebuilds by itself (a callable one must be passed)."""
    options = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "out_dim": 16, "quiet": True, "seed": 0}
    return sd.tl.pretrain(synthetic_slides(), backbone=sd.Backbone(input_size=64), **options, **SMALL_PATCH)


@pytest.fixture
def slide(synthetic_slides):
    return synthetic_slides(seed=5)[0]


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if tl.embed trains a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("tl.embed trained a model")

    monkeypatch.setattr(_pretrain, "pretrain", refuse)


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def _with_records_only(sdata):
    """The same elements in a new object: only the .uns records tell its model, as after write and read_zarr."""
    return spatialdata.SpatialData(images=sdata.images, shapes=sdata.shapes, tables=sdata.tables)


def test_save_pretrained_then_from_pretrained_embeds_identically_with_a_model_card(model, slide, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == FILES
    loaded = sd.SpadeModel.from_pretrained(tmp_path / "m")
    assert loaded.identity() == model.identity()
    assert loaded.source == {"path": str((tmp_path / "m").resolve())}
    # no feature cache: the loaded model's backbone, rebuilt from config.json, computes its own features
    sd.tl.embed(slide, model, key_added="X_saved", cache=False)
    sd.tl.embed(slide, loaded, key_added="X_loaded", cache=False)
    obsm = slide.tables["table"].obsm
    for suffix in ("", "_weights", "_gene", "_expr"):
        np.testing.assert_array_equal(obsm[f"X_loaded{suffix}"], obsm[f"X_saved{suffix}"])

    front, body = _card(tmp_path / "m")
    assert front["library_name"] == "spade_sd" and front["license"] == "bsd-3-clause"
    assert "spade_sd" in front["tags"] and "spatial-transcriptomics" in front["tags"]
    config = model.config
    for slide_name in config.slides:
        assert slide_name in body
    assert f"| spots | {config.n_spots} |" in body
    assert f"{len(model.panel)} genes" in body and all(f"`{g}`" in body for g in model.panel.genes[:20])
    assert model.backbone.name in body and model.backbone.identity() in body and model.identity() in body
    assert f"| spade_sd | {config.versions['spade_sd']} |" in body and f"| torch | {config.versions['torch']} |" in body
    assert "## Metrics" not in body  # the model records no evaluation


def test_metrics_given_are_listed_in_the_card_and_bad_ones_refused_before_writing(model, tmp_path):
    model.save_pretrained(tmp_path / "m", metrics={"knn_pearson": 0.372}, license="cc-by-4.0")
    front, body = _card(tmp_path / "m")
    assert front["license"] == "cc-by-4.0" and "## Metrics" in body and "| knn_pearson | 0.372 |" in body
    with pytest.raises(TypeError, match="metrics must be a mapping .* found list"):
        model.save_pretrained(tmp_path / "bad", metrics=[0.372])
    assert not (tmp_path / "bad").exists()


def test_overwrite_replaces_a_saved_model_with_its_card_but_never_a_readme_of_the_users(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m", overwrite=True)
    model.save(tmp_path / "m", overwrite=True)  # the card of the replaced model goes with it
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == FILES[1:]
    mine = tmp_path / "mine"
    model.save(mine)
    (mine / "README.md").write_text("# my notes\n")
    with pytest.raises(FileExistsError, match="other entries as well: README.md"):
        model.save_pretrained(mine, overwrite=True)
    assert (mine / "README.md").read_text() == "# my notes\n"


def test_from_pretrained_says_what_to_do_offline_and_refuses_what_is_no_model(model, slide, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"read as a Hugging Face Hub repository id.*Offline\?.*--local-dir"):
        sd.SpadeModel.from_pretrained("someone/spade-model-that-is-not-cached")
    with pytest.raises(FileNotFoundError, match="no folder .* not a Hugging Face Hub repository id either"):
        sd.SpadeModel.from_pretrained(tmp_path / "no" / "such" / "model")
    (tmp_path / "adapters").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        sd.SpadeModel.from_pretrained(tmp_path / "adapters")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face Hub repository id"):
        sd.tl.embed(slide, model=str(tmp_path / "no" / "such" / "model"))
    assert "X_spade" not in slide.tables["table"].obsm


def test_push_to_hub_uploads_the_save_pretrained_folder(model, monkeypatch):
    uploaded = {}

    class FakeApi:  # tests never push: this stands in for the Hub
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            uploaded["created"] = repo_id

        def upload_folder(self, *, repo_id, folder_path, commit_message):
            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            uploaded["card"] = (Path(folder_path) / "README.md").read_text()
            return type("Commit", (), {"oid": "0" * 40})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    shared = replace(model)  # a copy, so that the module's model keeps no Hub source
    assert shared.push_to_hub("lab/mob-model") == "0" * 40
    assert uploaded["created"] == "lab/mob-model" and uploaded["files"] == FILES
    assert 'SpadeModel.from_pretrained("lab/mob-model")' in uploaded["card"]
    assert shared.source == {"repo_id": "lab/mob-model", "revision": "0" * 40}


def test_embed_records_the_model_path_and_finds_the_model_again_after_write_and_read_zarr(
    model, slide, tmp_path, no_training, caplog
):
    model.save_pretrained(tmp_path / "m")
    sd.tl.embed(slide, model=str(tmp_path / "m"))
    recorded = slide.tables["table"].uns["spade"]["model"]
    assert recorded["identity"] == model.identity()
    assert recorded["source"] == {"path": str((tmp_path / "m").resolve())}
    slide.write(tmp_path / "slide.zarr")

    again = spatialdata.read_zarr(tmp_path / "slide.zarr")
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        sd.tl.embed(again)  # would fail (no_training) if it trained
    assert f"Reusing model {model.identity()}" in caplog.text and str((tmp_path / "m").resolve()) in caplog.text
    np.testing.assert_array_equal(again.tables["table"].obsm["X_spade"], slide.tables["table"].obsm["X_spade"])

    # the tools that never train find it the same way
    fresh = _with_records_only(again)
    sd.tl.predict_expression(fresh, genes=model.panel.genes[:3])
    assert "spade_predicted" in fresh.tables


def test_an_embedding_whose_model_was_moved_or_never_saved_says_so_and_trains(model, slide, tmp_path, caplog):
    model.save_pretrained(tmp_path / "m")
    sd.tl.embed(slide, model=tmp_path / "m")
    shutil.move(tmp_path / "m", tmp_path / "moved")
    trained = []

    def pretrain(sdata, **kwargs):  # stands in for training, which tl.embed does here
        trained.append(sdata)
        return model

    again = _with_records_only(slide)
    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.INFO, logger="spade_sd"):
        patch.setattr(_pretrain, "pretrain", pretrain)
        sd.tl.embed(again)
    assert trained == [again]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    path = str((tmp_path / "m").resolve())
    assert f"made by model {model.identity()}, saved at {path}" in warned and "no longer at that path" in warned
    assert "training a new model" in warned and "model.save_pretrained(path)" in warned

    in_memory = replace(model)  # never saved: no source
    sd.tl.embed(slide, in_memory, key_added="X_memory")
    caplog.clear()
    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.INFO, logger="spade_sd"):
        patch.setattr(_pretrain, "pretrain", pretrain)
        sd.tl.embed(_with_records_only(slide), key_added="X_memory")
    assert "was never saved (no path is recorded)" in caplog.text and len(trained) == 2


def test_another_model_saved_at_the_recorded_path_is_used_with_a_warning_saying_what_differs(
    model, slide, tmp_path, no_training, caplog
):
    model.save_pretrained(tmp_path / "m")
    sd.tl.embed(slide, model=tmp_path / "m")
    other = replace(model, config=replace(model.config, n_spots=model.config.n_spots + 1))
    other.save_pretrained(tmp_path / "m", overwrite=True)
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        sd.tl.embed(_with_records_only(slide))
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "is not the one that made the embedding in .uns['spade'] of table 'table'" in warned
    assert f"(identity {other.identity()})" in warned and f"(identity {model.identity()})" in warned
    assert f"config n_spots {model.config.n_spots} recorded, {model.config.n_spots + 1} found" in warned
    assert slide.tables["table"].uns["spade"]["model"]["identity"] == other.identity()


# ---- FineTunedBackbone --------------------------------------------------------------------------------------

TINY_VIT = {"depth": 3, "img_size": 32, "patch_size": 8, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> sd.Backbone:
    """A tiny timm ViT, randomly initialised, from a local safetensors file (no hub needed)."""
    torch.manual_seed(0)
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
    path = tmp_path_factory.mktemp("vit") / "tiny_vit.safetensors"
    safetensors.torch.save_file(module.state_dict(), path)
    return sd.Backbone("vit_tiny_patch16_224", weights=path, engine="torch", input_size=32, **TINY_VIT)


def test_finetuned_backbone_save_pretrained_then_from_pretrained_gives_identical_features(vit, tmp_path):
    tuned = sd.FineTunedBackbone(vit, rank=4)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapters away from zero, as after training
        for name, parameter in tuned.module.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    genes = [f"gene_{i}" for i in range(30)]
    tuned.attach("seal", {"panel": {"genes": genes}, "history": {"train_spots": 120, "epochs": 2}}, {})
    tuned.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.md", "adapters.json", "adapters.safetensors"]
    loaded = sd.FineTunedBackbone.from_pretrained(tmp_path / "a", base=vit)
    patches = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(loaded(patches), tuned(patches))
    assert loaded.identity() == tuned.identity()

    front, body = _card(tmp_path / "a")
    assert front["library_name"] == "spade_sd" and front["license"] == "bsd-3-clause" and "lora" in front["tags"]
    assert vit.identity() in body and "rank 4" in body and "`vit_tiny_patch16_224`" in body
    assert "30: gene_0, gene_1" in body and "| train_spots | 120 |" in body
    tuned.save(tmp_path / "a", overwrite=True)  # a replaced card goes with its adapters
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapters.json", "adapters.safetensors"]


# ---- scanpy's legacy spatial AnnData ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def legacy_mob(mob1):
    """MOB1 as scanpy lays out a spatial AnnData: full-resolution pixels in obsm['spatial'], a hires image at half
    the resolution and its scale factors in uns['spatial'][library_id]."""
    table = mob1.tables["table"]
    full = mob1.images["MOB1_image"]["scale0"]["image"].values.transpose(1, 2, 0)
    spots = mob1.shapes["MOB1_spots"].loc[table.obs["spot_id"]]
    adata = ad.AnnData(X=table.X.copy(), var=table.var.copy())
    adata.obs_names = table.obs_names
    # scanpy's layout is Visium's; legacy ST's 100 µm spots are told by spade_sd's own obs column
    adata.obs[SPOT_DIAMETER_UM] = SPOT_DIAMETERS_UM["legacy_ST"]
    adata.obsm["spatial"] = np.c_[spots.geometry.x, spots.geometry.y]
    scalefactors = {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 2 * float(spots.radius.iloc[0])}
    adata.uns["spatial"] = {"MOB1": {"images": {"hires": full[::2, ::2].copy()}, "scalefactors": scalefactors}}
    return adata


def test_legacy_anndata_is_converted_embedded_and_given_the_outputs(model, mob1, legacy_mob, caplog):
    adata = legacy_mob.copy()
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        sd.tl.embed(adata, model)
    assert "converted scanpy's legacy AnnData (library 'MOB1', image 'hires')" in caplog.text
    assert (
        adata.obsm["X_spade"].shape == (adata.n_obs, model.representation_dim)
        and np.isfinite(adata.obsm["X_spade"]).all()
    )
    # the scale found through the conversion: the hires image has half the JPEG's resolution
    assert adata.uns["spade"]["params"]["mpp"] == pytest.approx(2 * resolve_patches(mob1, **SMALL_PATCH)[0].mpp, 0.01)
    assert list(adata.obs.columns) == [SPOT_DIAMETER_UM, "spade_expert"] and "spatialdata_attrs" not in adata.uns
    assert (adata.X != legacy_mob.X).nnz == 0  # the counts are the user's, untouched

    # the same as embedding spatialdata-io's conversion oneself, row for row
    converted = from_legacy_anndata(legacy_mob)
    sd.tl.embed(converted, model)
    np.testing.assert_array_equal(adata.obsm["X_spade"], converted.tables["table"].obsm["X_spade"])

    bad = legacy_mob.copy()
    bad.uns["spatial"] = {"MOB1": {"scalefactors": {}}}
    with pytest.raises(TypeError, match=r"legacy spatial AnnData .* holds no images"):
        sd.tl.embed(bad, model)


def test_a_model_pretrained_on_a_legacy_anndata_is_attached_to_it(legacy_mob, monkeypatch, caplog):
    adata = legacy_mob.copy()
    lowres = adata.uns["spatial"]["MOB1"]["images"]["hires"][::4, ::4].copy()
    adata.uns["spatial"]["MOB1"]["images"]["lowres"] = lowres
    adata.uns["spatial"]["MOB1"]["scalefactors"]["tissue_lowres_scalef"] = 0.125
    options = {"n_experts": 2, "n_fine": 4, "max_epochs": 1, "out_dim": 16, "quiet": True}
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        model = sd.tl.pretrain(adata, backbone=sd.Backbone(input_size=64), **options, **SMALL_PATCH)
    assert "converted scanpy's legacy AnnData (library 'MOB1', image 'hires')" in caplog.text  # the finer image

    def refuse(*args, **kwargs):
        raise AssertionError("tl.embed trained a model")

    monkeypatch.setattr(_pretrain, "pretrain", refuse)
    sd.tl.embed(adata)
    assert adata.uns["spade"]["model"]["identity"] == model.identity()


def _state(adata: ad.AnnData) -> dict:
    """What a user sees of an AnnData: its keys, counts and columns, to tell whether a call changed anything."""
    return {
        "obs": adata.obs.copy(),
        "obsm": sorted(adata.obsm),
        "uns": sorted(adata.uns),
        "X": adata.X.copy(),
        "spade_sd": repr(adata.uns.get("spade_sd")),
    }


def _assert_unchanged(adata: ad.AnnData, state: dict) -> None:
    after = _state(adata)
    assert after["obsm"] == state["obsm"] and after["uns"] == state["uns"] and after["spade_sd"] == state["spade_sd"]
    assert (after["X"] != state["X"]).nnz == 0
    assert after["obs"].equals(state["obs"])


@pytest.fixture
def sides(legacy_mob) -> ad.AnnData:
    """MOB1's legacy AnnData with a label column: the spots left and right of the middle of the section."""
    labelled = legacy_mob.copy()
    x = labelled.obsm["spatial"][:, 0]
    labelled.obs["side"] = pd.Categorical(np.where(x < np.median(x), "left", "right"))
    return labelled


def test_query_transfer_labels_and_domains_write_their_outputs_to_a_legacy_anndata(model, legacy_mob, sides, caplog):
    adata = legacy_mob.copy()
    genes = list(model.panel.genes[:2])
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        sd.tl.query(adata, model, genes=genes)
        sd.tl.transfer_labels(adata, model, reference=sides, label_key="side", k=5)
    for tool in ("tl.query", "tl.transfer_labels"):
        assert f"{tool}: converted scanpy's legacy AnnData (library 'MOB1', image 'hires')" in caplog.text
    # the reference, without X_spade, is converted and embedded for the call, and left as it was
    assert "tl.transfer_labels (reference=): converted scanpy's legacy AnnData" in caplog.text
    assert "X_spade" not in sides.obsm and "spade_sd" not in sides.uns
    sd.tl.domains(adata)  # reads .obsm only: the AnnData itself, no conversion

    assert np.isfinite(adata.obs["spade_query"]).all() and adata.uns["spade_query"]["params"]["genes"] == genes
    assert set(adata.obs["spade_labels"].cat.categories) == {"left", "right"}
    probabilities = adata.obsm["spade_labels_probabilities"]
    assert list(probabilities.columns) == ["left", "right"] and np.allclose(probabilities.sum(axis=1), 1)
    assert adata.obs["spade_domain"].notna().all() and adata.uns["spade_domain"]["n_spots"] == adata.n_obs
    assert "X_spade" in adata.obsm  # transfer_labels embedded the slide, as it does a SpatialData
    outputs = adata.uns["spade_sd"]["outputs"]
    assert outputs["obs"] == {
        "spade_expert": "tl.embed",
        "spade_query": "tl.query",
        "spade_labels": "tl.transfer_labels",
        "spade_domain": "tl.domains",
    }
    assert "spatialdata_attrs" not in adata.uns and "region" not in adata.obs
    assert (adata.X != legacy_mob.X).nnz == 0  # the counts are the user's, untouched
    # labels read from the AnnData are not overwritten through its converted copy
    with pytest.raises(ValueError, match=r"cannot write .obs\['spade_labels'\].*this call reads it"):
        sd.tl.transfer_labels(adata, reference=adata, label_key="spade_labels", k=5)

    # the same as running the tools on spatialdata-io's conversion oneself
    converted = from_legacy_anndata(legacy_mob)
    sd.tl.query(converted, model, genes=genes)
    sd.tl.transfer_labels(converted, model, reference=from_legacy_anndata(sides), label_key="side", k=5)
    sd.tl.domains(converted)
    table = converted.tables["table"]
    np.testing.assert_array_equal(adata.obs["spade_query"], table.obs["spade_query"])
    np.testing.assert_array_equal(adata.obs["spade_labels"], table.obs["spade_labels"])
    np.testing.assert_array_equal(adata.obs["spade_domain"], table.obs["spade_domain"])


def test_predict_expression_returns_the_predicted_table_of_a_legacy_anndata(model, legacy_mob, caplog):
    adata = legacy_mob.copy()
    state = _state(adata)
    genes = list(model.panel.genes[:3])
    with caplog.at_level(logging.INFO, logger="spade_sd"):
        predicted = sd.tl.predict_expression(adata, model, genes=genes)
    assert "tl.predict_expression: converted scanpy's legacy AnnData" in caplog.text
    assert "returned" in caplog.text
    _assert_unchanged(adata, state)  # the prediction is returned, not written into the counts' AnnData
    assert isinstance(predicted, ad.AnnData) and list(predicted.var_names) == genes
    assert predicted.obs_names.equals(adata.obs_names) and np.isfinite(predicted.X).all()
    # ready for scanpy: the spots' pixels and the H&E (sc.pl.spatial), none of spatialdata's bookkeeping
    np.testing.assert_array_equal(predicted.obsm["spatial"], adata.obsm["spatial"])
    assert list(predicted.uns["spatial"]) == ["MOB1"] and "hires" in predicted.uns["spatial"]["MOB1"]["images"]
    assert "spatialdata_attrs" not in predicted.uns and predicted.obs.shape[1] == 0
    assert predicted.uns["spade_predicted"]["model"]["identity"] == model.identity()

    converted = from_legacy_anndata(legacy_mob)
    assert sd.tl.predict_expression(converted, model, genes=genes) is None
    np.testing.assert_array_equal(predicted.X, converted.tables["spade_predicted"].X)

    # the AnnData as its own reference: each spot left out of its own prediction, as with the SpatialData's table
    measured = list(adata.var_names[:3])
    sd.tl.embed(adata, model)
    own = sd.tl.predict_expression(adata, model, reference=adata, genes=measured, k=10)
    sd.tl.embed(converted, model)
    table = converted.tables["table"]
    sd.tl.predict_expression(converted, model, reference=table, genes=measured, k=10, key_added="own")
    np.testing.assert_allclose(own.X, converted.tables["own"].X, rtol=1e-6)


def test_a_tool_failing_on_a_legacy_anndata_leaves_it_unchanged(model, legacy_mob, sides, monkeypatch):
    adata = legacy_mob.copy()
    adata.obs["mine"] = 1.0
    state = _state(adata)
    with pytest.raises(ValueError, match=r"tl.query cannot write .obs\['mine'\].*did not write"):
        sd.tl.query(adata, model, genes=list(model.panel.genes[:2]), key_added="mine")
    with pytest.raises(KeyError, match="not_a_gene"):
        sd.tl.query(adata, model, genes=["not_a_gene"])
    with pytest.raises(KeyError, match=r"no .obs\['no_labels'\]"):
        sd.tl.transfer_labels(adata, model, reference=sides, label_key="no_labels")
    with pytest.raises(KeyError, match=r"no .obsm\['X_none'\]"):
        sd.tl.domains(adata, use_rep="X_none")
    with pytest.raises(KeyError, match="not_a_gene"):
        sd.tl.predict_expression(adata, model, genes=["not_a_gene"])
    _assert_unchanged(adata, state)

    # a failure after the slide was embedded: the embedding made for the call does not reach the AnnData either
    def fail(*args, **kwargs):
        raise RuntimeError("classifier failed")

    monkeypatch.setattr(_transfer, "_classified", fail)
    with pytest.raises(RuntimeError, match="classifier failed"):
        sd.tl.transfer_labels(adata, model, reference=sides, label_key="side", k=5)
    _assert_unchanged(adata, state)
