"""Keys that several modules read or write: each is written here once."""

from __future__ import annotations

# Table metadata that spade_sd's loaders and pp.tile_image write, and its readers look up: table.uns[UNS_KEY]
UNS_KEY = "spade_sd"
# ... its fields
SAMPLE = "sample"
MPP = "mpp"
SPOT_DIAMETER_UM = "spot_diameter_um"
TECHNOLOGY = "technology"
# ... the table (spots' own) a derived table was computed from (tl.predict_expression's): inference prefers the own
DERIVED_FROM = "derived_from"
# obs column naming the sample (slide) of each spot, also read by GenePanel and tl.evaluate
SAMPLE_KEY = "sample"
# obsm key of spot centers (x, y)
SPATIAL_KEY = "spatial"
# Default output keys of tl.features and tl.embed
BACKBONE_KEY = "X_backbone"
EMBEDDING_KEY = "X_spade"
# Default output keys of tl.predict_expression (a table), tl.query (an obs column) and tl.transfer_labels
PREDICTED_KEY = "spade_predicted"
QUERY_KEY = "spade_query"
LABELS_KEY = "spade_labels"
# Spot diameters (µm) of technologies whose tables spade_sd recognises without a user-given scale
SPOT_DIAMETERS_UM = {"Visium": 55.0, "legacy_ST": 100.0}
