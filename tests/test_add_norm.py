"""Fused residual add + norm: tfln.add_layer_norm / add_rms_norm, their raw ops
and the Keras layers' `residual=` form.

Oracles: float64 NumPy (every CPU ISA, in subprocesses, like
test_cpu_kernels.py) and PyTorch's float64 autograd of `s = x + r;
F.layer_norm(s)`. s must be exactly what `x + r` gives in the input dtype.
"""
import functools
import os
import platform
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import tf_layernorm as tfln
from tf_layernorm import ops as _ops

ISAS = ["baseline", "avx2", "avx512"]
_ISA_FLAGS = {
    "baseline": set(),
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAGS = _cpu_flags()
_NP = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
       "bfloat16": ml_dtypes.bfloat16}
# Relative tolerance per dtype: float32 math, rounded once to the output.
_RTOL = {"float32": 2e-5, "float64": 1e-10, "bfloat16": 2 ** -7, "float16": 2 ** -10}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_LAYERNORM_CPU_ISA")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


def _round(a64, dt):
    """float64 values rounded once to dt (the exact sum of two dt values,
    rounded: what a correct element-wise add in dt gives), back in float64."""
    return a64.astype(_NP[dt]).astype(np.float64)


def _oracle(s, g, b, dy, ds, axes, rms, eps):
    """y, dx (= dresidual), dgamma, dbeta of y = norm(s), with ds reaching s
    directly, in float64. axes: the normalized (sorted, non-negative) axes."""
    axes = tuple(axes)
    others = tuple(d for d in range(s.ndim) if d not in axes)
    pshape = [s.shape[d] if d in axes else 1 for d in range(s.ndim)]
    g = np.ones(pshape) if g is None else g.reshape(pshape)
    b = np.zeros(pshape) if b is None else b.reshape(pshape)
    mean = 0.0 if rms else s.mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(((s - mean) ** 2).mean(axis=axes, keepdims=True) + eps)
    xh = (s - mean) * rstd
    y = xh * g + (0.0 if rms else b)
    gv = dy * g
    mean_g = 0.0 if rms else gv.mean(axis=axes, keepdims=True)
    dx = rstd * (gv - mean_g - xh * (gv * xh).mean(axis=axes, keepdims=True)) + ds
    return y, dx, (dy * xh).sum(axis=others), dy.sum(axis=others)


# ------------------------------------------------------ every ISA, in place --

# (shape, axis, dtype, param dtype): rows with vector tails, half rows widened
# into the row cache and past it (D > 4096), the channel layout with column
# tails, and sizes that take the streaming stores and both threads.
CASES = [
    ((5, 1), -1, "float32", "float32"),
    ((9, 17), -1, "float32", "float32"),
    ((13, 1029), -1, "float32", "float32"),
    ((6, 100), -1, "float64", "float64"),
    ((3, 17, 37), 1, "float32", "float32"),
    ((3, 7, 45), 1, "float64", "float64"),
    ((2048, 1024), -1, "float32", "float32"),
    ((8, 64, 4096), 1, "float32", "float32"),
    ((9, 31), -1, "bfloat16", "bfloat16"),
    ((9, 47), -1, "bfloat16", "float32"),
    ((3, 5000), -1, "bfloat16", "float32"),
    ((3, 9, 70), 1, "bfloat16", "float32"),
    ((9, 31), -1, "float16", "float16"),
    ((7, 4500), -1, "float16", "float32"),
    ((4096, 1024), -1, "float16", "float16"),
    ((3, 9, 70), 1, "float16", "float32"),
]

