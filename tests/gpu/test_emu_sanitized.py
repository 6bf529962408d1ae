"""The emulated CUDA kernels under AddressSanitizer + UndefinedBehaviorSanitizer.

The emulator runs layer_norm_gpu.cu on CPU memory, so an out-of-bounds access
in a kernel is an out-of-bounds access of a heap buffer (PyTorch allocates
through the preloaded ASan malloc: every tensor ends at a redzone), and a
misaligned vector load is a misaligned C++ access (UBSan's alignment check);
x86 forgives both without a sanitizer. The sanitized build (build.py,
sanitize=True) compiles the kernels, the harness ABI and the emulator with
-fsanitize=address,undefined; emu.cc annotates its fiber switches for ASan.

Python is not instrumented, so every run is a child process started with
LD_PRELOAD=build.asan_preload() (the script below is its entry point):
  - a subset of the harness grid (test_gpu_kernels.run_case) that takes every
    path at small sizes: rows and warp/CTA/streaming row paths, columns,
    misaligned tensors and parameters, D not a multiple of the vector width
    on every path (a few extra cases; the grid's large D are all multiples of
    8), D = 0 and rows = 0, the one-SM device's persistent loops; plus the
    selftest kernels, correct and faulting (fibers abandoned mid-block), under
    all three schedules. No report may appear.
  - the selftest's tail off-by-one write must be reported by ASan, and a signed
    overflow by UBSan: proof that the sanitizers are live in this setup.
~70 s cold on 2 cores, ~45 s of it the sanitized build of layer_norm_gpu.cu
(cached in build/emu/ by source hash); ~30 s warm.
"""
import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "emu"))
import build as emu_build  # noqa: E402  (tests/gpu/emu/build.py)
import test_emu_selftest as selftest  # noqa: E402

# Harness cases by id (test_gpu_kernels.case_id), each for a path or an edge.
GRID_SUBSET = [
    # rows = 0, D = 0 (and both), row and column layouts
    "float32-0x8x1", "float16-0x8x4", "float64-4x0x1", "bfloat16-3x0x5", "float32-0x0x1",
    # sub-warp and warp row paths, D not a multiple of the vector width
    "float32-1x1x1", "float32-37x3x1", "float16-37x31x1", "float64-37x31x1",
    "float32-37x127x1", "bfloat16-37x127x1", "float32-19x1000x1",
    # CTA-per-row, streaming backward (D > 8192), streaming forward (D > 16384)
    "float32-5x4096x1", "bfloat16-5x4096x1", "float32-3x8200x1",
    "float32-2x20000x1-rms-noscale-nocenter", "float32-5x20000x1-noscale-nocenter",
    # columns (inner > 1)
    "float64-1x1x2", "bfloat16-2x3x5", "float32-1x5x1000", "float16-4x64x30-rms-noscale-nocenter",
    "float32-3x64x5-rms-beta", "float32-2x8x3-constant-eps0",
    # misaligned tensors / parameters: scalar paths, UBSan's alignment check
    "float32-5x8x1-misaligned", "bfloat16-5x768x1-misaligned",
    "float16-5x768x1-misaligned_params", "float16-5x8192x1-misaligned_params",
    # mixed precision, no affine, non-finite rows, double statistics, edges
    "bfloat16-9x1000x1-p32", "bfloat16-5x1024x1-noscale", "bfloat16-9x1024x1-nan",
    "float32-9x1024x1-x1e+30", "bfloat16-9x64x1-rms-x1e+30-nocenter", "float32-3x64x1-pm2e38",
    "float32-5x64x1-offset1e4-offset10000", "float32-9x768x1-rms-beta",
]
# Tails on the large paths (D odd): CTA per row; CTA forward + streaming
# backward; streaming forward; float64 (2 per vector) streaming.
EXTRA_TAILS = [("float32", 3, 4097), ("float16", 2, 8195), ("bfloat16", 2, 16391),
               ("float64", 2, 8193)]
