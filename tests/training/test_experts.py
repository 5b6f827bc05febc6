from __future__ import annotations

import dataclasses
import logging
import socket

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from spade_sd.config import TrainingConfig
from spade_sd.model.clustering import two_stage_kmeans
from spade_sd.model.heads import ExpertMixture, ProjectionHead
from spade_sd.model.routing import default_tau, expert_weights
from spade_sd.model.standardization import FeatureScaler
from spade_sd.training.data import ExpertBatchSampler, split_by_slide
from spade_sd.training.experts import _keep_generalist_where_better, train_experts
from spade_sd.training.losses import clip_loss, contrastive_loss, soft_target_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(X, Y, expert_idx, slide, *, n_experts, init=None, quiet=False, **options):
    """train_experts with keywords: TrainingConfig fields (loss "soft_target" unless given) and Lightning's."""
    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    config = TrainingConfig(**{"loss": "soft_target", **{k: v for k, v in options.items() if k in names}})
    trainer = {k: v for k, v in options.items() if k not in names}
    return train_experts(
        X, Y, expert_idx, slide, n_experts=n_experts, config=config, init=init, quiet=quiet, trainer_kwargs=trainer
    )


def planted(n=60, n_types=4, n_slides=4, d=64, n_genes=50, seed=0):
    """Four separated "tissue types" over slides; within a type a continuous factor drives both X and Y."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (n_types, d))
    image_loadings = rng.normal(0, 1, (n_types, d, 4))
    mean_expression = rng.normal(2, 1, (n_types, n_genes))
    gene_loadings = rng.normal(0, 0.5, (n_types, n_genes, 4))
    X, Y, slides = [], [], []
    for s in range(n_slides):
        shift = rng.normal(0, 0.3, d)
        for t in range(n_types):
            z = rng.normal(size=(n, 4))
            X.append(centers[t] + z @ image_loadings[t].T + rng.normal(0, 1, (n, d)) + shift)
            Y.append(mean_expression[t] + z @ gene_loadings[t].T + rng.normal(0, 0.1, (n, n_genes)))
            slides += [f"s{s}"] * n
    return np.vstack(X).astype(np.float32), np.vstack(Y).astype(np.float32), np.array(slides)


@pytest.fixture(scope="module")
def data():
    """Slides s0, s1 train, s2 validates, s3 is never seen in training."""
    X, Y, slides = planted()
    seen = slides != "s3"
    scaler = FeatureScaler().fit(X[seen])
    X = scaler.transform(X)
    clustering = two_stage_kmeans(X[seen], slides[seen], n_fine=8, n_experts=4, seed=0)
    return X, Y, slides, seen, clustering


def retrieval(mixture, X, Y, weights):
    """Rank of each spot's own expression among all candidates, by cosine similarity of the embeddings."""
    with torch.no_grad():
        image = F.normalize(mixture.embed_image(torch.from_numpy(X), weights), dim=-1)
        gene = F.normalize(mixture.embed_gene(torch.from_numpy(Y), weights), dim=-1)
    similarity = (image @ gene.T).numpy()
    rank = (similarity > similarity.diagonal()[:, None]).sum(1)
    return (rank < 1).mean(), (rank < 5).mean()


@pytest.mark.parametrize("loss", ["soft_target", "clip"])
def test_training_aligns_images_with_expression_on_an_unseen_slide(data, loss):
    X, Y, slides, seen, clustering = data
    _, expert = clustering.assign(X)
    mixture, history = _train(
        X[seen], Y[seen], expert[seen], slides[seen], n_experts=4, out_dim=128, loss=loss, max_epochs=40,
        val_slides=["s2"], quiet=True, accelerator="cpu",
    )  # fmt: skip
    assert history["val_slides"] == ["s2"]
    assert history["train_spots_per_expert"] == [120] * 4
    assert history["val_loss"][-1] < 0.5 * history["val_loss"][0]
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert history["best_val_loss"] == min(history["val_loss"])

    test = ~seen
    weights = expert_weights(X[test], clustering, tau=default_tau(X[seen], clustering))
    top1, top5 = retrieval(mixture, X[test], Y[test], weights)
    chance = 1 / test.sum()
    logging.getLogger("spade_sd").info("%s: top-1 %.3f, top-5 %.3f, chance %.4f", loss, top1, top5, chance)
    assert top5 > 10 * 5 * chance, top5
    assert top1 > 10 * chance, top1


