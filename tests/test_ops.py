"""Numerics of tf_layernorm.layer_norm, the raw op and their gradients.

Oracles: a float64 NumPy forward and an analytic float64 NumPy backward, and
PyTorch (float64 CPU autograd). Results are never compared with earlier
outputs of the library itself (except in the determinism tests, which compare
two runs of the same call bit for bit).
"""
import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import torch

import tf_layernorm
from tf_layernorm import layer_norm, load_ops

torch.set_num_threads(1)

# ------------------------------------------------------------------ oracles --

TOL = {tf.float64: 1e-10, tf.float32: 1e-5}


def _norm_axes(axis, rank):
    axes = [axis] if isinstance(axis, int) else list(axis)
    return tuple(sorted(a % rank for a in axes))


def _param_shape(shape, axes):
    return tuple(shape[a] for a in axes)


def _bcast_shape(shape, axes):
    return tuple(shape[d] if d in axes else 1 for d in range(len(shape)))


def _ref_stats(x, axes, eps):
    """x as float64 with its two-pass mean and 1/sqrt(var + eps), keepdims."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return x, mean, 1.0 / np.sqrt(var + eps)


def ref_forward(x, gamma, beta, axes, eps):
    """float64 y, mean, rstd (keepdims) of layer norm over `axes` (sorted, >= 0)."""
    x, mean, rstd = _ref_stats(x, axes, eps)
    y = (x - mean) * rstd
    bshape = _bcast_shape(x.shape, axes)
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64).reshape(bshape)
    if beta is not None:
        y = y + np.asarray(beta, np.float64).reshape(bshape)
    return y, mean, rstd


def ref_backward(dy, x, gamma, axes, eps):
    """Analytic float64 dx, dgamma, dbeta of layer norm over `axes`."""
    x, mean, rstd = _ref_stats(x, axes, eps)
    dy = np.asarray(dy, np.float64)
    xhat = (x - mean) * rstd
    bshape = _bcast_shape(x.shape, axes)
    g = dy * np.asarray(gamma, np.float64).reshape(bshape) if gamma is not None else dy
    dx = rstd * (g - g.mean(axis=axes, keepdims=True)
                 - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    others = tuple(d for d in range(x.ndim) if d not in axes)
    pshape = _param_shape(x.shape, axes)
    dgamma = (dy * xhat).sum(axis=others).reshape(pshape)
    dbeta = dy.sum(axis=others).reshape(pshape)
    return dx, dgamma, dbeta


def torch_forward_backward(x, gamma, beta, axes, eps, dy):
    """PyTorch float64 y and gradients; non-trailing axes are permuted to the end."""
    rank = x.ndim
    others = [d for d in range(rank) if d not in axes]
    perm = others + list(axes)
    inverse = [perm.index(d) for d in range(rank)]
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    gt = torch.tensor(np.asarray(gamma, np.float64), requires_grad=True) if gamma is not None else None
    bt = torch.tensor(np.asarray(beta, np.float64), requires_grad=True) if beta is not None else None
    pshape = _param_shape(x.shape, axes)
    y = torch.nn.functional.layer_norm(xt.permute(perm), pshape, gt, bt, eps).permute(inverse)
    y.backward(torch.tensor(np.asarray(dy, np.float64)))
    grad = lambda t: None if t is None else t.grad.numpy()  # noqa: E731
    return y.detach().numpy(), grad(xt), grad(gt), grad(bt)


def assert_close(actual, expected, tol):
    """Relative-ish closeness: rtol=tol, atol=tol * max(1, max|expected|)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def _rng(*key):
    seed = int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed)


# -------------------------------------------------------------- test cases --

# (shape, axis): rank 1..5, D=1, odd D, zero rows, contiguous and
# non-contiguous axis sets, inner > 1 (channel axis), inner > one chunk.
CASES = [
    ((7,), -1),
    ((5, 1), -1),                 # D = 1
    ((4, 7), -1),                 # odd D
    ((3, 1000), -1),              # odd D, many lanes + tail
    ((0, 8), -1),                 # zero rows
    ((3, 4, 0), 1),               # zero rows through an empty inner dim
    ((2, 3, 7), [-2, -1]),        # trailing block
    ((4, 6, 9), 1),               # channel axis of (N, C, L)
    ((2, 5, 300), 1),             # channel axis, inner spans two column chunks
    ((2, 3, 4, 5), [1, 2]),       # middle contiguous block
    ((3, 4, 5), [0, 2]),          # non-contiguous
    ((2, 3, 2, 3, 4), -1),        # rank 5
    ((2, 3, 2, 3, 4), [1, 2, 3]), # rank 5 middle block
    ((2, 3, 2, 3, 4), [0, 2, 4]), # rank 5 non-contiguous
]
CASE_IDS = [f"{'x'.join(map(str, s)) or 'scalar'}-ax{a}".replace(" ", "") for s, a in CASES]

