"""RMSNorm: tf_layernorm.rms_norm and tf_layernorm.RMSNorm, on the fused
LayerNorm kernels. Oracles: float64 PyTorch (torch.nn.functional.rms_norm
semantics) and keras.layers.RMSNormalization side by side."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import keras
import torch

import tf_layernorm as tfln
from tf_layernorm import RMSNorm, rms_norm

torch.set_num_threads(1)

RMS_OP = "TfLayernorm>RMSNorm"
RMS_GRAD_OP = "TfLayernorm>RMSNormGrad"


def _axes(axis, rank):
    return sorted(a % rank for a in ([axis] if isinstance(axis, int) else axis))


def _pshape(shape, axis):
    return tuple(shape[a] for a in _axes(axis, len(shape)))


def torch_rms(x, gamma, axis, eps, dy):
    """float64 PyTorch: torch.nn.functional.rms_norm over the (permuted-last)
    axes, and its autograd gradients. Returns numpy y, dx, dgamma (or None)."""
    shape = x.shape
    axes = _axes(axis, len(shape))
    perm = [d for d in range(len(shape)) if d not in axes] + axes
    inverse = [perm.index(d) for d in range(len(shape))]
    X = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    G = torch.tensor(np.asarray(gamma, np.float64), requires_grad=True) if gamma is not None \
        else None
    pshape = tuple(shape[a] for a in axes)
    Y = torch.nn.functional.rms_norm(X.permute(perm), pshape, G, eps).permute(inverse)
    Y.backward(torch.tensor(np.asarray(dy, np.float64)))
    return (Y.detach().numpy(), X.grad.numpy(),
            None if G is None else G.grad.numpy())


CASES = [
    ((4, 6, 16), -1),
    ((5, 1), -1),                # D = 1
    ((3, 1029), -1),             # vector tails
    ((4, 6, 16), [-2, -1]),
    ((3, 8, 10), 1),             # channel axis (inner > 1)
    ((2, 5, 300), 1),            # channel axis, long columns
    ((2, 3, 4, 5), [1, 3]),      # non-contiguous
    ((2, 3, 4, 5), [3, 1]),      # unsorted
    ((3, 4, 5), [0, 1, 2]),      # every axis
]
IDS = ["last", "D1", "tail", "last2", "channels", "channels_long", "noncontig", "unsorted",
       "all"]


@pytest.mark.parametrize("scale", [True, False], ids=["scale", "noscale"])
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
def test_rms_norm_float64_matches_torch(shape, axis, scale):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 2 + 0.7
    gamma = rng.standard_normal(_pshape(shape, axis)) + 1 if scale else None
    dy = rng.standard_normal(shape)
    xt = tf.constant(x)
    gt = tf.constant(gamma) if scale else None
    with tf.GradientTape() as tape:
        tape.watch(xt)
        if scale:
            tape.watch(gt)
        y = rms_norm(xt, gt, axis=axis, epsilon=1e-6)
    grads = tape.gradient(y, [xt] + ([gt] if scale else []), output_gradients=tf.constant(dy))
    ry, rdx, rdg = torch_rms(x, gamma, axis, 1e-6, dy)
    np.testing.assert_allclose(y.numpy(), ry, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads[0].numpy(), rdx, rtol=1e-10, atol=1e-10)
    if scale:
        np.testing.assert_allclose(grads[1].numpy(), rdg, rtol=1e-10, atol=1e-10)


# Tolerances per x dtype: float32 statistics, outputs rounded once to x's dtype.
TOL = {tf.float32: 2e-5, tf.float16: 2e-3, tf.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype,pdt", [(tf.float32, tf.float32), (tf.float16, tf.float16),
                                       (tf.float16, tf.float32), (tf.bfloat16, tf.bfloat16),
                                       (tf.bfloat16, tf.float32)],
                         ids=["f32", "f16", "f16_f32", "bf16", "bf16_f32"])
@pytest.mark.parametrize("shape,axis", [((64, 768), -1), ((4, 33, 7), 1), ((2, 6, 40), [-2, -1])],
                         ids=["rows", "channels", "last2"])
def test_rms_norm_low_precision_matches_torch(shape, axis, dtype, pdt):
    rng = np.random.default_rng(2)
    # The oracle sees exactly the rounded inputs.
    x = tf.cast(rng.standard_normal(shape) * 3 + 0.5, dtype)
    g = tf.cast(rng.standard_normal(_pshape(shape, axis)) * 0.5 + 1, pdt)
    dy = tf.cast(rng.standard_normal(shape), dtype)
    with tf.GradientTape() as tape:
        tape.watch([x, g])
        y = rms_norm(x, g, axis=axis)
    dx, dg = tape.gradient(y, [x, g], output_gradients=dy)
    assert y.dtype == dtype and dx.dtype == dtype and dg.dtype == pdt
    f64 = lambda t: tf.cast(t, tf.float64).numpy()  # noqa: E731
    ry, rdx, rdg = torch_rms(f64(x), f64(g), axis, 1e-6, f64(dy))
    tol = TOL[dtype]
    np.testing.assert_allclose(f64(y), ry, rtol=tol, atol=tol * np.abs(ry).max())
    np.testing.assert_allclose(f64(dx), rdx, rtol=tol, atol=tol * np.abs(rdx).max())
    rows = np.prod(shape) / np.prod(_pshape(shape, axis))
    dg_tol = TOL[pdt] if pdt != tf.float32 else 2e-5
    np.testing.assert_allclose(f64(dg), rdg, rtol=dg_tol,
                               atol=max(dg_tol, tol) * np.abs(rdg).max() * np.sqrt(rows) / 4)


def test_rms_norm_runs_the_fused_ops():
    f = tf.function(lambda x, g: tf.gradients(rms_norm(x, g), [x, g]))
    graph = f.get_concrete_function(tf.TensorSpec([4, 16]), tf.TensorSpec([16])).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count(RMS_OP) == 1 and types.count(RMS_GRAD_OP) == 1
    assert "TfLayernorm>LayerNorm" not in types


def test_rms_norm_differs_from_layer_norm():
    # Rows with a nonzero mean: RMSNorm keeps it, LayerNorm removes it.
    x = np.full((2, 8), 3.0, np.float32) + np.arange(8, dtype=np.float32)
    y = rms_norm(x).numpy()
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    assert (y > 0).all()
    assert not np.allclose(y, tfln.layer_norm(x).numpy(), atol=0.1)


def test_default_epsilon_is_1e_6():
    x = np.full((1, 4), 1e-3, np.float32)  # mean square 1e-6: epsilon doubles it
    np.testing.assert_allclose(rms_norm(x).numpy(), np.full((1, 4), 1 / np.sqrt(2)), rtol=1e-5)
    np.testing.assert_allclose(rms_norm(x, epsilon=0.0).numpy(), np.ones((1, 4)), rtol=1e-5)


def test_gradient_through_rstd_output_matches_torch():
    """The raw op's rstd output is differentiable too (its exact term)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 12)) + 0.4
    g = rng.standard_normal(12) + 1
    w1, w2 = rng.standard_normal((5, 12)), rng.standard_normal((5, 1))
    xt, gt = tf.constant(x), tf.constant(g)
    with tf.GradientTape() as tape:
        tape.watch([xt, gt])
        y, rstd = tfln.load_ops().tf_layernorm_rms_norm(
            xt, gt, S=tf.float64, epsilon=1e-6, begin_norm_axis=-1, num_norm_axes=1, scale=True)
        loss = tf.reduce_sum(y * w1) + tf.reduce_sum(rstd * w2)
    dx, dg = tape.gradient(loss, [xt, gt])
    X = torch.tensor(x, requires_grad=True)
    G = torch.tensor(g, requires_grad=True)
    R = torch.rsqrt((X ** 2).mean(-1, keepdim=True) + 1e-6)
    L = (X * R * G * torch.tensor(w1)).sum() + (R * torch.tensor(w2)).sum()
    L.backward()
    np.testing.assert_allclose(rstd.numpy(), R.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(dx.numpy(), X.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dg.numpy(), G.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape,axis", [((3, 5, 7), -1), ((3, 5, 7), 1), ((4, 3, 5), [0, 2])],
                         ids=["last", "channels", "noncontig"])
def test_double_backward_matches_torch(shape, axis):
    rng = np.random.default_rng(4)
    axes = _axes(axis, len(shape))
    pshape = _pshape(shape, axis)
    x, v, w = (rng.standard_normal(shape) for _ in range(3))
    gamma = rng.standard_normal(pshape) + 1
    xt, gt = tf.Variable(x), tf.Variable(gamma)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_sum(rms_norm(xt, gt, axis=axis) * w)
        gx, gg = inner.gradient(loss, [xt, gt])
        penalty = tf.reduce_sum(gx * v) + tf.reduce_sum(tf.square(gx)) + tf.reduce_sum(gg ** 3)
    ours = outer.gradient(penalty, [xt, gt])

    X = torch.tensor(x, requires_grad=True)
    G = torch.tensor(gamma, requires_grad=True)
    perm = [d for d in range(len(shape)) if d not in axes] + axes
    Y = torch.nn.functional.rms_norm(X.permute(perm), pshape, G, 1e-6)
    L = (Y * torch.tensor(w).permute(perm)).sum()
    GX, GG = torch.autograd.grad(L, [X, G], create_graph=True)
    P = (GX * torch.tensor(v)).sum() + (GX ** 2).sum() + (GG ** 3).sum()
    ref = torch.autograd.grad(P, [X, G])
    for o, r, what in zip(ours, ref, ("x", "gamma")):
        np.testing.assert_allclose(o.numpy(), r.numpy(), rtol=1e-9, atol=1e-9, err_msg=what)


def test_xla_context_uses_composite_with_same_numbers():
    rng = np.random.default_rng(5)
    x = tf.constant(rng.standard_normal((6, 40)).astype(np.float32) + 0.5)
    g = tf.constant(rng.standard_normal(40).astype(np.float32) + 1)

    def fwd_bwd(x, g):
        with tf.GradientTape() as tape:
            tape.watch([x, g])
            y = rms_norm(x, g)
            loss = tf.reduce_sum(y * y * 0.5 + y)
        return [y] + tape.gradient(loss, [x, g])

    jit = tf.function(fwd_bwd, jit_compile=True)
    hlo = jit.experimental_get_compiler_ir(x, g)(stage="hlo")
    assert "TfLayernorm" not in hlo
    for a, b in zip(jit(x, g), tf.function(fwd_bwd)(x, g)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


def test_zero_size_inputs():
    y = rms_norm(tf.zeros([0, 8]), tf.ones([8]))
    assert y.shape == (0, 8)
    x = tf.zeros([3, 0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = rms_norm(x)
    assert y.shape == (3, 0) and tape.gradient(y, x).shape == (3, 0)
    g = tf.ones([5])
    with tf.GradientTape() as tape:
        tape.watch(g)
        loss = tf.reduce_sum(rms_norm(tf.zeros([0, 5]), g))
    np.testing.assert_array_equal(tape.gradient(loss, g).numpy(), np.zeros(5))


def test_repeats_bitwise_with_many_threads():
    rng = np.random.default_rng(6)
    x = tf.constant(rng.standard_normal((2048, 1024)).astype(np.float32))
    g = tf.constant(rng.standard_normal(1024).astype(np.float32))
    dy = tf.constant(rng.standard_normal((2048, 1024)).astype(np.float32))

    def run():
        with tf.GradientTape() as tape:
            tape.watch([x, g])
            y = rms_norm(x, g)
        return [y.numpy()] + [t.numpy() for t in tape.gradient(y, [x, g], output_gradients=dy)]

    for a, b in zip(run(), run()):
        assert a.tobytes() == b.tobytes()


# ------------------------------------------------------------- bad input --

def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="gamma has shape"):
        rms_norm(tf.ones([2, 8]), tf.ones([7]))
    with pytest.raises(TypeError, match="axis"):
        rms_norm(tf.ones([2, 8]), axis=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        rms_norm(tf.ones([2, 8]), epsilon=-1.0)
    with pytest.raises(TypeError):
        rms_norm(tf.ones([2, 8], tf.int32))


def test_raw_ops_validate_their_inputs():
    ops = tfln.load_ops()
    x = tf.ones([4, 8])
    with pytest.raises(tf.errors.InvalidArgumentError, match="gamma"):
        ops.tf_layernorm_rms_norm(x, tf.ones([3]), S=tf.float32, epsilon=1e-6,
                                  begin_norm_axis=-1, num_norm_axes=1, scale=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="epsilon"):
        ops.tf_layernorm_rms_norm(x, tf.ones([8]), S=tf.float32, epsilon=float("nan"),
                                  begin_norm_axis=-1, num_norm_axes=1, scale=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="rstd"):
        ops.tf_layernorm_rms_norm_grad(x, x, tf.ones([8]), tf.ones([4, 2]), begin_norm_axis=-1,
                                       num_norm_axes=1, scale=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="dy"):
        ops.tf_layernorm_rms_norm_grad(tf.ones([4, 7]), x, tf.ones([8]), tf.ones([4, 1]),
                                       begin_norm_axis=-1, num_norm_axes=1, scale=True)
    with pytest.raises((tf.errors.InvalidArgumentError, tf.errors.NotFoundError)):
        ops.tf_layernorm_rms_norm(tf.ones([4, 8], tf.float16), tf.ones([8], tf.bfloat16),
                                  S=tf.float32, epsilon=1e-6, begin_norm_axis=-1,
                                  num_norm_axes=1, scale=True)


# ------------------------------------------------------------- the layer --

def test_layer_defaults_and_config_match_keras():
    ours, theirs = RMSNorm(), keras.layers.RMSNormalization()
    assert ours.epsilon == theirs.epsilon == 1e-6
    assert ours.axis == theirs.axis == -1
    ours.build((2, 8))
    theirs.build((2, 8))
    assert [w.path.split("/")[-1] for w in ours.weights] == \
        [w.path.split("/")[-1] for w in theirs.weights] == ["scale"]
    np.testing.assert_array_equal(ours.scale.numpy(), np.ones(8, np.float32))
    config = RMSNorm(axis=[1, 2], epsilon=1e-4, name="n").get_config()
    clone = RMSNorm.from_config(config)
    assert clone.axis == [1, 2] and clone.epsilon == 1e-4 and clone.name == "n"


# Keras's RMSNormalization broadcasts its scale from the right, so it only
# runs when the normalized axes are the trailing ones; ours runs on any axes
# (checked against PyTorch below).
@pytest.mark.parametrize("shape,axis", [((4, 6, 16), -1), ((4, 6, 16), [1, 2]),
                                        ((4, 6, 16), [2, 1]), ((2, 3, 4, 5), (-2, -1)),
                                        ((7, 5), 1)],
                         ids=["last", "last2", "unsorted", "negative_tuple", "rank2"])
def test_layer_matches_keras_rms_normalization(shape, axis):
    rng = np.random.default_rng(7)
    x = tf.constant(rng.standard_normal(shape).astype(np.float32) * 2 + 0.3)
    ours, theirs = RMSNorm(axis=axis), keras.layers.RMSNormalization(axis=axis)
    ours.build(shape)
    theirs.build(shape)
    scale = rng.standard_normal(theirs.scale.shape).astype(np.float32) + 1
    ours.scale.assign(scale)
    theirs.scale.assign(scale)
    w = tf.constant(rng.standard_normal(shape).astype(np.float32))
    results = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) * w)
        results.append([layer(x)] + tape.gradient(loss, [x, layer.scale]))
    for a, b, what in zip(*results, ("y", "dx", "dscale")):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=2e-5, err_msg=what)


@pytest.mark.parametrize("shape,axis", [((3, 8, 10), 1), ((2, 3, 4, 5), [1, 3])],
                         ids=["channels", "noncontig"])
def test_layer_on_leading_axes_matches_torch(shape, axis):
    rng = np.random.default_rng(10)
    x = rng.standard_normal(shape).astype(np.float32) + 0.5
    dy = rng.standard_normal(shape).astype(np.float32)
    layer = RMSNorm(axis=axis)
    layer.build(shape)
    scale = rng.standard_normal(layer.scale.shape).astype(np.float32) + 1
    layer.scale.assign(scale)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
    dx, ds = tape.gradient(y, [xt, layer.scale], output_gradients=tf.constant(dy))
    ry, rdx, rds = torch_rms(x, scale, axis, 1e-6, dy)
    for a, b, what in ((y, ry, "y"), (dx, rdx, "dx"), (ds, rds, "dscale")):
        np.testing.assert_allclose(a.numpy(), b, rtol=2e-5, atol=2e-5, err_msg=what)


def test_layer_in_a_model_trains_and_round_trips(tmp_path):
    rng = np.random.default_rng(8)
    model = keras.Sequential([keras.Input((5, 12)), keras.layers.Dense(12), RMSNorm(),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = rng.standard_normal((64, 5, 12)).astype(np.float32)
    y = rng.standard_normal((64, 5, 1)).astype(np.float32)
    before = model.layers[1].scale.numpy().copy()
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert not np.allclose(model.layers[1].scale.numpy(), before)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[1], RMSNorm)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)


def test_mixed_precision_runs_fused_op_on_the_half_tensor():
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = RMSNorm()
        x = tf.random.normal([4, 32])
        y = layer(x)
        assert layer.scale.dtype == tf.float32
        assert y.dtype == tf.float16
        f = tf.function(lambda t: layer(t))
        graph = f.get_concrete_function(tf.TensorSpec([4, 32], tf.float16)).graph
        ops = [op for op in graph.get_operations() if op.type == RMS_OP]
        assert len(ops) == 1
        assert ops[0].inputs[0].dtype == tf.float16 and ops[0].inputs[1].dtype == tf.float32
        ref = rms_norm(tf.cast(tf.cast(x, tf.float16), tf.float64),
                       tf.cast(layer.scale, tf.float64))
        np.testing.assert_allclose(tf.cast(y, tf.float64).numpy(), ref.numpy(), rtol=2e-3,
                                   atol=2e-3)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def test_saved_model_with_rms_norm_reloads_in_fresh_process(tmp_path):
    rng = np.random.default_rng(9)
    model = keras.Sequential([keras.Input((16,)), RMSNorm()])
    model.layers[0].scale.assign(rng.standard_normal(16).astype(np.float32))
    x = rng.standard_normal((3, 16)).astype(np.float32)
    export = str(tmp_path / "export")
    model.export(export, verbose=False)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model(x).numpy())
    code = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        import tf_layernorm
        m = tf.saved_model.load({export!r})
        x = np.load({str(tmp_path / 'x.npy')!r})
        y = m.serve(tf.constant(x)).numpy()
        assert np.allclose(y, np.load({str(tmp_path / 'y.npy')!r}), rtol=1e-6, atol=1e-6)
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
