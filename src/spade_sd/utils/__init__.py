"""Tier 0: logging, argument checks, keys and settings shared by every other tier (imports nothing of spade_sd)."""
