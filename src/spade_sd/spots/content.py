"""What the spots' patches show: tissue or blank glass, and whether they look like brightfield H&E at all.

Both are told from patches already read, never by another pass over the image: the evenly spread sample of
:attr:`~spade_sd.spots.patches.SpotPatches.sample` (which the feature cache's fingerprint reads anyway), checked
before any patch is encoded, and every batch as it is encoded. Tissue is what :func:`spade_sd.pp.tile_image` calls
tissue: pixels whose HSV saturation is above ``TISSUE_SATURATION`` (glass is grey, H&E stains pink and purple).

Thresholds measured on the 112 µm patches (224 px) of every spot of her2st C2, C3, C4, C5, MOB1, MOB2, MOB3 and both
scMuscle Visium samples, and of patches centred in the slides' glass corners (32 per slide):

- tissue fraction of a spot's patch: 1st percentile 0.41 to 0.46 on her2st, 0.28 on MOB1, 0.05 on MOB3 and 0.02 on
  Visium (whose 600 px image blurs pale muscle into glass); glass patches 0 (MOB1's lavender glass: at most 0.054);
- blank patches (:func:`blank_patches`) among the spots': 0 % on her2st and MOB1, 0.25 % on MOB2, 1.1 % on MOB3,
  3.2 % and 3.6 % on Visium;
- brightness (mean of the pixels' largest channel) of spots' patches: median 171 to 228, 1st percentile ≥ 140;
  every channel's mean ≥ 123 of 255. Fluorescence is dark: a median patch brightness near 30.
"""

from __future__ import annotations

import weakref

import numpy as np

from spade_sd.spots.patches import SpotPatches
from spade_sd.spots.tiles import TISSUE_SATURATION
from spade_sd.utils.logging import logger

# A patch is blank when under this share of its pixels are tissue...
BLANK_TISSUE_FRACTION = 0.05
# ... or when its grey levels hardly vary (standard deviation, of 255): all white, all black or one flat colour
UNIFORM_STD = 2.0
# Warn when more of a call's patches than this share are blank (the real slides: at most 3.6 %)
BLANK_WARN_SHARE = 0.05
# Refuse before encoding when at least this share of the sampled patches are blank
BLANK_REFUSE_SHARE = 0.9
# Statistics use every k-th pixel of a patch, so that at least this many remain per side
STAT_PIXELS = 32
# Brightfield H&E is bright: warn below this median patch brightness, or this mean of any channel (of 255)
DARK_BRIGHTNESS = 100.0
DARK_CHANNEL = 50.0
# Patches whose sample was checked already (a fine-tuned backbone's features pass through two feature calls)
_CHECKED: weakref.WeakSet = weakref.WeakSet()


def _pixels(patches: np.ndarray) -> np.ndarray:
    """``(n, k, 3)`` float32 pixels of ``(n, y, x, 3)`` uint8 patches, every ``step``-th per side."""
    step = max(1, patches.shape[1] // STAT_PIXELS)
    sub = patches[:, ::step, ::step]
    return sub.reshape(len(sub), -1, 3).astype(np.float32)


def blank_patches(patches: np.ndarray) -> np.ndarray:
    """Which of ``(n, y, x, 3)`` uint8 RGB patches show no tissue.

    A patch is blank when under ``BLANK_TISSUE_FRACTION`` of its pixels are above ``TISSUE_SATURATION`` (HSV
    saturation), or when its grey levels vary by less than ``UNIFORM_STD``. Glass, an all-white or all-black image, one flat colour and the white beyond an image's edge are blank. In a grey
    image (no saturation) only uniform patches are.
    """
    pixels = _pixels(patches)
    value, low = pixels.max(axis=2), pixels.min(axis=2)
    saturation = np.divide(value - low, value, out=np.zeros_like(value), where=value > 0)
    tissue = (saturation > TISSUE_SATURATION).mean(axis=1)
    grey = (saturation == 0).all(axis=1)
    uniform = pixels.mean(axis=2).std(axis=1) < UNIFORM_STD
    return uniform | (~grey & (tissue < BLANK_TISSUE_FRACTION))


def _looks(brightness: float) -> str:
    if brightness > 200:
        return "white: glass, an empty or failed scan"
    if brightness < 50:
        return "black: a failed scan, or a label or mask image"
    return "flat"


def _where(patches: SpotPatches) -> str:
    geometry = patches.geometry
    return f"image {geometry.image_key!r} under the spots of shapes {geometry.shapes_key!r}"


def check_sample(patches: SpotPatches) -> None:
    """Refuse patches that nearly all show no tissue, and warn when they do not look like H&E; before any encoding.

    Reads nothing but :attr:`~spade_sd.spots.patches.SpotPatches.sample` (already read for the feature cache).

    Raises
    ------
    ValueError
        If at least ``BLANK_REFUSE_SHARE`` of the sampled patches are blank (:func:`blank_patches`).
    """
    if patches in _CHECKED:
        return
    sample = patches.sample
    blank = blank_patches(sample)
    pixels = _pixels(sample)
    if blank.mean() >= BLANK_REFUSE_SHARE:
        brightness = float(pixels.mean())
        raise ValueError(
            f"{blank.sum()} of {len(sample)} patches sampled evenly over the spots show no tissue in {_where(patches)} "
            f"(under {BLANK_TISSUE_FRACTION:.0%} of their pixels stained, or one flat colour); their mean "
            f"brightness is {brightness:.0f} of 255 ({_looks(brightness)}). Nothing was encoded. Check that image_key "
            "names the H&E image of these spots and that the transformations place the spots on its tissue."
        )
    brightness = float(np.median(pixels.max(axis=2).mean(axis=1)))
    channels = pixels.reshape(-1, 3).mean(axis=0)
    if brightness < DARK_BRIGHTNESS or channels.min() < DARK_CHANNEL:
        logger.warning(
            "The patches of %s do not look like brightfield H&E: median brightness %.0f of 255 and channel means "
            "%s (H&E: bright glass, pink and purple tissue; measured on the bundled slides: median brightness 171 "
            "to 228, every channel's mean above 120). A fluorescence or dark image gives features that mean nothing "
            "to H&E backbones; pass image_key= naming the H&E image.",
            _where(patches),
            brightness,
            np.round(channels).astype(int).tolist(),
        )
    _CHECKED.add(patches)


class BlankCount:
    """Blank patches counted batch by batch while they are encoded; :meth:`report` warns above a few percent."""

    def __init__(self) -> None:
        self.n, self.blank = 0, []

    def add(self, indices: np.ndarray, patches: np.ndarray) -> None:
        """Count the blank patches of a batch (``indices``: their positions among the spots)."""
        self.n += len(patches)
        self.blank.append(np.asarray(indices)[blank_patches(patches)])

    def report(self, patches: SpotPatches) -> None:
        """Warn when more than ``BLANK_WARN_SHARE`` of the patches counted are blank."""
        blank = np.concatenate(self.blank) if self.blank else np.empty(0, dtype=int)
        if self.n == 0 or len(blank) <= BLANK_WARN_SHARE * self.n:
            return
        rows = patches.geometry.table_rows[blank[:5]].tolist()
        logger.warning(
            "%d of %d patches (%.1f %%) of %s show no tissue (under %.0f %% of their pixels stained, or one flat "
            "colour), e.g. rows %s of table %r: their features describe glass, not tissue. Check that the spots lie "
            "on the tissue, or leave those spots out.",
            len(blank),
            self.n,
            100 * len(blank) / self.n,
            _where(patches),
            100 * BLANK_TISSUE_FRACTION,
            rows,
            patches.geometry.table_key,
        )
