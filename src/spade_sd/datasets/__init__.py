"""Real spatial transcriptomics + H&E data sets, fetched with pooch or found locally, and a synthetic generator."""

from spade_sd.datasets._loaders import her2st, mouse_olfactory_bulb, visium_muscle
from spade_sd.datasets._registry import fetch, registry
from spade_sd.datasets._synthetic import synthetic
from spade_sd.datasets._xenium import xenium_lung

__all__ = ["fetch", "her2st", "mouse_olfactory_bulb", "registry", "synthetic", "visium_muscle", "xenium_lung"]
