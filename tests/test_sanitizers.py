"""CI step: the CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.

Runs scripts/sanitize.sh: a bazel --config=asan build of the op library (CPU
only, in its own output directory), a self-test that a planted heap overflow
and signed overflow are reported, then the op tests and the fuzzers with the
sanitizer runtimes preloaded into Python, for the best ISA and the baseline.
Any test failure or sanitizer report fails this test. Several minutes: the
sanitized build of the kernels and the instrumented test run.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_kernels_have_no_asan_or_ubsan_reports(tmp_path):
    bazel = shutil.which(os.environ.get("BAZEL", "bazel"))
    if bazel is None:
        # CI always has bazel after scripts/setup.sh: never a silent skip.
        pytest.fail("bazel is not on PATH; scripts/setup.sh installs it")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LD_PRELOAD", "TF_LAYERNORM_CPU_ISA", "PYTEST_ADDOPTS")}
    env.update(PYTHON=sys.executable, BAZEL=bazel, TMPDIR=str(tmp_path))
    out = tmp_path / "sanitize.log"
    with open(out, "w") as f:
        proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "sanitize.sh")], cwd=ROOT,
                              env=env, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
    text = out.read_text(errors="replace")
    summary = "\n".join(line for line in text.splitlines() if "[sanitize]" in line)
    print(summary)
    assert proc.returncode == 0, summary + "\n...\n" + text[-20000:]
    assert "OK: zero ASan/UBSan reports" in text, summary
