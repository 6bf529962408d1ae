"""tf_layernorm.fuse: a model's Keras and keras-hub normalization layers compute
with the fused kernels, and nothing else about the model changes.

The oracle is the unfused model itself (Keras's and keras-hub's own math),
compared at float32 tolerance: fuse must not change what a model computes.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import keras
import tf_layernorm as tfln

KERAS_HUB_INSTALL = (
    "pip install --no-deps keras-hub==0.32.0 regex kagglehub kagglesdk tqdm pyyaml "
    "huggingface_hub tokenizers sentencepiece (or scripts/setup.sh --test); with its "
    "dependencies keras-hub would pull the full tensorflow wheel")
OUR_OPS = {"TfLayernorm>LayerNorm", "TfLayernorm>RMSNorm"}
# What Keras's and keras-hub's norms compute with: none may remain after fuse.
COMPOSITE_NORM_OPS = {"Rsqrt", "Sqrt", "Reciprocal", "Mean"}


def keras_hub():
    try:
        import keras_hub as kh
    except ImportError as e:
        pytest.fail(f"keras-hub is needed by the fuse tests but does not import ({e}): "
                    f"{KERAS_HUB_INSTALL}")
    return kh


def bert():
    return keras_hub().models.BertBackbone(
        vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=12)


def gemma():
    return keras_hub().models.GemmaBackbone(
        vocabulary_size=50, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, head_dim=8)


def llama():
    return keras_hub().models.LlamaBackbone(
        vocabulary_size=50, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32)


BACKBONES = {"bert": bert, "gemma": gemma, "llama": llama}
# Norm layers in each: embeddings + 2 per block (BERT); 2 per block + final.
NORM_LAYERS = {"bert": 5, "gemma": 5, "llama": 5}


def randomize(model, seed=0):
    """Random weights, so that a scale of ones (or Gemma's zeros) hides nothing."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.3, v.shape).astype(v.dtype))


def backbone_inputs(model, seed=1):
    rng = np.random.default_rng(seed)
    x = {"token_ids": rng.integers(1, 50, (2, 8)).astype("int32"),
         "padding_mask": np.array([[1] * 8, [1] * 5 + [0] * 3], "int32")}
    if "segment_ids" in [t.name for t in model.inputs]:
        x["segment_ids"] = rng.integers(0, 2, (2, 8)).astype("int32")
    return x


def sequence_output(out):
    return out["sequence_output"] if isinstance(out, dict) else out


def outputs_and_grads(model, x):
    """The model's output and the gradients of a fixed projection of it with
    respect to every trainable weight (zeros where none flows)."""
    with tf.GradientTape() as tape:
        y = sequence_output(model(x))
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cos(tf.range(
            y.shape[-1], dtype=tf.float32)))
    grads = tape.gradient(loss, model.trainable_weights)
    grads = [np.zeros(w.shape, "float32") if g is None else tf.convert_to_tensor(g).numpy()
             for g, w in zip(grads, model.trainable_weights)]
    return np.asarray(y), grads


def assert_same_math(before, after, rtol=1e-5):
    (y0, g0), (y1, g1) = before, after
    np.testing.assert_allclose(y1, y0, rtol=rtol, atol=rtol * np.abs(y0).max())
    # Some true gradients are 0 (e.g. a key bias under softmax), so rounding
    # is judged against the largest gradient of the model.
    scale = max(np.abs(g).max() for g in g0)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * scale)


def op_types(model, x):
    graph = tf.function(lambda: model(x)).get_concrete_function().graph
    return [op.type for op in graph.get_operations()]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_outputs_and_gradients_unchanged(name):
    model = BACKBONES[name]()
    randomize(model)
    x = backbone_inputs(model)
    before = outputs_and_grads(model, x)
    assert tfln.fuse(model) == NORM_LAYERS[name]
    assert_same_math(before, outputs_and_grads(model, x))


def test_fused_model_keeps_keras_auto_jit_off_the_fused_kernels():
    from keras.src.trainers.trainer import model_supports_jit

    model = bert()
    assert model_supports_jit(model)
    tfln.fuse(model)
    assert not model_supports_jit(model)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_fused_graph_runs_our_ops_and_no_composite_norm(name):
    model = BACKBONES[name]()
    x = backbone_inputs(model)
    unfused = op_types(model, x)
    assert COMPOSITE_NORM_OPS & set(unfused), "the unfused graph has no norm chain to remove"
    assert not OUR_OPS & set(unfused)
    tfln.fuse(model)
    fused = op_types(model, x)
    assert sum(t in OUR_OPS for t in fused) == NORM_LAYERS[name]
    assert not COMPOSITE_NORM_OPS & set(fused), sorted(COMPOSITE_NORM_OPS & set(fused))


def config_of(layer):
    try:
        return layer.get_config()
    except NotImplementedError:  # keras-hub's Gemma RMSNormalization has no get_config
        return "NotImplementedError"


