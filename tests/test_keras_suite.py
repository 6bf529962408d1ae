"""Keras's own LayerNormalization and RMSNormalization tests, from the
installed keras wheel, with tf_layernorm's layers in place of Keras's.

The tests run in a child pytest with tests/keras_suite/tfln_keras_plugin.py,
which patches `keras.src.layers.LayerNormalization` / `RMSNormalization` (how
Keras's test files reach them) with our layers, counts their constructions
and reports each test's outcome. Tests Keras skips on this backend would not
be passes: none may skip, and every one must pass.
"""
import json
import os
import subprocess
import sys

import keras

HERE = os.path.dirname(os.path.abspath(__file__))
KERAS_TESTS = os.path.join(os.path.dirname(keras.src.__file__), "layers", "normalization")
FILES = ["layer_normalization_test.py", "rms_normalization_test.py"]


def test_keras_normalization_tests_pass_with_our_layers(tmp_path):
    report = tmp_path / "report.json"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TFLN_KERAS_SUITE_REPORT=str(report),
               PYTHONPATH=os.path.join(HERE, "keras_suite"))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "tfln_keras_plugin", "-c", "pytest.ini", "--rootdir", str(tmp_path),
         *[os.path.join(KERAS_TESTS, f) for f in FILES]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert report.exists(), f"the child pytest wrote no report:\n{log}"
    result = json.loads(report.read_text())
    outcomes = result["outcomes"]
    not_passed = {k: v for k, v in outcomes.items() if v != "passed"}
    assert not not_passed, f"Keras's tests that did not pass with our layers: {not_passed}\n{log}"
    assert proc.returncode == 0, log
    # Both test classes ran (7 LayerNormalization tests, 4 RMSNormalization
    # tests in Keras 3.15), and with our layers, not Keras's.
    assert sum("LayerNormalizationTest" in k for k in outcomes) >= 7, outcomes
    assert sum("RMSNormalizationTest" in k for k in outcomes) >= 4, outcomes
    assert result["constructed"]["LayerNormalization"] > 0, result
    assert result["constructed"]["RMSNormalization"] > 0, result
