"""Tier 1, no torch: which elements are meant, spot geometry, lazy patches, tiles over tissue, the gene panel."""
