"""output="joint": the aligned coordinates followed by the standardized backbone features, saved and reloaded."""

from __future__ import annotations

import numpy as np
import pytest

import spade_sd as sd
from spade_sd.config import TrainingConfig

FAST = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "quiet": True, "cache": False, "size_um": 64.0, "size_px": 64}


def _channel_statistics(patches: np.ndarray) -> np.ndarray:
    pixels = patches.astype(np.float32) / 255
    return np.concatenate([pixels.mean(axis=(1, 2)), pixels.std(axis=(1, 2))], axis=1)


@pytest.fixture(scope="module")
def trained():
    import torch

    torch.set_num_threads(1)
    backbone = sd.Backbone(_channel_statistics, dim=6, version="channel-statistics")
    slides = sd.datasets.synthetic(n_slides=2, grid=(8, 8), mpp=1.0, n_genes=60, seed=0)
    # X_spade as the heads' output (representation="heads"): the joint block is part of the heads' embedding
    heads = {"representation": "heads", **FAST}
    aligned = sd.tl.pretrain(slides, backbone=backbone, seed=1, **heads)
    joint = sd.tl.pretrain(slides, backbone=backbone, seed=1, output="joint", backbone_comps=4, **heads)
    return backbone, slides, aligned, joint


def test_the_default_output_is_the_aligned_coordinates_only(trained):
    _, _, aligned, _ = trained
    assert TrainingConfig().output == "aligned" and aligned.block is None and aligned.dim == 256


def test_a_joint_embedding_is_the_aligned_one_followed_by_the_backbone_block(trained):
    backbone, slides, aligned, joint = trained
    assert joint.config.training.output == "joint" and joint.dim == 256 + 4
    table = slides[0].tables["table"]
    sd.tl.features(slides[0], backbone=backbone, size_um=64.0, size_px=64, cache=False)
    features = np.asarray(table.obsm["X_backbone"], dtype=np.float32)
    sd.tl.embed(slides[0], joint, cache=False)
    image, gene = table.obsm["X_spade"], table.obsm["X_spade_gene"]
    assert image.shape == gene.shape == (64, 260)
    # the same heads and subspace as training without the block (same seed): the aligned part is unchanged
    sd.tl.embed(slides[0], aligned, cache=False)
    np.testing.assert_allclose(image[:, :256], table.obsm["X_spade"], atol=1e-5)
    # the block is the standardized features' leading components, scaled; the gene side's block is zero
    assert np.all(gene[:, 256:] == 0) and np.abs(image[:, 256:]).max() > 0
    block = image[:, 256:]
    np.testing.assert_allclose(block.var(axis=0).sum(), image[:, :256].var(axis=0).sum(), rtol=0.5)
    np.testing.assert_allclose(block, joint.block.transform(joint.standardize(features)), atol=1e-5)


@pytest.mark.cpu_paths
def test_a_joint_model_saves_and_loads_identically(trained, tmp_path):
    backbone, _, _, joint = trained
    joint.save(tmp_path / "joint")
    again = sd.SpadeModel.load(tmp_path / "joint", backbone=backbone)
    assert again.identity() == joint.identity() and again.dim == joint.dim
    features = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    np.testing.assert_array_equal(again.embed_features(features)[0], joint.embed_features(features)[0])
    assert again.reference.embedding.shape[1] == joint.dim  # the reference bank holds joint embeddings


def test_too_many_backbone_components_are_refused_before_training():
    backbone = sd.Backbone(_channel_statistics, dim=6, version="channel-statistics")
    slides = sd.datasets.synthetic(n_slides=2, grid=(8, 8), mpp=1.0, n_genes=60, seed=0)
    with pytest.raises(ValueError, match=r"backbone_comps must be at most .* = 6; found 7"):
        sd.tl.pretrain(slides, backbone=backbone, output="joint", backbone_comps=7, **FAST)
