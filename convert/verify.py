"""Checks a converted directory against its manifest (sizes and sha256 of every file).

    python -m convert.verify DIR

Prints `ok: DIR (N files)` and exits 0, or one line `error: ...` naming the first missing, resized,
changed or unlisted file and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from pali_jax.cli import run_main
from pali_jax.model_dir import verify


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m convert.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="a directory written by convert.hf_to_flax or fine-tuning's export")
    args = parser.parse_args(argv)

    def body() -> None:
        print(f"ok: {args.dir} ({verify(args.dir)} files)")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
