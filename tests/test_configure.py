"""configure.py's choice of how the GPU kernels are built (clang + CUDA 12
wheels by default, nvcc opt-in, CPU only), run on a copy in a temp folder."""
import os
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_ENV = ["TF_LAYERNORM_NEED_CUDA", "TF_LAYERNORM_CUDA_COMPILER", "TF_LAYERNORM_CLANG",
            "TF_LAYERNORM_CUDA_WHEELS", "TF_LAYERNORM_CUDA_ARCHS", "TF_LAYERNORM_PTX_ISA"]


def configure(tmp_path, *args, **env):
    shutil.copy(os.path.join(ROOT, "configure.py"), tmp_path / "configure.py")
    full = {k: v for k, v in os.environ.items() if k not in CUDA_ENV}
    full["TF_LAYERNORM_CUDA_WHEELS"] = str(tmp_path / "wheels")
    full.update(env)
    proc = subprocess.run([sys.executable, "configure.py"] + list(args), cwd=tmp_path, env=full,
                          capture_output=True, text=True)
    rc = tmp_path / ".bazelrc"
    lines = rc.read_text().splitlines() if rc.exists() else []
    return proc, [l for l in lines if l.startswith("build --action_env=TF_LAYERNORM")]


def fake_clang(tmp_path, version_line):
    path = tmp_path / "fake-clang++"
    path.write_text("#!/bin/sh\necho '%s'\n" % version_line)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def clang19():
    path = shutil.which("clang++-19")
    if path is None:
        pytest.fail("clang++-19 is not installed; scripts/setup.sh installs it")
    return path


def test_default_is_clang_with_cuda12_wheels(tmp_path):
    clang19()
    proc, lines = configure(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "build --action_env=TF_LAYERNORM_NEED_CUDA=1" in lines
    assert "build --action_env=TF_LAYERNORM_CUDA_COMPILER=clang" in lines
    clang = [l.split("=", 2)[2] for l in lines if "TF_LAYERNORM_CLANG=" in l]
    assert len(clang) == 1 and os.path.isabs(clang[0]) and "clang++" in clang[0]
    assert "build --action_env=TF_LAYERNORM_CUDA_ARCHS=75,80,86,89,90" in lines
    assert "build --action_env=TF_LAYERNORM_PTX_ISA=80" in lines
    assert "build --action_env=TF_LAYERNORM_CUDA_WHEELS=%s" % (tmp_path / "wheels") in lines
    assert (tmp_path / "wheels").is_dir()
    assert "CUDA 12 via" in proc.stdout and "PTX ISA 8.0" in proc.stdout


def test_archs_and_ptx_isa_overrides(tmp_path):
    clang19()
    proc, lines = configure(tmp_path, TF_LAYERNORM_CUDA_ARCHS="80;90",
                            TF_LAYERNORM_PTX_ISA="78")
    assert proc.returncode == 0, proc.stderr
    assert "build --action_env=TF_LAYERNORM_CUDA_ARCHS=80,90" in lines
    assert "build --action_env=TF_LAYERNORM_PTX_ISA=78" in lines


@pytest.mark.parametrize("how", [("--no-cuda",), ("--cuda=off",), "NEED_CUDA=0"])
def test_cpu_only(tmp_path, how):
    if how == "NEED_CUDA=0":
        proc, lines = configure(tmp_path, TF_LAYERNORM_NEED_CUDA="0")
    else:
        proc, lines = configure(tmp_path, *how)
    assert proc.returncode == 0, proc.stderr
    assert lines == ["build --action_env=TF_LAYERNORM_NEED_CUDA=0"]


def test_explicit_clang_that_is_too_old_is_an_error(tmp_path):
    old = fake_clang(tmp_path, "Ubuntu clang version 14.0.0")
    proc, lines = configure(tmp_path, TF_LAYERNORM_CLANG=old)
    assert proc.returncode != 0
    assert "TF_LAYERNORM_CLANG=%s" % old in proc.stderr and "clang 14" in proc.stderr
    assert "no clang++ >= 17" in proc.stderr


def test_explicit_clang_missing_is_an_error(tmp_path):
    proc, _ = configure(tmp_path, "--cuda=clang", TF_LAYERNORM_CLANG="/nonexistent/clang++")
    assert proc.returncode != 0
    assert "/nonexistent/clang++: not found" in proc.stderr


def test_no_clang_on_path_falls_back_to_cpu_and_says_so(tmp_path):
    # A PATH with python only: none of clang++-19/20/18/17/clang++.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(sys.executable, bindir / "python3")
    proc, lines = configure(tmp_path, PATH=str(bindir))
    assert proc.returncode == 0, proc.stderr
    assert lines == ["build --action_env=TF_LAYERNORM_NEED_CUDA=0"]
    assert "building the CPU kernels only" in proc.stdout and "clang-19" in proc.stdout
    # Asked for explicitly, the same is an error.
    proc, _ = configure(tmp_path, "--cuda=clang", PATH=str(bindir))
    assert proc.returncode != 0 and "no clang++ >= 17" in proc.stderr


def test_nvcc_is_opt_in(tmp_path):
    nvcc = shutil.which("nvcc")
    proc, lines = configure(tmp_path, "--cuda=nvcc")
    if nvcc is None:
        assert proc.returncode != 0 and "no CUDA toolkit" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert "build --action_env=TF_LAYERNORM_CUDA_COMPILER=nvcc" in lines
    home = [l.split("=", 2)[2] for l in lines if "TF_LAYERNORM_CUDA_HOME=" in l]
    assert len(home) == 1 and os.path.isfile(os.path.join(home[0], "bin", "nvcc")), lines
    assert not any("TF_LAYERNORM_CLANG" in l for l in lines)
