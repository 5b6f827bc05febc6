"""tl.pretrain over a cohort list on two processes (Lightning DDP on CPU, gloo), as a cluster job would run it.

``ddp_fork``: the two training processes are forked from the test's, so they skip importing torch and Lightning
again; after another test initialised CUDA forking is unsafe (Lightning refuses it), so they are spawned instead.
Everything but the heads' training (clustering, subspaces, reference bank) runs once, in the calling process, which
gets rank 0's weights back.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from conftest import SMALL_PATCH

import spade_sd as sd


class _RankWeights(L.Callback):
    """Every training process writes its starting and final weights (the best epoch's, restored) to ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = {k: v.detach().cpu().clone() for k, v in pl_module.mixture.state_dict().items()}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.mixture.state_dict().items()}
        record = {"world_size": trainer.world_size, "start": self.start, "state": state}
        torch.save(record, self.folder / f"rank{trainer.global_rank}.pt")


def test_pretrain_on_two_processes_trains_one_model_identical_on_every_rank(synthetic_slides, tmp_path):
    strategy = "ddp_spawn" if torch.cuda.is_initialized() else "ddp_fork"
    options = {"n_experts": 2, "n_fine": 3, "max_epochs": 2, "out_dim": 16, "reference_size": 40, "quiet": True}
    model = sd.tl.pretrain(
        synthetic_slides(n_slides=4, grid=(6, 6)),  # 4 slides: one is held out whole for validation
        backbone=sd.Backbone(sd.MorphologyFeatures()),
        warm_start=False,
        batch_size=8,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=[_RankWeights(tmp_path)],
        **options,
        **SMALL_PATCH,
    )
    history = model.history
    assert history["epochs"] == 2 and np.isfinite(history["train_loss"]).all()
    assert len(history["val_slides"]) == 1 and sum(history["train_spots_per_expert"]) == 3 * 36
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and not (tmp_path / "rank2.pt").exists()
    returned = model.mixture.state_dict()
    for name, value in returned.items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name  # in step on every rank
        assert torch.equal(value, ranks[0]["state"][name]), name  # the model holds what the ranks trained
    assert any(not torch.equal(v, ranks[0]["start"][k]) for k, v in returned.items())  # and training moved them
    # saved once, by the one process that holds the model, and it loads back with the same weights
    model.save_pretrained(tmp_path / "model")
    again = sd.SpadeModel.from_pretrained(tmp_path / "model", backbone=model.backbone)
    assert all(torch.equal(v, again.mixture.state_dict()[k]) for k, v in returned.items())
