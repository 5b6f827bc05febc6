"""Tier 3, torch only: standardization, two-stage clustering, routing, the experts' heads, the subspace, SpadeModel.

Embedding with a saved model needs nothing above this tier: no Lightning, scikit-learn or scanpy.
"""
