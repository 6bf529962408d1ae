"""Tests of the Keras layer tf_layernorm.LayerNorm."""
import inspect

import numpy as np
import pytest
import tensorflow as tf
import keras

import tf_layernorm
from tf_layernorm import LayerNorm


def _ref_layer_norm(x, gamma, beta, axis, epsilon):
    """float64 NumPy reference; gamma/beta have shape x.shape[sorted axes]."""
    x = np.asarray(x, np.float64)
    rank = x.ndim
    axes = sorted(a % rank for a in ([axis] if isinstance(axis, int) else axis))
    mean = x.mean(axis=tuple(axes), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=tuple(axes), keepdims=True)
    y = (x - mean) / np.sqrt(var + epsilon)
    bshape = [x.shape[d] if d in axes else 1 for d in range(rank)]
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64).reshape(bshape)
    if beta is not None:
        y = y + np.asarray(beta, np.float64).reshape(bshape)
    return y


def _param_shape(shape, axis):
    rank = len(shape)
    axes = sorted(a % rank for a in ([axis] if isinstance(axis, int) else axis))
    return tuple(shape[a] for a in axes)


def _rand(shape, seed, scale=1.0, offset=0.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + offset).astype(np.float32)


# (input shape, axis) for the comparisons against the reference and Keras.
CASES = [
    ((4, 6, 16), -1),
    ((4, 6, 16), [-2, -1]),
    ((3, 8, 10), 1),          # channel axis of (N, C, L)
    ((2, 3, 4, 5), [1, 3]),   # non-contiguous
    ((2, 3, 4, 5), [3, 1]),   # unsorted (Keras sorts)
    ((2, 3, 4, 5), (-1, -3)),  # negative, tuple
    ((2, 4, 3, 3), 1),        # channel axis of NCHW
    ((3, 4, 5), [0, 1, 2]),   # every axis
]
CASE_IDS = ["last", "last_two", "channels_NCL", "noncontiguous_1_3", "unsorted_3_1",
            "negative_tuple", "channels_NCHW", "all_axes"]


# ------------------------------------------------------------------ values --

