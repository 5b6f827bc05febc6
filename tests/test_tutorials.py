"""The tutorials in docs/tutorials run as the docs build runs them; the quick start runs here in its fast mode.

The code cells of the MyST notebook are read from the file itself (no Jupyter needed) and executed in order in a
fresh Python process, as a reader running the notebook top to bottom would, with ``SPADE_SD_FAST=1``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "docs" / "tutorials"
CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```[ \t]*$", flags=re.DOTALL | re.MULTILINE)

# what the test reads back from the notebook's own variables once every cell has run
REPORT = """
import json as _json
import numpy as _np
_table = sdata.tables["table"]
_predicted = new.tables["spade_predicted"]
_json.dump(
    {
        "n_obs": int(_table.n_obs),
        "X_spade": list(_table.obsm["X_spade"].shape),
        "X_spade_finite": bool(_np.isfinite(_table.obsm["X_spade"]).all()),
        "leiden": int(_table.obs["spade_leiden"].nunique()),
        "leiden_missing": int(_table.obs["spade_leiden"].isna().sum()),
        "domains": int(_table.obs["spade_domain"].nunique()),
        "new_obs": int(new.tables["table"].n_obs),
        "predicted": list(_predicted.shape),
        "predicted_finite": bool(_np.isfinite(_np.asarray(_predicted.X)).all()),
        "predicted_spread": float(_np.asarray(_predicted.X).std(axis=0).max()),
        "median_r": float(_np.median(r)),
    },
    open(_REPORT_PATH, "w"),
)
"""


def code_cells(notebook: Path) -> list[str]:
    """The source of every ``{code-cell}`` of a MyST markdown notebook, in order."""
    return CODE_CELL.findall(notebook.read_text())


def test_every_tutorial_is_a_python3_myst_notebook_with_code():
    notebooks = sorted(p for p in TUTORIALS.glob("*.md") if p.name != "index.md")
    assert {p.name for p in notebooks} >= {"quickstart_mob.md", "her2st_sections.md", "he_only_and_seal.md"}
    for notebook in notebooks:
        header = notebook.read_text().split("---")[1]
        assert "format_name: myst" in header and "name: python3" in header, notebook.name
        cells = code_cells(notebook)
        assert len(cells) >= 4, notebook.name
        for cell in cells:
            compile(cell, notebook.name, "exec")  # every cell is valid Python as written


@pytest.mark.slow
def test_quickstart_runs_in_fast_mode(tmp_path, data_dir):
    cells = code_cells(TUTORIALS / "quickstart_mob.md")
    report_path = tmp_path / "report.json"
    script = "\n\n".join(
        ["import matplotlib\nmatplotlib.use('Agg')", f"_REPORT_PATH = {str(report_path)!r}", *cells, REPORT]
    )
    (tmp_path / "quickstart.py").write_text(script)
    # the script runs in tmp_path: a data folder given relative to the repository (as CI gives it) is made absolute
    env = {**os.environ, "SPADE_SD_FAST": "1", "SPADE_SD_DATA_DIR": str(data_dir.resolve()), "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "quickstart.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, textwrap.shorten(done.stderr[-4000:], 4000)
    report = json.loads(report_path.read_text())
    assert report["X_spade"][0] == report["n_obs"] > 300 and report["X_spade"][1] > 0
    assert report["X_spade_finite"]
    assert report["leiden"] >= 2 and report["leiden_missing"] == 0
    assert report["domains"] >= 2
    assert report["predicted"][0] == report["new_obs"] > 300 and report["predicted"][1] > 0
    assert report["predicted_finite"] and report["predicted_spread"] > 0  # not one constant profile
    assert report["median_r"] > 0  # the H&E carries expression on the olfactory bulb: better than chance
    assert {p.name for p in tmp_path.iterdir()} == {"quickstart.py", "report.json"}  # it writes nowhere else