# The residual add + norm (FUSED_EMU_CASES): its pre-pass loads and stores on
# the register (tails, misaligned: element-wise), streaming (misaligned) and
# column paths, and its dsum loads in every backward.
FUSED_SUBSET = ["float32-9x127x1-add", "float16-19x1000x1-add-misaligned",
                "float32-2x20000x1-add-misaligned", "bfloat16-4x5x77-add-rms-p32-nocenter",
                "float64-2x200x40-add", "float32-1x4096x33-add"]
# Again on a 1-SM device with one resident block: persistent loops take every row.
ONE_BLOCK_SUBSET = ["float32-37x127x1", "float32-3x8200x1", "float32-1x5x1000",
                    "float16-5x768x1-misaligned_params"]

SANITIZER_MARKS = ("AddressSanitizer", "runtime error:", "LeakSanitizer")


def _tools_missing():
    for tool in ("g++", "objcopy", "readelf", "c++filt"):
        if shutil.which(tool) is None:
            return tool
    return None


def _child_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_VERSION")}
    env.update(
        LD_PRELOAD=emu_build.asan_preload(),
        # No leak check: Python never frees much of its memory at exit.
        # No fake stacks: emu.cc drops a fiber's fake stack at every switch
        # out of it, so use-after-return detection crashes the emulator
        # (GCC's default is off; set here so an inherited ASAN_OPTIONS cannot).
        ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0",
        UBSAN_OPTIONS="print_stacktrace=1")
    return env


def _run_child(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.abspath(__file__)] + list(args),
                          env=_child_env(), cwd=os.path.dirname(os.path.dirname(HERE)),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


# --- pytest ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def libs():
    # As the emulated grid: never pass by skipping where the op builds.
    missing = _tools_missing()
    if missing:
        pytest.fail("%s not found (the emulated build needs binutils and g++)" % missing)
    if len(emu_build.asan_preload().split(":")) != 2:
        pytest.fail("g++ lacks libasan.so or libubsan.so (%r)" % emu_build.asan_preload())
    import harness
    # Two cores: the small selftest build hides behind the harness's.
    with ThreadPoolExecutor(2) as pool:
        harness_lib = pool.submit(harness.build_emulated, True)
        selftest_lib = pool.submit(selftest.build_selftest, True)
        return harness_lib.result(), selftest_lib.result()


def _report(proc):
    """The child's last case and its output from the first report on."""
    out = proc.stdout
    cases = [line for line in out.splitlines() if line.startswith("case ")]
    first = min([out.find(m) for m in SANITIZER_MARKS if m in out] or [max(0, len(out) - 8000)])
    return "exit %d; last %s\n%s" % (proc.returncode, cases[-1] if cases else "case: none",
                                      out[max(0, first - 200):first + 8000])


def test_grid_subset_has_no_sanitizer_reports(libs):
    proc = _run_child("grid", *libs)
    assert proc.returncode == 0 and not any(m in proc.stdout for m in SANITIZER_MARKS), \
        _report(proc)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print("sanitized cases: %d in %.1f s; slowest %s" % (
        summary["cases"], summary["seconds"], summary["slowest"]))


def test_asan_reports_the_tail_off_by_one_write(libs):
    proc = _run_child("oob", libs[1])
    assert proc.returncode != 0 and "NOT REPORTED" not in proc.stdout, _report(proc)
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in proc.stdout, _report(proc)
    assert "WRITE of size 4" in proc.stdout, _report(proc)
    # The report's stack names the kernel's line (a frame on a fiber stack).
    assert selftest.source_line("tail_oob") in proc.stdout, _report(proc)


def test_ubsan_reports_a_signed_overflow(libs):
    proc = _run_child("overflow", libs[1])
    assert proc.returncode != 0 and "NOT REPORTED" not in proc.stdout, _report(proc)
    assert "runtime error: signed integer overflow" in proc.stdout, _report(proc)