AFFINE = [(True, True), (True, False), (False, True), (False, False)]
AFFINE_IDS = ["gamma+beta", "gamma", "beta", "plain"]


def _make_inputs(shape, axis, dtype, scale, center, *key):
    rng = _rng(shape, axis, dtype.name, scale, center, *key)
    axes = _norm_axes(axis, len(shape))
    pshape = _param_shape(shape, axes)
    np_dtype = dtype.as_numpy_dtype
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(np_dtype)
    gamma = (1.0 + 0.5 * rng.standard_normal(pshape)).astype(np_dtype) if scale else None
    beta = rng.standard_normal(pshape).astype(np_dtype) if center else None
    dy = rng.standard_normal(shape).astype(np_dtype)
    return x, gamma, beta, dy, axes


def _tf_grads(x, gamma, beta, dy, axis, eps=1e-5):
    xt = tf.constant(x)
    gt = tf.constant(gamma) if gamma is not None else None
    bt = tf.constant(beta) if beta is not None else None
    sources = [t for t in (xt, gt, bt) if t is not None]
    with tf.GradientTape() as tape:
        tape.watch(sources)
        y = layer_norm(xt, gt, bt, axis=axis, epsilon=eps)
    grads = tape.gradient(y, sources, output_gradients=tf.constant(dy))
    it = iter(grads)
    dx = next(it)
    dg = next(it) if gt is not None else None
    db = next(it) if bt is not None else None
    return y, dx, dg, db


# ------------------------------------------------------------------ forward --

@pytest.mark.parametrize("scale,center", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_forward_matches_numpy(shape, axis, dtype, scale, center):
    x, gamma, beta, _, axes = _make_inputs(shape, axis, dtype, scale, center)
    y = layer_norm(x, gamma, beta, axis=axis)
    assert y.dtype == dtype
    assert tuple(y.shape) == shape
    ref, _, _ = ref_forward(x, gamma, beta, axes, 1e-5)
    assert_close(y.numpy(), ref, TOL[dtype])


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.5, 2])
def test_forward_uses_epsilon(eps):
    x, gamma, beta, _, axes = _make_inputs((6, 33), -1, tf.float64, True, True, eps)
    x = x * 0.1  # small variance so epsilon matters
    y = layer_norm(x, gamma, beta, epsilon=eps)
    # The op's epsilon attribute is a float32 attr (as in TF's own fused
    # norms), so even float64 x sees epsilon rounded to float32.
    eps32 = float(np.float32(eps))
    assert_close(y.numpy(), ref_forward(x, gamma, beta, axes, eps32)[0], 1e-10)
    # ... which is within float32 rounding of the requested epsilon.
    assert_close(y.numpy(), ref_forward(x, gamma, beta, axes, eps)[0], 1e-7)


# ---------------------------------------------------------------- gradients --

@pytest.mark.parametrize("scale,center", AFFINE, ids=AFFINE_IDS)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_gradients_match_analytic(shape, axis, dtype, scale, center):
    x, gamma, beta, dy, axes = _make_inputs(shape, axis, dtype, scale, center)
    _, dx, dg, db = _tf_grads(x, gamma, beta, dy, axis)
    rdx, rdg, rdb = ref_backward(dy, x, gamma, axes, 1e-5)
    tol = TOL[dtype]
    assert dx.dtype == dtype
    assert_close(dx.numpy(), rdx, tol)
    if scale:
        assert dg.dtype == dtype
        assert_close(dg.numpy(), rdg, tol)
    if center:
        assert db.dtype == dtype
        assert_close(db.numpy(), rdb, tol)


@pytest.mark.parametrize("scale,center", [(True, True), (False, False)], ids=["affine", "plain"])
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_forward_and_gradients_match_torch(shape, axis, scale, center):
    x, gamma, beta, dy, axes = _make_inputs(shape, axis, tf.float64, scale, center, "torch")
    y, dx, dg, db = _tf_grads(x, gamma, beta, dy, axis)
    ty, tdx, tdg, tdb = torch_forward_backward(x, gamma, beta, axes, 1e-5, dy)
    assert_close(y.numpy(), ty, 1e-10)
    assert_close(dx.numpy(), tdx, 1e-10)
    if scale:
        assert_close(dg.numpy(), tdg, 1e-10)
        assert_close(db.numpy(), tdb, 1e-10)


@pytest.mark.parametrize("shape,axis", [
    ((3, 5), -1),
    ((2, 3, 4), 1),
    ((2, 3, 4), [0, 2]),
    ((2, 3, 2, 3), [1, 2]),
    ((4, 1), -1),
], ids=["rows", "channel", "noncontig", "middle", "D1"])
def test_compute_gradient_float64(shape, axis):
    x, gamma, beta, _, _ = _make_inputs(shape, axis, tf.float64, True, True, "cg")

    def f(x, g, b):
        return layer_norm(x, g, b, axis=axis, epsilon=1e-3)

    theoretical, numerical = tf.test.compute_gradient(
        f, [tf.constant(x), tf.constant(gamma), tf.constant(beta)], delta=1e-3)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------- half precision --

