"""Numerics at the edges: D = 1, constant rows, epsilon = 0, NaN/Inf, huge and
tiny magnitudes. Oracles: PyTorch in the same dtype where its result is the
defined one (NaN/Inf patterns, constant rows, epsilon = 0), PyTorch float64
where float32 PyTorch loses the answer (squares out of float's range: there
we return the exact result; see README "Numerics at the edges")."""
import numpy as np
import pytest
import tensorflow as tf
import torch

import tf_layernorm as tfln

torch.set_num_threads(1)

DTYPES = [tf.float32, tf.float16, tf.bfloat16, tf.float64]
TORCH = {tf.float32: torch.float32, tf.float16: torch.float16, tf.bfloat16: torch.bfloat16,
         tf.float64: torch.float64}


def _ours(x, gamma, beta, dy, rms, eps, dtype, axis=-1):
    xt = tf.constant(np.asarray(x), dtype)
    gt = None if gamma is None else tf.constant(np.asarray(gamma), dtype)
    bt = None if beta is None else tf.constant(np.asarray(beta), dtype)
    watched = [t for t in (xt, gt, bt) if t is not None]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        y = tfln.rms_norm(xt, gt, axis=axis, epsilon=eps) if rms else \
            tfln.layer_norm(xt, gt, bt, axis=axis, epsilon=eps)
    grads = tape.gradient(y, watched, output_gradients=tf.constant(np.asarray(dy), dtype))
    return [tf.cast(t, tf.float64).numpy() for t in [y] + grads]


def _torch(x, gamma, beta, dy, rms, eps, tdtype, axis=-1):
    """torch's results over `axis` (moved last), in tdtype, as float64 NumPy."""
    x = np.asarray(x)
    X = torch.tensor(x, dtype=torch.float64).to(tdtype).movedim(axis, -1).requires_grad_(True)
    G = None if gamma is None else \
        torch.tensor(np.asarray(gamma), dtype=torch.float64).to(tdtype).requires_grad_(True)
    B = None if beta is None else \
        torch.tensor(np.asarray(beta), dtype=torch.float64).to(tdtype).requires_grad_(True)
    shape = (X.shape[-1],)
    Y = torch.nn.functional.rms_norm(X, shape, G, eps) if rms else \
        torch.nn.functional.layer_norm(X, shape, G, B, eps)
    Y.backward(torch.tensor(np.asarray(dy), dtype=torch.float64).to(tdtype).movedim(axis, -1))
    out = [Y.detach().movedim(-1, axis), X.grad.movedim(-1, axis)]
    out += [t.grad for t in (G, B) if t is not None]
    return [t.double().numpy() for t in out]


def _rounded(a, dtype):
    """a as the dtype stores it (the oracle must see the same inputs)."""
    return tf.cast(tf.constant(np.asarray(a, np.float64), dtype), tf.float64).numpy()


