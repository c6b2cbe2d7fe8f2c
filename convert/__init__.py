"""Thin wrappers of `pali-jax` subcommands, run as `python -m convert.NAME` in a checkout (not installed)."""
