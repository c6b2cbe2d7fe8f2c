#!/usr/bin/env bash
# GPU check: run from the repository root on a machine with an NVIDIA GPU and JAX's CUDA
# build (plus torch with CUDA for transformers' figures). Finishes in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; assert jax.default_backend() == 'gpu', 'no GPU visible to JAX: pip install -e \".[cuda12]\"'"
PYTHONPATH=. python -m benchmarks.gpu_check "$@"