def _same_nonfinite(ours, ref, what):
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref), err_msg=what + ": NaN pattern")
    np.testing.assert_array_equal(np.isposinf(ours), np.isposinf(ref), err_msg=what + ": +inf")
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref), err_msg=what + ": -inf")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_d_equal_1_gives_beta_and_zero_dx(dtype):
    x = np.array([[3.0], [-2.0], [0.0], [1e4]])
    y, dx, dg, db = _ours(x, [2.0], [0.5], np.ones_like(x), False, 1e-5, dtype)
    np.testing.assert_array_equal(y, np.full_like(x, 0.5))
    np.testing.assert_array_equal(dx, np.zeros_like(x))
    np.testing.assert_array_equal(dg, [0.0])
    np.testing.assert_array_equal(db, [4.0])
    # float64 PyTorch agrees; float16/bfloat16 PyTorch on CPU does not for the
    # 1e4 row (0.66 / 0.375 instead of 0.5: E[x^2] - E[x]^2 cancellation).
    ty, tdx, tdg, tdb = _torch(x, [2.0], [0.5], np.ones_like(x), False, 1e-5, torch.float64)
    np.testing.assert_array_equal(y, ty)
    np.testing.assert_array_equal(dx, tdx)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_constant_rows_give_beta_and_match_torch(dtype):
    x = np.array([[7.0] * 6, [-3.5] * 6, [0.0] * 6])
    gamma = np.linspace(0.5, 2, 6)
    beta = np.arange(6.0)
    dy = np.arange(18.0).reshape(3, 6) / 10
    y, dx, dg, db = _ours(x, gamma, beta, dy, False, 1e-5, dtype)
    np.testing.assert_array_equal(y, np.tile(_rounded(beta, dtype), (3, 1)))
    ref = _torch(x, _rounded(gamma, dtype), _rounded(beta, dtype), _rounded(dy, dtype), False,
                 1e-5, torch.float64)
    # float64: epsilon is a float32 attribute (1e-5 is 1.0000000e-5 + 2.5e-13),
    # a 1e-8 relative change of rstd = 1/sqrt(epsilon) here.
    tol = {tf.float32: 1e-5, tf.float64: 1e-7, tf.float16: 4e-3, tf.bfloat16: 3e-2}[dtype]
    for o, r, what in zip((y, dx, dg, db), ref, ("y", "dx", "dgamma", "dbeta")):
        np.testing.assert_allclose(o, r, rtol=tol, atol=tol * max(1, np.abs(r).max()),
                                   err_msg=what)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_epsilon_zero_on_constant_rows_is_nan_like_torch(dtype, rms):
    # Variance (or mean square) 0 and epsilon 0: 0 * inf, undefined: NaN.
    x = np.array([[0.0] * 4, [5.0] * 4, [1.0, 2.0, 3.0, 4.0]]) if not rms else \
        np.array([[0.0] * 4, [1.0, 2.0, 3.0, 4.0]])
    dy = np.ones_like(x)
    ours = _ours(x, None, None, dy, rms, 0.0, dtype)
    ref = _torch(x, None, None, dy, rms, 0.0, TORCH[dtype])
    for o, r, what in zip(ours, ref, ("y", "dx")):
        _same_nonfinite(o, r, what)
        ok = np.isfinite(r)
        tol = {tf.float32: 1e-5, tf.float64: 1e-12, tf.float16: 4e-3, tf.bfloat16: 3e-2}[dtype]
        np.testing.assert_allclose(o[ok], r[ok], rtol=tol, atol=tol, err_msg=what)
    assert np.isnan(ours[0][0]).all()


