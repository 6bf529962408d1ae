#!/usr/bin/env bash
# Set up and build (idempotent), install the benchmark's peers, run the CPU benchmark.
# Results: bench/results/cpu.{md,json,png}. Extra arguments go to bench_cpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pip install -q -r bench/requirements.txt
# tf_keras (Keras 2, TF's own LayerNormalization before Keras 3) for the
# running TensorFlow's major.minor. --no-deps: it names the package
# `tensorflow`, which would pull the ~600 MB GPU wheel next to tensorflow-cpu;
# the installed TensorFlow provides the module it imports.
tf_minor=$(.venv/bin/python -c 'import tensorflow as tf; print(".".join(tf.__version__.split(".")[:2]))' 2>/dev/null)
.venv/bin/python -m pip install -q --no-deps "tf_keras~=${tf_minor}.0" ||
  echo "bench: tf_keras ${tf_minor} not installable here; its column is skipped"
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python bench/bench_cpu.py "$@"