@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_matches_numpy_reference_with_nontrivial_weights(shape, axis):
    x = _rand(shape, 0, scale=2.0, offset=0.5)
    pshape = _param_shape(shape, axis)
    gamma = _rand(pshape, 1, scale=0.5, offset=1.0)
    beta = _rand(pshape, 2)
    layer = LayerNorm(axis=axis,
                      gamma_initializer=keras.initializers.Constant(gamma),
                      beta_initializer=keras.initializers.Constant(beta))
    y = layer(x)
    assert y.shape == shape
    assert y.dtype == tf.float32
    np.testing.assert_allclose(y.numpy(), _ref_layer_norm(x, gamma, beta, axis, 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_default_epsilon_is_1e_5():
    # Small variance makes the epsilon visible in the output.
    x = _rand((3, 7), 3, scale=0.01)
    layer = LayerNorm()
    assert layer.epsilon == 1e-5
    y = layer(x).numpy()
    np.testing.assert_allclose(y, _ref_layer_norm(x, None, None, -1, 1e-5), rtol=1e-4, atol=1e-5)
    assert not np.allclose(y, _ref_layer_norm(x, None, None, -1, 1e-3), atol=1e-2)


def test_set_weights_changes_output():
    shape, axis = (5, 4, 6), -1
    x = _rand(shape, 4)
    layer = LayerNorm(axis=axis)
    layer(x)
    gamma = _rand((6,), 5, offset=1.0)
    beta = _rand((6,), 6)
    layer.set_weights([gamma, beta])
    np.testing.assert_allclose(layer(x).numpy(), _ref_layer_norm(x, gamma, beta, axis, 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_mxnet_doc_example():
    y = LayerNorm()(np.array([[1, 2, 3, 4, 5], [1, 1, 2, 2, 2]], np.float32))
    expected = [[-1.41421, -0.707105, 0.0, 0.707105, 1.41421],
                [-1.2247195, -1.2247195, 0.81647956, 0.81647956, 0.81647956]]
    np.testing.assert_allclose(y.numpy(), expected, atol=1e-4)


# -------------------------------------------- against keras LayerNormalization --

def _pair(shape, axis):
    """A built LayerNorm and keras LayerNormalization with the same weights."""
    pshape = _param_shape(shape, axis)
    gamma = _rand(pshape, 11, scale=0.5, offset=1.0)
    beta = _rand(pshape, 12)
    ours = LayerNorm(axis=axis, epsilon=1e-3)
    ours.build(shape)
    ref = keras.layers.LayerNormalization(axis=axis, epsilon=1e-3)
    ref.build(shape)
    assert tuple(ref.gamma.shape) == pshape
    ours.set_weights([gamma, beta])
    ref.set_weights([gamma, beta])
    return ours, ref


@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_outputs_match_keras_layer_normalization(shape, axis):
    ours, ref = _pair(shape, axis)
    x = _rand(shape, 13, scale=3.0, offset=-1.0)
    np.testing.assert_allclose(ours(x).numpy(), ref(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_gradients_match_keras_layer_normalization(shape, axis):
    ours, ref = _pair(shape, axis)
    x = tf.constant(_rand(shape, 14, scale=3.0, offset=-1.0))
    dy = tf.constant(_rand(shape, 15))

    def grads(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) * dy)
        gx, gg, gb = tape.gradient(loss, [x, layer.gamma, layer.beta])
        return gx.numpy(), np.asarray(gg), np.asarray(gb)

    for got, want, what in zip(grads(ours), grads(ref), ("dx", "dgamma", "dbeta")):
        assert got.shape == want.shape, what
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=what)


# ----------------------------------------------------------------- weights --

@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_weight_names_and_shapes(shape, axis):
    layer = LayerNorm(axis=axis)
    layer(_rand(shape, 0))
    assert [w.name for w in layer.weights] == ["gamma", "beta"]
    pshape = _param_shape(shape, axis)
    assert tuple(layer.gamma.shape) == pshape
    assert tuple(layer.beta.shape) == pshape
    assert len(layer.trainable_weights) == 2


def test_default_weights_are_ones_and_zeros():
    layer = LayerNorm()
    layer.build((2, 5))
    np.testing.assert_array_equal(np.asarray(layer.gamma), np.ones(5, np.float32))
    np.testing.assert_array_equal(np.asarray(layer.beta), np.zeros(5, np.float32))


def test_center_false_creates_no_beta():
    x = _rand((3, 8), 0)
    gamma = _rand((8,), 1, offset=1.0)
    layer = LayerNorm(center=False, gamma_initializer=keras.initializers.Constant(gamma))
    y = layer(x)
    assert layer.beta is None
    assert [w.name for w in layer.weights] == ["gamma"]
    np.testing.assert_allclose(y.numpy(), _ref_layer_norm(x, gamma, None, -1, 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_scale_false_creates_no_gamma():
    x = _rand((3, 8), 0)
    beta = _rand((8,), 2)
    layer = LayerNorm(scale=False, beta_initializer=keras.initializers.Constant(beta))
    y = layer(x)
    assert layer.gamma is None
    assert [w.name for w in layer.weights] == ["beta"]
    np.testing.assert_allclose(y.numpy(), _ref_layer_norm(x, None, beta, -1, 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_center_and_scale_false_has_no_weights():
    x = _rand((3, 8), 0)
    layer = LayerNorm(center=False, scale=False)
    y = layer(x)
    assert layer.weights == []
    np.testing.assert_allclose(y.numpy(), _ref_layer_norm(x, None, None, -1, 1e-5),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- in_channels --

def test_in_channels_creates_weights_at_construction():
    layer = LayerNorm(in_channels=6)
    assert layer.built
    assert len(layer.weights) == 2
    assert tuple(layer.gamma.shape) == (6,)
    assert tuple(layer.beta.shape) == (6,)
    x = _rand((4, 6), 0)
    np.testing.assert_allclose(layer(x).numpy(), _ref_layer_norm(x, None, None, -1, 1e-5),
                               rtol=1e-5, atol=1e-5)
    assert len(layer.weights) == 2


def test_in_channels_on_channel_axis():
    layer = LayerNorm(axis=1, in_channels=3)
    x = _rand((2, 3, 7), 0)
    gamma = _rand((3,), 1, offset=1.0)
    beta = _rand((3,), 2)
    layer.set_weights([gamma, beta])
    np.testing.assert_allclose(layer(x).numpy(), _ref_layer_norm(x, gamma, beta, 1, 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_in_channels_mismatched_input_raises():
    layer = LayerNorm(in_channels=6)
    with pytest.raises(ValueError, match="in_channels"):
        layer(_rand((4, 5), 0))


def test_in_channels_with_multiple_axes_raises():
    with pytest.raises(ValueError, match="in_channels"):
        LayerNorm(axis=[-2, -1], in_channels=4)


@pytest.mark.parametrize("bad", [-1, 2.0, True, "4"])
def test_in_channels_invalid_value_raises(bad):
    with pytest.raises(ValueError):
        LayerNorm(in_channels=bad)


# --------------------------------------------- regularizers and constraints --

def test_regularizers_appear_in_losses():
    gamma = _rand((5,), 1, offset=1.0)
    beta = _rand((5,), 2)
    layer = LayerNorm(gamma_initializer=keras.initializers.Constant(gamma),
                      beta_initializer=keras.initializers.Constant(beta),
                      gamma_regularizer=keras.regularizers.L2(0.1),
                      beta_regularizer=keras.regularizers.L1(0.2))
    layer(_rand((2, 5), 0))
    losses = sorted(float(v) for v in layer.losses)
    expected = sorted([0.1 * float(np.sum(gamma.astype(np.float64) ** 2)),
                       0.2 * float(np.sum(np.abs(beta.astype(np.float64))))])
    assert len(losses) == 2
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_no_regularizers_no_losses():
    layer = LayerNorm()
    layer(_rand((2, 5), 0))
    assert layer.losses == []


def test_gamma_constraint_applied_after_optimizer_step():
    x = _rand((8, 5), 0)
    xhat = _ref_layer_norm(x, None, None, -1, 1e-5).astype(np.float32)
    layer = LayerNorm(gamma_constraint=keras.constraints.NonNeg())
    layer(x)
    opt = keras.optimizers.SGD(learning_rate=10.0)
    with tf.GradientTape() as tape:
        # d loss / d gamma = sum over the batch of xhat**2 > 0: a big step
        # drives gamma far below zero unless the constraint clips it.
        loss = tf.reduce_sum(layer(x) * xhat)
    grads = tape.gradient(loss, layer.trainable_weights)
    assert np.all(np.asarray(grads[0]) > 0.1)
    opt.apply_gradients(zip(grads, layer.trainable_weights))
    gamma = np.asarray(layer.gamma)
    np.testing.assert_array_equal(gamma, np.zeros(5, np.float32))
    # beta has no constraint: it moved freely.
    assert not np.allclose(np.asarray(layer.beta), 0.0)


# ----------------------------------------------------------------- masking --

def _masked_input():
    x = _rand((3, 4, 6), 0)
    x[0, 3] = 0.0
    x[2, 1:] = 0.0
    expected_mask = np.array([[True, True, True, False],
                              [True, True, True, True],
                              [True, False, False, False]])
    return x, expected_mask


def test_supports_masking():
    assert LayerNorm().supports_masking is True


def test_compute_mask_passes_mask_through():
    layer = LayerNorm()
    x, mask = _masked_input()
    out = layer.compute_mask(tf.constant(x), tf.constant(mask))
    np.testing.assert_array_equal(np.asarray(out), mask)


def test_mask_propagates_in_sequential_model():
    x, expected = _masked_input()
    model = keras.Sequential([keras.Input((4, 6)), keras.layers.Masking(0.0), LayerNorm()])
    y = model(x)
    mask = getattr(y, "_keras_mask", None)
    assert mask is not None
    np.testing.assert_array_equal(np.asarray(mask), expected)


def test_mask_propagates_in_functional_model():
    x, expected = _masked_input()
    inp = keras.Input((4, 6))
    masked = keras.layers.Masking(0.0)(inp)
    out = LayerNorm()(masked)
    # The symbolic output carries the mask, and a masked consumer sees it.
    assert getattr(out, "_keras_mask", None) is not None
    model = keras.Model(inp, out)
    y = model(x)
    np.testing.assert_array_equal(np.asarray(y._keras_mask), expected)

    # A downstream RNN uses the mask: sample 0 (last step masked) gives what
    # the RNN gives on its first three steps alone.
    inp2 = keras.Input((None, 6))
    rnn = keras.layers.SimpleRNN(3, seed=0)
    rnn_model = keras.Model(inp2, rnn(LayerNorm()(keras.layers.Masking(0.0)(inp2))))
    y_masked = rnn_model(x).numpy()
    y_short = rnn_model(x[:1, :3]).numpy()
    np.testing.assert_allclose(y_masked[:1], y_short, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ config --

def _constructor_args():
    params = inspect.signature(LayerNorm.__init__).parameters
    return [p for p in params if p not in ("self", "kwargs")]


def test_get_config_contains_every_constructor_argument():
    config = LayerNorm().get_config()
    for name in _constructor_args():
        assert name in config, name


def test_get_config_round_trip_defaults():
    layer = LayerNorm()
    config = layer.get_config()
    assert LayerNorm.from_config(config).get_config() == config


def test_get_config_round_trip_non_defaults():
    layer = LayerNorm(axis=[1, 3], epsilon=1e-3, center=False, scale=True,
                      beta_initializer="ones",
                      gamma_initializer=keras.initializers.Constant(2.0),
                      beta_regularizer=keras.regularizers.L1(0.01),
                      gamma_regularizer=keras.regularizers.L2(0.02),
                      beta_constraint=keras.constraints.NonNeg(),
                      gamma_constraint=keras.constraints.MaxNorm(3.0),
                      name="my_ln", trainable=False)
    config = layer.get_config()
    assert config["axis"] == [1, 3]
    assert config["epsilon"] == 1e-3
    assert config["center"] is False
    assert config["name"] == "my_ln"
    assert config["trainable"] is False
    clone = LayerNorm.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.gamma_regularizer, keras.regularizers.L2)
    assert isinstance(clone.gamma_constraint, keras.constraints.MaxNorm)


def test_get_config_round_trip_in_channels():
    layer = LayerNorm(axis=1, in_channels=3)
    config = layer.get_config()
    assert config["in_channels"] == 3
    clone = LayerNorm.from_config(config)
    assert clone.get_config() == config
    assert clone.built and len(clone.weights) == 2


def test_serialize_deserialize_round_trip():
    layer = LayerNorm(axis=-2, epsilon=1e-4)
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(restored, LayerNorm)
    assert restored.get_config() == layer.get_config()


# ------------------------------------------------------ shapes and symbolic --

@pytest.mark.parametrize("shape,axis", [((None, 5), -1), ((None, 3, 8), 1),
                                        ((None, 2, 3, 4), [1, 3]), ((7, None, 4), [-1])])
def test_compute_output_shape(shape, axis):
    assert tuple(LayerNorm(axis=axis).compute_output_shape(shape)) == shape


def test_compute_output_shape_axis_out_of_range_raises():
    with pytest.raises(ValueError):
        LayerNorm(axis=3).compute_output_shape((None, 4, 5))


def test_symbolic_input_call():
    inp = keras.Input((None, 16))
    layer = LayerNorm()
    out = layer(inp)
    assert tuple(out.shape) == (None, None, 16)
    assert out.dtype == "float32"
    assert tuple(layer.gamma.shape) == (16,)
    model = keras.Model(inp, out)
    x = _rand((2, 5, 16), 0)
    np.testing.assert_allclose(model(x).numpy(), _ref_layer_norm(x, None, None, -1, 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_unknown_normalized_dim_raises():
    with pytest.raises(ValueError):
        LayerNorm()(keras.Input((4, None)))


def test_float16_input_gives_float32_output():
    x16 = _rand((4, 6, 8), 0, scale=2.0).astype(np.float16)
    gamma = _rand((8,), 1, scale=0.5, offset=1.0)
    beta = _rand((8,), 2)
    layer = LayerNorm(gamma_initializer=keras.initializers.Constant(gamma),
                      beta_initializer=keras.initializers.Constant(beta))
    y = layer(tf.constant(x16))
    assert layer.compute_dtype == "float32"
    assert y.dtype == tf.float32
    np.testing.assert_allclose(y.numpy(), _ref_layer_norm(x16, gamma, beta, -1, 1e-5),
                               rtol=1e-2, atol=1e-2)


def test_mixed_float16_policy_matches_keras():
    x = _rand((4, 6, 8), 0, scale=2.0)
    ours = LayerNorm(epsilon=1e-3, dtype="mixed_float16")
    ref = keras.layers.LayerNormalization(epsilon=1e-3, dtype="mixed_float16")
    y, y_ref = ours(x), ref(x)
    assert ours.gamma.dtype == "float32"  # variables stay float32
    assert y.dtype == tf.float16
    np.testing.assert_allclose(y.numpy().astype(np.float32), y_ref.numpy().astype(np.float32),
                               atol=5e-3)


# ---------------------------------------------------------------- training --

def test_fit_decreases_loss():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 8)).astype(np.float32)
    y = (x @ rng.standard_normal((8, 1))).astype(np.float32)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), LayerNorm(),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    history = model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    ln = model.layers[1]
    assert not np.allclose(np.asarray(ln.gamma), 1.0)  # gamma was trained


def test_tf_function_traces_once_for_dynamic_shapes():
    layer = LayerNorm()
    layer.build((None, None, 16))
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None, None, 16], tf.float32)])
    def f(x):
        traces.append(1)
        return layer(x)

    for i, (n, t) in enumerate([(2, 3), (5, 7), (1, 1), (4, 9)]):
        x = _rand((n, t, 16), i)
        y = f(tf.constant(x))
        assert y.shape == (n, t, 16)
        np.testing.assert_allclose(y.numpy(), _ref_layer_norm(x, None, None, -1, 1e-5),
                                   rtol=1e-5, atol=1e-5)
    assert len(traces) == 1


# ------------------------------------------------------------ bad arguments --

@pytest.mark.parametrize("axis", ["-1", 1.0, None, True, [0, "1"], [1.0], (-1, False)])
def test_axis_of_bad_type_raises_type_error(axis):
    with pytest.raises(TypeError):
        LayerNorm(axis=axis)


def test_empty_axis_raises_value_error():
    with pytest.raises(ValueError):
        LayerNorm(axis=[])


def test_axis_out_of_range_raises_on_build():
    with pytest.raises(ValueError):
        LayerNorm(axis=2)(_rand((3, 4), 0))


def test_duplicate_axis_raises_on_build():
    with pytest.raises(ValueError):
        LayerNorm(axis=[1, -1])(_rand((3, 4), 0))


def test_package_exports():
    assert tf_layernorm.LayerNorm is LayerNorm
    assert callable(tf_layernorm.layer_norm)


# --------------------------------------------------- Keras 3.15 parity extras --

@pytest.mark.parametrize("shape,axis", CASES[:4], ids=CASE_IDS[:4])
def test_rms_scaling_matches_keras(shape, axis):
    pshape = _param_shape(shape, axis)
    gamma = _rand(pshape, 21, scale=0.5, offset=1.0)
    with pytest.warns(UserWarning, match="rms_scaling"):
        ours = LayerNorm(axis=axis, epsilon=1e-3, rms_scaling=True)
    with pytest.warns(UserWarning):
        ref = keras.layers.LayerNormalization(axis=axis, epsilon=1e-3, rms_scaling=True)
    ours.build(shape)
    ref.build(shape)
    assert ours.beta is None and ref.beta is None
    ours.set_weights([gamma])
    ref.set_weights([gamma])
    x = tf.constant(_rand(shape, 22, scale=2.0, offset=1.5))
    dy = tf.constant(_rand(shape, 23))
    got = []
    for layer in (ours, ref):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * dy)
        gx, gg = tape.gradient(loss, [x, layer.gamma])
        got.append((y.numpy(), gx.numpy(), np.asarray(gg)))
    for a, b, what in zip(got[0], got[1], ("y", "dx", "dgamma")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=what)


def test_rms_scaling_round_trips_through_config():
    with pytest.warns(UserWarning):
        layer = LayerNorm(rms_scaling=True, epsilon=1e-3)
    config = layer.get_config()
    assert config["rms_scaling"] is True
    with pytest.warns(UserWarning):
        clone = LayerNorm.from_config(config)
    assert clone.rms_scaling is True
    assert LayerNorm().get_config()["rms_scaling"] is False


def test_supports_jit_is_false_so_auto_jit_stays_off():
    from keras.src.trainers.trainer import model_supports_jit
    ours = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8), LayerNorm()])
    ref = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8),
                            keras.layers.LayerNormalization()])
    assert LayerNorm().supports_jit is False
    assert model_supports_jit(ref)  # the Keras model would be XLA-compiled on GPU
    assert not model_supports_jit(ours)