def tiny_run(data, seed, batch_size=32, **kwargs):
    X, Y, slides, seen, clustering = data
    _, expert = clustering.assign(X)
    return _train(
        X[seen], Y[seen], expert[seen], slides[seen], n_experts=4, out_dim=32, batch_size=batch_size, max_epochs=2,
        val_slides=["s2"], seed=seed, quiet=True, accelerator="cpu", **kwargs,
    )  # fmt: skip


@pytest.mark.cpu_paths
def test_same_seed_same_weights_different_seed_different(data):
    first, history = tiny_run(data, seed=0)
    again, history_again = tiny_run(data, seed=0)
    other, _ = tiny_run(data, seed=1)
    same, different = again.state_dict(), other.state_dict()
    for name, a in first.state_dict().items():
        assert torch.equal(a, same[name]), name
        if name != "logit_scale":  # unused by the soft-target loss, so it keeps its fixed initial value
            assert not torch.equal(a, different[name]), name
    assert history["train_loss"] == history_again["train_loss"]
    X = torch.from_numpy(data[0][:10])
    weights = torch.full((10, 4), 0.25)
    assert torch.equal(first.embed_image(X, weights), again.embed_image(X, weights))


class _SpoilSecondEpoch(L.Callback):
    """Snapshots the weights validated after epoch 0, then ruins them at the start of epoch 1."""

    def on_validation_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.snapshot = {k: v.clone() for k, v in pl_module.mixture.state_dict().items()}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                for p in pl_module.mixture.parameters():
                    p.add_(5 * torch.randn_like(p))


def test_returns_the_weights_of_the_best_epoch_not_the_last(data):
    spoil = _SpoilSecondEpoch()
    mixture, history = tiny_run(data, seed=0, lr=1e-6, callbacks=[spoil])
    assert history["epochs"] == 2 and history["best_epoch"] == 0
    assert history["val_loss"][1] > history["val_loss"][0]
    for name, value in mixture.state_dict().items():
        assert torch.equal(value, spoil.snapshot[name]), name


