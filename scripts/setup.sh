#!/usr/bin/env bash
# Sets up everything on a fresh machine, idempotently, reusing what is built:
#   1. Bazel (Debian's bazel-bootstrap + bazel-rules-java) if no bazel is on PATH,
#      and clang-19 (the CUDA 12 kernels' compiler, see configure.py) unless a
#      CPU-only or nvcc build is asked for;
#   2. a virtualenv .venv with the pinned TensorFlow/Keras (requirements*.txt);
#   3. python configure.py (writes .bazelrc from tf.sysconfig);
#   4. bazel build of the op library, the platform wheel in dist/, installed in .venv.
# Usage: scripts/setup.sh [--test]   (--test also installs the test requirements and keras-hub)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
WITH_TEST=0
[[ "${1:-}" == "--test" ]] && WITH_TEST=1

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
SUDO=""
[[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null && SUDO="sudo"

# 1. Bazel --------------------------------------------------------------------
if ! command -v "${BAZEL:-bazel}" >/dev/null; then
  log "installing Bazel (Debian bazel-bootstrap, bazel-rules-java)"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q bazel-bootstrap bazel-rules-java
elif [[ ! -d /usr/share/bazel/rules/java ]] && "${BAZEL:-bazel}" --version 2>/dev/null | grep -q no_version; then
  log "installing bazel-rules-java (Debian Bazel builds offline with it)"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q bazel-rules-java
fi

# The GPU kernels: clang compiles them against NVIDIA's CUDA 12 wheels, which
# Bazel fetches (pip) and checks itself. No clang >= 17: install Debian's 19.
CUDA_MODE="${TF_LAYERNORM_CUDA_COMPILER:-clang}"
[[ "${TF_LAYERNORM_NEED_CUDA:-1}" == 0 ]] && CUDA_MODE=off
have_clang() {
  local c
  for c in clang++-19 clang++-20 clang++-18 clang++-17; do command -v "$c" >/dev/null && return 0; done
  return 1
}
if [[ "$CUDA_MODE" == clang && -z "${TF_LAYERNORM_CLANG:-}" ]] && ! have_clang; then
  log "installing clang-19 (compiles the CUDA 12 kernels)"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q clang-19 lld-19
fi

# 2. Python environment -------------------------------------------------------
PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
REQ_FILES=(requirements.txt)
(( WITH_TEST )) && REQ_FILES+=(requirements-test.txt)
REQS=()
for f in "${REQ_FILES[@]}"; do REQS+=(-r "$f"); done
# Reinstall only when the pins (or TF_PACKAGE) change.
STAMP=".venv/.installed-$( (cat "${REQ_FILES[@]}"; echo "${TF_PACKAGE:-}") | sha256sum | cut -c1-16)"
if [[ ! -f "$STAMP" ]]; then
  log "installing pinned requirements"
  .venv/bin/python -m pip install -q --upgrade pip
  if [[ -n "${TF_PACKAGE:-}" ]]; then
    .venv/bin/python -m pip install -q "$TF_PACKAGE" $(grep -v -E '^(#|tensorflow)' requirements.txt)
    (( WITH_TEST )) && .venv/bin/python -m pip install -q -r requirements-test.txt
  else
    .venv/bin/python -m pip install -q "${REQS[@]}"
  fi
  touch "$STAMP"
fi
# keras-hub (tests/test_fuse.py builds small BERT/Gemma/Llama backbones): its
# declared dependencies would pull the full `tensorflow` wheel (and
# tensorflow-text) next to tensorflow-cpu, so it goes in without them; what it
# needs to import is in requirements-test.txt.
KERAS_HUB_PIN="keras-hub==0.32.0"
KERAS_HUB_STAMP=".venv/.installed-keras-hub-$(echo "$KERAS_HUB_PIN" | sha256sum | cut -c1-16)"
if (( WITH_TEST )) && [[ ! -f "$KERAS_HUB_STAMP" ]]; then
  log "installing $KERAS_HUB_PIN (--no-deps)"
  .venv/bin/python -m pip install -q --no-deps "$KERAS_HUB_PIN"
  touch "$KERAS_HUB_STAMP"
fi

# 3. Configure ----------------------------------------------------------------
.venv/bin/python configure.py

# 4. Build, package, install --------------------------------------------------
log "bazel build //:build_pip_pkg"
"${BAZEL:-bazel}" build //:build_pip_pkg
rm -f dist/tf_layernorm-*.whl
PYTHON_BIN_PATH="$ROOT/.venv/bin/python" bazel-bin/build_pip_pkg dist
.venv/bin/python -m pip install -q --force-reinstall --no-deps dist/tf_layernorm-*.whl
log "installed $(ls dist/tf_layernorm-*.whl) into .venv"