_SCRIPT = """
    import ctypes
    import numpy as np, tensorflow as tf
    import tf_layernorm
    ops = tf_layernorm.load_ops()
    lib = ctypes.CDLL(tf_layernorm.build_info()["library"])
    lib.tf_layernorm_forwarded_buffers.restype = ctypes.c_int64
    lib.tf_layernorm_cpu_isa.restype = ctypes.c_char_p
    out = {{}}
    for i, (shape, axis, dt, pdt) in enumerate({cases!r}):
        rng = np.random.default_rng(i)
        a = axis % len(shape)
        S = tf.float64 if dt == "float64" else tf.float32
        x = tf.cast(tf.constant(rng.standard_normal(shape) * 2.0 + 0.5), dt)
        r = tf.cast(tf.constant(rng.standard_normal(shape) * 3.0), dt)
        g = tf.cast(tf.constant(1.0 + 0.5 * rng.standard_normal(shape[a])), pdt)
        b = tf.cast(tf.constant(rng.standard_normal(shape[a])), pdt)
        dy = tf.cast(tf.constant(rng.standard_normal(shape)), dt)
        ds = tf.cast(tf.constant(rng.standard_normal(shape)), dt)
        one = tf.constant(1.0, dt)
        common = dict(begin_norm_axis=a, num_norm_axes=1, scale=True)

        def raw(x, r, xb, dy, ds, dyr, dsr, rr):
            y, s, mean, rstd = ops.tf_layernorm_add_layer_norm(
                x, r, g, b, S=S, epsilon=1e-5, center=True, **common)
            dx, dg, db = ops.tf_layernorm_add_layer_norm_grad(
                dy, ds, s, g, mean, rstd, center=True, **common)
            ry, rs, rrstd = ops.tf_layernorm_add_rms_norm(xb, rr, g, S=S, epsilon=1e-5,
                                                         **common)
            rdx, rdg = ops.tf_layernorm_add_rms_norm_grad(dyr, dsr, rs, g, rrstd, **common)
            return y, s, dx, dg, db, ry, rs, rdx, rdg

        @tf.function
        def fresh(x, r, dy, ds, one, two):
            # Fresh products whose only reader is our op: s may take x's
            # buffer, y r's, dx dy's (or ds's).
            return raw(x * one, r * one, x, dy * one, ds * one, dy * two, ds * two, r * two)

        @tf.function
        def held(x, r, dy, ds, one, two):
            return raw(x, r, x, dy, ds, dy, ds, r)

        @tf.function
        def no_ds(x, r, dy):
            y, s, mean, rstd = ops.tf_layernorm_add_layer_norm(
                x, r, g, b, S=S, epsilon=1e-5, center=True, **common)
            return ops.tf_layernorm_add_layer_norm_grad(
                dy, tf.zeros([0], x.dtype), s, g, mean, rstd, center=True, **common)[0]

        fresh(x, r, dy, ds, one, one)
        held(x, r, dy, ds, one, one)
        c0 = lib.tf_layernorm_forwarded_buffers()
        got = fresh(x, r, dy, ds, one, one)
        c1 = lib.tf_layernorm_forwarded_buffers()
        ref = held(x, r, dy, ds, one, one)
        c2 = lib.tf_layernorm_forwarded_buffers()
        out[f"forwarded{{i}}"] = np.array([c1 - c0, c2 - c1])
        out[f"tfadd{{i}}"] = tf.bitcast(x + r, tf.uint8).numpy()
        out[f"dxnods{{i}}"] = tf.cast(no_ds(x, r, dy), tf.float64).numpy()
        for k, t in (("x", x), ("r", r), ("g", g), ("b", b), ("dy", dy), ("ds", ds)):
            out[f"{{k}}{{i}}"] = tf.cast(t, tf.float64).numpy()
        for k, t, u in zip({outputs!r}, got, ref):
            out[f"{{k}}{{i}}"] = tf.cast(t, tf.float64).numpy()
            out[f"bits_{{k}}{{i}}"] = tf.bitcast(t, tf.uint8).numpy()
            out[f"same_{{k}}{{i}}"] = np.array(
                tf.bitcast(t, tf.uint8).numpy().tobytes() == tf.bitcast(u, tf.uint8).numpy().tobytes())
    np.savez({path!r}, **out)
    print("ISA", lib.tf_layernorm_cpu_isa().decode())
"""
OUTPUTS = ("y", "s", "dx", "dg", "db", "ry", "rs", "rdx", "rdg")


@functools.lru_cache(maxsize=None)
def _run_isa(isa, tmp_dir):
    path = os.path.join(tmp_dir, f"add-{isa}.npz")
    script = _SCRIPT.format(cases=CASES, path=path, outputs=OUTPUTS)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_dir,
                          env=_env(TF_LAYERNORM_CPU_ISA=isa), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ISA {isa}" in proc.stdout
    return dict(np.load(path))


@pytest.fixture(scope="module")
def isa_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("add_norm_isa"))


