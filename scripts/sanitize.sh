#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the CPU kernels.
#
#   scripts/sanitize.sh [pytest args...]
#
# 1. bazel build --config=asan of the op library (CPU only, incremental; its
#    own output directory, so the normal build is left alone);
# 2. stages it as the tf_layernorm package of an overlay virtualenv on top of
#    $PYTHON's (default .venv): the overlay's python is sys.executable, so the
#    tests' subprocesses (which drop PYTHONPATH) load the sanitized library too;
# 3. self-test: a deliberate heap overflow and a deliberate signed overflow in
#    a throwaway library built with the same flags must each be reported, or
#    the setup could not see a real one;
# 4. runs the op tests and the fuzzers under LD_PRELOAD of the sanitizer
#    runtimes, once with the best ISA of this CPU and once with
#    TF_LAYERNORM_CPU_ISA=baseline (test_cpu_kernels.py forces every ISA in
#    its own subprocesses already and runs in the first pass only);
# 5. fails on any test failure and on any sanitizer report (log_path files).
#
# Environment: PYTHON (default .venv/bin/python), BAZEL (default bazel),
# SANITIZE_ISAS (default "auto baseline"), TFLN_FUZZ_EXAMPLES (the fuzzers'
# budget), KEEP_SANITIZE_DIR=1 keeps the staging directory.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
START=$SECONDS
log() { printf '\033[1m[sanitize]\033[0m %s\n' "$*"; }
die() { printf '\033[1m[sanitize]\033[0m FAILED: %s\n' "$*" >&2; exit 1; }

PY="${PYTHON:-$ROOT/.venv/bin/python}"
BAZEL="${BAZEL:-bazel}"
[[ -x "$PY" ]] || die "no Python at $PY (scripts/setup.sh --test creates .venv, or set PYTHON)"
command -v "$BAZEL" >/dev/null || die "bazel ($BAZEL) is not on PATH (scripts/setup.sh installs it)"
grep -q '^build:asan ' .bazelrc 2>/dev/null ||
  die ".bazelrc has no asan config: re-run python configure.py (with the options you use)"

# The op tests and the fuzzers (tests/test_fuzz*.py, whichever exist), whole:
# nothing in them is deselected. The rest of the suite is left to the normal
# run: test_layer.py, test_saved_model.py, test_distribute.py reach the same
# kernels through Keras / SavedModel / tf.distribute (what runs under the
# sanitizers is the kernels, not that plumbing); test_packaging.py checks the
# installed wheel and spawns a normal bazel build; test_gpu_registration.py is
# about CUDA, and this build is CPU only.
TESTS=(tests/test_ops.py tests/test_errors.py tests/test_rms_norm.py tests/test_cpu_kernels.py)
for f in tests/test_fuzz*.py; do [[ -f "$f" ]] && TESTS+=("$f"); done

# 1. Build ----------------------------------------------------------------------
log "bazel build --config=asan //cc:_layer_norm_ops.so"
"$BAZEL" build --config=asan //cc:_layer_norm_ops.so //cc:_build_info.json
BIN="$("$BAZEL" info --config=asan bazel-bin 2>/dev/null)"
LIB="$BIN/cc/_layer_norm_ops.so"
[[ -f "$LIB" && -f "$BIN/cc/_build_info.json" ]] || die "$LIB was not built"
# The library must carry the instrumentation (not a stale normal build).
SYMS="$(nm -D --undefined-only "$LIB")"
grep -q '__asan_report_load' <<<"$SYMS" || die "$LIB has no ASan instrumentation"
grep -q '__ubsan_handle_' <<<"$SYMS" || die "$LIB has no UBSan instrumentation"
# The runtimes it was linked against: preloaded into the uninstrumented Python.
runtime() { ldd "$LIB" | awk -v n="$1" '$1 ~ "^"n"\\.so" && $3 ~ /^\// {print $3; exit}'; }
LIBASAN="$(runtime libasan)"
LIBUBSAN="$(runtime libubsan)"
[[ -n "$LIBASAN" && -n "$LIBUBSAN" ]] || die "cannot find libasan/libubsan of $LIB: $(ldd "$LIB")"

# 2. Stage ----------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tfln-sanitize.XXXXXX")"
if [[ -z "${KEEP_SANITIZE_DIR:-}" ]]; then trap 'rm -rf "$WORK"' EXIT; fi
"$PY" -m venv --without-pip "$WORK/venv"
OVERLAY_PY="$WORK/venv/bin/python"
SITE="$("$OVERLAY_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# The base environment's site-packages (and its .pth files) after the overlay's.
"$PY" -c 'import site, sys; print("import site; " + "; ".join(
    "site.addsitedir(%r)" % p for p in site.getsitepackages()))' >"$SITE/zz_tfln_base_env.pth"
