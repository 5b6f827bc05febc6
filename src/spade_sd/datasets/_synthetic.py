"""A procedural H&E + spot-expression generator with planted structure, for tests and tutorials.

Every slide is tiled by Voronoi regions of a few tissue types. A type is visible in the image (stroma colour,
fibre stripes, nucleus size and density) and in the expression (a type-specific gene program). On top of that a
smooth random field modulates the nucleus density inside every type; the expected nuclear area fraction of a spot
(``obs["image_signal"]``) drives a second, continuous gene program, so an image↔expression link exists beyond the
discrete types. With ``type_expression`` below 1 the types' own gene programs are weakened (0: shared by all
types), which plants tissue types that the image shows but expression barely explains: morphology labels for
checking that an embedding keeps what its backbone saw.
"""

from __future__ import annotations

import colorsys
import time
from dataclasses import dataclass, replace

import anndata as ad
import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity
from xarray import DataTree

from spade_sd.utils.constants import SAMPLE, SAMPLE_KEY, SPATIAL_KEY, SPOT_DIAMETER_UM, TECHNOLOGY, UNS_KEY
from spade_sd.utils.logging import logger

_TILE = 1024
_SEEDS_PER_TYPE = 2
_MAX_LAYOUT_TRIES = 1000
_N_WAVES = 24
_FIELD_SIGMA = 0.5
_FIELD_CLIP = 3.0
_WAVELENGTH_PITCHES = (3.0, 8.0)
_RADIUS_JITTER = (0.8, 1.2)
_STRIPE_DEPTH = 0.08
_PIXEL_NOISE = 5.0
_LIBRARY_MEAN = 4000.0
_LIBRARY_SIGMA = 0.35
_LOGIT_NOISE = 0.25
_SIGNAL_CENTRE, _SIGNAL_SCALE = 0.2, 0.1
_MIN_PYRAMID_SIDE = 256


@dataclass(frozen=True)
class _TypeLooks:
    """Appearance of each tissue type, shared by all slides so that a type means the same thing everywhere."""

    stroma_rgb: np.ndarray
    nucleus_rgb: np.ndarray
    nuclear_fraction: np.ndarray
    nucleus_radius_um: np.ndarray
    stripe_period_um: np.ndarray
    stripe_angle: np.ndarray


@dataclass(frozen=True)
class _GenePrograms:
    """Logit-scale expression model shared by all slides."""

    base: np.ndarray
    type_effect: np.ndarray
    image_weight: np.ndarray
    program: np.ndarray