def _check_case(got, i, case, label):
    shape, axis, dt, pdt = case
    x, r, g, b, dy, ds = (got[f"{k}{i}"] for k in ("x", "r", "g", "b", "dy", "ds"))
    a = axis % len(shape)
    # s: exactly x + r rounded once in dt, and bitwise TensorFlow's x + r.
    s_ref = _round(x + r, dt)
    for name in ("s", "rs"):
        np.testing.assert_array_equal(got[f"{name}{i}"], s_ref, err_msg=f"{label} {case} {name}")
        assert got[f"bits_{name}{i}"].tobytes() == got[f"tfadd{i}"].tobytes(), (label, case, name)
    want = {}
    want["y"], want["dx"], want["dg"], want["db"] = _oracle(s_ref, g, b, dy, ds, [a], False, 1e-5)
    want["ry"], want["rdx"], want["rdg"], _ = _oracle(s_ref, g, None, dy, ds, [a], True, 1e-5)
    nods = _oracle(s_ref, g, b, dy, 0.0, [a], False, 1e-5)[1]
    for name, ref in list(want.items()) + [("dxnods", nods)]:
        out_dt = pdt if name in ("dg", "db", "rdg") else dt
        tol = max(_RTOL[out_dt], _RTOL[dt] if dt == "float64" else 2e-5)
        scale = max(1.0, float(np.abs(ref).max()))
        if name in ("dg", "db", "rdg"):
            scale *= np.sqrt(x.size / x.shape[a])
        np.testing.assert_allclose(got[f"{name}{i}"], ref, rtol=tol, atol=tol * scale,
                                   err_msg=f"{label} {shape} axis={axis} {dt}/{pdt} {name}")


