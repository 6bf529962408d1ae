"""Property-based fuzzing of layer_norm and rms_norm (hypothesis).

Each example draws a shape (rank 1..6, zero-size dims included), axes (int or
list, negative, unsorted, non-contiguous), a dtype pair, epsilon, scale/center
and per-row kinds of values, then runs the forward and every gradient (dx,
dgamma, dbeta through tf.GradientTape with a random upstream gradient),
eagerly or inside a tf.function.

Oracles, never our own output. Each row of x (the normalized dims
flattened, the others as rows) gets a class from its exact statistics:
- in range (finite x; float32 statistics, float64 for float64 x, and the
  outputs stay well inside their dtype's range): an extended-precision NumPy
  reference on the same rounded inputs, with a tolerance per dtype relative
  to the row's scale (float32 1e-5, float16 2e-3, bfloat16 1.6e-2; dgamma /
  dbeta scaled by sqrt(rows summed)); exact values past the output dtype's
  max must come out as +-Inf of their sign;
- NaN/Inf in the row: torch.nn.functional.layer_norm / rms_norm and autograd
  computed in the SAME dtypes as ours (torch CPU): the same NaN/+Inf/-Inf
  pattern and close finite values;
- finite but out of the statistics' range (variance overflow; epsilon 0 with
  squares that underflow): torch as above, or the exact result (always
  right), or the documented divergence from torch (D1-D3 below, README
  "Hardening"; test_known_divergence_* pin each with a minimal repro as a
  strict xfail against torch).

TFLN_FUZZ_EXAMPLES sets the number of examples across the suite (default
150, about 20 s on a 2-core machine). Runs are derandomized, so CI sees the
same examples every time; a failure prints the case (and its hypothesis
blob) to reproduce it.
"""
import collections
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import tensorflow as tf
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

import tf_layernorm as tfln

torch.set_num_threads(1)

# ------------------------------------------------------------------ budget --

