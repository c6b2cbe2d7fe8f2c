"""Runs a module as `python -m` would and writes its peak RSS (VmHWM, bytes) to a file.

    python -m benchmarks.peak_rss OUT.txt convert.hf_to_flax SRC DST

The parent's `getrusage(RUSAGE_CHILDREN)` would count the pages a forked child shares with its
parent before exec; VmHWM is the high-water mark of this process's own memory map.
"""

import runpy
import sys
from pathlib import Path


def _status_bytes(field: str) -> int:
    """A memory field of this process's /proc/self/status (VmHWM, VmRSS, ...), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


if __name__ == "__main__":
    out, module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        Path(out).write_text(str(peak_rss_bytes()))
