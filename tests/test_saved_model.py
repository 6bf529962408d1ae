"""Saving models that use tf_layernorm and reloading them in a fresh process.

Every reload runs in a child Python process (a fresh TensorFlow runtime, where
the custom ops are registered only if the child imports tf_layernorm). The
child reads its inputs from, and writes its outputs to, tmp_path as .npy files.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import keras

import tf_layernorm
from tf_layernorm import LayerNorm


def _run_child(code, tmp_path, timeout=240):
    """Runs `code` in a fresh interpreter with cwd=tmp_path (so the repository's
    source dir, which lacks the compiled library, is not importable)."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("PYTHONPATH", None)
    script = textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=timeout)


def _check_ok(proc):
    assert proc.returncode == 0, (
        f"child failed (rc={proc.returncode})\n--- stdout ---\n{proc.stdout[-4000:]}"
        f"\n--- stderr ---\n{proc.stderr[-8000:]}")


def _rand(shape, seed, scale=1.0, offset=0.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + offset).astype(np.float32)


def _functional_model():
    """Dense -> LayerNorm(-1, non-trivial weights) -> LayerNorm(axis=1,
    in_channels) -> LayerNorm([1, 2], center=False) -> Dense."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 8))
    h = keras.layers.Dense(8)(inp)
    h = LayerNorm(name="ln_last", gamma_initializer=keras.initializers.RandomUniform(0.5, 1.5),
                  beta_initializer=keras.initializers.RandomNormal(stddev=0.5))(h)
    h = LayerNorm(axis=1, in_channels=6, epsilon=1e-3, name="ln_channels",
                  beta_initializer=keras.initializers.Constant(0.25))(h)
    h = LayerNorm(axis=[1, 2], center=False, name="ln_two",
                  gamma_initializer=keras.initializers.RandomUniform(0.5, 1.5))(h)
    out = keras.layers.Dense(3)(h)
    return keras.Model(inp, out)


_CHILD_PRELUDE = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
d = sys.argv[1]
import tf_layernorm  # registers the ops before anything is loaded
import numpy as np
import tensorflow as tf
assert os.path.dirname(tf_layernorm.__file__) != os.path.join(d, "tf_layernorm")
"""


def test_keras_format_save_load_in_fresh_process(tmp_path):
    model = _functional_model()
    x = _rand((5, 6, 8), 1, scale=2.0)
    expected = model.predict(x, verbose=0)
    np.save(tmp_path / "x.npy", x)
    model.save(tmp_path / "model.keras")

    proc = _run_child(_CHILD_PRELUDE + """
import json
import keras
model = keras.saving.load_model(os.path.join(d, "model.keras"))
x = np.load(os.path.join(d, "x.npy"))
np.save(os.path.join(d, "y.npy"), model.predict(x, verbose=0))
layers = {l.name: {"type": type(l).__module__ + "." + type(l).__name__,
                   "config": l.get_config(),
                   "weights": [w.name for w in l.weights]}
          for l in model.layers if l.name.startswith("ln_")}
with open(os.path.join(d, "layers.json"), "w") as f:
    json.dump(layers, f, default=str)
""", tmp_path)
    _check_ok(proc)

    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-6, atol=1e-6)
    import json
    layers = json.loads((tmp_path / "layers.json").read_text())
    assert set(layers) == {"ln_last", "ln_channels", "ln_two"}
    for name, info in layers.items():
        assert info["type"] == "tf_layernorm.layer.LayerNorm", name
        original = model.get_layer(name)
        assert info["config"]["axis"] == original.axis
        assert info["config"]["epsilon"] == original.epsilon
        assert info["config"]["in_channels"] == original.in_channels
        assert info["weights"] == [w.name for w in original.weights]


