"""Tier 4: training the experts with Lightning (losses, batches within an expert, the fit from features to a model)."""
