"""Plots: expert clusters over the H&E, encoder comparisons."""

from spade_sd.pl._benchmark import benchmark
from spade_sd.pl._experts import experts

__all__ = ["benchmark", "experts"]