mkdir "$SITE/tf_layernorm"
cp tf_layernorm/*.py "$SITE/tf_layernorm/"
cp "$LIB" "$BIN/cc/_build_info.json" "$SITE/tf_layernorm/"
chmod u+w "$SITE"/tf_layernorm/*

# Reports go to files ($REPORTS/{asan,ubsan}.PID), from every process, test
# subprocesses included. GCC's two runtimes each keep their own report file but
# export the same __sanitizer_* symbols, so only the first one loaded (ASan,
# which must come first) takes log_path from its options; UBSan's is set by
# every overlay Python at startup (a .pth hook) through libubsan's own symbol.
REPORTS="$WORK/reports"
mkdir "$REPORTS"
cat >"$SITE/_tfln_sanitizer_logs.py" <<'PY'
import ctypes, os
_lib, _path = os.environ.get("TFLN_LIBUBSAN"), os.environ.get("TFLN_UBSAN_LOG_PATH")
if _lib and _path:
    ctypes.CDLL(_lib).__sanitizer_set_report_path(_path.encode())
PY
echo "import _tfln_sanitizer_logs" >"$SITE/_tfln_sanitizer_logs.pth"
export TFLN_LIBUBSAN="$LIBUBSAN" TFLN_UBSAN_LOG_PATH="$REPORTS/ubsan"
export LD_PRELOAD="$LIBASAN $LIBUBSAN${LD_PRELOAD:+ $LD_PRELOAD}"
# detect_leaks=0: Python and TensorFlow keep their allocations until exit.
# abort_on_error: the process dies on the first report (pytest's faulthandler
# names the test); -fno-sanitize-recover=all does the same for UBSan.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$REPORTS/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

where="$(cd "$WORK" && "$OVERLAY_PY" -c 'import tf_layernorm; print(tf_layernorm.build_info()["library"])' \
  2>"$WORK/import.err")" || die "the sanitized package does not import: $(tail -c 3000 "$WORK/import.err")"
[[ "$where" == "$SITE/tf_layernorm/_layer_norm_ops.so" ]] || die "imported $where, not the sanitized library"
log "sanitized library: $LIB"
log "LD_PRELOAD=$LD_PRELOAD"

reports() { find "$REPORTS" -type f | sort; }
show_reports() {
  local f
  for f in $(reports); do
    printf '\n===== %s =====\n' "$f"
    head -c 40000 "$f"  # stacks run on through TensorFlow and Python frames
  done
  printf '\n'
  grep -h -e '^SUMMARY' -e 'runtime error' $(reports) || true
}

# 3. Self-test: the setup must see a planted bug (in a throwaway library) -------
CANARY_SRC="$WORK/canary.cc"
cat >"$CANARY_SRC" <<'EOF'
#include <cstdint>
#include <cstdlib>
extern "C" float canary_heap_overflow(int64_t n) {  // reads p[n] of n floats
  float* p = static_cast<float*>(std::malloc(n * sizeof(float)));
  for (int64_t i = 0; i < n; ++i) p[i] = 1.0f;
  float s = 0;
  for (int64_t i = 0; i <= n; ++i) s += p[i];
  std::free(p);
  return s;
}
extern "C" int canary_signed_overflow(int a) { return a + 1; }
EOF
"${CXX:-g++}" -shared -fPIC -O3 -g -fsanitize=address,undefined -fno-sanitize-recover=all \
  -o "$WORK/canary.so" "$CANARY_SRC"
for c in "canary_heap_overflow(16):asan:heap-buffer-overflow" \
         "canary_signed_overflow(2147483647):ubsan:signed integer overflow"; do
  IFS=: read -r call kind want <<<"$c"
  set +e
  (cd "$WORK" && "$OVERLAY_PY" -c "import ctypes; ctypes.CDLL('$WORK/canary.so').$call") \
    >/dev/null 2>&1
  rc=$?
  set -e
  found="$(cat "$REPORTS"/${kind}.* 2>/dev/null || true)"
  ((rc != 0)) && grep -q "$want" <<<"$found" ||
    die "self-test: $call exited $rc with no '$want' report in $REPORTS/$kind.*; the setup cannot detect errors"
  rm -f "$REPORTS"/*
  log "self-test: $call reported ($want) and exited $rc, as it must"
done

# 4. The tests ------------------------------------------------------------------
status=0
for isa in ${SANITIZE_ISAS:-auto baseline}; do
  files=("${TESTS[@]}")
  if [[ "$isa" != auto ]]; then
    files=()
    for f in "${TESTS[@]}"; do [[ "$f" != tests/test_cpu_kernels.py ]] && files+=("$f"); done
  fi
  log "TF_LAYERNORM_CPU_ISA=$isa: ${files[*]}"
  t0=$SECONDS
  set +e
  isa_env=(-u TF_LAYERNORM_CPU_ISA)
  [[ "$isa" != auto ]] && isa_env=(TF_LAYERNORM_CPU_ISA="$isa")
  env "${isa_env[@]}" "$OVERLAY_PY" -m pytest -p no:cacheprovider -q -ra "${files[@]}" "$@"
  rc=$?
  set -e
  log "TF_LAYERNORM_CPU_ISA=$isa: pytest exit $rc in $((SECONDS - t0)) s"
  if ((rc != 0)); then status=1; fi
  if [[ -n "$(reports)" ]]; then status=1; break; fi
done

# 5. Verdict --------------------------------------------------------------------
if [[ -n "$(reports)" ]]; then
  show_reports
  die "sanitizer reports above ($(reports | wc -l) files), $((SECONDS - START)) s"
fi
((status == 0)) || die "tests failed (no sanitizer report), $((SECONDS - START)) s"
log "OK: zero ASan/UBSan reports, all tests passed, $((SECONDS - START)) s"
