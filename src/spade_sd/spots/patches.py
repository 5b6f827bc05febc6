"""Lazy fixed-size square patches centered on spots, read from the coarsest sufficient pyramid level.

Only the windows asked for are read (one dask computation per batch), so a slide of any size is never loaded
whole. Each window covers exactly ``size_um`` µm, is resampled to ``size_px`` pixels and is white beyond the image.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from functools import cached_property

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
# Names of the one channel of a grey image
_GREY_NAMES = {"l", "grey", "gray", "luminance"}
# Names that say nothing of a channel's content: spatialdata's default integers, "channel_0", "c0", OME's "Channel:0:0"
_UNNAMED = re.compile(r"(?:c|ch|channel)?[\s_:-]*\d+(?:[\s_:-]+\d+)*", re.IGNORECASE)
_HE_EXPECTED = (
    "spade_sd reads brightfield H&E: RGB (3 channels) or RGBA (4) with channels unnamed or named r, g, b (a), or one "
    "grey channel"
)


def choose_level(geometry: SpotGeometry, size_um: float, size_px: int) -> int:
    """The coarsest pyramid level at least as fine as ``size_um / size_px`` µm per pixel (else level 0)."""
    needed = size_um / size_px
    fine_enough = [i for i, ds in enumerate(geometry.level_downsample) if geometry.mpp * max(ds) <= needed * (1 + 1e-6)]
    return max(fine_enough, default=0)


def as_rgb_uint8(window: np.ndarray, dtype: np.dtype, where: str = "the image") -> np.ndarray:
    """(c, y, x) window of any supported image type → (y, x, 3) uint8 RGB; ``where`` names it in errors."""
    if np.issubdtype(dtype, np.floating):
        missing = np.count_nonzero(np.isnan(window))
        if missing:
            # read as white it would look like glass, as black like a dark stain: either passes unnoticed
            raise ValueError(
                f"The pixels of {where} hold {missing} NaN values (of {window.size}); NaN is no colour. Replace them "
                "first, e.g. with 1.0 (white, like glass) for a float image in [0, 1]: "
                "Image2DModel.parse(image.fillna(1.0), ...), or crop the image to where it was scanned."
            )
        if window.size and (np.nanmin(window) < 0 or np.nanmax(window) > 1):
            raise ValueError(
                f"Float images must hold intensities in [0, 1]; found values in [{np.nanmin(window)}, "
                f"{np.nanmax(window)}]. Convert the image to uint8 first."
            )
        window = np.rint(window * WHITE)
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


def _channel_names(level: DataArray) -> list[str]:
    return [str(name).strip() for name in level.coords["c"].values] if "c" in level.coords else []


def _marker_names(names: list[str]) -> list[str]:
    """The channel names that are neither colours, nor a grey channel's, nor placeholders: markers such as DAPI."""
    grey = len(names) == 1
    return [
        name
        for name in names
        if name.lower() not in _COLOUR_NAMES
        and not (grey and name.lower() in _GREY_NAMES)
        and not _UNNAMED.fullmatch(name)
    ]


def unnamed_alpha(level: DataArray) -> bool:
    """Whether the image has 4 channels none of which is named: its 4th is alpha only if constant (checked on read)."""
    names = _channel_names(level)
    return len(names) == 4 and all(_UNNAMED.fullmatch(name) for name in names)


def check_image(level: DataArray, name: str | None = None) -> None:
    """Reject images spade_sd cannot read as brightfield H&E, before any work (``name`` is the image's key).

    Multiplexed images are told by their channel count (other than 1, 3 or 4) or by channel names that are not
    colours (``DAPI``, ``CD3``, ...).
    """
    image = "The image" if name is None else f"Image {name!r}"
    dtype, channels = level.dtype, level.sizes.get("c", 1)
    if "c" not in level.dims or level.dims != ("c", "y", "x"):
        raise ValueError(f"Expected a 2D image with dims ('c', 'y', 'x'), found dims {level.dims}.")
    names = _channel_names(level)
    if channels not in (1, 3, 4):
        raise ValueError(
            f"{image} has {channels} channels ({names}), as multiplexed fluorescence images do, not H&E. "
            f"{_HE_EXPECTED}. Pass image_key= naming the H&E image."
        )
    rgb_channel_order(level)  # names of which some are colours: its message says which colours are expected
    markers = _marker_names(names)
    if markers:
        raise ValueError(
            f"{image} has channels named {names}: {markers} name no colour, as the markers of an immunofluorescence "
            f"image do (DAPI, CD3, ...), so it is not H&E. {_HE_EXPECTED}. Pass image_key= naming the H&E image; if "
            "this image is H&E under other channel names, name them r, g, b: Image2DModel.parse(image.data, "
            "dims=('c', 'y', 'x'), c_coords=['r', 'g', 'b'])."
        )
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
        check_image(self._array, geometry.image_key)
        self._channels = rgb_channel_order(self._array)
        self._unnamed_alpha = unnamed_alpha(self._array)
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
        # unfused, so windows that share a chunk read it once: fused, each window decodes a lazily read PNG or TIFF
        (pixels,) = dask.compute([w for w, _ in windows], scheduler=scheduler, optimize_graph=False)
        out = np.empty((len(indices), self.size_px, self.size_px, 3), dtype=np.uint8)
        for k, (window, (_, covered), box) in enumerate(zip(pixels, windows, boxes, strict=True)):
            row = self.geometry.table_rows[indices[k]]
            where = (
                f"image {self.geometry.image_key!r} under the spot of row {row} of table {self.geometry.table_key!r}"
            )
            window = np.asarray(window)
            if self._unnamed_alpha:
                self._check_alpha(window[3], where)
            window = window if self._channels is None else window[self._channels]
            out[k] = self._resample(as_rgb_uint8(window, self._array.dtype, where), covered, box)
        return out

    @staticmethod
    def _check_alpha(alpha: np.ndarray, where: str) -> None:
        if alpha.size and alpha.min() != alpha.max():
            raise ValueError(
                f"The 4th of the 4 unnamed channels of {where} varies (from {alpha.min()} to {alpha.max()}), so it "
                f"is no alpha channel: a 4-channel fluorescence image is not H&E. {_HE_EXPECTED}. Pass image_key= "
                "naming the H&E image; if this is RGBA H&E, name its channels r, g, b, a (Image2DModel.parse(..., "
                "c_coords=['r', 'g', 'b', 'a']))."
            )

    @cached_property
    def sample_indices(self) -> np.ndarray:
        """Positions of at most ``FINGERPRINT_SPOTS`` spots spread evenly over the table's rows."""
        return np.unique(np.linspace(0, len(self) - 1, min(FINGERPRINT_SPOTS, len(self))).round().astype(int))

    @cached_property
    def sample(self) -> np.ndarray:
        """The patches of :attr:`sample_indices`, read once: the fingerprint and the content checks share them."""
        return self.read(self.sample_indices)

    def fingerprint(self) -> str:
        """Digest of the patch geometry and the pixels of a deterministic sample of patches.

        Cheap (reads at most ``FINGERPRINT_SPOTS`` patches) yet changes when the image content under the spots,
        the spot positions, the scale or the patch geometry change.
        """
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.asarray([self.size_um, self.size_px, *self.mpp_level, self.level], dtype=float).tobytes())
        digest.update(np.ascontiguousarray(self.geometry.centers, dtype=np.float64).tobytes())
        digest.update(repr(self.geometry.level_shapes).encode())
        digest.update(self.sample.tobytes())
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
