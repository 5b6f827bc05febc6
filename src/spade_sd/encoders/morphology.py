"""A classical, interpretable H&E patch descriptor: stain colour, texture, nuclear density and tissue fraction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.color import hed_from_rgb
from skimage.feature import graycomatrix, graycoprops

_STAINS = ("H", "E", "D")
_STAIN_STATS = ("mean", "std", "q10", "q50", "q90")
_GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
_GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
# rgb2gray's luminance weights
_GREY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
# skimage.color.rgb2hed: optical density log(max(rgb, 1e-6)) / log(1e-6), unmixed by hed_from_rgb, clipped at 0.
# For uint8 input the optical density takes only 256 values, so a lookup table replaces the float64 logarithm
# of the whole batch.
_OD_LUT = (np.log(np.maximum(np.arange(256) / 255, 1e-6)) / np.log(1e-6)).astype(np.float32)
_HED_FROM_RGB = hed_from_rgb.astype(np.float32)
# The 8 nearest neighbours in circular order, for the local binary pattern
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _uniform_lbp_table() -> np.ndarray:
    # uniform patterns (at most 2 circular 0/1 transitions) are labelled by their number of set bits, 0..8;
    # all others share label 9
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
    transitions = (bits != np.roll(bits, 1, axis=1)).sum(1)
    return np.where(transitions <= 2, bits.sum(1), 9).astype(np.int64)


_UNIFORM_LBP = _uniform_lbp_table()
# Bounds the float32 intermediates (about 1.2 MB per 224-px patch) when called directly with many patches
_CHUNK = 128


def rgb2hed_uint8(patches: np.ndarray) -> np.ndarray:
    """:func:`skimage.color.rgb2hed` of uint8 RGB images, as float32, by a lookup table of optical densities.

    Parameters
    ----------
    patches
        ``uint8`` array whose last axis holds the R, G and B channels.

    Returns
    -------
    ``float32`` haematoxylin, eosin and residual (DAB) optical densities, same shape as ``patches``.
    """
    return np.maximum(_OD_LUT[patches] @ _HED_FROM_RGB, 0)


def lbp_histogram(grey: np.ndarray) -> np.ndarray:
    """Normalised histogram of rotation-invariant uniform local binary patterns of a batch of grey images.

    Parameters
    ----------
    grey
        ``uint8`` array ``(batch, height, width)``, at least 3 pixels on each side.

    Returns
    -------
    ``(batch, 10)`` fractions of the inner pixels per pattern: labels 0–8 count the set bits of the uniform
    patterns (at most 2 circular 0/1 transitions among the 8 nearest neighbours), label 9 takes all others.
    """
    n = len(grey)
    centre = grey[:, 1:-1, 1:-1]
    h, w = centre.shape[1:]
    code = np.zeros(centre.shape, dtype=np.uint8)
    for bit, (dy, dx) in enumerate(_NEIGHBOURS):
        code |= (grey[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] >= centre).astype(np.uint8) << bit
    labels = _UNIFORM_LBP[code].reshape(n, -1)
    counts = np.bincount((np.arange(n)[:, None] * 10 + labels).ravel(), minlength=10 * n).reshape(n, 10)
    return counts / (h * w)


class MorphologyFeatures:
    """Hand-crafted, interpretable morphology features of H&E patches, usable as a backbone.

    Pass an instance to :class:`spade_sd.Backbone` (``Backbone(MorphologyFeatures())``) to use these features
    wherever a backbone is accepted, e.g. ``spade_sd.tl.features``; its :meth:`to_config` makes the backbone's
    identity stable, so the features are cached. Per patch, in this order (see :attr:`feature_names`):

    - stain colour: mean, standard deviation and 10/50/90 % quantiles of the haematoxylin (H), eosin (E) and
      residual (D) channels of :func:`skimage.color.rgb2hed` (15 features);
    - texture: grey-level co-occurrence contrast, homogeneity, energy and correlation at each distance in
      ``glcm_distances``, averaged over 4 directions (:func:`skimage.feature.graycomatrix` on the grey image
      quantised to ``glcm_levels`` levels), and the normalised histogram of rotation-invariant uniform local binary
      patterns of the 8 nearest neighbours (10 bins; like :func:`skimage.feature.local_binary_pattern` with
      ``P=8, R=1, method="uniform"`` but with the diagonal neighbours taken as they are rather than interpolated,
      which lets one vectorised pass serve the whole batch);
    - nuclei: pixels whose haematoxylin optical density exceeds ``nuclear_threshold`` are nuclear; the fraction of
      nuclear pixels, the number of 8-connected nuclei of at least ``min_nucleus_area`` pixels per 10,000 pixels,
      and their mean area in pixels (0 without nuclei);
    - tissue fraction: pixels whose darkest channel is below ``white_threshold``.

    With the defaults that is 37 features.

    Parameters
    ----------
    nuclear_threshold
        Haematoxylin optical density (in :func:`~skimage.color.rgb2hed` units) above which a pixel counts as
        nuclear. Haematoxylin-stained nuclei typically measure 0.07–0.15, eosin-stained stroma and red cells below
        0.01. A fixed threshold, rather than a per-patch Otsu threshold, keeps densities comparable between patches
        and does not invent nuclei in patches that have none.
    min_nucleus_area
        Connected nuclear regions smaller than this many pixels are noise and are not counted as nuclei.
    white_threshold
        A pixel is background when all three of its channels are at least this bright (0–255).
    glcm_levels
        Number of grey levels for the co-occurrence matrix; fewer levels make it denser and faster.
    glcm_distances
        Pixel distances of the co-occurrence matrix.

    Examples
    --------
    >>> import numpy as np
    >>> import spade_sd as sd
    >>> morphology = sd.MorphologyFeatures()
    >>> patches = np.full((2, 64, 64, 3), 255, dtype=np.uint8)
    >>> morphology(patches).shape
    (2, 37)
    >>> morphology.feature_names[:3]
    ['H_mean', 'H_std', 'H_q10']
    >>> sd.Backbone(morphology).dim
    37
    """

    def __init__(
        self,
        *,
        nuclear_threshold: float = 0.05,
        min_nucleus_area: int = 8,
        white_threshold: int = 220,
        glcm_levels: int = 32,
        glcm_distances: Sequence[int] = (1, 3),
    ) -> None:
        if not 2 <= glcm_levels <= 256:
            raise ValueError(f"expected glcm_levels between 2 and 256, found {glcm_levels}")
        self.nuclear_threshold = float(nuclear_threshold)
        self.min_nucleus_area = int(min_nucleus_area)
        self.white_threshold = int(white_threshold)
        self.glcm_levels = int(glcm_levels)
        self.glcm_distances = tuple(int(d) for d in glcm_distances)
        self.feature_names: list[str] = [
            *(f"{stain}_{stat}" for stain in _STAINS for stat in _STAIN_STATS),
            *(f"glcm_{prop}_d{d}" for prop in _GLCM_PROPS for d in self.glcm_distances),
            *(f"lbp_{i}" for i in range(10)),
            "nuclear_fraction",
            "nuclei_per_10k_px",
            "nucleus_mean_area_px",
            "tissue_fraction",
        ]
        self.dim = len(self.feature_names)

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.to_config().items())
        return f"MorphologyFeatures({params})"

    def to_config(self) -> dict[str, Any]:
        """Parameters that determine the features; :class:`~spade_sd.Backbone` hashes them into its identity.

        Returns
        -------
        JSON-able mapping of the constructor's arguments.
        """
        return {
            "nuclear_threshold": self.nuclear_threshold,
            "min_nucleus_area": self.min_nucleus_area,
            "white_threshold": self.white_threshold,
            "glcm_levels": self.glcm_levels,
            "glcm_distances": list(self.glcm_distances),
        }

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """Describe a batch of RGB patches.

        Parameters
        ----------
        patches
            ``uint8`` array of shape ``(batch, height, width, 3)``.

        Returns
        -------
        ``float32`` array of shape ``(batch, dim)``, columns named by :attr:`feature_names`.
        """
        patches = np.asarray(patches)
        if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 RGB patches of shape (batch, height, width, 3), found {patches.dtype} {patches.shape}"
            )
        if patches.shape[1] < 3 or patches.shape[2] < 3:
            raise ValueError(f"expected patches of at least 3x3 pixels, found {patches.shape[1]}x{patches.shape[2]}")
        features = [self._describe(patches[start : start + _CHUNK]) for start in range(0, len(patches), _CHUNK)]
        return np.concatenate(features) if features else np.zeros((0, self.dim), dtype=np.float32)

    def _describe(self, patches: np.ndarray) -> np.ndarray:
        n, h, w, _ = patches.shape
        hed = np.ascontiguousarray(rgb2hed_uint8(patches).reshape(n, h * w, 3).transpose(0, 2, 1))
        quantiles = np.moveaxis(np.quantile(hed, [0.1, 0.5, 0.9], axis=-1), 0, -1)
        colour = np.concatenate([hed.mean(-1)[..., None], hed.std(-1)[..., None], quantiles], axis=-1).reshape(n, -1)

        grey = (patches @ _GREY_WEIGHTS).clip(0, 255).astype(np.uint8)
        co_occurrence = np.stack([self._co_occurrence(g) for g in grey])

        nuclei = self._nuclei(hed[:, 0].reshape(n, h, w))
        # channel-wise minimum spelled out: numpy reduces a length-3 last axis several times slower
        darkest = np.minimum(np.minimum(patches[..., 0], patches[..., 1]), patches[..., 2])
        tissue = (darkest < self.white_threshold).mean((1, 2))
        return np.concatenate([colour, co_occurrence, lbp_histogram(grey), nuclei, tissue[:, None]], axis=1).astype(
            np.float32
        )

    def _co_occurrence(self, grey: np.ndarray) -> np.ndarray:
        quantised = (grey.astype(np.uint16) * self.glcm_levels // 256).astype(np.uint8)
        glcm = graycomatrix(
            quantised, self.glcm_distances, _GLCM_ANGLES, levels=self.glcm_levels, symmetric=True, normed=True
        )
        return np.concatenate([graycoprops(glcm, prop).mean(1) for prop in _GLCM_PROPS])

    def _nuclei(self, haematoxylin: np.ndarray) -> np.ndarray:
        n, h, w = haematoxylin.shape
        mask = haematoxylin > self.nuclear_threshold
        # A structuring element that is empty along the batch axis labels every patch separately in one call;
        # labels then increase patch by patch, so each label's patch follows from the per-patch maximum label.
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[1] = True
        labels, _ = ndimage.label(mask, structure=structure)
        areas = np.bincount(labels.ravel())[1:]
        last_label = np.maximum.accumulate(labels.reshape(n, -1).max(1))
        patch_of_label = np.searchsorted(last_label, np.arange(1, len(areas) + 1))
        kept = areas >= self.min_nucleus_area
        count = np.bincount(patch_of_label[kept], minlength=n)
        total_area = np.bincount(patch_of_label[kept], weights=areas[kept], minlength=n)
        mean_area = np.divide(total_area, count, out=np.zeros(n), where=count > 0)
        return np.stack([mask.mean((1, 2)), count / (h * w) * 1e4, mean_area], axis=1)