NONFINITE_ROWS = {
    "nan": [1.0, np.nan, 2.0, 3.0],
    "inf": [1.0, np.inf, 2.0, 3.0],
    "-inf": [1.0, -np.inf, 2.0, 3.0],
    "inf_and_-inf": [-np.inf, np.inf, 2.0, 3.0],
    "all_nan": [np.nan] * 4,
}


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("row", sorted(NONFINITE_ROWS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_nan_and_inf_rows_match_torch(dtype, row, rms):
    """A row holding NaN/Inf: the same NaN/Inf pattern as PyTorch in y, dx,
    dgamma and dbeta; the other rows are unaffected."""
    x = np.array([NONFINITE_ROWS[row], [1.0, 2.0, 3.0, 4.5]])
    gamma, beta = np.array([1.0, 2.0, 0.5, -1.0]), np.array([0.0, 1.0, -1.0, 2.0])
    dy = np.array([[0.5, -1.0, 2.0, 1.0], [1.0, 1.0, -2.0, 0.25]])
    ours = _ours(x, gamma, None if rms else beta, dy, rms, 1e-5, dtype)
    ref = _torch(x, gamma, None if rms else beta, dy, rms, 1e-5, TORCH[dtype])
    tol = {tf.float32: 1e-5, tf.float64: 1e-12, tf.float16: 4e-3, tf.bfloat16: 3e-2}[dtype]
    for o, r, what in zip(ours, ref, ("y", "dx", "dgamma", "dbeta")):
        _same_nonfinite(o, r, what)
        ok = np.isfinite(r)
        np.testing.assert_allclose(o[ok], r[ok], rtol=tol, atol=tol * 4, err_msg=what)
    assert np.isfinite(ours[0][1]).all() and np.isfinite(ours[1][1]).all()


# Rows whose squares leave float32's range, though the result is ordinary.
# (Up to a standard deviation of ~1e37: rstd must stay a normal float32.)
HUGE = {
    "1e30": [1e30, -1e30, 3e29, 0.0, 2e29, -5e29],
    "1e30_offset": [1e30, 1.01e30, 1.02e30, 1.03e30, 1e30, 1.025e30],
    "1e36": [1e36, -2e36, 3e36, 0.0, 5e35, -1e36],
    "1e-25_eps0": [1e-25, -1e-25, 3e-26, 0.0, 2e-26, -5e-26],
}


HUGE_CASES = [(dt, c) for dt in (tf.float32, tf.bfloat16) for c in sorted(HUGE)]


@pytest.mark.parametrize("axis", [-1, 0], ids=["rows", "channels"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype,case", HUGE_CASES,
                         ids=[f"{d.name}-{c}" for d, c in HUGE_CASES])
def test_out_of_range_squares_give_the_exact_result(dtype, case, rms, axis):
    """float32 statistics would overflow (|x| ~ 1e20 and up) or, with
    epsilon 0, underflow (|x| ~ 1e-20 and below); such rows are recomputed in
    double, so y and dx match PyTorch float64 (float32 PyTorch returns NaN,
    0 or inf for them). Channel layout: the same values down a column."""
    eps = 0.0 if case.endswith("eps0") else 1e-5
    row = np.array(HUGE[case])
    other = np.array([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])
    x = np.stack([row, other])
    dy = np.array([[0.5, -1.0, 2.0, 1.0, -0.5, 0.25], [1.0, 1.0, -2.0, 0.25, 0.5, -1.0]])
    gamma = np.array([1.0, 2.0, 0.5, -1.0, 1.5, 0.75])
    if axis == 0:
        x, dy = x.T.copy(), dy.T.copy()
    xr, dyr = _rounded(x, dtype), _rounded(dy, dtype)
    y, dx, dg = _ours(xr, gamma, None, dyr, rms, eps, dtype, axis=axis)[:3]
    ry, rdx, rdg = _torch(xr, _rounded(gamma, dtype), None, dyr, rms, eps, torch.float64,
                          axis=axis)[:3]
    tol = {tf.float32: 2e-5, tf.bfloat16: 2e-2}[dtype]
    for o, r, what in ((y, ry, "y"), (dg, rdg, "dgamma")):
        np.testing.assert_allclose(o, r, rtol=tol, atol=tol * np.abs(r).max(), err_msg=what)
    # dx scales like 1/|x|: compare relative to its own magnitude.
    np.testing.assert_allclose(dx, rdx, rtol=tol, atol=tol * np.abs(rdx).max(), err_msg="dx")


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_float16_extremes(rms):
    """65504 (float16's max) rows: exact like float64 PyTorch; a constant row
    of 65504 gives exactly beta (float16 PyTorch on CPU returns 0.71 there,
    from E[x^2] - E[x]^2 cancellation)."""
    x = np.array([[65504.0, -65504.0, 100.0, 0.0], [65504.0] * 4, [-65504.0, 65504.0, 1, 2]])
    dy = np.array([[1.0, -1.0, 0.5, 2.0], [1.0, 2.0, 3.0, 4.0], [0.25, 1.0, -1.0, 0.5]])
    beta = None if rms else np.array([0.5, -0.5, 0.25, 0.0])
    y, dx = _ours(x, None, beta, dy, rms, 1e-5, tf.float16)[:2]
    ry, rdx = _torch(x, None, beta, dy, rms, 1e-5, torch.float64)[:2]
    ry, rdx = _rounded(ry, tf.float16), _rounded(rdx, tf.float16)
    np.testing.assert_allclose(y, ry, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(dx, rdx, rtol=2e-3, atol=1e-6)
    if not rms:
        np.testing.assert_array_equal(y[1], _rounded(beta, tf.float16))
