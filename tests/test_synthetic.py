from __future__ import annotations

import itertools

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import spatialdata
from scipy import sparse
from spatialdata.transformations import Identity, get_transformation
from xarray import DataTree

from spade_sd.datasets._synthetic import synthetic

SAMPLE = "synthetic_0"
MPP = 1.0


@pytest.fixture(scope="module")
def sdata() -> spatialdata.SpatialData:
    return synthetic(grid=(12, 12), mpp=MPP, seed=0)


@pytest.fixture(scope="module")
def spot_pixels(sdata) -> tuple[np.ndarray, np.ndarray]:
    """Mean RGB and dark-pixel fraction inside each spot's circle, measured on the level-0 image."""
    image = sdata.images[f"{SAMPLE}_image"]["scale0"]["image"].values.astype(float)
    spots = sdata.shapes[f"{SAMPLE}_spots"]
    colours, dark = [], []
    for point, radius in zip(spots.geometry, spots["radius"], strict=True):
        i0, j0 = int(point.y - radius), int(point.x - radius)
        patch = image[:, i0 : int(point.y + radius) + 1, j0 : int(point.x + radius) + 1]
        ii, jj = np.ogrid[i0 : i0 + patch.shape[1], j0 : j0 + patch.shape[2]]
        pixels = patch[:, (ii + 0.5 - point.y) ** 2 + (jj + 0.5 - point.x) ** 2 <= radius**2]
        colours.append(pixels.mean(axis=1))
        dark.append((pixels.mean(axis=0) < 130).mean())
    return np.array(colours), np.array(dark)


def _log_normalised(table) -> np.ndarray:
    counts = table.X.toarray()
    return np.log1p(1e4 * counts / counts.sum(axis=1, keepdims=True))


def _demean_by(values: np.ndarray, labels: pd.Series) -> np.ndarray:
    return values - pd.Series(values).groupby(labels.to_numpy()).transform("mean").to_numpy()


def test_layout(sdata):
    assert set(sdata.images) == {f"{SAMPLE}_image"}
    assert set(sdata.shapes) == {f"{SAMPLE}_spots"}
    assert set(sdata.tables) == {"table"}

    image = sdata.images[f"{SAMPLE}_image"]
    assert isinstance(image, DataTree)
    assert len(image.children) >= 2
    level0 = image["scale0"]["image"]
    assert level0.dims == ("c", "y", "x")
    assert list(level0.coords["c"].values) == ["r", "g", "b"]
    assert level0.dtype == np.uint8
    assert level0.shape == (3, 1400, 1400)  # (12 + 2 margins) × 100 µm at 1 µm/px
    assert isinstance(get_transformation(image, "global"), Identity)

    spots = sdata.shapes[f"{SAMPLE}_spots"]
    assert isinstance(spots, gpd.GeoDataFrame)
    assert (spots.geom_type == "Point").all()
    assert isinstance(get_transformation(spots, "global"), Identity)

    table = sdata.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == (f"{SAMPLE}_spots", "region", "spot_id")
    assert sparse.isspmatrix_csr(table.X)
    assert table.X.dtype in (np.float32, np.int32)
    assert np.array_equal(table.X.data, np.round(table.X.data))
    assert table.var_names[0] == "gene_0000"
    assert list(table.obs["spot_id"]) == list(spots.index)
    assert all(isinstance(i, str) for i in spots.index)
    for column in ("region", "sample", "tissue_type"):
        assert isinstance(table.obs[column].dtype, pd.CategoricalDtype)
    assert (table.obs["sample"] == SAMPLE).all()
    assert np.issubdtype(table.obs["array_row"].dtype, np.integer)
    assert np.issubdtype(table.obs["array_col"].dtype, np.integer)
    np.testing.assert_allclose(table.obsm["spatial"], np.column_stack([spots.geometry.x, spots.geometry.y]))
    assert table.uns["spade_sd"] == {
        "dataset": "synthetic",
        "sample": SAMPLE,
        "technology": "synthetic",
        "spot_diameter_um": 55.0,
    }
    assert table.obs["image_signal"].between(0, 1).all()


