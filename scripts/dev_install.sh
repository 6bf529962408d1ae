#!/usr/bin/env bash
# Rebuild and reinstall the wheel into .venv (developer loop; setup.sh does it all).
set -euo pipefail
cd "$(dirname "$0")/.."
bazel build //:build_pip_pkg >/dev/null 2>&1 || bazel build //:build_pip_pkg
rm -f dist/tf_layernorm-*.whl
PYTHON_BIN_PATH=.venv/bin/python bazel-bin/build_pip_pkg dist >/dev/null
.venv/bin/pip install -q --force-reinstall --no-deps dist/tf_layernorm-*.whl