HALF_CASES = [((4, 7), -1), ((3, 1000), -1), ((4, 6, 9), 1), ((3, 4, 5), [0, 2])]
HALF_IDS = ["4x7", "3x1000", "channel", "noncontig"]


def _half_inputs(shape, axis, dtype, param_dtype, key):
    """Half x (and params), plus their exact values as float64 for the oracle."""
    x64, g64, b64, dy64, axes = _make_inputs(shape, axis, tf.float64, True, True, key)
    x = tf.cast(x64, dtype)
    g = tf.cast(g64, param_dtype)
    b = tf.cast(b64, param_dtype)
    dy = tf.cast(dy64, dtype)
    as64 = lambda t: tf.cast(t, tf.float64).numpy()  # noqa: E731
    return x, g, b, dy, as64(x), as64(g), as64(b), as64(dy), axes


@pytest.mark.parametrize("params", ["same", "float32"])
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("shape,axis", HALF_CASES, ids=HALF_IDS)
def test_half_forward(shape, axis, dtype, params):
    param_dtype = dtype if params == "same" else tf.float32
    x, g, b, _, x64, g64, b64, _, axes = _half_inputs(shape, axis, dtype, param_dtype, "half")
    y = layer_norm(x, g, b, axis=axis)
    assert y.dtype == dtype
    ref, _, _ = ref_forward(x64, g64, b64, axes, 1e-5)
    assert_close(tf.cast(y, tf.float64).numpy(), ref, 1e-2)


@pytest.mark.parametrize("params", ["same", "float32"])
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("shape,axis", HALF_CASES[:3], ids=HALF_IDS[:3])
def test_half_gradients(shape, axis, dtype, params):
    param_dtype = dtype if params == "same" else tf.float32
    x, g, b, dy, x64, g64, _, dy64, axes = _half_inputs(shape, axis, dtype, param_dtype, "hg")
    with tf.GradientTape() as tape:
        tape.watch([x, g, b])
        y = layer_norm(x, g, b, axis=axis)
    dx, dg, db = tape.gradient(y, [x, g, b], output_gradients=dy)
    assert dx.dtype == dtype and dg.dtype == param_dtype and db.dtype == param_dtype
    rdx, rdg, rdb = ref_backward(dy64, x64, g64, axes, 1e-5)
    as64 = lambda t: tf.cast(t, tf.float64).numpy()  # noqa: E731
    assert_close(as64(dx), rdx, 2e-2)
    # float32 parameter gradients are accumulated and stored in float32.
    ptol = 1e-4 if param_dtype == tf.float32 else 2e-2
    assert_close(as64(dg), rdg, ptol)
    assert_close(as64(db), rdb, ptol)


# ----------------------------------------------------------------- raw op --

RAW_CASES = [(-1, 1), (1, 2), (0, 4), (-3, 2), (0, 1), (2, 1)]


@pytest.mark.parametrize("dtype", [tf.float16, tf.float32, tf.float64], ids=["f16", "f32", "f64"])
@pytest.mark.parametrize("begin,num", RAW_CASES, ids=[f"b{b}n{n}" for b, n in RAW_CASES])
def test_raw_op_stats_keepdims_and_values(begin, num, dtype):
    shape = (2, 3, 4, 5)
    b = begin % 4
    axes = tuple(range(b, b + num))
    stats_dtype = tf.float64 if dtype == tf.float64 else tf.float32
    rng = _rng("raw", begin, num, dtype.name)
    x = tf.cast(rng.standard_normal(shape) * 3 + 1, dtype)
    pshape = _param_shape(shape, axes)
    gamma = tf.cast(rng.standard_normal(pshape), dtype)
    beta = tf.cast(rng.standard_normal(pshape), dtype)
    eps = 2.0 ** -10  # exactly representable in the op's float32 epsilon attr
    y, mean, rstd = load_ops().tf_layernorm_layer_norm(
        x, gamma, beta, epsilon=eps, begin_norm_axis=begin, num_norm_axes=num,
        scale=True, center=True, S=stats_dtype)
    expected_stats_shape = tuple(1 if d in axes else shape[d] for d in range(4))
    assert tuple(mean.shape) == expected_stats_shape
    assert tuple(rstd.shape) == expected_stats_shape
    assert mean.dtype == stats_dtype and rstd.dtype == stats_dtype
    x64 = tf.cast(x, tf.float64).numpy()
    ry, rmean, rrstd = ref_forward(x64, tf.cast(gamma, tf.float64).numpy(),
                                   tf.cast(beta, tf.float64).numpy(), axes, eps)
    stol = 1e-10 if dtype == tf.float64 else 1e-5
    assert_close(mean.numpy(), rmean, stol)
    assert_close(rstd.numpy(), rrstd, stol)
    assert_close(tf.cast(y, tf.float64).numpy(), ry, 1e-10 if dtype == tf.float64 else
                 (1e-5 if dtype == tf.float32 else 1e-2))