@pytest.mark.parametrize(("mpp", "diameter", "pitch"), [(1.0, 55.0, 100.0), (2.5, 65.0, 150.0)])
def test_mpp_recoverable_from_circles(mpp, diameter, pitch):
    sdata = synthetic(grid=(4, 5), mpp=mpp, spot_diameter_um=diameter, spot_pitch_um=pitch, n_genes=20)
    table = sdata.tables["table"]
    radius = sdata.shapes[f"{SAMPLE}_spots"]["radius"].to_numpy()
    assert np.allclose(table.uns["spade_sd"]["spot_diameter_um"] / (2 * radius), mpp)
    step = np.diff(np.sort(np.unique(table.obsm["spatial"][:, 0])))
    assert np.allclose(step * mpp, pitch)


def test_types_differ_in_mean_colour(sdata, spot_pixels):
    colours, _ = spot_pixels
    types = sdata.tables["table"].obs["tissue_type"]
    means = pd.DataFrame(colours).groupby(types.to_numpy(), observed=True).mean().to_numpy()
    assert len(means) == 4
    distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(means, 2)]
    assert min(distances) > 15, distances  # RGB units; observed ≈ 30–88 for seed 0


def test_expression_recovers_types_across_slides():
    train, test = (s.tables["table"] for s in synthetic(n_slides=2, grid=(12, 12), mpp=4.0, seed=3))
    centroids = pd.DataFrame(_log_normalised(train)).groupby(train.obs["tissue_type"].to_numpy()).mean()
    distances = ((_log_normalised(test)[:, None, :] - centroids.to_numpy()[None]) ** 2).sum(axis=-1)
    predicted = centroids.index[distances.argmin(axis=1)]
    accuracy = (predicted == test.obs["tissue_type"].to_numpy()).mean()
    assert accuracy > 0.9  # observed 1.0


def test_image_signal_follows_dark_pixels(sdata, spot_pixels):
    _, dark = spot_pixels
    obs = sdata.tables["table"].obs
    signal = obs["image_signal"].to_numpy()
    assert np.corrcoef(signal, dark)[0, 1] > 0.5  # observed ≈ 0.91
    # beyond the type means: the planted field varies within every type
    within = np.corrcoef(_demean_by(signal, obs["tissue_type"]), _demean_by(dark, obs["tissue_type"]))[0, 1]
    assert within > 0.5  # observed ≈ 0.88


def test_image_genes_follow_signal_within_types(sdata):
    table = sdata.tables["table"]
    types = table.obs["tissue_type"]
    signal = _demean_by(table.obs["image_signal"].to_numpy(), types)
    expression = _log_normalised(table)
    programs = table.var["program"].to_numpy()
    correlations = {
        program: np.median(
            [
                abs(np.corrcoef(_demean_by(expression[:, g], types), signal)[0, 1])
                for g in np.flatnonzero(programs == program)
            ]
        )
        for program in ("image", "base")
    }
    assert correlations["image"] > 0.4  # observed ≈ 0.75
    assert correlations["base"] < 0.2  # observed ≈ 0.04


@pytest.mark.cpu_paths
def test_deterministic_in_seed():
    def draw(seed):
        sdata = synthetic(grid=(5, 5), mpp=2.0, n_genes=30, seed=seed)
        return sdata.tables["table"], sdata.images[f"{SAMPLE}_image"]["scale0"]["image"].values

    (table_a, image_a), (table_b, image_b), (table_c, image_c) = draw(7), draw(7), draw(8)
    assert (table_a.X != table_b.X).nnz == 0
    pd.testing.assert_frame_equal(table_a.obs, table_b.obs)
    assert np.array_equal(image_a, image_b)
    assert (table_a.X != table_c.X).nnz > 0
    assert not np.array_equal(image_a, image_c)


def test_slides_drop_different_genes():
    slides = synthetic(n_slides=3, genes_dropped_per_slide=10, grid=(6, 6), mpp=4.0, n_genes=100)
    assert isinstance(slides, list) and len(slides) == 3
    gene_sets = []
    for i, sdata in enumerate(slides):
        table = sdata.tables["table"]
        assert table.uns["spade_sd"]["sample"] == f"synthetic_{i}"
        assert f"synthetic_{i}_image" in sdata.images and f"synthetic_{i}_spots" in sdata.shapes
        assert table.n_vars == 90
        gene_sets.append(set(table.var_names))
    assert all(a != b for a, b in itertools.combinations(gene_sets, 2))
    assert len(set.intersection(*gene_sets)) == 70

    full = synthetic(n_slides=2, grid=(6, 6), mpp=4.0, n_genes=100)
    assert all(s.tables["table"].n_vars == 100 for s in full)


