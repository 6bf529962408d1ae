"""The installed package: build info, TF version check, the wheel, configure."""
import glob
import json
import re
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import tensorflow as tf

import tf_layernorm as tfln

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_public_api():
    assert sorted(tfln.__all__) == sorted(
        ["LayerNorm", "RMSNorm", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm",
         "fuse", "load_ops", "build_info", "__version__"])
    for name in tfln.__all__:
        assert hasattr(tfln, name)


def test_load_ops_is_idempotent():
    assert tfln.load_ops() is tfln.load_ops()


def test_build_info_matches_running_tf():
    info = tfln.build_info()
    assert info["tf_version"].split(".")[:2] == tf.__version__.split(".")[:2]
    assert os.path.exists(info["library"])
    # CUDA kernels are in exactly when configure.py found a toolkit.
    with open(os.path.join(ROOT, ".bazelrc")) as f:
        want_cuda = "TF_LAYERNORM_NEED_CUDA=1" in f.read()
    assert info["cuda"] is want_cuda
    if want_cuda:
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", info["cuda_version"])
        assert {75, 80, 86, 89, 90} <= set(info["cuda_archs"])
        assert info["cuda_ptx"] == max(info["cuda_archs"])
    else:
        assert info["cuda_version"] is None and info["cuda_archs"] == []


def test_import_fails_clearly_on_tf_version_mismatch(tmp_path):
    # A copy of the installed package whose build info claims another TF.
    pkg = os.path.dirname(tfln.__file__)
    copy = tmp_path / "tf_layernorm"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    info = json.loads((copy / "_build_info.json").read_text())
    info["tf_version"] = "2.3.0"
    (copy / "_build_info.json").write_text(json.dumps(info))
    code = "import sys; sys.path.insert(0, sys.argv[1]); import tf_layernorm"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, cwd=str(tmp_path))
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "built against TensorFlow 2.3.0" in proc.stderr
    assert f"TensorFlow {tf.__version__} is running" in proc.stderr
    assert "configure.py" in proc.stderr


def test_wheel_is_platform_specific_and_complete():
    wheels = glob.glob(os.path.join(ROOT, "dist", "tf_layernorm-*.whl"))
    if not wheels:
        pytest.fail("no wheel in dist/: scripts/setup.sh builds it before the tests")
    wheel = wheels[0]
    tag = os.path.basename(wheel)[:-len(".whl")].split("-")[-1]
    assert tag != "any" and "linux" in tag, tag
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("tf_layernorm/_layer_norm_ops.so", "tf_layernorm/_build_info.json",
              "tf_layernorm/__init__.py", "tf_layernorm/ops.py", "tf_layernorm/layer.py",
              "tf_layernorm/fusion.py"):
        assert f in names


def test_configure_takes_flags_from_tf_sysconfig(tmp_path):
    # Run configure.py from a copy so the checkout's .bazelrc is untouched.
    shutil.copy(os.path.join(ROOT, "configure.py"), tmp_path)
    subprocess.run([sys.executable, str(tmp_path / "configure.py"), "--no-offline"], check=True,
                   capture_output=True)
    rc = (tmp_path / ".bazelrc").read_text()
    for flag in tf.sysconfig.get_compile_flags():
        if flag.startswith("-I"):
            assert f"TF_HEADER_DIR={flag[2:]}" in rc
        elif "std=" in flag:
            assert "-std=" + flag.split("std=")[1] in rc
        else:
            assert f"--copt={flag}" in rc
    lib_dir = next(f[2:] for f in tf.sysconfig.get_link_flags() if f.startswith("-L"))
    assert f"TF_SHARED_LIBRARY_DIR={lib_dir}" in rc
    assert "override_repository" not in rc


def test_library_links_tensorflow_framework_not_bundles_it():
    out = subprocess.run(["readelf", "-d", tfln.build_info()["library"]], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.fail("readelf failed: " + out.stderr)
    assert "libtensorflow_framework.so.2" in out.stdout


def test_kernels_link_statically_like_tf_serving():
    """TF Serving links //cc:layer_norm_ops_lib into its binary instead of
    loading the .so; alwayslink must keep the op and kernel registrations of
    a library nothing references (tests/serving/static_link_check.cc)."""
    bazel = shutil.which(os.environ.get("BAZEL", "bazel"))
    if bazel is None:
        pytest.skip("bazel is not on PATH")
    build = subprocess.run([bazel, "build", "//tests/serving:static_link_check"], cwd=ROOT,
                           capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([os.path.join(ROOT, "bazel-bin", "tests", "serving", "static_link_check")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    for op in ("TfLayernorm>LayerNorm", "TfLayernorm>LayerNormGrad", "TfLayernorm>RMSNorm",
               "TfLayernorm>RMSNormGrad"):
        assert f"op {op}: registered" in run.stdout
    assert "device='CPU'; T in [DT_FLOAT]; U in [DT_FLOAT]; S in [DT_FLOAT]" in run.stdout
