#!/usr/bin/env bash
# Verify and benchmark the CUDA kernels on a GPU machine that has nvcc and
# PyTorch (CUDA) but no TensorFlow. Results go to $OUT (default build/gpu_results):
#   gpu_tests.json / .log   the harness grid against PyTorch float64
#   gpu_<device>.json / .md the benchmark against PyTorch's native kernel
# Usage: tests/gpu/run_device.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-build/gpu_results}"
mkdir -p "$OUT"
export TFLN_HARNESS_BUILD_DIR="${TFLN_HARNESS_BUILD_DIR:-build/gpu_harness}"
{ nvidia-smi; nvcc --version; python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } \
  > "$OUT/machine.txt" 2>&1
status=0
python3 tests/gpu/test_gpu_kernels.py --json "$OUT/gpu_tests.json" 2>&1 | tee "$OUT/gpu_tests.log"
(( PIPESTATUS[0] == 0 )) || status=1
python3 bench/bench_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
(( PIPESTATUS[0] == 0 )) || status=1
exit $status
