"""Plots: experts and spatial domains over the H&E, encoder comparisons, query scores and predicted expression."""

from spade_sd.pl._benchmark import benchmark
from spade_sd.pl._domains import domains
from spade_sd.pl._experts import experts
from spade_sd.pl._predictions import expression, query

__all__ = ["benchmark", "domains", "experts", "expression", "query"]
