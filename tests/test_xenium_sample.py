"""The real Xenium sample (DeepSpot's NCBI858): spatialdata-io's Xenium layout, its counts and an end-to-end run."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy import sparse
from spatialdata.transformations import get_transformation

import spade_sd as sd
from spade_sd.spots.geometry import affine_to

FOLDER = "deepspot_xenium/example_data/data"
# Mean grey under the cells (x_pixel read as the row) is ~138, at random points ~216 and under the swapped reading
# ~213 (the shared data's README: 131, 214, 212): the cells lie on tissue, random points mostly on glass.
DARKER_BY = 40


@pytest.fixture(scope="module")
def xenium(data_dir):
    return sd.datasets.xenium_lung()


def _grey_at(image: np.ndarray, xy: np.ndarray) -> float:
    """Mean grey of a (y, x, c) image at (x, y) pixel positions."""
    col, row = np.floor(xy).astype(int).T
    return float(image[row, col].mean())


def test_layout_is_spatialdata_io_xenium(xenium):
    assert set(xenium.images) == {"he_image"} and set(xenium.shapes) == {"cell_circles"}
    assert set(xenium.tables) == {"table"}
    table, cells = xenium.tables["table"], xenium.shapes["cell_circles"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs == {"region": "cell_circles", "region_key": "region", "instance_key": "cell_id"}
    assert (table.obs["region"] == "cell_circles").all()
    assert cells.index.name == "cell_id" and (table.obs["cell_id"].to_numpy() == cells.index.to_numpy()).all()
    # circles in µm, 20 µm across as the meta json says; µm → Xenium's 0.2125 µm pixels ("global") by a scale
    assert np.allclose(cells["radius"], 10.0)
    to_global = affine_to(cells, "global")
    assert np.allclose(to_global[:2, :2], np.eye(2) / 0.2125) and np.allclose(to_global[:2, 2], 0)
    centers = np.c_[cells.geometry.x, cells.geometry.y]
    assert np.allclose(table.obsm["spatial"], centers)
    assert table.uns["spade_sd"]["technology"] == "Xenium"
    assert np.allclose(table.obs["transcript_counts"], np.asarray(table.X.sum(axis=1)).ravel())


def test_transformations_put_the_cells_on_tissue(xenium, data_dir):
    """Cells mapped through the transformations land on darker (stained) pixels than random points do."""
    from PIL import Image

    cells, image = xenium.shapes["cell_circles"], xenium.images["he_image"]
    level0 = next(iter(image["scale0"].values()))
    global_to_pixels = np.linalg.inv(affine_to(level0, "global"))
    shapes_to_pixels = global_to_pixels @ affine_to(cells, "global")
    centers = np.c_[cells.geometry.x, cells.geometry.y] @ shapes_to_pixels[:2, :2].T + shapes_to_pixels[:2, 2]
    height, width = level0.sizes["y"], level0.sizes["x"]
    assert (centers >= 0).all() and (centers[:, 0] < width).all() and (centers[:, 1] < height).all()

    pixels = np.asarray(Image.open(data_dir / FOLDER / "image" / "NCBI858.jpg").convert("RGB"))
    assert pixels.shape[:2] == (height, width)
    rng = np.random.default_rng(0)
    random = rng.uniform([0, 0], [width, height], size=(2000, 2))
    under_cells, at_random = _grey_at(pixels, centers), _grey_at(pixels, random)
    assert under_cells < at_random - DARKER_BY
    # the other reading of DeepSpot's columns (x_pixel as the column) puts cells off the image, the rest on glass
    swapped = centers[:, ::-1]
    inside = (swapped[:, 0] < width) & (swapped[:, 1] < height)
    assert not inside.all() and _grey_at(pixels, swapped[inside]) > under_cells + DARKER_BY
    # the level-0 image is the JPEG itself, through the same transformation the H&E's other levels share
    assert np.array_equal(level0.transpose("y", "x", "c").to_numpy(), pixels)
    assert set(get_transformation(level0, get_all=True)) == {"global"}


def test_counts_are_the_samples(xenium, data_dir):
    original = ad.read_h5ad(data_dir / FOLDER / "h5ad" / "NCBI858.h5ad")
    table = xenium.tables["table"]
    assert sparse.issparse(table.X)
    assert list(table.var_names) == list(original.var_names) and list(table.obs_names) == list(original.obs_names)
    assert np.array_equal(table.X.toarray(), np.asarray(original.X))
    assert table.n_obs == 200 and table.n_vars == 338


def test_scale_and_patches(xenium):
    patches = sd.pp.spot_patches(xenium)
    geometry = patches.geometry
    assert geometry.mpp == pytest.approx(0.2125 * 10)
    assert geometry.shapes_key == "cell_circles" and geometry.image_key == "he_image"
    # a 20 µm cell is 20 / 2.125 px across in the H&E's pixels
    assert np.allclose(2 * geometry.radius, 20 / geometry.mpp)


def test_unknown_sample_is_refused_naming_the_registered_one(data_dir):
    with pytest.raises(ValueError, match=r"Unknown Xenium lung sample 'NCBI999'.*'NCBI858'"):
        sd.datasets.xenium_lung("NCBI999")


def test_end_to_end_aggregate_pretrain_embed_predict(xenium, cache_dir, one_thread):
    """aggregate → pretrain on the squares → embed the cells → predict their expression: it runs, all finite."""
    sd.pp.aggregate(xenium, shapes_key="cell_circles", size_um=112.0, key_added="pseudo_spots")
    cells, squares = xenium.tables["table"], xenium.tables["pseudo_spots_table"]
    assert squares.obs["n_aggregated"].sum() == cells.n_obs and squares.n_obs < cells.n_obs
    assert np.array_equal(np.asarray(squares.X.sum(axis=0)), np.asarray(cells.X.sum(axis=0)))

    # the classical backbone keeps the test in seconds; what it checks is the sample's way through the tools
    backbone = sd.Backbone(sd.MorphologyFeatures())
    options = {"n_experts": 2, "n_fine": 4, "max_epochs": 2, "out_dim": 16, "quiet": True, "seed": 0}
    model = sd.tl.pretrain(xenium, shapes_key="pseudo_spots", backbone=backbone, **options)
    sd.tl.embed(xenium, model, shapes_key="cell_circles")
    assert cells.obsm["X_spade"].shape[0] == cells.n_obs and np.isfinite(cells.obsm["X_spade"]).all()
    sd.tl.predict_expression(xenium, model, shapes_key="cell_circles", k=10)
    predicted = xenium.tables["spade_predicted"]
    assert predicted.n_obs == cells.n_obs and list(predicted.obs_names) == list(cells.obs_names)
    assert predicted.uns["spatialdata_attrs"]["region"] == "cell_circles"
    assert np.isfinite(predicted.X).all() and predicted.X.std(axis=0).max() > 0
