"""Lazy fixed-size square patches centered on spots, read from the coarsest sufficient pyramid level.

Only the windows asked for are read (one dask computation per batch), so a slide of any size is never loaded
whole. Each window covers exactly ``size_um`` µm, is resampled to ``size_px`` pixels and is white beyond the image.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import dask
import numpy as np
from PIL import Image
from xarray import DataArray

from spade_sd.spots.geometry import SpotGeometry, image_levels, resolve_geometry
from spade_sd.utils.validation import check_patch_geometry

WHITE = 255
FINGERPRINT_SPOTS = 16
# The most pixels a patch window may span on the level it is read from (a 4096² uint8 RGB window is 48 MiB): more
# means an implausible scale (e.g. mpp=1e-9) or patch size, which would otherwise allocate gigabytes per patch
MAX_WINDOW_PX = 4096
# Channel names that say which colour a channel holds (spatialdata images carry them in the ``c`` coordinate)
_COLOUR_NAMES = {"r": "r", "red": "r", "g": "g", "green": "g", "b": "b", "blue": "b", "a": "a", "alpha": "a"}


def choose_level(geometry: SpotGeometry, size_um: float, size_px: int) -> int:
    """The coarsest pyramid level at least as fine as ``size_um / size_px`` µm per pixel (else level 0)."""
    needed = size_um / size_px
    fine_enough = [i for i, ds in enumerate(geometry.level_downsample) if geometry.mpp * max(ds) <= needed * (1 + 1e-6)]
    return max(fine_enough, default=0)


def as_rgb_uint8(window: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(c, y, x) window of any supported image type → (y, x, 3) uint8 RGB."""
    if np.issubdtype(dtype, np.floating):
        if window.size and (np.nanmin(window) < 0 or np.nanmax(window) > 1):
            raise ValueError(
                f"Float images must hold intensities in [0, 1]; found values in [{np.nanmin(window)}, "
                f"{np.nanmax(window)}]. Convert the image to uint8 first."
            )
        window = np.rint(np.nan_to_num(window, nan=1.0) * WHITE)
    window = window.astype(np.float32 if window.shape[0] == 4 else np.uint8, copy=False)
    if window.shape[0] == 1:
        window = np.repeat(window, 3, axis=0)
    elif window.shape[0] == 4:
        alpha = window[3:] / WHITE
        window = np.rint(window[:3] * alpha + WHITE * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(window.transpose(1, 2, 0))


def rgb_channel_order(level: DataArray) -> np.ndarray | None:
    """Indices that put an image's channels in RGB(A) order, from their names; ``None`` keeps the stored order.

    Images whose ``c`` coordinate names colours (``r``/``red``, ``g``, ``b``, ``a``/``alpha``, any case), such as
    ``["b", "g", "r"]``, are reordered; images without colour names (e.g. the default ``[0, 1, 2]``) are read as
    stored. Names of which only some are colours are an error.
    """
    if "c" not in level.coords:
        return None
    names = [str(name).strip().lower() for name in level.coords["c"].values]
    colours = [_COLOUR_NAMES.get(name) for name in names]
    if not any(colours):
        return None
    wanted = ["r", "g", "b", "a"][: len(names)] if len(names) in (3, 4) else None
    if wanted is None or sorted(c for c in colours if c) != sorted(wanted):
        raise ValueError(
            f"The image's channel names {[str(name) for name in level.coords['c'].values]} name colours, but not exactly "
            f"{'red, green, blue (and alpha)' if wanted is None else ', '.join(wanted)}; expected an RGB or RGBA "
            "image whose channels are named r, g, b (a) in any order, or left unnamed."
        )
    order = np.array([colours.index(c) for c in wanted])
    return None if np.array_equal(order, np.arange(len(order))) else order


def check_image(level: DataArray) -> None:
    """Reject images spade_sd cannot read as RGB, before any work."""
    dtype, channels = level.dtype, level.sizes.get("c", 1)
    if "c" not in level.dims or level.dims != ("c", "y", "x"):
        raise ValueError(f"Expected a 2D image with dims ('c', 'y', 'x'), found dims {level.dims}.")
    if channels not in (1, 3, 4):
        raise ValueError(
            f"Expected an RGB (3 channels), RGBA (4) or grey (1) H&E image, found {channels} channels "
            f"({list(level.coords['c'].values) if 'c' in level.coords else ''}); select three channels first."
        )
    rgb_channel_order(level)
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"Expected a uint8 (or float in [0, 1]) image, found dtype {dtype}; convert it to uint8.")


