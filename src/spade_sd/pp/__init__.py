"""Preprocessing: spot patches, gene panels, tiles."""

from ._spot_patches import spot_patches

__all__ = ["spot_patches"]
