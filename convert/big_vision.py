"""`python -m convert.big_vision` in a checkout of the repository: `pali-jax convert-big-vision` (see pali_jax/conversion.py)."""

import sys

from pali_jax.cli import console

if __name__ == "__main__":
    sys.exit(console("convert-big-vision"))
