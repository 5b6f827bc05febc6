"""Keys that several modules read or write: each is written here once."""

from __future__ import annotations

# Table metadata that spade_sd's loaders and pp.tile_image write, and its readers look up: table.uns[UNS_KEY]
UNS_KEY = "spade_sd"
# ... its fields
SAMPLE = "sample"
MPP = "mpp"
SPOT_DIAMETER_UM = "spot_diameter_um"
TECHNOLOGY = "technology"
# obs column naming the sample (slide) of each spot, also read by GenePanel and tl.evaluate
SAMPLE_KEY = "sample"
# obsm key of spot centers (x, y)
SPATIAL_KEY = "spatial"
# Default output keys of tl.features and tl.embed
BACKBONE_KEY = "X_backbone"
EMBEDDING_KEY = "X_spade"
# Spot diameters (µm) of technologies whose tables spade_sd recognises without a user-given scale
SPOT_DIAMETERS_UM = {"Visium": 55.0, "legacy_ST": 100.0}
