#!/usr/bin/env bash
# Builds the platform wheel from what Bazel built.
#   bazel build //:build_pip_pkg && bazel-bin/build_pip_pkg [DEST_DIR]
# (or ./build_pip_pkg.sh [DEST_DIR] from the source root after the build).
set -euo pipefail

DEST="$(realpath -m "${1:-dist}")"
PYTHON="${PYTHON_BIN_PATH:-python3}"

if [[ -d "$0.runfiles/tf_layernorm" ]]; then
  SRC="$0.runfiles/tf_layernorm"
  BIN="$SRC"
else
  SRC="$(cd "$(dirname "$0")" && pwd)"
  BIN="$SRC/bazel-bin"
fi
for f in "$BIN/cc/_layer_norm_ops.so" "$BIN/cc/_build_info.json"; do
  [[ -f "$f" ]] || { echo "build_pip_pkg: $f is missing; run bazel build //:build_pip_pkg" >&2; exit 1; }
done

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/tf_layernorm" "$DEST"
cp "$SRC/setup.py" "$SRC/MANIFEST.in" "$SRC/README.md" "$STAGE/"
cp "$SRC"/tf_layernorm/*.py "$STAGE/tf_layernorm/"
cp "$BIN/cc/_layer_norm_ops.so" "$BIN/cc/_build_info.json" "$STAGE/tf_layernorm/"
chmod u+w "$STAGE"/tf_layernorm/*

"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$STAGE"
ls -1 "$DEST"/tf_layernorm-*.whl