class SpotPatches:
    """Lazy, indexable patches centered on spots; usable as a map-style :class:`torch.utils.data.Dataset`.

    ``ds[i]`` is the uint8 ``(size_px, size_px, 3)`` patch of spot ``i`` (in the order of the table's rows);
    :meth:`read` reads a batch at once.

    Parameters
    ----------
    image
        The image element (multiscale or single-scale), dims ``(c, y, x)``.
    geometry
        The resolved spot geometry of that image.
    size_um
        Side of the square patch in µm.
    size_px
        Side of the returned patch in pixels.
    """

    def __init__(self, image, geometry: SpotGeometry, *, size_um: float = 112.0, size_px: int = 224) -> None:
        self.size_um, self.size_px = check_patch_geometry(size_um, size_px)
        self.geometry = geometry
        self.level = choose_level(geometry, self.size_um, self.size_px)
        self._array = image_levels(image)[self.level]
        check_image(self._array)
        self._channels = rgb_channel_order(self._array)
        self.mpp_level = geometry.mpp * np.asarray(geometry.level_downsample[self.level])
        self.window_px = self.size_um / self.mpp_level  # (x, y): a level's two factors can differ by a rounding
        if self.window_px.max() > MAX_WINDOW_PX:
            raise ValueError(
                f"A {self.size_um:g} µm patch spans {self.window_px.max():.0f} px on pyramid level {self.level} "
                f"({self.mpp_level.max():.3g} µm per pixel, the coarsest level fine enough for {self.size_px} px), "
                f"with {geometry.mpp:.3g} µm per full-resolution pixel from {geometry.mpp_source}; at most "
                f"{MAX_WINDOW_PX} px are read per patch. "
                "Check the scale (mpp=) and size_um, or add coarser pyramid levels to the image."
            )
        self._centers = geometry.centers_at(self.level)

    def __len__(self) -> int:
        return self.geometry.n_spots

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"Patch index {index} out of range for {len(self)} spots.")
        return self.read([index])[0]

    def _box(self, index: int) -> tuple[float, float, float, float]:
        cx, cy = self._centers[index]
        hx, hy = self.window_px / 2
        return cx - hx, cy - hy, cx + hx, cy + hy

    def _window(self, box: tuple[float, float, float, float]):
        """The dask slice covering ``box``, clipped to the image, and the integer box it covers."""
        x0, y0 = math.floor(box[0]), math.floor(box[1])
        x1, y1 = math.ceil(box[2]), math.ceil(box[3])
        height, width = self._array.shape[1:]
        clipped = self._array.data[:, max(y0, 0) : min(max(y1, 0), height), max(x0, 0) : min(max(x1, 0), width)]
        return clipped, (x0, y0, x1, y1)

    def _resample(self, pixels: np.ndarray, covered: tuple[int, int, int, int], box) -> np.ndarray:
        x0, y0, x1, y1 = covered
        canvas = np.full((y1 - y0, x1 - x0, 3), WHITE, dtype=np.uint8)
        oy, ox = max(-y0, 0), max(-x0, 0)
        canvas[oy : oy + pixels.shape[0], ox : ox + pixels.shape[1]] = pixels
        relative = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
        resized = Image.fromarray(canvas).resize((self.size_px, self.size_px), Image.Resampling.BILINEAR, box=relative)
        return np.asarray(resized)

    def read(self, indices: Sequence[int] | np.ndarray, *, scheduler: str = "threads") -> np.ndarray:
        """Read the patches of several spots in one lazy computation.

        Parameters
        ----------
        indices
            Spot positions (in the order of the table's rows).
        scheduler
            Dask scheduler of the read: ``"threads"``, or ``"synchronous"`` in reader processes (which are the
            parallelism themselves).

        Returns
        -------
        uint8 array ``(len(indices), size_px, size_px, 3)``.
        """
        indices = np.asarray(indices, dtype=int).reshape(-1)
        boxes = [self._box(i) for i in indices]
        windows = [self._window(box) for box in boxes]
        (pixels,) = dask.compute([w for w, _ in windows], scheduler=scheduler)
        out = np.empty((len(indices), self.size_px, self.size_px, 3), dtype=np.uint8)
        for k, (window, (_, covered), box) in enumerate(zip(pixels, windows, boxes, strict=True)):
            window = np.asarray(window) if self._channels is None else np.asarray(window)[self._channels]
            out[k] = self._resample(as_rgb_uint8(window, self._array.dtype), covered, box)
        return out

    def fingerprint(self) -> str:
        """Digest of the patch geometry and the pixels of a deterministic sample of patches.

        Cheap (reads at most ``FINGERPRINT_SPOTS`` patches) yet changes when the image content under the spots,
        the spot positions, the scale or the patch geometry change.
        """
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.asarray([self.size_um, self.size_px, *self.mpp_level, self.level], dtype=float).tobytes())
        digest.update(np.ascontiguousarray(self.geometry.centers, dtype=np.float64).tobytes())
        digest.update(repr(self.geometry.level_shapes).encode())
        sample = np.unique(np.linspace(0, len(self) - 1, min(FINGERPRINT_SPOTS, len(self))).round().astype(int))
        digest.update(self.read(sample).tobytes())
        return digest.hexdigest()


def resolve_patches(
    sdata, *, size_um: float = 112.0, size_px: int = 224, mpp: float | None = None, **elements: str | None
) -> tuple[SpotGeometry, SpotPatches]:
    """The spots' geometry and their lazy patches; nothing is read yet.

    Parameters
    ----------
    sdata
        SpatialData holding an H&E image, spots and a table annotating them.
    size_um, size_px
        Patch side in µm and in pixels.
    mpp
        µm per pixel of the image's full-resolution level (inferred when ``None``).
    **elements
        ``image_key``, ``shapes_key`` and ``table_key`` (see :func:`~spade_sd.spots.geometry.resolve_geometry`).

    Returns
    -------
    The :class:`~spade_sd.spots.geometry.SpotGeometry` and the :class:`SpotPatches` in the table's row order.
    """
    geometry = resolve_geometry(sdata, mpp=mpp, **elements)
    return geometry, SpotPatches(sdata.images[geometry.image_key], geometry, size_um=size_um, size_px=size_px)
