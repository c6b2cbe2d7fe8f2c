#!/usr/bin/env python
"""`pali-jax generate` from a checkout of the repository (see pali_jax/generate_command.py).

    python run_generate.py [--model MODEL] [--image IMG ...] [--prompt "caption en"] [options]
"""

import sys

from pali_jax.cli import console

if __name__ == "__main__":
    sys.exit(console("generate"))
