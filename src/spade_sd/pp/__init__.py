"""Preprocessing: spot patches, gene panels, tiles."""

from ._spot_patches import spot_patches
from ._tile_image import tile_image

__all__ = ["spot_patches", "tile_image"]
