"""Preprocessing: spot patches, gene panels, tiles, bins and cells aggregated into pseudo-spots."""

from spade_sd.pp._aggregate import aggregate
from spade_sd.pp._spot_patches import spot_patches
from spade_sd.pp._tile_image import tile_image

__all__ = ["aggregate", "spot_patches", "tile_image"]