# --- the child process (LD_PRELOAD=libasan:libubsan) --------------------------------

def _grid(harness_lib, selftest_lib):
    import numpy as np

    import harness
    import test_gpu_kernels as grid

    # The selftest kernels: correct ones under every schedule, and faults,
    # which leave fibers parked mid-block on their stacks (ASan must accept
    # the next launch reusing those stacks).
    print("case selftest kernels, every schedule", flush=True)
    st = selftest.SelfTest(selftest_lib)
    x = selftest.inputs(selftest.BLOCKS * 2 * selftest.THREADS)
    for schedule, seed in selftest.schedules():
        selftest.run_sums(st, "two_sums", x, selftest.BLOCKS, selftest.THREADS, 2, schedule, seed)
        # The 0xFF poison still reaches every __shared__ byte between ASan's redzones.
        out = selftest.run_sums(st, "unwritten_slot", x, selftest.BLOCKS, 160, 1, schedule, seed)
        assert np.isnan(out).all(), out
        for name, (args, _) in selftest.fault_cases().items():
            st.configure(schedule, seed)
            status, fault = st.call(name, *args(np.zeros(64, np.float32)))
            assert status == selftest.LAUNCH_FAILURE and fault, (name, status, fault)

    by_id = {grid.case_id(c): c for c in grid.EMU_CASES + grid.FUSED_EMU_CASES}
    missing = [i for i in GRID_SUBSET + FUSED_SUBSET + ONE_BLOCK_SUBSET if i not in by_id]
    assert not missing, "cases no longer in the grids (update the subset): %s" % missing
    base = dict(inner=1, param="same", scale=True, center=True, misaligned=False, nan=False)
    runs = [(by_id[i], False) for i in GRID_SUBSET + FUSED_SUBSET]
    runs += [(dict(base, dtype=dt, outer=rows, d=d), False) for dt, rows, d in EXTRA_TAILS]
    # A tail on the fused streaming path (odd D: pre-pass and dsum tails).
    runs += [(dict(base, dtype="bfloat16", outer=2, d=16391, residual=True), False)]
    runs += [(by_id[i], True) for i in ONE_BLOCK_SUBSET]

    k = harness.Kernels(path=harness_lib, emulated=True)
    times = []
    t0 = time.time()
    for case, one_block in runs:
        name = grid.case_id(case) + (" (one block per SM)" if one_block else "")
        print("case %s" % name, flush=True)  # the last line before a report names the case
        t = time.time()
        if one_block:
            k.configure(sms=1, one_block=True)
        try:
            # Determinism across schedules is the plain grid's job: one
            # schedule here (the in-place reruns still run, randomly scheduled).
            grid.run_case(case, k, check_determinism=False)
        finally:
            k.configure()
        times.append((time.time() - t, name))
    times.sort(reverse=True)
    print(json.dumps(dict(cases=len(runs), seconds=round(time.time() - t0, 1),
                          slowest=["%s %.1fs" % (n, s) for s, n in times[:3]])))


def _oob(selftest_lib):
    import torch

    st = selftest.SelfTest(selftest_lib)
    n = 1000  # a tensor of exactly n floats: ASan's redzone starts at out[n]
    out = torch.zeros(n, dtype=torch.float32)
    st.lib.st_tail_off_by_one(ctypes.c_void_p(out.data_ptr()), n)
    print("NOT REPORTED", flush=True)


def _overflow(selftest_lib):
    import numpy as np

    st = selftest.SelfTest(selftest_lib)
    out = np.zeros(32, np.int32)
    st.call("signed_overflow", out, 2**31 - 16)
    print("NOT REPORTED", flush=True)


if __name__ == "__main__":
    mode, paths = sys.argv[1], sys.argv[2:]
    {"grid": _grid, "oob": _oob, "overflow": _overflow}[mode](*paths)