def test_fuse_is_idempotent_and_keeps_variables_and_config():
    model = gemma()
    weights = list(model.weights)
    paths = [w.path for w in weights]
    config = model.get_config()
    configs = [config_of(layer) for layer in model._flatten_layers()]
    assert tfln.fuse(model) == 5
    calls = {id(layer): layer.__dict__.get("call") for layer in model._flatten_layers()}
    assert tfln.fuse(model) == 0
    assert {id(layer): layer.__dict__.get("call") for layer in model._flatten_layers()} == calls
    assert all(a is b for a, b in zip(model.weights, weights)) and len(model.weights) == len(weights)
    assert [w.path for w in model.weights] == paths
    assert model.get_config() == config
    assert [config_of(layer) for layer in model._flatten_layers()] == configs
    # Each layer keeps its class: what Keras serializes is unchanged.
    assert type(model.transformer_layers[0].pre_attention_norm).__module__ == (
        "keras_hub.src.models.gemma.rms_normalization")


class Block(keras.layers.Layer):
    """Norm layers nested in a subclassed layer: in a list, in a dict holding a
    Sequential, and as plain attributes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norms = [keras.layers.LayerNormalization(axis=[1, 2], epsilon=1e-2),
                      keras.layers.LayerNormalization(center=False, epsilon=0.5)]
        self.branch = {"ffn": keras.Sequential([keras.layers.Dense(6),
                                                keras.layers.RMSNormalization(epsilon=1e-3)])}
        self.inner = Inner()
        self.dense = keras.layers.Dense(6)

    def call(self, x):
        y = self.norms[0](x)
        y = self.norms[1](self.dense(y))
        return self.inner(self.branch["ffn"](y))


class OwnMath(keras.layers.LayerNormalization):
    """A subclass with its own call: not ours to replace."""

    def call(self, inputs):
        return super().call(inputs) * 2.0


class Inner(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scaled = keras.layers.LayerNormalization(scale=False)
        self.rms_scaling = keras.layers.LayerNormalization(rms_scaling=True)  # left to Keras
        self.own = OwnMath()

    def call(self, x):
        return self.own(self.rms_scaling(self.scaled(x)))


def test_nested_layers_in_subclassed_and_functional_models():
    inputs = keras.Input((5, 6))
    block = Block()
    model = keras.Model(inputs, keras.layers.LayerNormalization(axis=1)(block(inputs)))
    randomize(model)
    x = np.random.default_rng(3).normal(2.0, 3.0, (4, 5, 6)).astype("float32")
    model(x)
    before = outputs_and_grads(model, x)
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        dx0 = tape.gradient(tf.reduce_sum(tf.sin(model(xt))), xt)
    # 3 LayerNormalization + 1 RMSNormalization in Block, 1 after it; not
    # rms_scaling, not the subclass with its own call.
    assert tfln.fuse(model) == 5
    assert "call" not in block.inner.rms_scaling.__dict__
    assert "call" not in block.inner.own.__dict__
    assert_same_math(before, outputs_and_grads(model, x))
    with tf.GradientTape() as tape:
        tape.watch(xt)
        dx1 = tape.gradient(tf.reduce_sum(tf.sin(model(xt))), xt)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-5 * np.abs(dx0).max())
    assert sum(t in OUR_OPS for t in op_types(model, x)) == 5


def test_fuse_a_single_layer_and_rejects_non_layers():
    layer = keras.layers.RMSNormalization(axis=-1)
    assert tfln.fuse(layer) == 1
    x = np.random.default_rng(0).normal(size=(3, 7)).astype("float32")
    expected = x / np.sqrt(np.mean(x.astype("float64") ** 2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5)
    with pytest.raises(TypeError, match="expects a keras.layers.Layer or keras.Model"):
        tfln.fuse(object())


def test_a_norm_class_whose_call_changed_is_left_alone(monkeypatch):
    # A Keras/keras-hub release with other code in call has math fuse has not
    # read: such layers stay as they are, with a warning naming the class.
    from tf_layernorm import fusion

    key = ("keras_hub.src.models.llama.llama_layernorm", "LlamaLayerNorm")
    call, _ = fusion._KNOWN_CALLS[key]
    monkeypatch.setitem(fusion._KNOWN_CALLS, key, (call, "0" * 16))
    model = llama()
    with pytest.warns(UserWarning, match="LlamaLayerNorm.call is not the code"):
        assert tfln.fuse(model) == 0
    assert not any("call" in layer.__dict__ for layer in model._flatten_layers())
    monkeypatch.undo()
    assert tfln.fuse(model) == NORM_LAYERS["llama"]


def test_masking_is_kept():
    from keras.src.backend import get_keras_mask

    embed = keras.layers.Embedding(10, 8, mask_zero=True)
    # LayerNormalization passes the mask on; Keras's RMSNormalization does not
    # support masking (it drops the mask, with a warning): fused, the same.
    ln, rms = keras.layers.LayerNormalization(), keras.layers.RMSNormalization()
    # The mask reaches a layer that uses it: pooling averages the unmasked steps.
    pool = keras.layers.GlobalAveragePooling1D()
    x = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]], "int32")

    def run():
        e = embed(x)
        y, r = ln(e), rms(e)
        return y, get_keras_mask(y), pool(y), r, get_keras_mask(r)

    run()
    for v in embed.weights + ln.weights + rms.weights:
        v.assign(np.random.default_rng(5).normal(0.5, 1.0, v.shape).astype("float32"))
    y0, mask0, pooled0, r0, rmask0 = run()
    np.testing.assert_array_equal(mask0, x != 0)
    assert rmask0 is None
    assert tfln.fuse(ln) == 1 and tfln.fuse(rms) == 1
    y1, mask1, pooled1, r1, rmask1 = run()
    np.testing.assert_array_equal(mask1, mask0)
    assert rmask1 is None
    for a, b in ((y0, y1), (pooled0, pooled1), (r0, r1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_policies_are_respected(policy):
    kh = keras_hub()
    from keras_hub.src.models.gemma.rms_normalization import RMSNormalization as GemmaRMS
    from keras_hub.src.models.llama.llama_layernorm import LlamaLayerNorm
    keras.mixed_precision.set_global_policy(policy)
    try:
        inputs = keras.Input((4, 16))
        y = keras.layers.Dense(16)(inputs)
        y = keras.layers.LayerNormalization(axis=[1, 2])(y)
        y = keras.layers.RMSNormalization()(y)
        y = GemmaRMS()(y)
        y = LlamaLayerNorm()(y)
        model = keras.Model(inputs, y)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert kh is not None
    randomize(model)
    x = np.random.default_rng(4).normal(1.0, 2.0, (3, 4, 16)).astype("float32")
    y0, g0 = outputs_and_grads(model, x)
    dtypes = [w.dtype for w in model.weights]
    assert tfln.fuse(model) == 4
    y1, g1 = outputs_and_grads(model, x)
    assert model(x).dtype == policy.split("_")[1]
    assert [w.dtype for w in model.weights] == dtypes
    # Half-precision outputs: the same values up to one rounding of the
    # output dtype (the fused kernels round once, from float32).
    tol = {"mixed_float16": 2e-3, "mixed_bfloat16": 1.6e-2}[policy]
    np.testing.assert_allclose(y1.astype("float32"), y0.astype("float32"), rtol=tol,
                               atol=tol * np.abs(y0).max())
    scale = max(np.abs(g).max() for g in g0)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(b, a, rtol=4 * tol, atol=4 * tol * scale)


def run_child(code, tmp_path):
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc.stdout


def save_inputs(models, tmp_path):
    feeds, expected = {}, {}
    for name, model in models.items():
        x = backbone_inputs(model)
        feeds[name] = {k: v.tolist() for k, v in x.items()}
        expected[name] = np.asarray(sequence_output(model(x))).tolist()
    (tmp_path / "io.json").write_text(json.dumps({"x": feeds, "y": expected}))


def fused_backbones():
    models = {"bert": bert(), "gemma": gemma()}
    for model in models.values():
        randomize(model)
        assert tfln.fuse(model) == 5
    return models


def test_keras_file_saved_after_fuse_loads_without_tf_layernorm(tmp_path):
    models = fused_backbones()
    for name, model in models.items():
        model.save(tmp_path / f"{name}.keras")
    save_inputs(models, tmp_path)
    out = run_child("""
        import json, sys
        import numpy as np
        import keras, keras_hub
        io = json.load(open("io.json"))
        for name in ("bert", "gemma"):
            model = keras.saving.load_model(f"{name}.keras")
            x = {k: np.array(v, "int32") for k, v in io["x"][name].items()}
            y = model(x)
            y = y["sequence_output"] if isinstance(y, dict) else y
            np.testing.assert_allclose(np.asarray(y), np.array(io["y"][name]),
                                       rtol=1e-5, atol=1e-5)
        assert "tf_layernorm" not in sys.modules, "the child imported tf_layernorm"
        print("loaded without tf_layernorm")
    """, tmp_path)
    assert "loaded without tf_layernorm" in out


def test_saved_model_exported_after_fuse_holds_our_ops(tmp_path):
    models = fused_backbones()
    for name, model in models.items():
        model.export(str(tmp_path / name), verbose=False)
    save_inputs(models, tmp_path)
    out = run_child("""
        import json
        import numpy as np
        import tensorflow as tf
        for name in ("bert", "gemma"):
            try:
                tf.saved_model.load(name)
            except Exception as e:
                assert "TfLayernorm" in str(e), e
            else:
                raise AssertionError("loaded without tf_layernorm: our ops are not in it")
        import tf_layernorm
        io = json.load(open("io.json"))
        for name in ("bert", "gemma"):
            loaded = tf.saved_model.load(name)
            x = {k: tf.constant(v, tf.int32) for k, v in io["x"][name].items()}
            y = loaded.serve(x)
            y = y["sequence_output"] if isinstance(y, dict) else y
            np.testing.assert_allclose(y.numpy(), np.array(io["y"][name]), rtol=1e-5, atol=1e-5)
        print("served with tf_layernorm")
    """, tmp_path)
    assert "served with tf_layernorm" in out
