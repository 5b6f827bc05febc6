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
# ... the tool that made a table (tl.predict_expression, pp.tile_image): only that tool may replace it
WRITTEN_BY = "written_by"
# ... which tool wrote each output of the table, {"obs" | "obsm" | "uns": {key: tool}}: a tool overwrites only its own
OUTPUTS = "outputs"
# table.uns keys no tool writes under its key_added: spade_sd's metadata and spatialdata's
RESERVED_UNS = (UNS_KEY, "spatialdata_attrs")
# obs column naming the sample (slide) of each spot, also read by GenePanel and tl.evaluate
SAMPLE_KEY = "sample"
# obsm key of spot centers (x, y)
SPATIAL_KEY = "spatial"
# Default output keys of tl.features and tl.embed
BACKBONE_KEY = "X_backbone"
EMBEDDING_KEY = "X_spade"
# tl.features' output of SEAL's image embedding, for a backbone fine-tuned by tl.finetune (its attachment's name)
SEAL_KEY = "X_seal"
SEAL_ATTACHMENT = "seal"
# Default output keys of tl.predict_expression (a table), tl.query (an obs column) and tl.transfer_labels
PREDICTED_KEY = "spade_predicted"
QUERY_KEY = "spade_query"
LABELS_KEY = "spade_labels"
# Default output key of tl.domains (an obs column and its .uns record), which pl.domains draws
DOMAINS_KEY = "spade_domain"
# Spot diameters (µm) of technologies whose tables spade_sd recognises without a user-given scale
SPOT_DIAMETERS_UM = {"Visium": 55.0, "legacy_ST": 100.0}
# obs columns of a Visium table, as Space Ranger, spatialdata-io and scanpy write them (spade_sd's loaders write the
# last two): with circles on Visium's grid, they tell a Visium table that records no technology
VISIUM_OBS = ("in_tissue", "array_row", "array_col")
# Side in µm of the square bins of a table: pp.aggregate records it in uns[UNS_KEY]; Space Ranger's Visium HD scale
# factors use the same name
BIN_SIZE_UM = "bin_size_um"
# spatialdata-io's visium_hd reader names each bin size's shapes f"{dataset_id}_square_{size:03}um" and its table
# f"square_{size:03}um": the bins' side in µm
VISIUM_HD_BIN_NAME = r"(?:^|_)square_(\d+)um$"
# The reader spatialdata-io records in SpatialData.attrs, and the cell shapes its xenium reader writes in µm
READER_ATTR = "spatialdata_io_reader"
XENIUM_CELL_SHAPES = ("cell_boundaries", "nucleus_boundaries", "cell_circles")
# obs columns of a Xenium cell table (Xenium's cells.parquet, as spatialdata-io's xenium reader keeps them); the
# second is each cell's area in µm²
XENIUM_OBS = ("transcript_counts", "cell_area", "nucleus_area")
# obs column of pp.aggregate's table: how many bins or cells each square sums
N_AGGREGATED = "n_aggregated"
# Where a model was saved to or loaded from (SpadeModel.source), recorded by tl.embed in .uns[key]["model"][MODEL_SOURCE]
# so that a later call finds it: {SOURCE_PATH: folder} or {SOURCE_REPO: Hub repository id, SOURCE_REVISION: commit}
MODEL_SOURCE = "source"
SOURCE_PATH = "path"
SOURCE_REPO = "repo_id"
SOURCE_REVISION = "revision"
# scanpy's legacy spatial AnnData (read_visium): uns[LEGACY_SPATIAL][library_id] holds "images" and "scalefactors";
# obsm[SPATIAL_KEY] the spots' full-resolution pixels
LEGACY_SPATIAL = "spatial"
# Names spatialdata-io's xenium reader gives the cells as circles, the registered H&E image and the cell table's
# instance key (the cell ids); datasets.xenium_lung writes the same
XENIUM_CIRCLES = "cell_circles"
XENIUM_HE_IMAGE = "he_image"
XENIUM_CELL_ID = "cell_id"
# scanpy's UMAP coordinates (sc.tl.umap) and its neighbours' record, whose params["use_rep"] says what they embed;
# sd.pl.experts reuses them rather than computing another UMAP
UMAP_KEY = "X_umap"
NEIGHBORS_KEY = "neighbors"
