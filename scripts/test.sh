#!/usr/bin/env bash
# Set up and build (idempotent), then run the full test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" .venv/bin/python -m pytest tests -ra "$@"
