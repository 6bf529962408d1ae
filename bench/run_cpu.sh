#!/usr/bin/env bash
# Set up and build (idempotent), install the benchmark's peers, run the CPU
# benchmarks, each under both TensorFlow CPU allocators (plain and BFC):
#   bench_cpu.py    one op against its peers  -> bench/results/cpu.{md,json,png}
#   bench_graph.py  12 residual norms in one tf.function, and the demo model's
#                   training step             -> bench/results/graph.{md,json,png}
# Usage: bench/run_cpu.sh [--only cpu|graph] [bench_cpu.py args] [-- bench_graph.py args]
#   e.g. bench/run_cpu.sh --only cpu --cases 256x768 --dtypes float32 --repeat 8
set -euo pipefail
cd "$(dirname "$0")/.."
only=""
if [[ "${1:-}" == "--only" ]]; then
  only="${2:?--only needs cpu or graph}"
  [[ "$only" == cpu || "$only" == graph ]] || { echo "--only: cpu or graph, not '$only'" >&2; exit 2; }
  shift 2
fi
cpu_args=()
while (( $# )) && [[ "$1" != "--" ]]; do cpu_args+=("$1"); shift; done
(( $# )) && shift  # the --
graph_args=("$@")

scripts/setup.sh
.venv/bin/python -m pip install -q -r bench/requirements.txt
# tf_keras (Keras 2, TF's own LayerNormalization before Keras 3) for the
# running TensorFlow's major.minor. --no-deps: it names the package
# `tensorflow`, which would pull the ~600 MB GPU wheel next to tensorflow-cpu;
# the installed TensorFlow provides the module it imports.
tf_minor=$(.venv/bin/python -c 'import tensorflow as tf; print(".".join(tf.__version__.split(".")[:2]))' 2>/dev/null)
.venv/bin/python -m pip install -q --no-deps "tf_keras~=${tf_minor}.0" ||
  echo "bench: tf_keras ${tf_minor} not installable here; its column is skipped"
export TF_CPP_MIN_LOG_LEVEL=2
if [[ "$only" != graph ]]; then
  SECONDS=0
  .venv/bin/python bench/bench_cpu.py ${cpu_args[@]+"${cpu_args[@]}"}
  echo "bench: bench_cpu.py took ${SECONDS} s"
fi
if [[ "$only" != cpu ]]; then
  SECONDS=0
  .venv/bin/python bench/bench_graph.py ${graph_args[@]+"${graph_args[@]}"}
  echo "bench: bench_graph.py took ${SECONDS} s"
fi
