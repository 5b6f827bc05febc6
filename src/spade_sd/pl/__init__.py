"""Plots: expert clusters over the H&E, encoder comparisons."""

from ._benchmark import benchmark
from ._experts import experts

__all__ = ["benchmark", "experts"]
