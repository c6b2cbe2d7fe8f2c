"""`python -m convert.verify` in a checkout of the repository: `pali-jax verify` (see pali_jax/conversion.py)."""

import sys

from pali_jax.cli import console

if __name__ == "__main__":
    sys.exit(console("verify"))
