"""Builds pali_jax's CPU decoding kernels (pali_jax/cpu_kernels.cc) with the package; everything
else is declared in pyproject.toml.

The kernels are an optional extension: where there is no C++ compiler or no x86-64 CPU, or the
build fails, the install goes on without them and every product takes XLA's own forms
(pali_jax/cpu_kernels.py). They include XLA's FFI headers, which jaxlib ships (a build
requirement in pyproject.toml).
"""

import platform
import sys
from pathlib import Path

from setuptools import Extension, setup


def kernels() -> list[Extension]:
    if sys.platform == "win32" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        import jaxlib
    except ImportError:
        return []
    include = Path(jaxlib.__file__).parent / "include"
    if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
        return []
    return [Extension("pali_jax._cpu_kernels", ["pali_jax/cpu_kernels.cc"], include_dirs=[str(include)],
                      extra_compile_args=["-O3", "-std=c++17"], language="c++",
                      optional=True)]


setup(ext_modules=kernels())