@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_matches_float64_oracle_in_and_out_of_place(isa, isa_dir):
    """Every ISA, layout, dtype and size class: s is x + r exactly, y/dx/
    dgamma/dbeta match float64 NumPy, and the outputs written into forwarded
    buffers (s into x's, y into r's, dx into dy's or ds's) are bitwise the
    out-of-place ones."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the CPU kernels are x86-64")
    if not _ISA_FLAGS[isa] <= _FLAGS:
        pytest.skip(f"this CPU lacks {sorted(_ISA_FLAGS[isa] - _FLAGS)} for {isa}")
    got = _run_isa(isa, isa_dir)
    for i, case in enumerate(CASES):
        forwarded, held = got[f"forwarded{i}"]
        # LayerNorm: s, y, dx; RMSNorm: y (its x is held), dx.
        assert (forwarded, held) == (5, 0), (isa, case, forwarded, held)
        _check_case(got, i, case, isa)
        for name in OUTPUTS:
            assert got[f"same_{name}{i}"], (isa, case, name, "in place differs from out of place")


# ------------------------------------------------------------- PyTorch oracle --

def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dt,pdt", [("float32", "float32"), ("float64", "float64"),
                                    ("float16", "float32"), ("bfloat16", "bfloat16")])
@pytest.mark.parametrize("shape,axis", [((4, 6, 96), -1), ((3, 64, 5), [-2, -1]),
                                        ((5, 12, 7), [0, 2]), ((2, 24, 9), 1)])
def test_matches_pytorch_autograd(shape, axis, dt, pdt, rms):
    """y, s and the gradients of x, residual, gamma, beta (gradients flowing
    into both y and s) against PyTorch float64 autograd of s = x + r;
    F.layer_norm(s) / F.rms_norm(s), for contiguous, multi-axis, non-
    contiguous and channel axes."""
    torch = _torch()
    rng = np.random.default_rng(7)
    axes = _ops._normalize_axes(axis, len(shape))
    pshape = tuple(shape[a] for a in axes)
    x = tf.cast(rng.standard_normal(shape) + 1.0, dt)
    r = tf.cast(rng.standard_normal(shape) * 2.0, dt)
    g = tf.cast(1.0 + 0.3 * rng.standard_normal(pshape), pdt)
    b = tf.cast(rng.standard_normal(pshape), pdt)
    wy = tf.cast(rng.standard_normal(shape), dt)
    ws = tf.cast(rng.standard_normal(shape), dt)
    with tf.GradientTape() as tape:
        tape.watch([x, r, g, b])
        if rms:
            y, s = tfln.add_rms_norm(x, r, g, axis=axis, epsilon=1e-5)
        else:
            y, s = tfln.add_layer_norm(x, r, g, b, axis=axis, epsilon=1e-5)
        loss = tf.reduce_sum(tf.cast(y, tf.float64) * tf.cast(wy, tf.float64)) + \
            tf.reduce_sum(tf.cast(s, tf.float64) * tf.cast(ws, tf.float64))
    grads = tape.gradient(loss, [x, r, g] + ([] if rms else [b]))
    assert y.dtype == x.dtype and s.dtype == x.dtype

    f64 = lambda t: torch.tensor(tf.cast(t, tf.float64).numpy())  # noqa: E731
    s_rounded = _round(f64(x).numpy() + f64(r).numpy(), dt)
    np.testing.assert_array_equal(tf.cast(s, tf.float64).numpy(), s_rounded)
    # PyTorch: normalize over the last dims, so move the axes there.
    perm = [d for d in range(len(shape)) if d not in axes] + axes
    st = torch.tensor(s_rounded).permute(perm).contiguous().requires_grad_(True)
    gt, bt = f64(g).requires_grad_(True), f64(b).requires_grad_(True)
    if rms:
        yt = torch.nn.functional.rms_norm(st, pshape, gt, eps=1e-5)
    else:
        yt = torch.nn.functional.layer_norm(st, pshape, gt, bt, eps=1e-5)
    inv = [perm.index(d) for d in range(len(shape))]
    lt = (yt.permute(inv) * f64(wy)).sum() + (st.permute(inv) * f64(ws)).sum()
    lt.backward()
    ref_y = yt.permute(inv).detach().numpy()
    ref_ds = st.grad.permute(inv).numpy()
    tol = _RTOL[dt] if dt != "float32" else 2e-5
    ptol = max(_RTOL[pdt], tol)

    def close(got, ref, t, what, scale=1.0):
        got = tf.cast(got, tf.float64).numpy()
        np.testing.assert_allclose(got, ref, rtol=t,
                                   atol=t * scale * max(1.0, float(np.abs(ref).max())),
                                   err_msg=f"{what} {shape} {axis} {dt}/{pdt} rms={rms}")

    close(y, ref_y, tol, "y")
    close(grads[0], ref_ds, tol, "dx")
    close(grads[1], ref_ds, tol, "dresidual")
    rows = np.sqrt(np.prod(shape) / np.prod(pshape))
    close(grads[2], gt.grad.numpy(), ptol, "dgamma", rows)
    if not rms:
        close(grads[3], bt.grad.numpy(), ptol, "dbeta", rows)


# ------------------------------------------------------------------- graphs --

def _op_types(graph):
    return [op.type for op in graph.get_operations()]


@pytest.mark.parametrize("rms", [False, True])
def test_graph_has_one_fused_op_each_way_and_no_add(rms):
    """tf.function(add_layer_norm): the forward is the one fused op (no
    separate add), the backward one fused grad op (no separate add of the
    two gradient paths), with gradients into both y and s."""
    x = tf.random.normal([4, 32])
    r = tf.random.normal([4, 32])
    g = tf.Variable(tf.ones([32]))
    fn = tfln.add_rms_norm if rms else tfln.add_layer_norm
    fwd = "TfLayernorm>AddRMSNorm" if rms else "TfLayernorm>AddLayerNorm"

    @tf.function
    def forward(x, r):
        return fn(x, r, g)

    types = _op_types(forward.get_concrete_function(x, r).graph)
    assert types.count(fwd) == 1
    assert not {"Add", "AddV2", "AddN"} & set(types), types

    @tf.function
    def step(x, r):
        with tf.GradientTape() as tape:
            tape.watch([x, r])
            y, s = fn(x, r, g)
            loss = tf.reduce_sum(y * y) + tf.reduce_sum(tf.sin(s))
        return tape.gradient(loss, [x, r, g])

    types = _op_types(step.get_concrete_function(x, r).graph)
    assert types.count(fwd + "Grad") == 1, types
    assert "TfLayernorm>LayerNormGrad" not in types and "TfLayernorm>RMSNormGrad" not in types


def test_unused_sum_passes_no_dsum_and_matches_oracle():
    """Post-LN: only y is used; the backward gets an empty dsum (nothing to
    read) and dx is the plain norm's gradient at s."""
    rng = np.random.default_rng(3)
    x, r = (tf.constant(rng.standard_normal([6, 40]), tf.float32) for _ in range(2))
    g = tf.constant(rng.standard_normal([40]), tf.float32)
    b = tf.constant(rng.standard_normal([40]), tf.float32)
    dy = tf.constant(rng.standard_normal([6, 40]), tf.float32)

    @tf.function
    def grads(x, r):
        with tf.GradientTape() as tape:
            tape.watch([x, r])
            y, _ = tfln.add_layer_norm(x, r, g, b)
        return tape.gradient(y, [x, r], output_gradients=dy)

    graph = grads.get_concrete_function(x, r).graph
    grad_op = [op for op in graph.get_operations() if op.type == "TfLayernorm>AddLayerNormGrad"]
    assert len(grad_op) == 1 and grad_op[0].inputs[1].shape.as_list() == [0]
    dx, dr = grads(x, r)
    s = _round(x.numpy().astype(np.float64) + r.numpy(), "float32")
    ref = _oracle(s, g.numpy().astype(np.float64), b.numpy().astype(np.float64),
                  dy.numpy().astype(np.float64), 0.0, [1], False, 1e-5)[1]
    np.testing.assert_allclose(dx, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(dx, dr)


def test_xla_composite_matches_fused():
    """Under jit_compile=True the ops run as composite TF ops (XLA cannot
    compile a custom op): same y, s and gradients up to float32 rounding."""
    rng = np.random.default_rng(5)
    x, r = (tf.constant(rng.standard_normal([8, 3, 48]), tf.float32) for _ in range(2))
    g = tf.constant(1 + rng.standard_normal([48]) * 0.1, tf.float32)
    b = tf.constant(rng.standard_normal([48]), tf.float32)

    def run(x, r):
        with tf.GradientTape() as tape:
            tape.watch([x, r, g, b])
            y, s = tfln.add_layer_norm(x, r, g, b)
            ry, rs = tfln.add_rms_norm(x, r, g)
            loss = tf.reduce_sum(y * y * y) + tf.reduce_sum(s * s) + tf.reduce_sum(ry * rs)
        return [y, s, ry, rs] + tape.gradient(loss, [x, r, g, b])

    xla = tf.function(run, jit_compile=True)
    types = _op_types(xla.get_concrete_function(x, r).graph)
    assert not any(t.startswith("TfLayernorm>") for t in types)
    for got, want in zip(xla(x, r), tf.function(run)(x, r)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_second_order_gradient_matches_float64():
    """A gradient penalty through add_layer_norm (the grad op's own gradient)
    against the same math in float64 composite ops."""
    rng = np.random.default_rng(11)
    x = tf.constant(rng.standard_normal([5, 24]))
    r = tf.constant(rng.standard_normal([5, 24]))
    g = tf.constant(1 + 0.2 * rng.standard_normal([24]))
    b = tf.constant(rng.standard_normal([24]))

    def composite(x, r, g, b):
        s = x + r
        m = tf.reduce_mean(s, -1, keepdims=True)
        v = tf.reduce_mean((s - m) ** 2, -1, keepdims=True)
        return (s - m) * tf.math.rsqrt(v + 1e-5) * g + b, s

    def penalty(fn):
        with tf.GradientTape() as outer:
            outer.watch([x, r, g, b])
            with tf.GradientTape() as inner:
                inner.watch([x, r])
                y, s = fn(x, r, g, b)
                loss = tf.reduce_sum(tf.sin(y)) + tf.reduce_sum(s * s * s)
            gx, gr = inner.gradient(loss, [x, r])
            pen = tf.reduce_sum(gx * gx) + tf.reduce_sum(tf.cos(gr))
        return outer.gradient(pen, [x, r, g, b])

    for got, want in zip(penalty(tfln.add_layer_norm), penalty(composite)):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8 * np.abs(want).max())


# ------------------------------------------------------------------- errors --

def test_bad_residuals_get_clear_errors():
    x = tf.ones([2, 8])
    with pytest.raises(TypeError, match="residual must have x's dtype float32, got float16"):
        tfln.add_layer_norm(x, tf.ones([2, 8], tf.float16))
    with pytest.raises(ValueError, match="residual has shape .*expected x's shape"):
        tfln.add_rms_norm(x, tf.ones([2, 7]))
    with pytest.raises(ValueError, match="residual has shape"):
        tfln.LayerNorm()(x, residual=tf.ones([1, 8]))
    lib = tfln.load_ops()
    common = dict(begin_norm_axis=-1, num_norm_axes=1, scale=True)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"residual has shape \[2,7\] but x has shape \[2,8\]"):
        lib.tf_layernorm_add_layer_norm(x, tf.ones([2, 7]), tf.ones([8]), tf.ones([8]),
                                        center=True, **common)
    y, s, mean, rstd = lib.tf_layernorm_add_layer_norm(x, x, tf.ones([8]), tf.ones([8]),
                                                       center=True, **common)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"dsum has shape \[3\], expected \[2,8\] .*or \[0\]"):
        lib.tf_layernorm_add_layer_norm_grad(x, tf.ones([3]), s, tf.ones([8]), mean, rstd,
                                             center=True, **common)
    with pytest.raises(tf.errors.InvalidArgumentError, match="dy has shape .* but sum has shape"):
        lib.tf_layernorm_add_rms_norm_grad(tf.ones([2, 9]), tf.zeros([0]), s, tf.ones([8]),
                                           rstd, **common)

    @tf.function
    def graph(x, r):
        return lib.tf_layernorm_add_rms_norm(x, r, tf.ones([8]), **common)

    with pytest.raises(ValueError, match="residual has shape"):
        graph.get_concrete_function(tf.TensorSpec([2, 8]), tf.TensorSpec([2, 5]))


