"""Plots: expert clusters over the H&E, encoder comparisons, query scores and predicted expression."""

from spade_sd.pl._benchmark import benchmark
from spade_sd.pl._experts import experts
from spade_sd.pl._predictions import expression, query

__all__ = ["benchmark", "experts", "expression", "query"]