def test_compile_jit_compile_true_falls_back_to_the_fused_kernel():
    # Keras turns jit_compile=True off (with a warning) for models holding a
    # layer with supports_jit=False, so training runs the fused op.
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), LayerNorm()])
    with pytest.warns(UserWarning, match="jit_compile"):
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert model.jit_compile is False
    model.fit(np.ones((4, 8), np.float32), np.zeros((4, 4), np.float32), verbose=0)


def test_xla_compiled_train_step_matches_fused_training():
    """A custom train step under tf.function(jit_compile=True) traces the
    layer in an XLA context: it compiles (composite ops, no custom op) and
    trains exactly like the fused kernel does."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((64, 8)).astype(np.float32))
    y = tf.constant((x.numpy() @ rng.standard_normal((8, 1))).astype(np.float32))

    def train(jit):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                                  LayerNorm(axis=-1), keras.layers.Dense(1)])
        opt = keras.optimizers.SGD(0.05)
        opt.build(model.trainable_variables)

        @tf.function(jit_compile=jit)
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)
            return loss

        losses = [float(step(x[i:i + 16], y[i:i + 16])) for i in range(0, 64, 16)] * 1
        if jit:  # really compiled by XLA: the HLO exists, so no custom op was in it
            hlo = step.experimental_get_compiler_ir(x[:16], y[:16])(stage="hlo")
            assert "TfLayernorm" not in hlo
        return losses, [v.numpy() for v in model.trainable_variables]

    loss_jit, w_jit = train(True)
    loss_ref, w_ref = train(False)
    np.testing.assert_allclose(loss_jit, loss_ref, rtol=1e-4)
    for a, b in zip(w_jit, w_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy,dtype", [("mixed_float16", tf.float16),
                                          ("mixed_bfloat16", tf.bfloat16)])
def test_mixed_precision_runs_fused_op_on_half_tensor(policy, dtype):
    layer = LayerNorm(dtype=policy)
    layer.build((4, 16))
    assert layer.gamma.dtype == "float32" and layer.beta.dtype == "float32"

    @tf.function
    def f(x):
        return layer(x)

    x = tf.constant(_rand((4, 16), 0, scale=2.0), dtype=dtype)
    graph = f.get_concrete_function(x).graph
    fused = [op for op in graph.get_operations() if op.type == "TfLayernorm>LayerNorm"]
    assert len(fused) == 1
    op = fused[0]
    # x goes in as the half tensor (no float32 copy), gamma/beta as float32.
    assert op.inputs[0].dtype == dtype and op.inputs[1].dtype == tf.float32
    assert op.inputs[0].op.type == "Placeholder"
    y = f(x)
    assert y.dtype == dtype
    ref = _ref_layer_norm(x.numpy().astype(np.float64), None, None, -1, 1e-5)
    np.testing.assert_allclose(y.numpy().astype(np.float64), ref, atol=2e-2)


@pytest.mark.parametrize("shape,axis", [((0, 8), -1), ((3, 0, 5), -1), ((2, 3, 4), [1, 2])])
def test_zero_size_inputs_match_keras(shape, axis):
    ours = LayerNorm(axis=axis, epsilon=1e-3)
    ref = keras.layers.LayerNormalization(axis=axis, epsilon=1e-3)
    x = tf.zeros(shape)[:0] if shape[0] == 2 else tf.zeros(shape)
    y_ours, y_ref = ours(x), ref(x)
    assert y_ours.shape == y_ref.shape == x.shape
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(ours(x))
    gx, gg = tape.gradient(loss, [x, ours.gamma])
    assert gx.shape == x.shape
    np.testing.assert_array_equal(np.asarray(gg), np.zeros(ours.gamma.shape))
