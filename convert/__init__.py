"""Checkpoint converters (run as `python -m convert.hf_to_flax`)."""
