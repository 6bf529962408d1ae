"""pytest plugin: run Keras's own normalization tests with tf_layernorm's
layers in place of Keras's.

Loaded with `-p tfln_keras_plugin` by tests/test_keras_suite.py. Keras's test
files reach the layers as `keras.src.layers.LayerNormalization` /
`RMSNormalization` (`from keras.src import layers`); both that module and the
public `keras.layers` are patched before the tests are collected. Keras's
LayerNormalization defaults to epsilon=1e-3 and ours to 1e-5 (see the
README), so the stand-in only changes that default. Every construction of a
stand-in is counted, and the outcome of each test is written as JSON to
$TFLN_KERAS_SUITE_REPORT so the caller can check both.
"""
import json
import os

import keras
import keras.src.layers

import tf_layernorm as tfln

_constructed = {"LayerNormalization": 0, "RMSNormalization": 0}
_outcomes = {}


@keras.saving.register_keras_serializable(package="tfln_keras_suite")
class KerasDefaultsLayerNorm(tfln.LayerNorm):
    """tf_layernorm.LayerNorm with Keras's default epsilon (1e-3)."""

    def __init__(self, axis=-1, epsilon=1e-3, **kwargs):
        _constructed["LayerNormalization"] += 1
        super().__init__(axis=axis, epsilon=epsilon, **kwargs)


@keras.saving.register_keras_serializable(package="tfln_keras_suite")
class CountingRMSNorm(tfln.RMSNorm):
    def __init__(self, *args, **kwargs):
        _constructed["RMSNormalization"] += 1
        super().__init__(*args, **kwargs)


for _module in (keras.src.layers, keras.layers):
    _module.LayerNormalization = KerasDefaultsLayerNorm
    _module.RMSNormalization = CountingRMSNorm


def pytest_runtest_logreport(report):
    # A test's outcome: its call phase, or the setup phase when it skipped
    # or failed there.
    if report.when == "call" or report.outcome != "passed":
        outcome = report.outcome
        if report.when != "call" and report.outcome == "failed":
            outcome = "error"
        _outcomes.setdefault(report.nodeid, outcome)
        if outcome == "failed":
            _outcomes[report.nodeid] = outcome


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TFLN_KERAS_SUITE_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"constructed": _constructed, "outcomes": _outcomes,
                       "exitstatus": int(exitstatus)}, f, indent=1)
