from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_import_is_light():
    loaded = _modules_after("import spade_sd")
    assert not {"torch", "timm", "lightning", "spatialdata", "scanpy"} & loaded


def test_public_submodules_do_not_import_torch():
    loaded = _modules_after("import spade_sd as sd\nsd.pp, sd.tl, sd.pl, sd.datasets, sd.GenePanel")
    assert "spatialdata" in loaded and not {"torch", "timm", "lightning", "onnxruntime"} & loaded


def test_public_names():
    import spade_sd as sd

    assert {"pp", "tl", "pl", "datasets", "Backbone", "SpadeModel", "GenePanel"} <= set(dir(sd))
    assert callable(sd.pp.spot_patches) and callable(sd.tl.pretrain) and callable(sd.pl.experts)
