#!/usr/bin/env bash
# Everything a lent GPU machine (nvcc + PyTorch with CUDA, no TensorFlow, no
# network) should run, in one command that fits a 10-minute call: results as
# files under $OUT (default build/gpu_results), a summary last.
#
#   1. build      the TF-free harness (cc/kernels/layer_norm_gpu.cu + C ABI):
#                 the wheel's own GPU object when `--prebuild` linked it here
#                 (Bazel, clang, CUDA 12: carry build/gpu_harness), else nvcc
#                 for this GPU. harness_build.txt says which.
#   2. grid       every harness case vs a float64 PyTorch oracle      gpu_tests.{json,log}
#   3. bench      vs PyTorch's kernels, rows, channel axis, Inf rows  gpu_<device>.{json,md}
#   4. memcheck, racecheck, synccheck: compute-sanitizer on the small
#                 sanitizer grid                                      sanitizer_<tool>.log
# Each step gets what is left of --budget seconds (default 540) and is cut off
# when it runs out; later steps are then reported as not run.
#
# Usage: tests/gpu/run_device.sh [--budget S] [--quick] [--emulate] [--prebuild]
#   --quick     the benchmark's short version
#   --emulate   rehearsal without a GPU: the grid step runs the sanitizer
#               grid on the SIMT emulator (tests/gpu/emu); steps that need a
#               GPU are reported as skipped. Same files, same summary.
#   --prebuild  here, before the device run: link the harness with the wheel's
#               GPU object (bazel build //tests/gpu:libtfln_harness.so) into
#               build/gpu_harness (under 64 MiB: carry that folder).
#               TFLN_HARNESS_COMPILER=nvcc on the device ignores it.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-build/gpu_results}"
PY="${PYTHON:-python3}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
BUDGET=540 QUICK="" EMULATE=0 PREBUILD=0 GRID_ARGS=()
while (( $# )); do
  case "$1" in
    --budget) BUDGET="$2"; shift ;;
    --quick) QUICK="--quick" ;;
    --emulate) EMULATE=1 ;;
    --prebuild) PREBUILD=1 ;;
    -k) GRID_ARGS+=(-k "$2"); shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
export TFLN_HARNESS_BUILD_DIR="${TFLN_HARNESS_BUILD_DIR:-build/gpu_harness}"

if (( PREBUILD )); then
  "${BAZEL:-bazel}" build //tests/gpu:libtfln_harness.so //cc:build_info || exit 1
  "$PY" -c "import sys, json; sys.path.insert(0, 'tests/gpu'); import harness;
print(json.dumps(harness.install_prebuilt(sys.argv[1], sys.argv[2]), indent=1))" \
    bazel-bin/tests/gpu/libtfln_harness.so bazel-bin/cc/_build_info.json || exit 1
  ls -la "$TFLN_HARNESS_BUILD_DIR"
  exit 0
fi

mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
status=0
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME COMMAND...: runs with the time left, logs to $OUT/NAME.log
step() {
  local name="$1"; shift
  local t0 rc remaining
  remaining=$(left)
  if (( remaining < 10 )); then
    echo "$name: NOT RUN (budget spent)" | tee -a "$SUMMARY"; status=1; return
  fi
  t0=$(date +%s)
  timeout --kill-after=10 "$remaining" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    echo "$name: ok (${took} s)" | tee -a "$SUMMARY"
  elif (( rc == 124 || rc == 137 )); then
    echo "$name: CUT OFF after ${took} s (budget)" | tee -a "$SUMMARY"; status=1
  else
    echo "$name: FAILED rc=$rc (${took} s): $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ')" \
      | tee -a "$SUMMARY"; status=1
  fi
}
skip() { echo "$1: skipped ($2)" | tee -a "$SUMMARY"; }

{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  if (( EMULATE )); then echo "emulated rehearsal: $(uname -m) $(nproc) cores"; else nvidia-smi; fi
  command -v nvcc >/dev/null && nvcc --version
  "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
} > "$OUT/machine.txt" 2>&1

GRID=(tests/gpu/test_gpu_kernels.py --json "$OUT/gpu_tests.json")
if (( EMULATE )); then
  skip build "emulated: no nvcc build"
  step grid "$PY" "${GRID[@]}" --backend emu --cases sanitizer "${GRID_ARGS[@]}"
  skip bench "emulated: no GPU"
  for tool in memcheck racecheck synccheck; do skip "$tool" "emulated: no GPU"; done
else
  step build "$PY" -c "import sys; sys.path.insert(0, 'tests/gpu'); import harness;
lib = harness.build(); print(lib); print(harness.describe(lib))"
  cp "$OUT/build.log" "$OUT/harness_build.txt" 2>/dev/null
  step grid "$PY" "${GRID[@]}" --backend gpu "${GRID_ARGS[@]}"
  step bench "$PY" bench/bench_gpu.py --out "$OUT" $QUICK
  SAN=compute-sanitizer
  command -v "$SAN" >/dev/null || SAN="$(dirname "$(command -v nvcc)")/compute-sanitizer"
  for tool in memcheck racecheck synccheck; do
    step "sanitizer_$tool" "$SAN" --tool "$tool" --error-exitcode 1 --target-processes all \
      "$PY" tests/gpu/test_gpu_kernels.py --backend gpu --cases sanitizer "${GRID_ARGS[@]}"
  done
fi
echo "total: $(( $(date +%s) - START )) s of $BUDGET; results in $OUT" | tee -a "$SUMMARY"
exit $status