def test_writes_and_reads_zarr(tmp_path):
    sdata = synthetic(grid=(6, 7), mpp=2.0, n_genes=40, seed=1)
    sdata.write(tmp_path / "synthetic.zarr")
    back = spatialdata.read_zarr(tmp_path / "synthetic.zarr")
    table, table_back = sdata.tables["table"], back.tables["table"]
    assert (table.X != table_back.X).nnz == 0
    pd.testing.assert_frame_equal(table.obs, table_back.obs, check_dtype=False, check_categorical=False)
    assert table_back.uns["spade_sd"]["sample"] == SAMPLE
    np.testing.assert_array_equal(table.obsm["spatial"], table_back.obsm["spatial"])
    spots, spots_back = sdata.shapes[f"{SAMPLE}_spots"], back.shapes[f"{SAMPLE}_spots"]
    assert list(spots.index) == list(spots_back.index)
    np.testing.assert_allclose(spots_back["radius"], spots["radius"])
    image, image_back = (s.images[f"{SAMPLE}_image"]["scale0"]["image"].values for s in (sdata, back))
    np.testing.assert_array_equal(image, image_back)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_types": 0},
        {"grid": (2, 1), "n_types": 3},
        {"mpp": 0.0},
        {"n_genes": 4, "n_types": 4},
        {"n_slides": 2, "genes_dropped_per_slide": 100},
    ],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="must|cannot"):
        synthetic(**kwargs)


def _patch_statistics(sdata) -> np.ndarray:
    """Mean and standard deviation of every RGB channel over each spot's patch: a minimal image encoder."""
    from spade_sd.spots.patches import resolve_patches

    _, patches = resolve_patches(sdata, size_um=50.0, size_px=16)
    pixels = patches.read(np.arange(len(patches))).astype(float) / 255
    return np.c_[pixels.mean(axis=(1, 2)), pixels.std(axis=(1, 2))]


def _transfer_accuracy(train: np.ndarray, test: np.ndarray, y_train: np.ndarray, y_test: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train, y_train)
    return float((model.predict(test) == y_test).mean())


def test_type_expression_zero_plants_types_the_image_shows_and_expression_barely_explains():
    def accuracies(type_expression):
        slides = synthetic(n_slides=2, grid=(12, 12), mpp=2.0, n_genes=60, type_expression=type_expression, seed=3)
        tables = [s.tables["table"] for s in slides]
        types = [t.obs["tissue_type"].to_numpy() for t in tables]
        image = _transfer_accuracy(*map(_patch_statistics, slides), *types)
        expression = _transfer_accuracy(*map(_log_normalised, tables), *types)
        return image, expression, slides

    image, expression, slides = accuracies(0.0)
    # slide 0 → slide 1, 4 types (chance 0.25): observed image 0.98, expression 0.40
    assert image > 0.9 and expression < 0.6, (image, expression)
    image_default, expression_default, default = accuracies(1.0)
    assert image_default > 0.9 and expression_default > 0.9  # observed 0.98 and 1.0
    # the option changes the expression only: the images are the same
    for weak, strong in zip(slides, default, strict=True):
        pixels = [
            s.images[f"{s.tables['table'].uns['spade_sd']['sample']}_image"]["scale0"]["image"].values
            for s in (weak, strong)
        ]
        np.testing.assert_array_equal(*pixels)
        pd.testing.assert_frame_equal(weak.tables["table"].obs, strong.tables["table"].obs)


@pytest.mark.parametrize("type_expression", [-0.5, float("nan"), True])
def test_rejects_bad_type_expression(type_expression):
    with pytest.raises(ValueError, match="type_expression must be"):
        synthetic(grid=(4, 4), n_genes=20, type_expression=type_expression)
