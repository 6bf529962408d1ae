#!/usr/bin/env bash
# The main job: set up and build (idempotent), then train a Transformer encoder
# block with tf_layernorm.LayerNorm, export it, reload it in a fresh process,
# check predictions, and compare step time with keras.layers.LayerNormalization.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cd examples && TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" ../.venv/bin/python demo.py "$@"
