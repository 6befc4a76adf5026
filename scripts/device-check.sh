#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA GPU and its frameworks already installed (the device
# image has torch, jax[cuda], flax, transformers, pytest): the `cuda`-marked tests, then a GPU
# benchmark written to benchmarks/cuda-<date>/ (or to $OUT when set, for the device tool).
# Usage: bash scripts/device-check.sh            (from the repository root)
#        bash scripts/device-check.sh --tpu      (a TPU machine: only the JAX Pallas check)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
stamp=$(date -u +%Y-%m-%d)
out=${OUT:-benchmarks}/cuda-$stamp
mkdir -p "$out"
{
  date -u; uptime; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $PY -c "import torch, jax; print('torch', torch.__version__, torch.cuda.is_available()); print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$out/machine.txt"
if [ "${1:-}" = "--tpu" ]; then
  # The Pallas engine compiled for the TPU (Mosaic): correctness against the chunked engine, then
  # times against jax.nn (xla), written to $out/pallas.json.
  timeout 500 $PY benchmarks/pallas/device_check.py "$out" 2>&1 | tee "$out/pallas-log.txt"
  exit "${PIPESTATUS[0]}"
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU here: nothing to check" >&2
  exit 2
fi
status=0
# Tests first (a few minutes): the GPU correctness checks and the CUDA-only integration cases.
timeout 300 $PY -m pytest -p no:cacheprovider -q -o addopts="" -m cuda \
  tests/test_cuda.py tests/test_integrations_transformers.py 2>&1 | tee "$out/tests.txt" || status=1
# Then the benchmark: ours against torch SDPA (flash) and XLA on the GPU, float16/bfloat16 at
# lengths where the fused kernels shine, time only (memory is the allocator's peak, in the JSON).
timeout 400 $PY -m memory_efficient_attention bench --device cuda --dtype bfloat16 \
  --lengths 1024,4096,16384 --impls ours-torch,ours-jax,sdpa,xla --repeats 5 --time-budget 20 \
  --no-progress --out "$out" 2>&1 | tee "$out/bench-log.txt" || status=1
# The JAX Pallas engine compiled for the GPU (Triton): correctness, then times against jax.nn's
# xla and cudnn implementations (bfloat16, causal and not, with a score_mod).
timeout 400 $PY benchmarks/pallas/device_check.py "$out" --lengths 4096,16384,65536 2>&1 \
  | tee "$out/pallas-log.txt" || status=1
exit $status