@pytest.mark.parametrize("shape,begin", [((3, 0), -1), ((2, 0, 3), 1), ((2, 3, 0), 1)],
                         ids=["3x0", "2x0x3", "2x3x0-axes1..3"])
def test_raw_op_empty_norm_dims_give_nan_stats(shape, begin):
    num = 1 if shape != (2, 3, 0) else 2
    b = begin % len(shape)
    axes = range(b, b + num)
    pshape = [shape[a] for a in axes]
    y, mean, rstd = load_ops().tf_layernorm_layer_norm(
        tf.zeros(shape), tf.zeros(pshape), tf.zeros(pshape), begin_norm_axis=begin,
        num_norm_axes=num)
    assert tuple(y.shape) == shape
    stats_shape = tuple(1 if d in axes else shape[d] for d in range(len(shape)))
    assert tuple(mean.shape) == stats_shape and tuple(rstd.shape) == stats_shape
    assert mean.numpy().size > 0
    assert np.isnan(mean.numpy()).all()
    assert np.isnan(rstd.numpy()).all()


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", [((0, 8), -1), ((3, 4, 0), 1), ((0, 3, 4), [1, 2])],
                         ids=["0x8", "3x4x0-ax1", "0x3x4-ax12"])
def test_zero_rows_give_zero_param_grads(shape, axis, dtype):
    axes = _norm_axes(axis, len(shape))
    pshape = _param_shape(shape, axes)
    # Non-zero parameters: the gradients must still be exactly zero sums.
    gamma = np.full(pshape, 3.0, dtype.as_numpy_dtype)
    beta = np.full(pshape, -2.0, dtype.as_numpy_dtype)
    x = np.zeros(shape, dtype.as_numpy_dtype)
    y, dx, dg, db = _tf_grads(x, gamma, beta, np.zeros(shape, dtype.as_numpy_dtype), axis)
    assert tuple(y.shape) == shape and tuple(dx.shape) == shape
    assert tuple(dg.shape) == pshape and tuple(db.shape) == pshape
    assert np.array_equal(dg.numpy(), np.zeros(pshape))
    assert np.array_equal(db.numpy(), np.zeros(pshape))


def test_raw_grad_op_zero_rows_writes_zero_param_grads():
    ops = load_ops()
    x = tf.zeros([0, 5])
    gamma = tf.fill([5], 7.0)
    y, mean, rstd = ops.tf_layernorm_layer_norm(x, gamma, gamma)
    dx, dg, db = ops.tf_layernorm_layer_norm_grad(x, x, gamma, mean, rstd)
    assert tuple(dx.shape) == (0, 5)
    assert np.array_equal(dg.numpy(), np.zeros(5)) and np.array_equal(db.numpy(), np.zeros(5))


# ------------------------------------------- gradients through mean / rstd --

def _torch_stats_loss_grads(x, gamma, beta, axes, eps, w1, w2, w3):
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    bshape = _bcast_shape(x.shape, axes)
    mean = xt.mean(dim=axes, keepdim=True)
    var = ((xt - mean) ** 2).mean(dim=axes, keepdim=True)
    rstd = (var + eps).rsqrt()
    y = (xt - mean) * rstd * gt.reshape(bshape) + bt.reshape(bshape)
    loss = 0.0
    if w1 is not None:
        loss = loss + (y * torch.tensor(w1)).sum()
    if w2 is not None:
        loss = loss + (mean * torch.tensor(w2)).sum()
    if w3 is not None:
        loss = loss + (rstd * torch.tensor(w3)).sum()
    loss.backward()
    grad = lambda t: np.zeros(t.shape) if t.grad is None else t.grad.numpy()  # noqa: E731
    return grad(xt), grad(gt), grad(bt)


STATS_GEOMS = [((5, 12), -1, 1), ((2, 3, 4, 5), 1, 2), ((2, 3, 4, 5), -2, 1)]
STATS_USES = [("y", "mean", "rstd"), ("mean",), ("rstd",), ("y", "rstd"), ("y", "mean")]


