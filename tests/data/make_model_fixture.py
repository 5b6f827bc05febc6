"""Save a small model with the code of main at ca61673, and the embedding its reloaded copy gives, as a fixture.

Run with that commit's code, e.g. ``git worktree add /tmp/old ca61673`` then
``PYTHONPATH=/tmp/old/src python tests/data/make_model_fixture.py train tests/data`` and, in a new process,
``PYTHONPATH=/tmp/old/src python tests/data/make_model_fixture.py embed tests/data``.
"""

import sys
from pathlib import Path

import numpy as np

import spade_sd as sd

PROBE = {"grid": (8, 8), "mpp": 1.0, "n_genes": 60, "seed": 5}

step, out = sys.argv[1], Path(sys.argv[2])
if step == "train":
    slides = sd.datasets.synthetic(n_slides=2, grid=(8, 8), mpp=1.0, n_genes=60, seed=0)
    model = sd.tl.pretrain(
        slides, n_experts=2, n_fine=4, max_epochs=3, size_um=64.0, size_px=64, seed=0, quiet=True, cache=False
    )
    model.save(out / "model_ca61673")
else:
    model = sd.SpadeModel.load(out / "model_ca61673")
    probe = sd.datasets.synthetic(**PROBE)
    sd.tl.embed(probe, model, cache=False)
    table = probe.tables["table"]
    np.savez(
        out / "model_ca61673_embedding.npz",
        **{k: table.obsm[k] for k in ("X_spade", "X_spade_gene", "X_spade_weights")},
    )