def test_keras_export_reload_serve_in_fresh_process(tmp_path):
    model = _functional_model()
    x = _rand((4, 6, 8), 2, scale=2.0)
    expected = model.predict(x, verbose=0)
    np.save(tmp_path / "x.npy", x)
    # A second batch size: the exported signature has a None batch dim.
    x_other = _rand((7, 6, 8), 3)
    np.save(tmp_path / "x_other.npy", x_other)
    expected_other = model.predict(x_other, verbose=0)
    model.export(str(tmp_path / "exported"), verbose=False)

    proc = _run_child(_CHILD_PRELUDE + """
loaded = tf.saved_model.load(os.path.join(d, "exported"))
for name in ("x", "x_other"):
    x = tf.constant(np.load(os.path.join(d, name + ".npy")))
    np.save(os.path.join(d, "y_" + name + ".npy"), loaded.serve(x).numpy())
""", tmp_path)
    _check_ok(proc)

    np.testing.assert_allclose(np.load(tmp_path / "y_x.npy"), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "y_x_other.npy"), expected_other,
                               rtol=1e-5, atol=1e-5)


class _LNModule(tf.Module):
    def __init__(self):
        super().__init__()
        self.gamma = tf.Variable(_rand((16,), 10, scale=0.5, offset=1.0), name="gamma")
        self.beta = tf.Variable(_rand((16,), 11), name="beta")

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 16], tf.float32)])
    def f(self, x):
        return tf_layernorm.layer_norm(x, self.gamma, self.beta, axis=-1, epsilon=1e-5)


@pytest.fixture(scope="module")
def saved_module(tmp_path_factory):
    """A tf.Module calling tf_layernorm.layer_norm, saved with
    tf.saved_model.save, plus the original outputs and gradients."""
    d = tmp_path_factory.mktemp("tf_module")
    module = _LNModule()
    x = tf.constant(_rand((3, 5, 16), 12, scale=2.0, offset=0.5))
    dy = tf.constant(_rand((3, 5, 16), 13))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = module.f(x)
        loss = tf.reduce_sum(y * dy)
    gx, gg, gb = tape.gradient(loss, [x, module.gamma, module.beta])
    np.save(d / "x.npy", x.numpy())
    np.save(d / "dy.npy", dy.numpy())
    tf.saved_model.save(module, str(d / "saved"))
    return d, {"y": y.numpy(), "gx": gx.numpy(), "gg": gg.numpy(), "gb": gb.numpy()}


def test_tf_saved_model_reload_values_and_gradients_in_fresh_process(saved_module):
    d, expected = saved_module
    proc = _run_child(_CHILD_PRELUDE + """
loaded = tf.saved_model.load(os.path.join(d, "saved"))
x = tf.constant(np.load(os.path.join(d, "x.npy")))
dy = tf.constant(np.load(os.path.join(d, "dy.npy")))
with tf.GradientTape() as tape:
    tape.watch(x)
    y = loaded.f(x)
    loss = tf.reduce_sum(y * dy)
gx, gg, gb = tape.gradient(loss, [x, loaded.gamma, loaded.beta])
np.save(os.path.join(d, "child_y.npy"), y.numpy())
np.save(os.path.join(d, "child_gx.npy"), gx.numpy())
np.save(os.path.join(d, "child_gg.npy"), gg.numpy())
np.save(os.path.join(d, "child_gb.npy"), gb.numpy())
# The None batch dim of the signature: another batch size works too.
y2 = loaded.f(tf.concat([x, x], axis=0)).numpy()
np.save(os.path.join(d, "child_y2.npy"), y2)
""", d)
    _check_ok(proc)

    np.testing.assert_allclose(np.load(d / "child_y.npy"), expected["y"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.load(d / "child_y2.npy"),
                               np.concatenate([expected["y"]] * 2), rtol=1e-6, atol=1e-6)
    for k in ("gx", "gg", "gb"):
        np.testing.assert_allclose(np.load(d / f"child_{k}.npy"), expected[k],
                                   rtol=1e-5, atol=1e-5, err_msg=k)


def test_tf_saved_model_reload_without_import_fails(saved_module):
    d, _ = saved_module
    proc = _run_child("""
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
assert "tf_layernorm" not in sys.modules
tf.saved_model.load(os.path.join(sys.argv[1], "saved"))
""", d)
    assert proc.returncode != 0
    assert "Op type not registered" in proc.stderr, proc.stderr[-4000:]
