"""Save a small model with the code of main at ca61673, and the embedding it gives, as a test fixture."""
import json, sys
from pathlib import Path
import numpy as np
import spade_sd as sd
print(sd.__file__)
out = Path(sys.argv[1])
slides = sd.datasets.synthetic(n_slides=2, grid=(8, 8), mpp=1.0, n_genes=60, seed=0)
model = sd.tl.pretrain(slides, n_experts=2, n_fine=4, max_epochs=3, size_um=64.0, size_px=64, seed=0, quiet=True, cache=False)
model.save(out / "model_ca61673", overwrite=False)
probe = sd.datasets.synthetic(grid=(8, 8), mpp=1.0, n_genes=60, seed=5)
sd.tl.embed(probe, model, cache=False)
table = probe.tables["table"]
np.savez(out / "model_ca61673_embedding.npz", X_spade=table.obsm["X_spade"], X_spade_gene=table.obsm["X_spade_gene"], X_spade_weights=table.obsm["X_spade_weights"])
(out / "model_ca61673_README.md").write_text(
    "A model saved by spade_sd at commit ca61673 (before the weights digest and the package reshaping), with the\n"
    "embedding it gave of `sd.datasets.synthetic(grid=(8, 8), mpp=1.0, n_genes=60, seed=5)`:\n"
    "made by `tests/data/make_model_fixture.py` run with that commit's code. Later versions must load it and embed\n"
    "identically.\n"
)
print(repr(model))
