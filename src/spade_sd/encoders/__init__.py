"""Tier 2: frozen patch encoders (timm, the packaged EfficientNet-Lite0, modules, callables) and their feature cache."""
