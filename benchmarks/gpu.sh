#!/usr/bin/env bash
# The prepared GPU check: needs no package registry. The GPU machines have jax
# (CUDA), flax, optax and numpy; fedjaxsim installs without its dependencies.
# Usage (repository root): bash benchmarks/gpu.sh [extra gpu_benchmark.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
  || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 470 python3 benchmarks/gpu_benchmark.py "$@"