# -------------------------------------------------------------- Keras layers --

@pytest.mark.parametrize("layer_cls", [tfln.LayerNorm, tfln.RMSNorm])
def test_keras_layers_take_a_residual_and_round_trip(layer_cls, tmp_path):
    """`layer(x, residual=r)` returns (y, s) in functional models, trains,
    and a .keras file reloads with the same outputs."""
    import keras
    inp, res = keras.Input((6, 32)), keras.Input((6, 32))
    norm = layer_cls()
    y, s = norm(keras.layers.Dense(32)(inp), residual=res)
    model = keras.Model([inp, res], [y, s])
    assert model.output_shape == [(None, 6, 32), (None, 6, 32)]
    rng = np.random.default_rng(2)
    x, r = (rng.standard_normal((4, 6, 32)).astype("float32") for _ in range(2))
    yy, ss = model([x, r])
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][0]
    h = dense(x)
    np.testing.assert_array_equal(ss, h + r)
    np.testing.assert_allclose(yy, norm(h + r), rtol=1e-6, atol=1e-6)
    model.compile("adam", "mse")
    model.fit([x, r], [x, r], epochs=2, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    again = keras.models.load_model(path)
    for a, b in zip(again([x, r]), model([x, r])):
        np.testing.assert_array_equal(a, b)


def test_keras_residual_under_mixed_precision():
    """mixed_float16: x, r float16, the scale float32; y in the compute dtype
    and s = x + r in float16, as the unfused layer and add give."""
    import keras
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        norm = tfln.LayerNorm()
        x = tf.cast(tf.random.normal([3, 64]), tf.float16)
        r = tf.cast(tf.random.normal([3, 64]), tf.float16)
        y, s = norm(x, residual=r)
        assert norm.gamma.dtype == "float32"
        assert y.dtype == tf.float16 and s.dtype == tf.float16
        np.testing.assert_array_equal(s, x + r)
        np.testing.assert_array_equal(y, norm(x + r))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_saved_model_with_fused_add_reloads(tmp_path):
    """A SavedModel using add_layer_norm / add_rms_norm and its gradient
    reloads in a fresh process (after importing tf_layernorm) with the same
    outputs."""
    class Block(tf.Module):
        def __init__(self):
            self.g = tf.Variable(tf.random.normal([16]))
            self.b = tf.Variable(tf.random.normal([16]))

        @tf.function(input_signature=[tf.TensorSpec([None, 16]), tf.TensorSpec([None, 16])])
        def __call__(self, x, r):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y, s = tfln.add_layer_norm(x, r, self.g, self.b)
                ry, rs = tfln.add_rms_norm(y, s, self.g)
                loss = tf.reduce_sum(ry * rs)
            return ry, rs, tape.gradient(loss, x)

    block = Block()
    path = str(tmp_path / "sm")
    tf.saved_model.save(block, path)
    rng = np.random.default_rng(9)
    x, r = (rng.standard_normal((3, 16)).astype("float32") for _ in range(2))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "r.npy", r)
    want = [t.numpy() for t in block(x, r)]
    script = f"""
import numpy as np, tensorflow as tf
import tf_layernorm
m = tf.saved_model.load({path!r})
out = m(np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'r.npy')!r}))
np.savez({str(tmp_path / 'out.npz')!r}, *[t.numpy() for t in out])
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for i, w in enumerate(want):
        np.testing.assert_array_equal(got[f"arr_{i}"], w)