@dataclass(frozen=True)
class _DensityField:
    """A smooth, positive random field (sum of random plane waves) that modulates nucleus density."""

    omega: np.ndarray
    phase: np.ndarray

    def modulation(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        waves = np.cos(x[..., None] * self.omega[:, 0] + y[..., None] * self.omega[:, 1] + self.phase)
        gauss = np.sqrt(2.0 / len(self.phase)) * waves.sum(axis=-1)
        return np.exp(_FIELD_SIGMA * np.clip(gauss, -_FIELD_CLIP, _FIELD_CLIP))


@dataclass(frozen=True)
class _Layout:
    """Where the types lie on one slide and how nucleus density varies inside them."""

    looks: _TypeLooks
    seeds_xy: np.ndarray
    seed_type: np.ndarray
    field: _DensityField
    tissue_box: tuple[float, float, float, float]
    mpp: float

    def type_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Type of the nearest Voronoi seed; ``x`` and ``y`` broadcast against each other."""
        # one seed at a time keeps memory at a single image-sized buffer instead of one per seed
        nearest = np.full(np.broadcast_shapes(np.shape(x), np.shape(y)), np.inf)
        kind = np.zeros(nearest.shape, dtype=int)
        for (sx, sy), seed_type in zip(self.seeds_xy, self.seed_type, strict=True):
            d2 = (x - sx) ** 2 + (y - sy) ** 2
            closer = d2 < nearest
            nearest[closer] = d2[closer]
            kind[closer] = seed_type
        return kind

    def nuclear_fraction_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Mean nuclear area per tissue area (before overlaps) at the given pixel positions."""
        return self.looks.nuclear_fraction[self.type_at(x, y)] * self.field.modulation(x, y)


@dataclass(frozen=True)
class _Scene:
    """Everything needed to render any tile of one slide, independently of the other tiles."""

    layout: _Layout
    nuclei_xy: np.ndarray
    nuclei_radius: np.ndarray
    nuclei_rgb: np.ndarray
    noise_key: tuple[int, ...]


def synthetic(
    *,
    n_slides: int = 1,
    n_types: int = 4,
    grid: tuple[int, int] = (20, 20),
    spot_pitch_um: float = 100.0,
    spot_diameter_um: float = 55.0,
    mpp: float = 0.5,
    n_genes: int = 200,
    genes_dropped_per_slide: int = 0,
    type_expression: float = 1.0,
    technology: str = "synthetic",
    seed: int = 0,
) -> SpatialData | list[SpatialData]:
    """Generate H&E-like slides with spot expression and planted image↔expression structure.

    Each slide is tiled by contiguous Voronoi regions of ``n_types`` tissue types (every type occurs on every
    slide). A type has its own stroma hue and saturation, fibre-stripe frequency, nucleus size and mean nucleus
    density. Within every type a smooth random field (wavelengths of 3–8 spot pitches) changes the nucleus
    density, so the expected fraction of a spot covered by dark nuclei varies continuously.

    Counts are ``Poisson(library_size · softmax(logits))`` with
    ``logits = base + type program + image program · (image_signal − 0.2) / 0.1 + noise``: each type raises its
    own marker genes, and a separate set of image-linked genes goes up or down with the spot's nuclear fraction.

    Parameters
    ----------
    n_slides
        Number of slides; each gets its own layout, density field and nuclei, sharing the type definitions.
    n_types
        Number of planted tissue types.
    grid
        Spots per slide as ``(rows, columns)`` of a square grid.
    spot_pitch_um
        Center-to-center distance of neighbouring spots in µm.
    spot_diameter_um
        Spot diameter in µm.
    mpp
        µm per pixel of the full-resolution image. The image measures ``grid × pitch`` plus one pitch of margin
        on every side.
    n_genes
        Number of simulated genes, named ``gene_0000``, ``gene_0001``, ….
    genes_dropped_per_slide
        How many genes each slide lacks; the slides drop disjoint subsets, so their gene sets differ.
    type_expression
        Strength of the types' own gene programs, a factor on their logit effects (at least 0). 1: every type
        raises its marker genes clearly; 0: all types share one expression program, so the types differ in the
        image (colour, fibres, nucleus size and density) and in expression only through the image-linked genes,
        which follow the nucleus density that also varies within every type. The image is the same for every
        value.
    technology
        Recorded in ``uns["spade_sd"]["technology"]``.
    seed
        Seed of the random generator; the output is a deterministic function of all arguments.

    Returns
    -------
    One :class:`~spatialdata.SpatialData` per slide (a list when ``n_slides > 1``), sample names
    ``synthetic_0``, ``synthetic_1``, …, each with

    - image ``{sample}_image``: uint8 ``(c, y, x)`` RGB pyramid, rendered lazily per 1024-px tile;
    - shapes ``{sample}_spots``: circles (points with a ``radius`` column, level-0 pixels), indexed by spot id;
    - table ``table``: raw counts in ``X`` (CSR, float32); ``obs`` columns ``spot_id``, ``region``,
      ``array_row``, ``array_col``, ``sample``, ``tissue_type`` (the planted type) and ``image_signal``
      (the expected nuclear area fraction of the spot, in [0, 1)); ``obsm["spatial"]`` (spot centers, x and y
      in level-0 pixels); ``var["program"]`` (``base``, ``type_<k>`` or ``image``: which planted program
      drives the gene); ``uns["spade_sd"]`` (``dataset``, ``sample``, ``technology``, ``spot_diameter_um``).
    """
    _check_arguments(n_slides, n_types, grid, spot_pitch_um, spot_diameter_um, mpp, n_genes, genes_dropped_per_slide)
    if isinstance(type_expression, bool) or not np.isfinite(type_expression) or type_expression < 0:
        raise ValueError(f"type_expression must be a finite number >= 0, got {type_expression!r}.")
    start = time.perf_counter()
    shared_seq, *slide_seqs = np.random.SeedSequence(seed).spawn(n_slides + 1)
    shared_rng = np.random.default_rng(shared_seq)
    looks = _type_looks(n_types, shared_rng)
    programs = _gene_programs(n_genes, n_types, shared_rng)
    programs = replace(programs, type_effect=programs.type_effect * float(type_expression))
    dropped = shared_rng.permutation(n_genes)[: n_slides * genes_dropped_per_slide].reshape(n_slides, -1)
    slides = [
        _slide(
            f"synthetic_{i}",
            looks=looks,
            programs=programs,
            dropped_genes=dropped[i],
            grid=grid,
            spot_pitch_um=spot_pitch_um,
            spot_diameter_um=spot_diameter_um,
            mpp=mpp,
            technology=technology,
            seed_seq=seq,
            noise_key=(seed, i),
        )
        for i, seq in enumerate(slide_seqs)
    ]
    logger.info(
        "synthetic: built %d slide(s) of %d×%d spots, %d types, %d genes in %.1f s (images render lazily)",
        n_slides,
        grid[0],
        grid[1],
        n_types,
        n_genes,
        time.perf_counter() - start,
    )
    return slides[0] if n_slides == 1 else slides


def _check_arguments(
    n_slides: int,
    n_types: int,
    grid: tuple[int, int],
    spot_pitch_um: float,
    spot_diameter_um: float,
    mpp: float,
    n_genes: int,
    genes_dropped_per_slide: int,
) -> None:
    if n_slides < 1 or n_types < 1:
        raise ValueError(f"n_slides and n_types must be at least 1, got n_slides={n_slides}, n_types={n_types}.")
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid must be (rows, columns) of positive integers, got {grid!r}.")
    if grid[0] * grid[1] < n_types:
        raise ValueError(f"A {grid[0]}×{grid[1]} grid cannot show all {n_types} types; use a larger grid.")
    if min(spot_pitch_um, spot_diameter_um, mpp) <= 0:
        raise ValueError(
            f"spot_pitch_um, spot_diameter_um and mpp must be positive, got {spot_pitch_um}, {spot_diameter_um}, {mpp}."
        )
    if n_genes < n_types + 1:
        raise ValueError(f"n_genes must be at least n_types + 1 = {n_types + 1} to plant the programs, got {n_genes}.")
    if genes_dropped_per_slide < 0 or n_slides * genes_dropped_per_slide >= n_genes:
        raise ValueError(
            f"Slides drop disjoint gene subsets, so n_slides × genes_dropped_per_slide must be in [0, n_genes), "
            f"got {n_slides} × {genes_dropped_per_slide} with n_genes={n_genes}."
        )


def _type_looks(n_types: int, rng: np.random.Generator) -> _TypeLooks:
    rank = np.arange(n_types) / max(n_types - 1, 1)
    # golden-ratio steps decorrelate saturation from hue, so neighbouring hues still differ in saturation
    saturation = 0.22 + 0.28 * ((np.arange(n_types) * 0.618034) % 1.0)
    stroma = [colorsys.hsv_to_rgb(0.80 + 0.17 * r, s, 0.93) for r, s in zip(rank, saturation, strict=True)]
    nuclei = [colorsys.hsv_to_rgb(0.72 + 0.06 * r, 0.6, 0.45) for r in rank]
    return _TypeLooks(
        stroma_rgb=255.0 * np.asarray(stroma),
        nucleus_rgb=255.0 * np.asarray(nuclei),
        nuclear_fraction=rng.permutation(np.linspace(0.06, 0.30, n_types)),
        nucleus_radius_um=rng.permutation(np.linspace(2.5, 4.5, n_types)),
        stripe_period_um=rng.permutation(np.linspace(6.0, 24.0, n_types)),
        stripe_angle=rng.uniform(0.0, np.pi, n_types),
    )


def _gene_programs(n_genes: int, n_types: int, rng: np.random.Generator) -> _GenePrograms:
    per_program = max(1, n_genes // (2 * (n_types + 1)))
    order = rng.permutation(n_genes)
    program = np.full(n_genes, "base", dtype=object)
    type_effect = np.zeros((n_types, n_genes))
    for t in range(n_types):
        markers = order[t * per_program : (t + 1) * per_program]
        program[markers] = f"type_{t}"
        type_effect[t, markers] = rng.uniform(1.5, 2.5, per_program)
    image_genes = order[n_types * per_program : (n_types + 1) * per_program]
    program[image_genes] = "image"
    image_weight = np.zeros(n_genes)
    image_weight[image_genes] = rng.choice([-1.0, 1.0], per_program) * rng.uniform(0.5, 1.0, per_program)
    return _GenePrograms(rng.normal(0.0, 1.0, n_genes), type_effect, image_weight, program)


def _slide(
    sample: str,
    *,
    looks: _TypeLooks,
    programs: _GenePrograms,
    dropped_genes: np.ndarray,
    grid: tuple[int, int],
    spot_pitch_um: float,
    spot_diameter_um: float,
    mpp: float,
    technology: str,
    seed_seq: np.random.SeedSequence,
    noise_key: tuple[int, ...],
) -> SpatialData:
    rng = np.random.default_rng(seed_seq)
    pitch_px = spot_pitch_um / mpp
    shape = (round((grid[0] + 2) * pitch_px), round((grid[1] + 2) * pitch_px))
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij"))
    centers = np.column_stack([(cols + 1.5) * pitch_px, (rows + 1.5) * pitch_px])
    layout = _layout(looks, shape, centers, pitch_px, mpp, rng)
    scene = _Scene(layout, *_nuclei(layout, rng), noise_key=noise_key)

    spot_type = layout.type_at(centers[:, 0], centers[:, 1])
    signal = 1.0 - np.exp(-layout.nuclear_fraction_at(centers[:, 0], centers[:, 1]))
    counts = _counts(programs, spot_type, signal, rng)
    keep = np.setdiff1d(np.arange(counts.shape[1]), dropped_genes)

    spot_ids = pd.Index([f"{r}x{c}" for r, c in zip(rows, cols, strict=True)])
    truth = pd.DataFrame(
        {
            "tissue_type": pd.Categorical.from_codes(spot_type, [f"type_{t}" for t in range(len(looks.stroma_rgb))]),
            "image_signal": signal,
        },
        index=spot_ids,
    )
    var = pd.DataFrame({"program": pd.Categorical(programs.program[keep])}, index=[f"gene_{g:04d}" for g in keep])
    uns = {
        "dataset": "synthetic",
        SAMPLE: sample,
        TECHNOLOGY: technology,
        SPOT_DIAMETER_UM: float(spot_diameter_um),
    }
    table = _table(sample, rows, cols, centers, truth, sparse.csr_matrix(counts[:, keep].astype(np.float32)), var, uns)
    spots = gpd.GeoDataFrame(
        {"radius": np.full(len(spot_ids), spot_diameter_um / 2.0 / mpp)},
        geometry=gpd.points_from_xy(centers[:, 0], centers[:, 1]),
        index=spot_ids,
    )
    return SpatialData(
        images={f"{sample}_image": _image_model(scene, shape)},
        shapes={f"{sample}_spots": ShapesModel.parse(spots, transformations={"global": Identity()})},
        tables={"table": table},
    )


def _table(
    sample: str,
    rows: np.ndarray,
    cols: np.ndarray,
    centers: np.ndarray,
    truth: pd.DataFrame,
    counts: sparse.csr_matrix,
    var: pd.DataFrame,
    uns: dict,
) -> ad.AnnData:
    n_spots = len(truth)
    obs = pd.DataFrame(
        {
            "spot_id": truth.index,
            "region": pd.Categorical([f"{sample}_spots"] * n_spots),
            "array_row": rows,
            "array_col": cols,
            SAMPLE_KEY: pd.Categorical([sample] * n_spots),
        },
        index=truth.index,
    ).join(truth)
    table = ad.AnnData(X=counts, obs=obs, var=var, obsm={SPATIAL_KEY: centers}, uns={UNS_KEY: uns})
    return TableModel.parse(table, region=f"{sample}_spots", region_key="region", instance_key="spot_id")


def _layout(
    looks: _TypeLooks,
    shape: tuple[int, int],
    centers: np.ndarray,
    pitch_px: float,
    mpp: float,
    rng: np.random.Generator,
) -> _Layout:
    half_margin = pitch_px / 2.0
    tissue_box = (half_margin, half_margin, shape[1] - half_margin, shape[0] - half_margin)
    seeds_xy, seed_type = _voronoi_seeds(len(looks.stroma_rgb), tissue_box, centers, rng)
    wavelength = rng.uniform(*_WAVELENGTH_PITCHES, _N_WAVES) * pitch_px
    angle = rng.uniform(0.0, 2.0 * np.pi, _N_WAVES)
    omega = (2.0 * np.pi / wavelength)[:, None] * np.column_stack([np.cos(angle), np.sin(angle)])
    field = _DensityField(omega, rng.uniform(0.0, 2.0 * np.pi, _N_WAVES))
    return _Layout(looks, seeds_xy, seed_type, field, tissue_box, mpp)


def _voronoi_seeds(
    n_types: int,
    tissue_box: tuple[float, float, float, float],
    centers: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi seeds, redrawn until every type covers a fair share of the spots."""
    seed_type = np.repeat(np.arange(n_types), _SEEDS_PER_TYPE)
    min_spots = max(1, len(centers) // (4 * n_types))
    low, high = np.array(tissue_box[:2]), np.array(tissue_box[2:])
    for _ in range(_MAX_LAYOUT_TRIES):
        seeds_xy = rng.uniform(low, high, (len(seed_type), 2))
        d2 = ((centers[:, None, :] - seeds_xy[None]) ** 2).sum(axis=-1)
        if np.bincount(seed_type[np.argmin(d2, axis=1)], minlength=n_types).min() >= min_spots:
            return seeds_xy, seed_type
    raise ValueError(
        f"Could not lay out {n_types} types with at least {min_spots} spots each on {len(centers)} spots; "
        "use fewer types or a larger grid."
    )


def _nuclei(layout: _Layout, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nucleus centers from an inhomogeneous Poisson process (by thinning), with radii and colours."""
    looks = layout.looks
    x0, y0, x1, y1 = layout.tissue_box
    radius_px = looks.nucleus_radius_um / layout.mpp
    mean_area = np.pi * radius_px**2 * (_RADIUS_JITTER[1] ** 3 - _RADIUS_JITTER[0] ** 3) / (3 * np.diff(_RADIUS_JITTER))
    type_intensity = looks.nuclear_fraction / mean_area
    max_intensity = type_intensity.max() * np.exp(_FIELD_SIGMA * _FIELD_CLIP)
    n_candidates = rng.poisson(max_intensity * (x1 - x0) * (y1 - y0))
    xy = rng.uniform((x0, y0), (x1, y1), (n_candidates, 2))
    kind = layout.type_at(xy[:, 0], xy[:, 1])
    intensity = type_intensity[kind] * layout.field.modulation(xy[:, 0], xy[:, 1])
    accepted = rng.random(n_candidates) < intensity / max_intensity
    kind = kind[accepted]
    radius = radius_px[kind] * rng.uniform(*_RADIUS_JITTER, len(kind))
    rgb = looks.nucleus_rgb[kind] * rng.uniform(0.85, 1.1, (len(kind), 1))
    return xy[accepted], radius, rgb


def _counts(programs: _GenePrograms, spot_type: np.ndarray, signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    image_term = np.outer((signal - _SIGNAL_CENTRE) / _SIGNAL_SCALE, programs.image_weight)
    logits = programs.base + programs.type_effect[spot_type] + image_term
    logits += rng.normal(0.0, _LOGIT_NOISE, logits.shape)
    profile = np.exp(logits - logits.max(axis=1, keepdims=True))
    profile /= profile.sum(axis=1, keepdims=True)
    library = rng.lognormal(np.log(_LIBRARY_MEAN), _LIBRARY_SIGMA, len(spot_type))
    return rng.poisson(library[:, None] * profile)


def _image_model(scene: _Scene, shape: tuple[int, int]) -> DataTree:
    chunks = ((3,), _tile_sizes(shape[0]), _tile_sizes(shape[1]))
    image = da.map_blocks(
        _render_block, scene=scene, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), dtype=np.uint8)
    )
    scale_factors = [2]
    while min(shape) // 2 ** (len(scale_factors) + 1) >= _MIN_PYRAMID_SIDE:
        scale_factors.append(2)
    return Image2DModel.parse(
        image,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=scale_factors,
        chunks=(3, _TILE, _TILE),
        transformations={"global": Identity()},
    )


def _tile_sizes(length: int) -> tuple[int, ...]:
    full, rest = divmod(length, _TILE)
    return (_TILE,) * full + ((rest,) if rest else ())


def _render_block(scene: _Scene, block_info: dict | None = None) -> np.ndarray:
    (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    return _render_tile(scene, y0, y1, x0, x1)


def _render_tile(scene: _Scene, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Render pixels ``[y0, y1) × [x0, x1)``; pixel ``(i, j)`` has its center at ``(j + 0.5, i + 0.5)``."""
    layout = scene.layout
    looks = layout.looks
    yy, xx = np.ogrid[y0:y1, x0:x1]
    yy, xx = yy + 0.5, xx + 0.5
    kind = layout.type_at(xx, yy)
    period_px = looks.stripe_period_um[kind] / layout.mpp
    angle = looks.stripe_angle[kind]
    phase = 2.0 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period_px
    rgb = looks.stroma_rgb[kind] * (1.0 - _STRIPE_DEPTH * (0.5 + 0.5 * np.sin(phase)))[..., None]
    _paint_nuclei(rgb, scene, y0, x0)
    rng = np.random.default_rng([*scene.noise_key, y0, x0])
    rgb += _PIXEL_NOISE * rng.standard_normal(rgb.shape, dtype=np.float32)
    bx0, by0, bx1, by1 = layout.tissue_box
    rgb[(xx < bx0) | (xx >= bx1) | (yy < by0) | (yy >= by1)] = 255.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def _paint_nuclei(rgb: np.ndarray, scene: _Scene, y0: int, x0: int) -> None:
    height, width = rgb.shape[:2]
    local = scene.nuclei_xy - (x0, y0)
    r = scene.nuclei_radius
    visible = (local[:, 0] > -r) & (local[:, 0] < width + r) & (local[:, 1] > -r) & (local[:, 1] < height + r)
    for (cx, cy), radius, colour in zip(local[visible], r[visible], scene.nuclei_rgb[visible], strict=True):
        i0, i1 = max(int(cy - radius), 0), min(int(np.ceil(cy + radius)) + 1, height)
        j0, j1 = max(int(cx - radius), 0), min(int(np.ceil(cx + radius)) + 1, width)
        ii, jj = np.ogrid[i0:i1, j0:j1]
        inside = (ii + 0.5 - cy) ** 2 + (jj + 0.5 - cx) ** 2 <= radius**2
        rgb[i0:i1, j0:j1][inside] = colour
