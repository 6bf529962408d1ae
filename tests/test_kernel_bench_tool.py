"""bench/cpu_kernels_bench.cc (the TF-free, single-thread kernel timer) builds
with Bazel and runs on every ISA this CPU has, including shapes with partial
vectors, and there finds the in-place kernels (y in x's buffer, dx in dy's)
bitwise equal to the out-of-place ones (it exits 1 otherwise); bad arguments
get a usage message and exit code 2."""
import os
import re
import shutil
import subprocess

import pytest

from test_cpu_kernels import SUPPORTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool():
    bazel = shutil.which(os.environ.get("BAZEL", "bazel"))
    if bazel is None:
        pytest.fail("bazel is not on PATH; scripts/setup.sh installs it")
    subprocess.run([bazel, "build", "//cc:cpu_kernels_bench"], cwd=ROOT, check=True,
                   capture_output=True, timeout=1800)
    path = os.path.join(ROOT, "bazel-bin", "cc", "cpu_kernels_bench")
    assert os.access(path, os.X_OK)
    return path


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_LAYERNORM_CPU_ISA"}
    env.update(extra)
    return env


@pytest.mark.parametrize("isa", SUPPORTED)
@pytest.mark.parametrize("rows,d", [(3, 37), (16, 768), (2, 4097)])
def test_runs_every_dtype(tool, isa, rows, d):
    proc = subprocess.run([tool, str(rows), str(d), "3"], env=_env(TF_LAYERNORM_CPU_ISA=isa),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"ISA {isa}, {rows} x {d}, one thread, 3 reps")
    for dtype in ("float32", "bfloat16", "float16"):
        timing = r"([\d.]+) \(([\d.]+)\)\s+"
        m = re.search(rf"^{dtype}\s+{timing * 4}([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
                      proc.stdout, re.M)
        assert m, proc.stdout
        t = list(map(float, m.groups()))
        for lo, hi in zip(t[0:8:2], t[1:8:2]):  # forward, backward, both in place
            assert 0 < lo <= hi, proc.stdout
        copy, fwd_ratio, bwd_ratio = t[8:]
        assert copy > 0
        assert fwd_ratio == pytest.approx(t[0] / copy, rel=0.05, abs=0.01), proc.stdout
        assert bwd_ratio == pytest.approx(t[2] / (1.5 * copy), rel=0.05, abs=0.01), proc.stdout


@pytest.mark.parametrize("args", [["0", "768"], ["4", "-1"], ["4", "8", "0"], ["x", "8"]])
def test_bad_arguments(tool, args):
    proc = subprocess.run([tool] + args, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr
