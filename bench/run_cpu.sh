#!/usr/bin/env bash
# Set up and build (idempotent), install the benchmark's peers, run the CPU benchmark.
# Results: bench/results/cpu.{md,json,png}. Extra arguments go to bench_cpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pip install -q -r bench/requirements.txt
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python bench/bench_cpu.py "$@"
