"""`python -m pali_jax COMMAND ...`: the `pali-jax` command (see pali_jax/cli.py)."""

import sys

from pali_jax.cli import console

sys.exit(console())