# TFLN_FUZZ_EXAMPLES: examples across the whole suite (default 150, about
# 20 s here), shared 13:13:4 by the three property tests.
_TOTAL = int(os.environ.get("TFLN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=max(1, _TOTAL * 13 // 30), deadline=None, derandomize=True,
                print_blob=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SMALL = settings(FUZZ, max_examples=max(1, _TOTAL * 4 // 30))

# --------------------------------------------------------------- dtypes --

TF_DT = {"float16": tf.float16, "bfloat16": tf.bfloat16, "float32": tf.float32,
         "float64": tf.float64}
TORCH_DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
            "float64": torch.float64}
# (x dtype, gamma/beta dtype): every pair the kernels take.
DTYPE_PAIRS = [("float32", "float32"), ("float64", "float64"), ("float16", "float16"),
               ("float16", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32")]
# Tolerance relative to a row's scale, per output dtype.
TOL = {"float64": 1e-9, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
DTYPE_MAX = {"float64": 1.7e308, "float32": 3.4e38, "float16": 65504.0, "bfloat16": 3.38e38}
# Smallest subnormals: the outputs' absolute resolution near 0.
DTYPE_TINY = {"float64": 5e-324, "float32": 1.5e-45, "float16": 6e-8, "bfloat16": 9.2e-41}

# Typical first (hypothesis shrinks towards the first), then the extremes.
EPSILONS = [1e-5, 1e-6, 1e-3, 1e-12, 1.0, 100.0, 1e-30, 0.0]
ROW_KINDS = ["normal", "normal", "normal", "offset", "tiny", "huge", "constant", "nan", "inf"]


def rounded(values, dtype):
    """values (float64) rounded to dtype and back: the exact inputs ours sees."""
    return tf.cast(tf.cast(tf.constant(values, tf.float64), TF_DT[dtype]), tf.float64).numpy()


# ------------------------------------------------------------- the cases --

@dataclass
class Case:
    op: str                 # "layer_norm" or "rms_norm"
    shape: tuple
    axis: object            # as passed to the API (int or list)
    axes: list              # sorted, non-negative
    x_dtype: str
    p_dtype: str
    epsilon: float
    scale: bool
    center: bool
    mode: str               # "eager" or "function"
    kinds: list             # row kind of row r is kinds[r % len(kinds)]
    # Filled by make_arrays: float64 arrays holding exactly representable values.
    x: np.ndarray = field(default=None, repr=False)
    dy: np.ndarray = field(default=None, repr=False)
    gamma: np.ndarray = field(default=None, repr=False)
    beta: np.ndarray = field(default=None, repr=False)

    @property
    def perm(self):
        """Moves the normalized axes (sorted) to the end: rows are then the
        last len(axes) dims flattened."""
        return [d for d in range(len(self.shape)) if d not in self.axes] + self.axes

    @property
    def norm_shape(self):
        return tuple(self.shape[a] for a in self.axes)

    @property
    def rows_cols(self):
        d = int(np.prod(self.norm_shape, dtype=np.int64))
        return int(np.prod(self.shape, dtype=np.int64)) // max(d, 1) if d else 0, d


def to_rows(case, a):
    """a (x's layout) -> [rows, D]."""
    r, d = case.rows_cols
    t = np.transpose(a, case.perm)
    return t.reshape(-1, d) if d else np.zeros((0, 0))


def from_rows(case, a2):
    """[rows, D] -> x's layout."""
    shape_t = [case.shape[p] for p in case.perm]
    inverse = [case.perm.index(d) for d in range(len(case.shape))]
    return np.transpose(a2.reshape(shape_t), inverse)


def row_values(rng, kind, d, x_dtype):
    """One row of D values of the given kind, float64 (rounded later)."""
    half = x_dtype == "float16"
    if kind == "normal":
        scale = 10.0 ** rng.uniform(-3, 3)
        return rng.normal(scale * rng.normal(), scale, d)
    if kind == "offset":  # large mean, small spread: cancellation in x - mean
        scale = 10.0 ** rng.uniform(-2, 1)
        return rng.normal(scale * 10.0 ** rng.uniform(2, 4), scale, d)
    if kind == "tiny":  # float16: its subnormals; others: ~1e-30
        return rng.normal(0, 1e-6 if half else 1e-30, d)
    if kind == "huge":  # float16: up to its max; others: ~1e30
        return rng.uniform(-65504, 65504, d) if half else rng.normal(0, 1e30, d)
    if kind == "constant":
        value = rng.choice([0.0, 1.0, -3.5, 60000.0 if half else 1e30, 1e-7 if half else 1e-30])
        return np.full(d, value * (1 if rng.random() < 0.5 else -1))
    row = rng.normal(0, 1, d)
    hits = rng.choice(d, size=int(rng.integers(1, d + 1)), replace=False) if d else []
    if kind == "nan":
        row[hits] = np.nan
    else:  # "inf": +/-inf, sometimes next to a NaN
        row[hits] = np.where(rng.random(len(hits)) < 0.5, np.inf, -np.inf)
        if d > 1 and rng.random() < 0.2:
            row[rng.integers(d)] = np.nan
    return row


def make_arrays(case, seed):
    rng = np.random.default_rng(seed)
    r, d = case.rows_cols
    x2 = np.stack([row_values(rng, case.kinds[i % len(case.kinds)], d, case.x_dtype)
                   for i in range(r)]) if r and d else np.zeros((r, d))
    case.x = rounded(from_rows(case, x2), case.x_dtype)
    case.dy = rounded(rng.normal(0, 1, case.shape), case.x_dtype)
    # Parameters of mixed magnitude and sign, zeros included.
    g = rng.normal(1, 1, case.norm_shape) * 10.0 ** rng.uniform(-1, 1)
    g[rng.random(case.norm_shape) < 0.1] = 0.0
    case.gamma = rounded(g, case.p_dtype) if case.scale else None
    want_beta = case.center and case.op == "layer_norm"
    case.beta = rounded(rng.normal(0, 1, case.norm_shape), case.p_dtype) if want_beta else None
    return case


@st.composite
def shapes(draw, max_elements=768):
    rank = draw(st.integers(1, 6))
    dims, total = [], 1
    for _ in range(rank):
        cap = max(1, min(40, max_elements // total))
        dim = draw(st.one_of(st.integers(1, min(5, cap)), st.integers(1, cap)))
        dims.append(dim)
        total *= dim
    # A zero-size dim in about one case in ten (sampled_from draws evenly;
    # integers would favour its bound 0).
    if draw(st.sampled_from([False] * 9 + [True])):
        dims[draw(st.integers(0, rank - 1))] = 0
    return tuple(dims)


@st.composite
def axis_args(draw, rank):
    """(axis as passed to the API, sorted non-negative axes): a contiguous
    block or any subset (non-contiguous, unsorted), half the time each."""
    if draw(st.booleans()):
        first = draw(st.integers(0, rank - 1))
        axes = list(range(first, draw(st.integers(first + 1, rank))))
    else:
        axes = draw(st.permutations(range(rank)))[:draw(st.integers(1, rank))]
    spelled = [a - rank if draw(st.booleans()) else a for a in axes]
    if len(spelled) == 1 and draw(st.booleans()):
        return spelled[0], sorted(axes)
    return spelled, sorted(axes)


@st.composite
def cases(draw, op, kinds=st.lists(st.sampled_from(ROW_KINDS), min_size=1, max_size=6)):
    shape = draw(shapes())
    axis, axes = draw(axis_args(len(shape)))
    x_dtype, p_dtype = draw(st.sampled_from(DTYPE_PAIRS))
    case = Case(op=op, shape=shape, axis=axis, axes=axes, x_dtype=x_dtype, p_dtype=p_dtype,
                epsilon=draw(st.sampled_from(EPSILONS)), scale=draw(st.booleans()),
                center=draw(st.booleans()), mode=draw(st.sampled_from(["eager", "function"])),
                kinds=draw(kinds))
    return make_arrays(case, draw(st.integers(0, 2**32 - 1)))


# ------------------------------------------------------------ under test --

def run_ours(case):
    """y, dx, dgamma, dbeta (None where absent) as float64 NumPy arrays."""
    x = tf.cast(tf.constant(case.x), TF_DT[case.x_dtype])
    dy = tf.cast(tf.constant(case.dy), TF_DT[case.x_dtype])
    params = {k: tf.cast(tf.constant(v), TF_DT[case.p_dtype])
              for k, v in (("gamma", case.gamma), ("beta", case.beta)) if v is not None}

    def forward_backward(x, dy, params):
        with tf.GradientTape() as tape:
            tape.watch([x] + list(params.values()))
            if case.op == "layer_norm":
                y = tfln.layer_norm(x, params.get("gamma"), params.get("beta"),
                                    axis=case.axis, epsilon=case.epsilon)
            else:
                y = tfln.rms_norm(x, params.get("gamma"), axis=case.axis, epsilon=case.epsilon)
        grads = tape.gradient(y, [x] + list(params.values()), output_gradients=dy)
        return y, grads

    if case.mode == "function":
        forward_backward = tf.function(forward_backward, autograph=False)
    y, grads = forward_backward(x, dy, params)
    assert y.dtype == x.dtype, (y.dtype, x.dtype)
    out = {"y": y, "dx": grads[0]}
    for name, grad in zip(params, grads[1:]):
        assert grad.dtype == params[name].dtype, (name, grad.dtype)
        out["d" + name] = grad
    return {k: tf.cast(v, tf.float64).numpy() for k, v in out.items()}


# ---------------------------------------------------------------- oracles --

# Row classes: which oracle judges a row.
IN_RANGE = "in range"            # float64 (extended) NumPy reference
NONFINITE = "NaN/Inf in x"       # torch, same dtypes
VAR_OVERFLOW = "variance overflow"  # finite x, sum of squares past the stats dtype: torch
RSTD_INF = "zero variance, epsilon 0"  # var + eps == 0 in the stats dtype: torch
BORDERLINE = "borderline"        # between two classes by rounding: nothing asserted


def reference(case):
    """Extended-precision NumPy forward and backward on [rows, D] (the same
    rounded inputs), the error each output may carry, and each row's class.
    Textbook formulas (torch's float64 autograd agrees:
    test_reference_matches_torch_float64). The mean is taken relative to the
    row's first element so constant rows have exactly their value as mean."""
    ld = np.longdouble
    x2, dy2 = to_rows(case, case.x).astype(ld), to_rows(case, case.dy).astype(ld)
    r, d = x2.shape
    g = np.ones(d, ld) if case.gamma is None else case.gamma.reshape(-1).astype(ld)
    b = np.zeros(d, ld) if case.beta is None else case.beta.reshape(-1).astype(ld)
    eps = ld(float(np.float32(case.epsilon)))  # the op's epsilon attr is a float32
    rms = case.op == "rms_norm"
    with np.errstate(all="ignore"):
        x0 = x2[:, :1]
        mu = np.zeros((r, 1), ld) if rms else x0 + (x2 - x0).mean(1, keepdims=True)
        xc = x2 - mu
        var = (xc * xc).mean(1, keepdims=True)
        rstd = 1 / np.sqrt(var + eps)
        xhat = xc * rstd
        gdy = dy2 * g
        mean_g = np.zeros((r, 1), ld) if rms else gdy.mean(1, keepdims=True)
        mean_gx = (gdy * xhat).mean(1, keepdims=True)
        ref = {"y": xhat * g + b, "dx": rstd * (gdy - mean_g - xhat * mean_gx),
               "dgamma_terms": dy2 * xhat, "dgamma": (dy2 * xhat).sum(0), "dbeta": dy2.sum(0)}
        constant = (x2 == x0).all(1, keepdims=True)
        atol = error_bounds(case, xhat, rstd, np.where(constant, 0, mu), g, b, gdy, mean_g,
                            mean_gx, dy2)
    as64 = lambda t: {k: v.astype(np.float64) for k, v in t.items()}
    return as64(ref), as64(atol), row_classes(case, x2, xc, eps)


def error_bounds(case, xhat, rstd, mu, g, b, gdy, mean_g, mean_gx, dy2):
    """Absolute error allowed per output element (4x the estimate).

    Sources: rounding of the outputs and of the statistics' arithmetic (the
    dtype's TOL times the row's largest terms); the mean, held in float32
    (float64 for float64 x), whose rounding u * |mean| moves every xhat by
    u * |mean| * rstd: for rows like 1e4 + N(0, 1e-3) far more than the
    row's scale (constant rows pass mu = 0: their mean is exact); and the
    outputs' subnormal spacing."""
    tol = TOL[case.x_dtype]
    stats_tol = TOL["float64" if case.x_dtype == "float64" else "float32"]
    amax = lambda a, axis: np.max(np.abs(a), axis=axis, initial=0.0, keepdims=axis == 1)
    dxhat = stats_tol * np.abs(mu) * rstd  # per row
    gmax, xmax = amax(g, None), amax(xhat, 1)
    rows = np.sqrt(max(len(xhat), 1))  # dgamma/dbeta sum this many rows
    tiny, ptiny = DTYPE_TINY[case.x_dtype], DTYPE_TINY[case.p_dtype]
    return {
        "y": 4 * (tol * (xmax * gmax + amax(b, None)) + dxhat * gmax) + tiny,
        "dx": 4 * rstd * (tol * (amax(gdy, 1) + np.abs(mean_g) + xmax * np.abs(mean_gx)) +
                          dxhat * (np.abs(mean_gx) + xmax * amax(gdy, 1))) + tiny,
        "dgamma": 4 * rows * (stats_tol * amax(dy2 * xhat, 0) + amax(dy2 * dxhat, 0)) + ptiny,
        "dbeta": 4 * rows * stats_tol * amax(dy2, 0) + ptiny,
    }


def row_classes(case, x2, xc, eps):
    """Each row's class (IN_RANGE, ...), from the exact statistics and the
    range of the statistics' dtype (float32, or float64 for float64 x)."""
    f64 = case.x_dtype == "float64"
    stats = np.finfo(np.float64 if f64 else np.float32)
    big = np.longdouble(stats.max)  # 4 * big must not overflow (as float32 it would)
    underflow = np.longdouble(stats.smallest_subnormal) / 2  # smaller squares round to 0
    d = x2.shape[1]
    with np.errstate(all="ignore"):
        finite = np.isfinite(x2).all(1)
        sq = xc * xc
        # The kernel's sums: squares, and (LayerNorm) x - first element.
        ssum = sq.sum(1)
        shifted = np.abs(x2 - x2[:, :1]).sum(1)
        peak = np.maximum(np.maximum(ssum, sq.max(1, initial=0)), shifted)
        var = ssum / d
    cls = np.full(len(x2), BORDERLINE, dtype=object)
    cls[finite & (peak < big / 4) & (var + eps >= (1e-290 if f64 else 1e-30))] = IN_RANGE
    cls[finite & (peak > 4 * big)] = VAR_OVERFLOW
    cls[finite & (eps == 0) & (np.max(sq, axis=1, initial=0) < underflow)] = RSTD_INF
    cls[~finite] = NONFINITE
    return cls


def run_torch(case):
    """torch.nn.functional layer_norm / rms_norm and autograd, in our dtypes."""
    perm = case.perm
    inverse = [perm.index(d) for d in range(len(case.shape))]
    xt = torch.tensor(case.x).to(TORCH_DT[case.x_dtype]).requires_grad_()
    params = {k: torch.tensor(v).to(TORCH_DT[case.p_dtype]).requires_grad_()
              for k, v in (("gamma", case.gamma), ("beta", case.beta)) if v is not None}
    eps = float(np.float32(case.epsilon))
    if case.p_dtype != case.x_dtype:
        # torch's mixed-dtype path wants every parameter present: ones and
        # zeros change no value (their gradients are not compared).
        ones = torch.ones(case.norm_shape, dtype=TORCH_DT[case.p_dtype])
        weight = params.get("gamma", ones)
        bias = params.get("beta", torch.zeros_like(ones))
    else:
        weight, bias = params.get("gamma"), params.get("beta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mixed dtypes: "Cannot dispatch to fused implementation"
        xp = xt.permute(perm)
        if case.op == "layer_norm":
            y = torch.nn.functional.layer_norm(xp, case.norm_shape, weight, bias, eps)
        else:
            y = torch.nn.functional.rms_norm(xp, case.norm_shape, weight, eps)
        y = y.permute(inverse)
        y.backward(torch.tensor(case.dy).to(y.dtype))
    out = {"y": y.detach(), "dx": xt.grad}
    out.update({"d" + k: p.grad for k, p in params.items()})
    return {k: v.double().numpy() for k, v in out.items()}


# ----------------------------------------------------------- comparisons --
# Each check returns a per-row (or per-element for dgamma) verdict, so rows of
# several classes in one case are judged each by its own oracle.

def pattern(a):
    """Where a is NaN, +Inf and -Inf."""
    return np.stack([np.isnan(a), np.isposinf(a), np.isneginf(a)])


def close_to_reference(ours, ref, atol, max_value):
    """Elementwise: within atol of the exact value where that fits the output
    dtype, +-Inf of its sign where it is far past the dtype's max (output
    overflow, e.g. float16 dx of a row with a tiny variance); anything in
    between is not judged."""
    with np.errstate(all="ignore"):
        fits = np.abs(ref) < max_value / 4
        over = np.abs(ref) > 2 * max_value
        good = np.where(fits, np.abs(ours - ref) <= atol, True)
        return good & np.where(over, ours == np.copysign(np.inf, ref), True)


def like_torch(ours, theirs, tol, scale, strict=True):
    """Elementwise: torch's NaN/+Inf/-Inf (strict=False: non-finite where
    torch is, NaN and Inf may trade places), and close finite values."""
    same = (np.all(pattern(ours) == pattern(theirs), axis=0) if strict else
            np.isfinite(ours) == np.isfinite(theirs))
    with np.errstate(all="ignore"):
        near = np.abs(ours - theirs) <= tol * (scale + np.abs(theirs))
    return same & (near | ~np.isfinite(theirs))


def fail(name, ours, oracle, bad, what):
    i = tuple(np.argwhere(bad)[0])
    raise AssertionError(f"{name}: {what}; {int(bad.sum())} of {bad.size} values, first at "
                         f"{i}: ours {ours[i]!r}, oracle {oracle[i]!r}")


# Known divergences from torch (README "Hardening"; test_known_divergence_*
# pin each one with a minimal repro):
#
# D1 LayerNorm rows of finite x whose sum of squared deviations overflows
#    float32 (|x - mean| ~ 1e19 and beyond; float32 and bfloat16 x): the
#    kernels recompute such rows' statistics in double and are exact; torch's
#    float32 and bfloat16 kernels give NaN. Past a standard deviation of
#    ~1e37 rstd is no longer a normal float32 and the row comes out as in
#    the float statistics, rstd = 0: y = beta (0 without center), dx = 0;
#    the checker accepts that too.
# D2 epsilon 0 and squares that underflow float32: exact here (double
#    statistics); torch gets rstd = inf and returns NaN/+-Inf.
# D3 Constant rows near float32's max: ours is exact, torch overflows its
#    row sum (layer_norm) or 2 * x (rms_norm's backward) into NaN.

def follows_d1(case, name, o2):
    """Per row of output o2 ([rows, D]): behaves as D1 describes."""
    if name == "y":  # beta rounded to y's dtype, or 0
        b = np.zeros(o2.shape[1]) if case.beta is None else case.beta.reshape(-1)
        return np.all(o2 == rounded(b, case.x_dtype), axis=1)
    return np.all(o2 == 0, axis=1)


def check_rows(case, name, cls, ours, ref, atol, theirs):
    """y or dx: rows in range against the reference; rows out of range
    against the reference, torch, or their documented divergence."""
    o2, r2 = to_rows(case, ours[name]), ref[name]
    dmax = DTYPE_MAX[case.x_dtype]
    exact = np.all(close_to_reference(o2, r2, atol[name], dmax), axis=1)
    bad = (cls == IN_RANGE) & ~exact
    if bad.any():
        good = close_to_reference(o2, r2, atol[name], dmax)
        fail(f"{name} (rows in range vs float64)", o2, r2, bad[:, None] & ~good,
             "values off the exact result")
    if theirs is None:
        return
    t2 = to_rows(case, theirs[name])
    tol = 4 * TOL[case.x_dtype]
    scale = np.max(np.where(np.isfinite(t2), np.abs(t2), 0), axis=1, initial=1.0)[:, None]
    for kind in (NONFINITE, VAR_OVERFLOW, RSTD_INF):
        rows = cls == kind
        torch_ok = np.all(like_torch(o2, t2, tol, scale, strict=kind != RSTD_INF), axis=1)
        ok = torch_ok | (exact & (kind != NONFINITE))
        if kind == VAR_OVERFLOW and case.op == "layer_norm":
            ok |= follows_d1(case, name, o2)
        bad = rows & ~ok
        if bad.any():
            fail(f"{name} (rows '{kind}' vs torch)", o2, t2,
                 bad[:, None] & ~like_torch(o2, t2, tol, scale, kind != RSTD_INF),
                 "NaN/Inf pattern or values differ from torch (nor exact, nor a known "
                 "divergence)")


def check_param_grad(case, name, cls, ours, ref, atol, theirs):
    """dgamma/dbeta sum every row: the reference judges them when it is
    finite (every row in range, or out of range but computed exactly), D1
    rows adding 0; else torch, unless a borderline row is in the sum."""
    o = ours[name].reshape(-1)
    pmax = DTYPE_MAX[case.p_dtype]
    rtol = 2 * TOL[case.p_dtype]
    if name == "dbeta":  # the sum of dy: whatever x holds
        expected = {"reference": ref["dbeta"]}
    else:
        expected = {"reference": ref["dgamma"]}
        d1 = (cls == VAR_OVERFLOW) & (case.op == "layer_norm")
        if d1.any():
            expected["reference, D1 rows adding 0"] = ref["dgamma_terms"][~d1].sum(0)
    for label, want in expected.items():
        if np.isfinite(want).all() and np.all(close_to_reference(
                o, want, atol[name] + rtol * np.abs(want), pmax)):
            return
    if theirs is None or (cls == BORDERLINE).any():
        if np.isfinite(ref[name]).all() and (cls == IN_RANGE).all():
            fail(name + " vs float64", o, ref[name],
                 ~close_to_reference(o, ref[name], atol[name] + rtol * np.abs(ref[name]), pmax),
                 "values off the exact result")
        return  # a row of unknown value is part of the sum
    t = theirs[name].reshape(-1)
    scale = math.sqrt(len(cls)) * np.max(np.where(np.isfinite(t), np.abs(t), 0), initial=1.0)
    good = like_torch(o, t, 4 * max(TOL[case.x_dtype], TOL[case.p_dtype]), scale,
                      strict=not (cls == RSTD_INF).any())
    if not good.all():
        fail(name + " vs torch", o, t, ~good, "NaN/Inf pattern or values differ from torch")


def check_case(case):
    if currently_in_test_context():
        note(f"case: {case}")
    ours = run_ours(case)
    assert ours["y"].shape == case.shape and ours["dx"].shape == case.shape
    for p in ("gamma", "beta"):
        if getattr(case, p) is not None:
            assert ours["d" + p].shape == case.norm_shape, (p, ours["d" + p].shape)
    r, d = case.rows_cols
    if d == 0:
        return  # nothing to normalize: empty outputs, shapes checked above
    ref, atol, cls = reference(case)
    if currently_in_test_context():
        note(f"row classes: {sorted(collections.Counter(cls).items())}")
    theirs = None if (cls == IN_RANGE).all() else run_torch(case)
    for name in ("y", "dx"):
        check_rows(case, name, cls, ours, ref, atol, theirs)
    for name in ("dgamma", "dbeta"):
        if name in ours:
            check_param_grad(case, name, cls, ours, ref, atol, theirs)


# ------------------------------------------------------------------ tests --

@FUZZ
@given(case=cases("layer_norm"))
def test_layer_norm_properties(case):
    check_case(case)


@FUZZ
@given(case=cases("rms_norm"))
def test_rms_norm_properties(case):
    check_case(case)


ONLY_FINITE = st.lists(st.sampled_from(["normal", "offset", "constant"]), min_size=1,
                       max_size=3)


@SMALL
@given(case=cases("layer_norm", kinds=ONLY_FINITE))
def test_layer_norm_finite_rows_properties(case):
    """Finite, moderate rows only: every example exercises the float64 path."""
    check_case(case)


def test_reference_matches_torch_float64():
    """The NumPy oracle is the textbook formula; check it once against
    torch's float64 autograd so a slip in it cannot hide a kernel bug."""
    for op, axis in (("layer_norm", [0, 2]), ("rms_norm", -1)):
        case = Case(op=op, shape=(3, 5, 4), axis=axis, axes=sorted(a % 3 for a in (
            [axis] if isinstance(axis, int) else axis)), x_dtype="float64",
            p_dtype="float64", epsilon=1e-3, scale=True, center=True, mode="eager",
            kinds=["normal"])
        make_arrays(case, 7)
        ref, _, cls = reference(case)
        assert (cls == IN_RANGE).all()
        theirs = run_torch(case)
        for name in ("y", "dx"):
            np.testing.assert_allclose(ref[name], to_rows(case, theirs[name]), rtol=1e-10,
                                       atol=1e-12)
        for name in ("dgamma", "dbeta"):
            if name in theirs:
                np.testing.assert_allclose(ref[name], theirs[name].reshape(-1), rtol=1e-10,
                                           atol=1e-12)


def _fixed_case(op, x, epsilon, x_dtype="float32", scale=True, center=True, seed=3):
    """A Case over rows x ([rows, D], last axis), other arrays drawn from seed."""
    x = np.asarray(x, np.float64)
    case = Case(op=op, shape=x.shape, axis=-1, axes=[1], x_dtype=x_dtype, p_dtype=x_dtype,
                epsilon=epsilon, scale=scale, center=center, mode="eager", kinds=["normal"])
    make_arrays(case, seed)
    case.x = rounded(x, x_dtype)
    return case


def test_checker_catches_wrong_outputs(monkeypatch):
    """The comparisons can fail: a y off by 1e-4 (float32), and a NaN where
    torch has a finite value, are both reported."""
    case = _fixed_case("layer_norm", np.random.default_rng(0).normal(size=(4, 7)), 1e-5)
    real = run_ours

    def off(c):
        out = real(c)
        out["y"] = out["y"] * (1 + 1e-4)
        return out

    monkeypatch.setattr(__import__(__name__), "run_ours", off)
    with pytest.raises(AssertionError, match="values off"):
        check_case(case)

    def nan_in_nan_row(c):
        out = real(c)
        out["y"][0, 0] = 0.0 if np.isnan(out["y"][0, 0]) else np.nan
        return out

    nan_case = _fixed_case("rms_norm", [[1.0, np.inf, 2.0], [1.0, 2.0, 3.0]], 1e-6)
    monkeypatch.setattr(__import__(__name__), "run_ours", nan_in_nan_row)
    with pytest.raises(AssertionError, match="NaN/Inf pattern or values differ from torch"):
        check_case(nan_case)


@pytest.mark.parametrize("d", [1, 3, 17, 33])
@pytest.mark.parametrize("value,epsilon", [(1e24, 1e-30), (1e37, 1e-5), (-3e20, 0.0)],
                         ids=["tiny-eps", "default-eps", "eps0-const"])
def test_backward_of_constant_row_far_from_zero(value, epsilon, d):
    """Regression (found by this suite): a constant row with |mean| * rstd
    past float32's max (1e24 with epsilon 1e-30, 1e37 with 1e-5) gave dx =
    NaN for the whole row when D is not a multiple of the vector width: the
    kernel's padding lanes held xhat = -mean * rstd = -inf, and 0 * inf
    poisoned the row sum. y = beta and dx = rstd * (g - mean(g)) exactly.
    With epsilon 0 the row's rstd is inf and everything is NaN, as torch."""
    case = _fixed_case("layer_norm", np.full((2, d), value), epsilon)
    check_case(case)
    if epsilon > 0:
        ours = run_ours(case)
        assert np.isfinite(ours["dx"]).all() and np.isfinite(ours["dgamma"]).all()


# ------------------------------------------------- known divergences --
# Where float32/bfloat16 PyTorch loses the answer and we do not: ours equals
# the extended-precision reference, and torch (same dtype, CPU) is not finite
# there. Documented in README "Hardening" (D1-D3); if torch's behaviour
# changes, the second assertion says so.

def _exact_where_torch_is_not(case, name, rtol):
    ours, theirs = run_ours(case)[name], run_torch(case)[name]
    ref = from_rows(case, reference(case)[0][name]) if name in ("y", "dx") else \
        reference(case)[0][name]
    assert np.isfinite(ours).all(), ours
    # (dx of the 1e38 rows is ~1e-38: float32's smallest normals, which TF's
    # flush-to-zero may round to 0.)
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=max(rtol * np.abs(ref).max(), 1e-36))
    assert not np.isfinite(theirs).all(), theirs


@pytest.mark.parametrize("x_dtype", ["float32", "bfloat16"])
def test_known_divergence_d1_variance_overflow(x_dtype):
    # Squared deviations ~2e61 > float32 max: the statistics are recomputed
    # in double (exact y); torch.nn.functional.layer_norm returns NaN.
    case = _fixed_case("layer_norm", [[1e30, -1e30, 3e30, 2e30]], 1e-5, x_dtype=x_dtype)
    _exact_where_torch_is_not(case, "y", 2e-5 if x_dtype == "float32" else 2e-2)


@pytest.mark.parametrize("op,name,x_dtype,x", [
    ("rms_norm", "dx", "float32", [[1e-30, 2e-30, -1.5e-30]]),
    ("layer_norm", "y", "bfloat16", [[1.4e-30, -1e-30, -2.6e-31, 5.1e-31, 2.9e-30, -2.2e-31]]),
], ids=["rms-dx-float32", "layer-y-bfloat16"])
def test_known_divergence_d2_epsilon_0_underflow(op, name, x_dtype, x):
    # epsilon 0 and squares that underflow float32: recomputed in double
    # (exact); torch gets rstd = inf and returns NaN/+-Inf.
    case = _fixed_case(op, x, 0.0, x_dtype=x_dtype, center=False)
    _exact_where_torch_is_not(case, name, 2e-5 if x_dtype == "float32" else 2e-2)


@pytest.mark.parametrize("op,name", [("layer_norm", "y"), ("rms_norm", "dx")])
def test_known_divergence_d3_near_float32_max(op, name):
    # A constant row of 1e38: ours takes the mean relative to the first
    # element (exact: y = beta) and RMSNorm's dx is exact; torch overflows
    # the row sum (LayerNorm) or 2 * x (rms_norm's backward) into NaN.
    case = _fixed_case(op, [[1e38, 1e38, 1e38, 1e38]], 1e-5)
    _exact_where_torch_is_not(case, name, 2e-5)
