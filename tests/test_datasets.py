from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from scipy import sparse
from xarray import DataTree

import spade_sd as sd
from spade_sd.datasets._registry import fetch, registry


def test_registry_lists_every_file_of_the_shared_registry(data_dir):
    listed = re.findall(r"\| (\w+) \| `([^`]+)` \| \d+ \| `([0-9a-f]{64})`", (data_dir / "REGISTRY.md").read_text())
    entries = registry()
    assert len(entries) == len(listed) == 48  # her2st, stutility_mob, scmuscle_visium, deepspot_xenium
    for dataset, path, sha256 in listed:
        entry = entries[f"{dataset}/{path}"]
        assert entry.sha256 == sha256 and entry.url.startswith("https://") and entry.url.endswith(path)


def test_missing_and_corrupt_files_name_the_file_and_place(tmp_path, data_dir):
    key = "stutility_mob/inst/extdata/counts/alignment_table_MOB1.tsv"
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / key))):
        fetch(key, tmp_path)
    with pytest.raises(FileNotFoundError, match="MOB4"):
        sd.datasets.mouse_olfactory_bulb("MOB4")  # registered upstream, absent here
    (tmp_path / key).parent.mkdir(parents=True)
    shutil.copy(data_dir / key, tmp_path / key)
    assert fetch(key, tmp_path) == tmp_path / key
    with (tmp_path / key).open("a") as handle:
        handle.write("x")
    with pytest.raises(OSError, match=r"alignment_table_MOB1.tsv.*damaged"):
        fetch(key, tmp_path)
    with pytest.raises(ValueError, match=r"Unknown her2st section 'Z9'.*'C2'"):
        sd.datasets.her2st("Z9")


def _check_layout(sdata, n_min: int, mpp_range: tuple[float, float]):
    image_key, shapes_key = next(iter(sdata.images)), next(iter(sdata.shapes))
    image = sdata.images[image_key]
    assert isinstance(image, DataTree) and len(image) >= 2
    level0 = next(iter(image["scale0"].values()))
    assert level0.dims == ("c", "y", "x") and level0.dtype == np.uint8 and level0.shape[0] == 3
    table = sdata.tables["table"]
    assert table.n_obs >= n_min and table.uns["spatialdata_attrs"]["region"] == shapes_key
    counts = table.X.toarray() if sparse.issparse(table.X) else table.X
    assert (counts >= 0).all() and np.allclose(counts, np.round(counts)) and counts.sum() > 0
    assert {"array_row", "array_col"} <= set(table.obs) and table.var_names.is_unique
    geometry = sd.pp.spot_patches(sdata).geometry
    assert mpp_range[0] < geometry.mpp < mpp_range[1]
    diameter_um = 2 * sdata.shapes[shapes_key]["radius"].iloc[0] * geometry.mpp
    if shapes_key.endswith("_spots"):  # legacy ST, circles in pixels of the full-resolution image
        assert diameter_um == pytest.approx(100.0)


def test_real_loaders_layout(her2st_c2, mob1):
    _check_layout(her2st_c2, 150, (0.6, 0.75))
    _check_layout(mob1, 300, (4.2, 5.0))
    assert her2st_c2.tables["table"].n_vars > 10_000 and "ERBB2" in her2st_c2.tables["table"].var_names


def test_visium_muscle_through_spatialdata_io(data_dir):
    sdata = sd.datasets.visium_muscle("Vis5A_2dpi")
    _check_layout(sdata, 900, (5.0, 20.0))  # only the 600-px low-resolution image exists
    assert sdata.tables["table"].uns["spade_sd"]["technology"] == "Visium"