@pytest.mark.parametrize("mode", ["eager", "function", "tf1"])
@pytest.mark.parametrize("uses", STATS_USES, ids=["+".join(u) for u in STATS_USES])
@pytest.mark.parametrize("shape,begin,num", STATS_GEOMS, ids=["rows", "block", "negbegin"])
def test_gradient_through_mean_and_rstd(shape, begin, num, uses, mode):
    rank = len(shape)
    b = begin % rank
    axes = tuple(range(b, b + num))
    rng = _rng("stats", shape, begin, num, uses)
    eps = 2.0 ** -10  # exactly representable in the op's float32 epsilon attr
    x = rng.standard_normal(shape) * 1.5 + 0.3
    pshape = _param_shape(shape, axes)
    gamma = 1.0 + 0.3 * rng.standard_normal(pshape)
    beta = rng.standard_normal(pshape)
    stats_shape = tuple(1 if d in axes else shape[d] for d in range(rank))
    w1 = rng.standard_normal(shape) if "y" in uses else None
    w2 = rng.standard_normal(stats_shape) if "mean" in uses else None
    w3 = rng.standard_normal(stats_shape) if "rstd" in uses else None

    def loss_fn(xt, gt, bt):
        y, mean, rstd = load_ops().tf_layernorm_layer_norm(
            xt, gt, bt, S=tf.float64, epsilon=eps, begin_norm_axis=begin, num_norm_axes=num)
        loss = tf.constant(0.0, tf.float64)
        if w1 is not None:
            loss += tf.reduce_sum(y * w1)
        if w2 is not None:
            loss += tf.reduce_sum(mean * w2)
        if w3 is not None:
            loss += tf.reduce_sum(rstd * w3)
        return loss

    def grads(xt, gt, bt):
        with tf.GradientTape() as tape:
            tape.watch([xt, gt, bt])
            loss = loss_fn(xt, gt, bt)
        return tape.gradient(loss, [xt, gt, bt], unconnected_gradients="zero")

    if mode == "eager":
        got = [t.numpy() for t in grads(tf.constant(x), tf.constant(gamma), tf.constant(beta))]
    elif mode == "function":
        got = [t.numpy() for t in tf.function(grads)(
            tf.constant(x), tf.constant(gamma), tf.constant(beta))]
    else:
        with tf.Graph().as_default():
            xs = tf.compat.v1.placeholder(tf.float64, shape)
            gs = tf.compat.v1.placeholder(tf.float64, pshape)
            bs = tf.compat.v1.placeholder(tf.float64, pshape)
            out = tf.gradients(loss_fn(xs, gs, bs), [xs, gs, bs],
                               unconnected_gradients="zero")
            with tf.compat.v1.Session() as sess:
                got = sess.run(out, {xs: x, gs: gamma, bs: beta})

    ref = _torch_stats_loss_grads(x, gamma, beta, axes, eps, w1, w2, w3)
    for g, r in zip(got, ref):
        assert_close(g, r, 1e-9)


# ------------------------------------------------------------- determinism --

def _forward_backward(x, gamma, beta, dy, axis):
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        y = layer_norm(x, gamma, beta, axis=axis)
    dx, dg, db = tape.gradient(y, [x, gamma, beta], output_gradients=dy)
    return [t.numpy() for t in (y, dx, dg, db)]


DET_CASES = [((4096, 1024), -1), ((128, 64, 300), 1)]


@pytest.mark.parametrize("shape,axis", DET_CASES, ids=["rows-4096x1024", "columns-128x64x300"])
def test_same_call_twice_is_bitwise_identical(shape, axis):
    x, gamma, beta, dy, _ = _make_inputs(shape, axis, tf.float32, True, True, "det")
    x, gamma, beta, dy = map(tf.constant, (x, gamma, beta, dy))
    first = _forward_backward(x, gamma, beta, dy, axis)
    second = _forward_backward(x, gamma, beta, dy, axis)
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()


def test_results_do_not_depend_on_thread_count(tmp_path):
    """One intra-op thread (subprocess) vs the default pool (this process)."""
    shape, axis = DET_CASES[0]
    x, gamma, beta, dy, _ = _make_inputs(shape, axis, tf.float32, True, True, "threads")
    np.savez(tmp_path / "in.npz", x=x, gamma=gamma, beta=beta, dy=dy)
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import tf_layernorm
        d = np.load({str(tmp_path / 'in.npz')!r})
        x, g, b, dy = (tf.constant(d[k]) for k in ("x", "gamma", "beta", "dy"))
        with tf.GradientTape() as tape:
            tape.watch([x, g, b])
            y = tf_layernorm.layer_norm(x, g, b, axis={axis!r})
        dx, dg, db = tape.gradient(y, [x, g, b], output_gradients=dy)
        np.savez({str(tmp_path / 'out.npz')!r}, y=y.numpy(), dx=dx.numpy(), dg=dg.numpy(),
                 db=db.numpy())
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = np.load(tmp_path / "out.npz")
    here = _forward_backward(*map(tf.constant, (x, gamma, beta, dy)), axis)
    for key, arr in zip(("y", "dx", "dg", "db"), here):
        assert single[key].tobytes() == arr.tobytes(), key


# ------------------------------------------------------- tracing and graphs --