def test_lightning_ddp_on_two_processes_matches_one_process(data):
    # dropout off: each process draws its own dropout masks, which no single process reproduces.
    # ddp_fork: forked workers skip re-importing torch and lightning (~20 s on 2 cores); after another test
    # initialised CUDA, forking is unsafe and Lightning refuses it, so spawn instead
    strategy = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
    single, single_history = tiny_run(data, seed=0, dropout=0.0, devices=1)
    ddp, ddp_history = tiny_run(data, seed=0, dropout=0.0, devices=2, strategy=strategy, batch_size=16)
    trained = ddp.state_dict()
    # two half-batch gradients averaged across processes sum in another order than one batch: float32 rounding,
    # amplified by Adam's normalisation for weights with tiny gradients (2e-6 seen with torch 2.14 on AMD EPYC)
    for name, a in single.state_dict().items():
        torch.testing.assert_close(trained[name], a, rtol=1e-5, atol=1e-5, msg=name)
    np.testing.assert_allclose(ddp_history["val_loss"], single_history["val_loss"], rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_loss_worker(rank, world, port, state, x, y, loss, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mixture = ExpertMixture(2, x.shape[1], y.shape[1], out_dim=16, dropout=0.0)
        mixture.load_state_dict(state)
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        image, gene = mixture.expert_embeddings(x[rows], y[rows], expert=1)
        value = contrastive_loss(image, gene, loss=loss, logit_scale=mixture.logit_scale)
        value.backward()
        grads = {name: p.grad for name, p in mixture.named_parameters() if p.grad is not None}
        for grad in grads.values():  # what DDP does to parameter gradients
            dist.all_reduce(grad)
            grad /= world
        if rank == 0:
            np.savez(out, loss=value.detach().numpy(), **{k: v.numpy() for k, v in grads.items()})
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss", ["soft_target", "clip"])
def test_gathered_loss_and_gradients_match_one_process(tmp_path, loss):
    torch.manual_seed(0)
    x, y = torch.randn(12, 10), torch.randn(12, 7)
    mixture = ExpertMixture(2, 10, 7, out_dim=16, dropout=0.0)
    image, gene = mixture.expert_embeddings(x, y, expert=1)
    reference = contrastive_loss(image, gene, loss=loss, logit_scale=mixture.logit_scale)
    reference.backward()

    out = tmp_path / "rank0.npz"
    args = (2, _free_port(), mixture.state_dict(), x, y, loss, out)
    mp.start_processes(_ddp_loss_worker, args=args, nprocs=2, start_method="fork")
    result = np.load(out)
    np.testing.assert_allclose(result["loss"], reference.item(), rtol=1e-5)
    expected = {name: p.grad.numpy() for name, p in mixture.named_parameters() if p.grad is not None}
    assert set(result.files) - {"loss"} == set(expected)
    assert any(name.startswith("image_heads.1") for name in expected)
    for name, grad in expected.items():
        np.testing.assert_allclose(result[name], grad, rtol=1e-5, atol=1e-7, err_msg=name)


def test_soft_target_loss_matches_bleep_formula():
    torch.manual_seed(0)
    image, gene = torch.randn(6, 4), torch.randn(6, 4)
    logits = gene @ image.T
    targets = torch.softmax((image @ image.T + gene @ gene.T) / 2, dim=-1)
    rows = -(targets * torch.log_softmax(logits, dim=-1)).sum(1)
    columns = -(targets.T * torch.log_softmax(logits.T, dim=-1)).sum(1)
    torch.testing.assert_close(soft_target_loss(image, gene), ((rows + columns) / 2).mean())


def test_clip_loss_rewards_alignment_and_clamps_the_scale():
    torch.manual_seed(0)
    image = torch.randn(8, 16)
    aligned = clip_loss(image, image * 3.0, torch.tensor(np.log(1 / 0.07)))
    shuffled = clip_loss(image, image[torch.randperm(8)], torch.tensor(np.log(1 / 0.07)))
    assert aligned < 0.05 < shuffled
    huge = torch.tensor(10.0)
    torch.testing.assert_close(
        clip_loss(image, image.flip(0), huge), clip_loss(image, image.flip(0), torch.log(torch.tensor(100.0)))
    )


def test_projection_head_and_routed_mixture():
    torch.manual_seed(0)
    head = ProjectionHead(10, 8, dropout=0.0)
    x = torch.randn(5, 10)
    projected = head.projection(x)
    expected = F.layer_norm(head.fc(F.gelu(projected)) + projected, (8,), head.layer_norm.weight, head.layer_norm.bias)
    torch.testing.assert_close(head(x), expected)

    mixture = ExpertMixture(3, 10, 4, out_dim=8).eval()
    one_hot = torch.eye(3)[[0, 2, 2, 1, 0]]
    torch.testing.assert_close(mixture.embed_image(x, one_hot)[1], mixture.image_heads[2](x)[1])
    soft = torch.tensor([[0.2, 0.3, 0.5]]).repeat(5, 1)
    mixed = sum(soft[:, e, None] * mixture.image_heads[e](x) for e in range(3))
    torch.testing.assert_close(mixture.embed_image(x, soft.numpy()), mixed)
    with pytest.raises(ValueError, match=r"routing weights of shape \(5, 3\)"):
        mixture.embed_gene(torch.randn(5, 4), torch.ones(5, 2))


def test_image_heads_can_start_at_the_backbone_principal_components():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 12)) * np.linspace(4, 1, 12) + 3.0
    mixture = ExpertMixture(2, 12, 5, out_dim=8, dropout=0.0).eval()
    gene_before = [p.clone() for p in mixture.gene_heads.parameters()]
    mixture.start_at_components(features)
    centered = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    coordinates = torch.from_numpy(centered @ vt[:8].T).float()
    x = torch.from_numpy(features).float()
    for head in mixture.image_heads:  # the residual branch is zero: the layer-normalized principal coordinates
        torch.testing.assert_close(head.fc(x[:, :8]), torch.zeros(200, 8))
        out = head(x)
        signs = torch.sign((out * F.layer_norm(coordinates, (8,))).sum(0))  # up to each direction's sign
        torch.testing.assert_close(out, F.layer_norm(coordinates * signs, (8,)), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(gene_before, mixture.gene_heads.parameters(), strict=True))
    # fewer directions than out_dim: the remaining rows keep their random start
    wide = ExpertMixture(1, 12, 5, out_dim=16)
    random_rows = wide.image_heads[0].projection.weight[12:].clone()
    wide.start_at_components(features)
    torch.testing.assert_close(wide.image_heads[0].projection.weight[12:], random_rows)
    with pytest.raises(ValueError, match=r"shape \(n, 12\); found \(200, 3\)"):
        mixture.start_at_components(features[:, :3])
    # blocks of rows (the bounded-memory path): the same start, from their covariance
    blocked = ExpertMixture(2, 12, 5, out_dim=8, dropout=0.0).eval()
    blocked.start_at_components(features[start : start + 32] for start in range(0, 200, 32))
    for ours, theirs in zip(blocked.image_heads, mixture.image_heads, strict=True):
        torch.testing.assert_close(ours.projection.weight, theirs.projection.weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.projection.bias, theirs.projection.bias, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(n, 12\); found \(32, 3\)"):
        blocked.start_at_components(iter([features[:32, :3]]))


def test_backbone_start_trains_and_differs_from_the_random_start(data):
    X, Y, slides, seen, clustering = data
    expert = clustering.assign(X[seen])[1]
    config = TrainingConfig(max_epochs=3, seed=0, warm_start=False)
    runs = {
        init: train_experts(
            X[seen],
            Y[seen],
            expert,
            slides[seen],
            n_experts=4,
            config=dataclasses.replace(config, head_init=init),
            quiet=True,
        )[0]
        for init in ("random", "backbone")
    }
    first = {k: m.image_heads[0].projection.weight.detach() for k, m in runs.items()}
    assert not torch.allclose(first["random"], first["backbone"])
    assert all(torch.isfinite(p).all() for p in runs["backbone"].parameters())


def test_batches_hold_one_expert_and_shard_across_processes():
    expert = np.repeat([0, 1, 2], [10, 7, 1])
    sampler = ExpertBatchSampler(expert, batch_size=4, seed=0)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert len(epoch0) == len(sampler) == 3 + 2  # expert 0: 4+4+2, expert 1: 4+3, expert 2: 1 spot dropped
    for batch in epoch0:
        assert len(set(expert[batch])) == 1 and len(batch) >= 2
    assert sorted(i for b in epoch0 for i in b) == list(range(17))
    assert epoch0 != epoch1

    shards = [list(ExpertBatchSampler(expert, batch_size=2, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    # global batches of 4: expert 0 gives 4+4+2, expert 1 gives 4 and a tail of 3 trimmed to 2
    assert len(shards[0]) == len(shards[1]) == 3 + 2
    for a, b in zip(*shards, strict=True):
        assert len(a) == len(b) and not set(a) & set(b)
        assert len(set(expert[a + b])) == 1


def test_split_holds_out_whole_slides(caplog):
    slide = np.repeat(["a", "b", "c", "d", "e"], 4)
    mask = split_by_slide(slide, val_fraction=0.4, seed=0)
    assert len(np.unique(slide[mask])) == 2 and not set(slide[mask]) & set(slide[~mask])
    np.testing.assert_array_equal(split_by_slide(slide, val_slides=["c"]), slide == "c")
    assert not split_by_slide(slide, val_fraction=0).any()
    with pytest.raises(ValueError, match=r"\['z'\] are not among the slides"):
        split_by_slide(slide, val_slides=["z"])
    with pytest.raises(ValueError, match="every slide"):
        split_by_slide(np.array(["a", "a"]), val_slides=["a"])

    one = np.zeros(100)
    coords = np.column_stack([np.arange(100) % 10, np.arange(100) // 10 * 3.0])  # longer along y
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        block = split_by_slide(one, val_fraction=0.2, coords=coords)
        none = split_by_slide(one, val_fraction=0.2)
    np.testing.assert_array_equal(block, coords[:, 1] >= 24)
    assert not none.any()
    assert "spatially contiguous block" in caplog.text and "training without validation" in caplog.text


def test_expert_without_training_spots_is_reported_not_fatal(data, caplog):
    X, Y, slides, seen, _ = data
    expert = np.where(slides == "s2", 2, (np.arange(len(X)) % 2))[seen]
    with caplog.at_level(logging.WARNING, logger="spade_sd"):
        mixture, history = _train(
            X[seen], Y[seen], expert, slides[seen], n_experts=3, out_dim=16, max_epochs=1, val_slides=["s2"],
            quiet=True, accelerator="cpu",
        )  # fmt: skip
    assert history["untrained_experts"] == [2]
    assert history["train_spots_per_expert"][2] == 0
    assert "Experts [2] have fewer than 2 training spots" in caplog.text
    assert mixture.n_experts == 3


def test_single_slide_without_coordinates_monitors_training_loss(data):
    X, Y, slides, _, clustering = data
    one = slides == "s0"
    _, history = _train(
        X[one], Y[one], clustering.assign(X[one])[1], slides[one], n_experts=4, out_dim=16, max_epochs=3,
        quiet=True, accelerator="cpu",
    )  # fmt: skip
    assert history["monitor"] == "train_loss" and history["best_val_loss"] is None
    assert history["val_loss"] == [] and len(history["train_loss"]) == 3
    assert history["best_loss"] == min(history["train_loss"])


def test_quiet_training_prints_nothing_and_writes_no_files(data, capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_run(data, seed=0)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
    assert list(tmp_path.iterdir()) == []
    assert not torch.are_deterministic_algorithms_enabled()


def test_invalid_inputs_are_explained(data):
    X, Y, slides, _, _ = data
    with pytest.raises(ValueError, match=r"expert_idx must lie in 0..1"):
        _train(X, Y, np.full(len(X), 3), slides, n_experts=2, quiet=True)
    with pytest.raises(ValueError, match=r"loss must be one of \['soft_target', 'clip'\]; found 'triplet'"):
        _train(X, Y, np.zeros(len(X), dtype=int), slides, n_experts=1, loss="triplet", quiet=True)


def test_few_slides_validate_on_a_block_of_each():
    # holding out one of three slides would hide a third of the data from the heads; a block of each keeps all
    slide = np.repeat(["a", "b", "c"], 100)
    grid = np.column_stack([np.arange(100) % 10, np.arange(100) // 10 * 3.0])  # longer along y
    coords = np.concatenate([grid, grid + 1000, grid * 2])  # each slide in its own frame
    mask = split_by_slide(slide, val_fraction=0.2, coords=coords)
    for name in "abc":
        rows = slide == name
        np.testing.assert_array_equal(mask[rows], coords[rows, 1] > np.quantile(coords[rows, 1], 0.8))
    whole = split_by_slide(slide, val_fraction=0.2, coords=coords, min_val_slides=3, seed=0)
    assert len(np.unique(slide[whole])) == 1 and not set(slide[whole]) & set(slide[~whole])
    np.testing.assert_array_equal(split_by_slide(slide, val_slides=["b"], coords=coords), slide == "b")


def test_warm_started_experts_share_the_generalists_space(data):
    """Experts started from one generalist stay in a common coordinate system; independently started ones do not."""
    X, Y, slides, seen, clustering = data
    _, expert = clustering.assign(X[seen])
    # heads started at random: started at the backbone's components, even cold experts would share its space
    options = {"n_experts": clustering.n_experts, "max_epochs": 8, "patience": 8, "loss": "clip", "quiet": True}
    options["head_init"] = "random"
    generalist, _ = _train(X[seen], Y[seen], np.zeros(seen.sum(), int), slides[seen], **{**options, "n_experts": 1})
    warm, history = _train(X[seen], Y[seen], expert, slides[seen], init=generalist, **options)
    cold, _ = _train(X[seen], Y[seen], expert, slides[seen], **options)

    def agreement(mixture: ExpertMixture) -> float:
        # mean cosine similarity of every pair of experts' image embeddings of the same patches
        with torch.inference_mode():
            x = torch.from_numpy(X[~seen])
            out = [F.normalize(head(x), dim=1) for head in mixture.image_heads]
        pairs = [(a * b).sum(1).mean() for i, a in enumerate(out) for b in out[i + 1 :]]
        return float(torch.stack(pairs).mean())

    assert agreement(warm) > 0.5 > agreement(cold) + 0.2
    reset = history["experts_from_generalist"]
    assert set(reset) <= set(range(clustering.n_experts))
    for e in reset:  # reset experts hold exactly the generalist's heads
        for ours, theirs in zip(warm.image_heads[e].parameters(), generalist.image_heads[0].parameters(), strict=True):
            torch.testing.assert_close(ours, theirs)


def test_experts_that_raise_the_validation_loss_get_the_generalists_heads(data):
    X, Y, slides, seen, clustering = data
    _, expert = clustering.assign(X)
    options = {"max_epochs": 8, "patience": 8, "loss": "clip", "quiet": True}
    generalist, _ = _train(X[seen], Y[seen], np.zeros(seen.sum(), int), slides[seen], n_experts=1, **options)
    mixture = ExpertMixture(clustering.n_experts, X.shape[1], Y.shape[1], out_dim=256)
    mixture.start_from(generalist)
    spoilt = int(np.bincount(expert[~seen]).argmax())
    with torch.no_grad():  # one expert's image head is spoilt; the others equal the generalist
        for parameter in mixture.image_heads[spoilt].parameters():
            parameter.add_(torch.randn_like(parameter))
    before = [p.clone() for p in mixture.image_heads[spoilt].parameters()]
    held = ~seen
    reset = _keep_generalist_where_better(mixture, generalist, X[held], Y[held], expert[held], "clip", 1.0)
    assert reset == sorted(set(expert[held].tolist()))  # the spoilt one, and the unchanged ones (equal loss)
    for ours, theirs, spoilt_value in zip(
        mixture.image_heads[spoilt].parameters(), generalist.image_heads[0].parameters(), before, strict=True
    ):
        torch.testing.assert_close(ours, theirs)
        assert not torch.equal(ours, spoilt_value)
    # a spoilt expert with no validation spots is not judged, and nothing is reset without validation spots
    assert _keep_generalist_where_better(mixture, generalist, X[:1], Y[:1], expert[:1], "clip", 1.0) == []


def test_start_from_needs_a_one_expert_mixture_of_the_same_size():
    mixture = ExpertMixture(3, 8, 5, out_dim=16)
    generalist = ExpertMixture(1, 8, 5, out_dim=16)
    mixture.start_from(generalist)
    for head in mixture.image_heads:
        torch.testing.assert_close(head.projection.weight, generalist.image_heads[0].projection.weight)
    with pytest.raises(ValueError, match="one-expert mixture with out_dim 16; found 3 experts"):
        mixture.start_from(ExpertMixture(3, 8, 5, out_dim=16))
