#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA GPU and its frameworks already installed (the device
# image has torch, jax[cuda], flax, transformers, pytest): the `cuda`-marked tests, then the GPU
# benchmarks, written to benchmarks/cuda-<date>/ (or to $OUT when set, for the device tool).
# (`bench --device cuda` also runs the main benchmark command on a GPU; not part of this script.)
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
# Each stage has its own limit; together they stay under 9 minutes (the device tool's 10-minute
# call). Tests first: the GPU correctness checks (the fused engine's CUDA kernels against the
# float64 reference, the drop-ins against SDPA) and the CUDA-only integration cases.
timeout 150 $PY -m pytest -p no:cacheprovider -q -o addopts="" -m cuda \
  tests/test_cuda.py tests/test_integrations_transformers.py 2>&1 | tee "$out/tests.txt" || status=1
# The PyTorch engines against SDPA's flash / efficient / cuDNN backends and FlexAttention:
# bfloat16, causal and not, with a score_mod, fwd and fwd+bwd, n = 4096..65536.
timeout 200 $PY benchmarks/cuda/torch_engines.py "$out" --dtypes bfloat16 --rounds 3 2>&1 \
  | tee "$out/torch-engines-log.txt" || status=1
# The JAX Pallas engine compiled for the GPU (Triton): correctness, then times against jax.nn's
# xla and cudnn implementations (bfloat16, causal and not, with a score_mod).
timeout 180 $PY benchmarks/pallas/device_check.py "$out" --lengths 4096,16384,65536 2>&1 \
  | tee "$out/pallas-log.txt" || status=1
exit $status
