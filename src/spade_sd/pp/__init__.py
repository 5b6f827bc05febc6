"""Preprocessing: spot patches, gene panels, tiles."""

from spade_sd.pp._spot_patches import spot_patches
from spade_sd.pp._tile_image import tile_image

__all__ = ["spot_patches", "tile_image"]