def test_tf_function_with_none_dims_traces_once():
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None, None, 8], tf.float32),
                                  tf.TensorSpec([8], tf.float32),
                                  tf.TensorSpec([8], tf.float32)])
    def f(x, g, b):
        traces.append(1)
        return layer_norm(x, g, b)

    rng = _rng("trace")
    g = (1 + rng.standard_normal(8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    for n, t in [(1, 1), (5, 3), (33, 2), (0, 4), (7, 0)]:
        x = rng.standard_normal((n, t, 8)).astype(np.float32)
        y = f(x, g, b)
        assert_close(y.numpy(), ref_forward(x, g, b, (2,), 1e-5)[0], 1e-5)
    assert len(traces) == 1
    assert f.experimental_get_tracing_count() == 1


def test_tf_function_unknown_rank_negative_axes():
    @tf.function(input_signature=[tf.TensorSpec(None, tf.float64),
                                  tf.TensorSpec(None, tf.float64)])
    def f(x, g):
        return layer_norm(x, g, None, axis=[-2, -1])

    for shape in [(3, 4, 5), (2, 2, 4, 5), (4, 5)]:
        x, gamma, _, _, axes = _make_inputs(shape, [-2, -1], tf.float64, True, False, "ur")
        assert_close(f(x, gamma).numpy(), ref_forward(x, gamma, None, axes, 1e-5)[0], 1e-10)


def test_tf_function_unknown_rank_noncontiguous_axes():
    """axis=[-3, -1] on an input of unknown rank must normalize over axes -3
    and -1 (or be rejected at trace time), never over a different set."""
    @tf.function(input_signature=[tf.TensorSpec(None, tf.float64)])
    def f(x):
        return layer_norm(x, axis=[-3, -1])

    x, _, _, _, axes = _make_inputs((3, 4, 5), [-3, -1], tf.float64, False, False, "urnc")
    try:
        y = f(x)
    except (ValueError, tf.errors.InvalidArgumentError):
        return  # rejecting the call is acceptable
    assert_close(y.numpy(), ref_forward(x, None, None, axes, 1e-5)[0], 1e-10)


FORBIDDEN_FWD = {"Mean", "Square", "SquaredDifference", "Rsqrt", "Sqrt", "Sub"}
# "Prod"/"Rank" would mean the composite mean/rstd gradient path was taken
# although nobody used mean/rstd.
FORBIDDEN_BWD = {"Mean", "Square", "SquaredDifference", "Rsqrt", "Prod", "Rank"}
GRAPH_CASES = [((4, 8), -1), ((3, 4, 5), [0, 2]), ((2, 3, 4), 1), ((2, 3, 4, 5), [-2, -1])]
GRAPH_IDS = ["rows", "noncontig", "channel", "trailing"]


def _specs(shape, axis):
    pshape = _param_shape(shape, _norm_axes(axis, len(shape)))
    return tf.TensorSpec(shape), tf.TensorSpec(pshape), tf.TensorSpec(pshape)


@pytest.mark.parametrize("shape,axis", GRAPH_CASES, ids=GRAPH_IDS)
def test_forward_graph_is_one_fused_op(shape, axis):
    fn = tf.function(lambda x, g, b: layer_norm(x, g, b, axis=axis))
    types = [op.type for op in fn.get_concrete_function(*_specs(shape, axis)).graph
             .get_operations()]
    assert types.count(tf_layernorm.ops.LAYER_NORM_OP) == 1
    assert not FORBIDDEN_FWD & set(types), types


@pytest.mark.parametrize("shape,axis", GRAPH_CASES, ids=GRAPH_IDS)
def test_gradient_graph_is_one_fused_op(shape, axis):
    @tf.function
    def grad_fn(x, g, b):
        with tf.GradientTape() as tape:
            tape.watch([x, g, b])
            y = layer_norm(x, g, b, axis=axis)
        return tape.gradient(y, [x, g, b], output_gradients=tf.ones_like(y) * 0.5)

    types = [op.type for op in grad_fn.get_concrete_function(*_specs(shape, axis)).graph
             .get_operations()]
    assert types.count(tf_layernorm.ops.LAYER_NORM_GRAD_OP) == 1
    assert not FORBIDDEN_BWD & set(types), types


# ---------------------------------------------------------------- TF1 graph --

@pytest.mark.parametrize("shape,axis", [((None, 6), -1), ((3, 4, 5), [0, 2]), ((4, 3, 5), 1)],
                         ids=["rows-placeholder", "noncontig", "channel"])
def test_tf1_graph_session_forward_and_gradients(shape, axis):
    concrete = tuple(7 if s is None else s for s in shape)
    x, gamma, beta, dy, axes = _make_inputs(concrete, axis, tf.float64, True, True, "tf1")
    with tf.Graph().as_default():
        xs = tf.compat.v1.placeholder(tf.float64, shape)
        gs = tf.compat.v1.placeholder(tf.float64, gamma.shape)
        bs = tf.compat.v1.placeholder(tf.float64, beta.shape)
        dys = tf.compat.v1.placeholder(tf.float64, shape)
        y = layer_norm(xs, gs, bs, axis=axis)
        grads = tf.gradients(y, [xs, gs, bs], grad_ys=dys)
        with tf.compat.v1.Session() as sess:
            out = sess.run([y] + grads, {xs: x, gs: gamma, bs: beta, dys: dy})
    ry = ref_forward(x, gamma, beta, axes, 1e-5)[0]
    refs = [ry, *ref_backward(dy, x, gamma, axes, 1e-5)]
    for got, ref in zip(out, refs):
        assert_close(got, ref, 1e-10)


# ---------------------------------------------------------------- stability --

@pytest.mark.parametrize("layout", ["rows", "channels"])
@pytest.mark.parametrize("d", [512, 1000])
def test_large_offset_float32_is_accurate(d, layout):
    """x = 1e4 + N(0, 1): E[x^2] - E[x]^2 in float32 would lose the variance
    completely (errors ~1e3). Shifted sums keep the mean to float32 rounding
    of 1e4 (~5e-4), so y stays within ~1e-3, in both kernel layouts."""
    rng = _rng("offset", d, layout)
    x = (1e4 + rng.standard_normal((64, d))).astype(np.float32)
    if layout == "channels":
        x = np.ascontiguousarray(x.T)[None]  # (1, d, 64): axis 1 with inner = 64
    y, mean, rstd = load_ops().tf_layernorm_layer_norm(
        x, tf.zeros([0]), tf.zeros([0]), begin_norm_axis=1, scale=False, center=False)
    ry, rmean, rrstd = ref_forward(x, None, None, (1,), 1e-5)
    assert np.abs(y.numpy() - ry).max() < 1e-3
    assert np.abs(rstd.numpy() / rrstd - 1).max() < 1e-4
    assert np.abs(mean.numpy() - rmean).max() < 1e-3


def test_large_offset_float64_is_accurate():
    rng = _rng("offset64")
    x = 1e8 + rng.standard_normal((16, 257))
    y = layer_norm(x)
    assert_close(y.numpy(), ref_forward(x, None, None, (1,), 1e-5)[0], 1e-6)


def test_large_offset_gradients_float32():
    rng = _rng("offset-grad")
    x = (1e4 + rng.standard_normal((32, 300))).astype(np.float32)
    gamma = (1 + 0.5 * rng.standard_normal(300)).astype(np.float32)
    beta = rng.standard_normal(300).astype(np.float32)
    dy = rng.standard_normal((32, 300)).astype(np.float32)
    _, dx, dg, db = _tf_grads(x, gamma, beta, dy, -1)
    rdx, rdg, rdb = ref_backward(dy, x, gamma, (1,), 1e-5)
    assert_close(dx.numpy(), rdx, 1e-2)
    assert_close(dg.numpy(), rdg, 1e-2)
    assert_close(db.numpy(), rdb, 1e-5)


# ----------------------------------------------------------------- op names --

def test_op_names_are_ours_only():
    script = textwrap.dedent("""
        import tensorflow
        from tensorflow.python.framework import op_def_registry
        names = ("TfLayernorm>LayerNorm", "TfLayernorm>LayerNormGrad", "TfLayernorm>RMSNorm",
                 "TfLayernorm>RMSNormGrad")
        before = [op_def_registry.get(n) is None for n in names]
        import tf_layernorm
        after = [op_def_registry.get(n) is not None for n in names]
        print("RESULT", before, after)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    cwd = os.path.dirname(os.path.abspath(sys.executable))  # not the repo root
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT [True, True, True, True] [True, True, True, True]" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------- XLA --

XLA_CASES = [((4, 6, 16), -1), ((3, 8, 10), 1), ((2, 3, 4, 5), [1, 3]), ((2, 4, 6), [-2, -1])]


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,axis", XLA_CASES, ids=["last", "channels", "noncontig", "last2"])
def test_xla_jit_function_uses_composite_with_same_results(shape, axis, dtype):
    rng = np.random.default_rng(5)
    axes = _norm_axes(axis, len(shape))
    x = tf.cast(rng.standard_normal(shape) * 2 + 1, dtype)
    gamma = tf.constant(rng.standard_normal(_param_shape(shape, axes)) + 1, tf.float32)
    beta = tf.constant(rng.standard_normal(_param_shape(shape, axes)), tf.float32)
    dy = tf.cast(rng.standard_normal(shape), dtype)

    def fwd_bwd(x, gamma, beta):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y = layer_norm(x, gamma, beta, axis=axis)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(dy, tf.float32))
        return (y,) + tuple(tape.gradient(loss, [x, gamma, beta]))

    jit = tf.function(fwd_bwd, jit_compile=True)
    hlo = jit.experimental_get_compiler_ir(x, gamma, beta)(stage="hlo")
    assert "TfLayernorm" not in hlo
    got = jit(x, gamma, beta)
    want = tf.function(fwd_bwd)(x, gamma, beta)  # the fused kernels
    tol = 1e-5 if dtype == tf.float32 else 2e-2
    for g, w, what in zip(got, want, ("y", "dx", "dgamma", "dbeta")):
        assert g.dtype == w.dtype, what
        np.testing.assert_allclose(tf.cast(g, tf.float64).numpy(), tf.cast(w, tf.float64).numpy(),
                                   rtol=tol, atol=tol, err_msg=what)


def test_no_jit_function_still_runs_the_fused_op():
    f = tf.function(lambda x: layer_norm(x))
    graph = f.get_concrete_function(tf.TensorSpec([2, 8])).graph
    assert [op.type for op in graph.get_operations()].count("TfLayernorm>LayerNorm") == 1


# ----------------------------------------------------- higher-order gradients --

DD_CASES = [((3, 5, 7), -1), ((3, 5, 7), 1), ((2, 4, 6), [-2, -1]), ((4, 3, 5), [0, 2])]


@pytest.mark.parametrize("center", [True, False], ids=["center", "nocenter"])
@pytest.mark.parametrize("shape,axis", DD_CASES, ids=["last", "channels", "last2", "noncontig"])
def test_double_backward_matches_torch(shape, axis, center):
    """A gradient penalty (gradient of a function of dL/dx) against PyTorch's
    double backward in float64: exercises the gradient of LayerNormGrad."""
    rng = np.random.default_rng(7)
    axes = _norm_axes(axis, len(shape))
    pshape = _param_shape(shape, axes)
    x, v, w = (rng.standard_normal(shape) for _ in range(3))
    x = x * 2 + 0.3
    gamma, beta = rng.standard_normal(pshape) + 1, rng.standard_normal(pshape)

    xt, gt, bt = tf.Variable(x), tf.Variable(gamma), tf.Variable(beta)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            y = layer_norm(xt, gt, bt if center else None, axis=axis)
            loss = tf.reduce_sum(y * w)
        gx, gg = inner.gradient(loss, [xt, gt])
        penalty = tf.reduce_sum(gx * v) + tf.reduce_sum(tf.square(gx)) + tf.reduce_sum(gg ** 3)
    ours = outer.gradient(penalty, [xt, gt])

    X = torch.tensor(x, requires_grad=True)
    G = torch.tensor(gamma, requires_grad=True)
    B = torch.tensor(beta) if center else None
    perm = [d for d in range(len(shape)) if d not in axes] + list(axes)
    Y = torch.nn.functional.layer_norm(X.permute(perm), pshape, G, B, 1e-5)
    L = (Y * torch.tensor(w).permute(perm)).sum()
    GX, GG = torch.autograd.grad(L, [X, G], create_graph=True)
    P = (GX * torch.tensor(v)).sum() + (GX ** 2).sum() + (GG ** 3).sum()
    ref = torch.autograd.grad(P, [X, G])
    for o, r, what in zip(ours, ref, ("x", "gamma")):
        np.testing.assert_allclose(o.numpy(), r.numpy(), rtol=1e-9, atol=1e-9, err_msg=what)


def test_hessian_vector_product_float32():
    rng = np.random.default_rng(8)
    x = tf.Variable(rng.standard_normal((6, 32)).astype(np.float32))
    v = tf.constant(rng.standard_normal((6, 32)).astype(np.float32))
    w = tf.constant(rng.standard_normal((6, 32)).astype(np.float32))
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_sum(tf.sin(layer_norm(x)) * w)
        g = inner.gradient(loss, x)
        gv = tf.reduce_sum(g * v)
    hvp = outer.gradient(gv, x).numpy()

    X = torch.tensor(x.numpy().astype(np.float64), requires_grad=True)
    L = (torch.sin(torch.nn.functional.layer_norm(X, (32,), eps=1e-5))
         * torch.tensor(w.numpy().astype(np.float64))).sum()
    (G,) = torch.autograd.grad(L, X, create_graph=True)
    (H,) = torch.autograd.grad((G * torch.tensor(v.numpy().astype(np.float64))).sum(), X)
    np.testing.assert_allclose(hvp, H.numpy(), rtol=2e-4, atol=2e-4)


# -------------------------------------------------------------- determinism --

def test_runs_and_repeats_under_enable_op_determinism(tmp_path):
    code = textwrap.dedent("""
        import numpy as np, tensorflow as tf
        tf.config.experimental.enable_op_determinism()
        import tf_layernorm as tfln
        rng = np.random.default_rng(0)
        x = tf.constant(rng.standard_normal((512, 384)).astype(np.float32) * 3 + 1)
        g = tf.Variable(np.ones(384, np.float32)); b = tf.Variable(np.zeros(384, np.float32))
        dy = tf.constant(rng.standard_normal((512, 384)).astype(np.float32))
        def run():
            with tf.GradientTape() as t:
                t.watch(x)
                y = tfln.layer_norm(x, g, b)
                loss = tf.reduce_sum(y * dy)
            return [y.numpy()] + [a.numpy() for a in t.gradient(loss, [x, g, b])]
        a, b2 = run(), run()
        assert all(np.array_equal(u.view(np.uint32), w.view(np.uint32)) for u, w in zip(a, b2))
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
