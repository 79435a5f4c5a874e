#!/usr/bin/env bash
# The prepared GPU check: needs no package registry. The GPU machines have jax
# (CUDA), flax, optax, chex and numpy; fedjaxsim installs without its dependencies.
# 1. benchmarks/gpu_benchmark.py: plan sweep at cohort 1,000, then cohorts
#    10-10,000 with the fastest plan (about 5 minutes);
# 2. the FedAvg-vs-NumPy and engine invariance tests on the GPU, at float32
#    matmul precision (XLA:GPU would otherwise use TF32 for float32 dots).
# Usage (repository root): bash benchmarks/gpu.sh [extra gpu_benchmark.py flags]
# Results land in $OUT (or ./gpu_out): gpu_results.jsonl, gpu_log.txt, tests.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
timeout 360 python3 benchmarks/gpu_benchmark.py --out "$OUT/gpu_results.jsonl" "$@" 2>&1 | tee "$OUT/gpu_log.txt" \
  | grep -v '^{' 
echo "benchmark exit: ${PIPESTATUS[0]}"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 100 python3 -m pytest -q -x -p no:cacheprovider \
  tests/algorithms/test_fed_avg.py tests/engine/test_engine_invariance.py > "$OUT/tests.txt" 2>&1
echo "GPU tests exit: $?"; tail -3 "$OUT/tests.txt"
