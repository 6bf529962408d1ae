"""bench/cpu_kernels_bench.cc (the TF-free, single-thread kernel timer) builds
with Bazel and runs on every ISA this CPU has, including shapes with partial
vectors; bad arguments get a usage message and exit code 2."""
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
        m = re.search(rf"^{dtype}\s+([\d.]+) \(([\d.]+)\)\s+([\d.]+) \(([\d.]+)\)\s+([\d.]+)$",
                      proc.stdout, re.M)
        assert m, proc.stdout
        fwd_min, fwd_med, bwd_min, bwd_med = map(float, m.groups()[:4])
        assert 0 < fwd_min <= fwd_med and 0 < bwd_min <= bwd_med


@pytest.mark.parametrize("args", [["0", "768"], ["4", "-1"], ["4", "8", "0"], ["x", "8"]])
def test_bad_arguments(tool, args):
    proc = subprocess.run([tool] + args, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr
