"""Loading of the op library, the functional API and the registered gradient."""
import json
import math
import numbers
import os
import threading

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.framework import tensor_util
from tensorflow.python.ops import control_flow_util

_LIBRARY_NAME = "_layer_norm_ops.so"
_BUILD_INFO_NAME = "_build_info.json"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

LAYER_NORM_OP = "TfLayernorm>LayerNorm"
LAYER_NORM_GRAD_OP = "TfLayernorm>LayerNormGrad"
RMS_NORM_OP = "TfLayernorm>RMSNorm"
RMS_NORM_GRAD_OP = "TfLayernorm>RMSNormGrad"
ADD_LAYER_NORM_OP = "TfLayernorm>AddLayerNorm"
ADD_LAYER_NORM_GRAD_OP = "TfLayernorm>AddLayerNormGrad"
ADD_RMS_NORM_OP = "TfLayernorm>AddRMSNorm"
ADD_RMS_NORM_GRAD_OP = "TfLayernorm>AddRMSNormGrad"

_HALF_DTYPES = (tf.float16, tf.bfloat16)
_SUPPORTED_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)

_lock = threading.Lock()
_module = None


def _read_build_info():
    path = os.path.join(_PACKAGE_DIR, _BUILD_INFO_NAME)
    if not os.path.exists(path):
        raise ImportError(
            f"tf_layernorm: {path} is missing, so the op library was never built for this "
            "checkout. Build and install the wheel with ./scripts/setup.sh (or "
            "python configure.py && bazel build //:build_pip_pkg && ./build_pip_pkg.sh dist)."
        )
    with open(path) as f:
        return json.load(f)


def _check_tf_version(info):
    built = info["tf_version"]
    running = tf.__version__
    if built.split(".")[:2] != running.split(".")[:2]:
        raise ImportError(
            f"tf_layernorm was built against TensorFlow {built} but TensorFlow {running} is "
            "running; custom ops only load in the TensorFlow major.minor they were compiled for. "
            "Rebuild it against this TensorFlow: python configure.py && "
            "bazel build //:build_pip_pkg && ./build_pip_pkg.sh dist && pip install dist/*.whl"
        )


def load_ops():
    """Loads the op library once (thread-safe) and returns its generated module.

    Importing tf_layernorm calls this; calling it again is free. It must have
    run in a process before a SavedModel that uses the ops is loaded.
    """
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            _check_tf_version(_read_build_info())
            _module = tf.load_op_library(os.path.join(_PACKAGE_DIR, _LIBRARY_NAME))
    return _module


def build_info():
    """What the loaded library was built with: TF version, CUDA, archs, path."""
    info = dict(_read_build_info())
    info["library"] = os.path.join(_PACKAGE_DIR, _LIBRARY_NAME)
    return info


# --------------------------------------------------------------------- axes --

def _check_axis_type(axis):
    """Returns axis as a list of ints, or raises TypeError/ValueError."""
    # Keras's wording (keras.layers.LayerNormalization), so code and tests
    # written against Keras see the same message; our detail follows it.
    expected = "Expected an int or a list/tuple of ints for the argument 'axis'"
    if isinstance(axis, bool) or not isinstance(axis, (int, list, tuple)):
        raise TypeError(
            f"{expected}, but received: {axis!r} (of type {type(axis).__name__})")
    axes = [axis] if isinstance(axis, int) else list(axis)
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(
                f"{expected}, but received: {axis!r} ({a!r} is a {type(a).__name__}, "
                "not an int)")
    if not axes:
        raise ValueError("axis must name at least one axis, got an empty list")
    return axes


def _normalize_axes(axis, rank):
    """Returns sorted axes (non-negative when rank is known) or raises.

    With rank unknown, only negative axes are accepted (they are resolved by
    the kernel at run time).
    """
    axes = _check_axis_type(axis)
    if rank is None:
        if any(a >= 0 for a in axes):
            raise ValueError(
                f"axis={axis!r} needs x to have a known rank; use negative axes (counted "
                "from the end) for inputs of unknown rank")
        resolved = sorted(axes)
        if not _is_contiguous(resolved):
            raise ValueError(
                f"axis={axis!r} is not a contiguous block of axes, which needs x to have a "
                "known rank (to transpose the axes to the end)")
    else:
        for a in axes:
            if not -rank <= a < rank:
                raise ValueError(f"axis {a} is out of range for x of rank {rank} (axis={axis!r})")
        resolved = sorted(a % rank for a in axes)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"axis={axis!r} names the same axis twice")
    return resolved


def _is_contiguous(axes):
    return axes == list(range(axes[0], axes[0] + len(axes)))


def _check_epsilon(epsilon):
    """Returns epsilon as a Python float, or raises TypeError/ValueError."""
    if isinstance(epsilon, (bool, np.bool_)) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a real number, got {epsilon!r}")
    epsilon = float(epsilon)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    return epsilon


# ------------------------------------------------------------------- dtypes --

def _check_x(x):
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"layer_norm expects a floating-point x (float16, bfloat16, float32 or float64), "
            f"got {x.dtype.name}")


def _param_dtype(x_dtype, param):
    """The dtype gamma/beta are passed in: their own where the kernels take it
    (x's dtype, or float32 for half-precision x), else x's dtype (as Keras casts)."""
    if param.dtype == x_dtype or (x_dtype in _HALF_DTYPES and param.dtype == tf.float32):
        return param.dtype
    return tf.float32 if x_dtype in _HALF_DTYPES else x_dtype


def _prepare_param(name, param, x, axes):
    param = tf.convert_to_tensor(param)
    if not param.dtype.is_floating:
        raise TypeError(f"{name} must be floating-point, got {param.dtype.name}")
    expected = tuple(x.shape[a] for a in axes) if x.shape.rank is not None else None
    if expected is not None and param.shape.rank is not None:
        if param.shape.rank != len(expected) or any(
                e is not None and p is not None and e != p
                for e, p in zip(expected, param.shape.as_list())):
            raise ValueError(
                f"{name} has shape {tuple(param.shape.as_list())}, expected {expected} "
                f"(the normalized dims of x with shape {tuple(x.shape.as_list())})")
    return param


# --------------------------------------------------------------- functional --

def layer_norm(x, gamma=None, beta=None, axis=-1, epsilon=1e-5, name=None):
    """Layer normalization of x over `axis`, fused in one kernel.

    y = (x - mean) / sqrt(var + epsilon) * gamma + beta, with mean and var over
    `axis` computed in float32 (float64 for float64 x), y in x's dtype.

    Args:
      x: a float16, bfloat16, float32 or float64 tensor.
      gamma: scale of shape `tuple(x.shape[a] for a in sorted(axes))`, or None.
      beta: offset of the same shape, or None.
      axis: int or list/tuple of ints, the axes to normalize over. Contiguous
        axes run the fused kernel directly; others are transposed to the end.
      epsilon: added to the variance; finite and >= 0.

    Differentiable with respect to x, gamma and beta.
    """
    with tf.name_scope(name or "layer_norm"):
        return _normalize(x, {"gamma": gamma, "beta": beta}, axis, epsilon, rms=False)


def rms_norm(x, gamma=None, axis=-1, epsilon=1e-6, name=None):
    """RMS normalization of x over `axis`, on the LayerNorm kernels.

    y = x / sqrt(mean(x^2) + epsilon) * gamma, the mean over `axis` in float32
    (float64 for float64 x), y in x's dtype: `keras.ops.rms_normalization`
    and `torch.nn.functional.rms_norm`.

    Args:
      x: a float16, bfloat16, float32 or float64 tensor.
      gamma: scale of shape `tuple(x.shape[a] for a in sorted(axes))`, or None.
      axis: int or list/tuple of ints, the axes to normalize over.
      epsilon: added to the mean square; finite and >= 0.

    Differentiable with respect to x and gamma.
    """
    with tf.name_scope(name or "rms_norm"):
        return _normalize(x, {"gamma": gamma}, axis, epsilon, rms=True)


def add_layer_norm(x, residual, gamma=None, beta=None, axis=-1, epsilon=1e-5, name=None):
    """Residual add + layer normalization in one kernel: returns (y, s) with
    s = x + residual and y = layer_norm(s, gamma, beta, axis, epsilon).

    s is in x's dtype, rounded exactly as `x + residual` rounds there; y is
    what `layer_norm(x + residual, ...)` gives. The kernel reads x and
    residual once and writes s and y: the pre-LN block's `h = h + f(h);
    y = norm(h)` (use s as the next h) or the post-LN block's
    `y = norm(x + f(x))` (ignore s) without a separate add.

    Args:
      x: a float16, bfloat16, float32 or float64 tensor.
      residual: a tensor of x's dtype and shape.
      gamma, beta, axis, epsilon: as in `layer_norm`.

    Differentiable with respect to x, residual, gamma and beta, with
    gradients flowing into both y and s; the backward is one fused op.
    """
    with tf.name_scope(name or "add_layer_norm"):
        return _normalize(x, {"gamma": gamma, "beta": beta}, axis, epsilon, rms=False,
                          residual=residual)


def add_rms_norm(x, residual, gamma=None, axis=-1, epsilon=1e-6, name=None):
    """Residual add + RMS normalization in one kernel: returns (y, s) with
    s = x + residual (x's dtype, rounded as `x + residual` rounds) and
    y = rms_norm(s, gamma, axis, epsilon). See `add_layer_norm`.

    Differentiable with respect to x, residual and gamma.
    """
    with tf.name_scope(name or "add_rms_norm"):
        return _normalize(x, {"gamma": gamma}, axis, epsilon, rms=True, residual=residual)


def _check_residual(residual, x):
    """residual as a tensor of x's dtype and (compatible) shape, or raises."""
    residual = tf.convert_to_tensor(residual, dtype_hint=x.dtype)
    if residual.dtype != x.dtype:
        raise TypeError(
            f"residual must have x's dtype {x.dtype.name}, got {residual.dtype.name} (cast one "
            "of them first, as x + residual would need)")
    if not x.shape.is_compatible_with(residual.shape):
        raise ValueError(
            f"residual has shape {tuple(residual.shape.as_list()) if residual.shape.rank is not None else None}"
            f", expected x's shape {tuple(x.shape.as_list()) if x.shape.rank is not None else None} "
            "(no broadcasting: the sum is an output of x's shape)")
    return residual


def _normalize(x, params, axis, epsilon, rms, residual=None):
    """Shared front end of layer_norm, rms_norm and their residual-add
    variants: checks, parameter dtypes, XLA fallback, transposes for
    non-contiguous axes, the fused op. With a residual, returns (y, s)."""
    x = tf.convert_to_tensor(x)
    _check_x(x)
    add = residual is not None
    if add:
        residual = _check_residual(residual, x)
    epsilon = _check_epsilon(epsilon)
    rank = x.shape.rank
    axes = _normalize_axes(axis, rank)

    params = {k: _prepare_param(k, p, x, axes) for k, p in params.items() if p is not None}
    if len({p.dtype for p in params.values()}) > 1:
        raise TypeError(
            f"gamma and beta must share a dtype, got {params['gamma'].dtype.name} and "
            f"{params['beta'].dtype.name}")
    param_dtype = x.dtype
    if params:
        param_dtype = _param_dtype(x.dtype, next(iter(params.values())))
    params = {k: tf.cast(p, param_dtype) for k, p in params.items()}
    gamma, beta = params.get("gamma"), params.get("beta")
    if _in_xla_context():
        # XLA cannot run a custom op; the same math in composite ops can.
        if add:
            s = x + residual
            return _composite_norm(s, gamma, beta, axes, epsilon, rms), s
        return _composite_norm(x, gamma, beta, axes, epsilon, rms)
    empty = tf.zeros([0], dtype=param_dtype)
    g = empty if gamma is None else gamma
    b = empty if beta is None else beta

    def fused(inputs, begin):
        """(y,) or (y, s) of the fused op on inputs (x,) or (x, residual)."""
        scale, center, num = gamma is not None, beta is not None, len(axes)
        if rms:
            out = _fused_rms(*inputs, g, begin, num, epsilon, scale)
        else:
            out = _fused(*inputs, g, b, begin, num, epsilon, scale, center)
        return out[:len(inputs)]

    inputs = (x, residual) if add else (x,)
    if rank is None or _is_contiguous(axes):
        out = fused(inputs, axes[0])
    else:
        # Non-contiguous axes: move them to the end (in sorted order, which is
        # the order of gamma's dims), normalize, move back.
        others = [d for d in range(rank) if d not in axes]
        perm = others + axes
        inverse = [perm.index(d) for d in range(rank)]
        out = fused(tuple(tf.transpose(t, perm) for t in inputs), rank - len(axes))
        out = tuple(tf.transpose(t, inverse) for t in out)
    return tuple(out) if add else out[0]


def _stats_dtype(x_dtype):
    return tf.float64 if x_dtype == tf.float64 else tf.float32


def _in_xla_context():
    """True while tracing for XLA (tf.function(jit_compile=True), Keras
    jit_compile=True), where a custom op cannot be compiled."""
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph())


def _broadcast_param(p, x, axes):
    """p (shape of x's dims at `axes`) reshaped to broadcast against x."""
    if p is None:
        return None
    rank = x.shape.rank
    if rank is None:  # contiguous negative axes: the normalized dims end at -1 - k
        last = axes[-1]
        trailing = -1 - last if last < 0 else None
        if trailing is None:
            raise ValueError("unknown-rank x needs negative axes")
        return tf.reshape(p, tf.concat([tf.shape(p), tf.ones([trailing], tf.int32)], 0))
    shape = [1] * rank
    for i, a in enumerate(axes):
        shape[a] = -1 if x.shape[a] is None else x.shape[a]
    if shape.count(-1) > 1:
        dims = tf.unstack(tf.shape(x))
        shape = [dims[a] if a in axes else 1 for a in range(rank)]
    return tf.reshape(p, shape)


def _composite_norm(x, gamma, beta, axes, epsilon, rms):
    """layer_norm / rms_norm in plain TF ops: the numerics of the fused kernels
    (statistics in float32, or float64 for float64 x; two-pass variance; y in
    x's dtype), for XLA contexts. Gradients come from TF's autodiff."""
    s = _stats_dtype(x.dtype)
    xs = tf.cast(x, s)
    centered = xs if rms else xs - tf.reduce_mean(xs, axis=axes, keepdims=True)
    var = tf.reduce_mean(tf.square(centered), axis=axes, keepdims=True)
    y = centered * tf.math.rsqrt(var + tf.cast(epsilon, s))
    if gamma is not None:
        y = y * tf.cast(_broadcast_param(gamma, x, axes), s)
    if beta is not None:
        y = y + tf.cast(_broadcast_param(beta, x, axes), s)
    return tf.cast(y, x.dtype)


def keras_rms_scaling(x, gamma, axis, epsilon):
    """What keras.layers.LayerNormalization(rms_scaling=True) computes in Keras
    3.15 (a deprecated option): x * rsqrt(var(x) + epsilon) * gamma, with the
    *centered* variance and no mean subtraction. Composite ops, in float32
    (float64 for float64 x) like Keras; kept only for drop-in parity."""
    x = tf.convert_to_tensor(x)
    _check_x(x)
    axes = _normalize_axes(axis, x.shape.rank)
    s = _stats_dtype(x.dtype)
    xs = tf.cast(x, s)
    var = tf.math.reduce_variance(xs, axis=axes, keepdims=True)
    y = xs * tf.math.rsqrt(var + tf.cast(epsilon, s))
    if gamma is not None:
        y = y * tf.cast(_broadcast_param(tf.convert_to_tensor(gamma), x, axes), s)
    return tf.cast(y, x.dtype)


def _fused(*args):
    """LayerNorm (x, gamma, beta, ...) -> (y, mean, rstd), or AddLayerNorm
    (x, residual, gamma, beta, ...) -> (y, s, mean, rstd)."""
    *inputs, begin, num, epsilon, scale, center = args
    op = load_ops().tf_layernorm_add_layer_norm if len(inputs) == 4 else \
        load_ops().tf_layernorm_layer_norm
    return op(*inputs, S=_stats_dtype(inputs[0].dtype), epsilon=epsilon, begin_norm_axis=begin,
              num_norm_axes=num, scale=scale, center=center)


def _fused_rms(*args):
    """RMSNorm (x, gamma, ...) -> (y, rstd), or AddRMSNorm (x, residual,
    gamma, ...) -> (y, s, rstd)."""
    *inputs, begin, num, epsilon, scale = args
    op = load_ops().tf_layernorm_add_rms_norm if len(inputs) == 3 else \
        load_ops().tf_layernorm_rms_norm
    return op(*inputs, S=_stats_dtype(inputs[0].dtype), epsilon=epsilon, begin_norm_axis=begin,
              num_norm_axes=num, scale=scale)


# ----------------------------------------------------------------- gradient --

def _is_known_zero(t):
    """True when an incoming gradient is None or a materialized zero.

    Gradient tapes hand zeros (not None) to a gradient function for outputs
    nobody used (here: mean and rstd). Recognizing them keeps the backward to
    the single fused op.
    """
    if t is None:
        return True
    if tf.executing_eagerly():
        return not bool(tf.reduce_any(tf.not_equal(t, 0)))
    op = t.op
    if op.type in ("ZerosLike", "OnesLike"):
        return op.type == "ZerosLike"
    if op.type == "Fill":
        value = tensor_util.constant_value(op.inputs[1])
        return value is not None and not value.any()
    value = tensor_util.constant_value(t)
    return value is not None and not value.any()


def _stats_grad(x, mean, rstd, begin, num, dmean, drstd):
    """The part of d/dx that flows through the mean and rstd outputs (exact,
    composite: off the common path, where nobody differentiates them), or
    None when their incoming gradients are known zeros. mean is None for
    RMSNorm (rstd = (mean(x^2) + eps)^-1/2)."""
    if _is_known_zero(dmean) and _is_known_zero(drstd):
        return None
    s = rstd.dtype
    rank = tf.rank(x)
    b = begin if begin >= 0 else begin + rank
    d = tf.cast(tf.reduce_prod(tf.shape(x)[b:b + num]), s)
    xs = tf.cast(x, s)
    centered = xs if mean is None else xs - mean
    contrib = tf.zeros_like(rstd)
    if mean is not None and dmean is not None:
        contrib = contrib + dmean / d
    if drstd is not None:
        contrib = contrib - drstd * rstd * rstd * rstd * centered / d
    return contrib


def _norm_grad(op, dy, dsum, dmean, drstd, rms, add):
    """The gradient of the four forward ops: one fused backward op, plus the
    mean/rstd terms when those outputs are differentiated. For the residual
    variants x and residual get the same gradient, dsum folded into it."""
    x = op.outputs[1] if add else op.inputs[0]   # the normalized tensor: s or x
    gamma = op.inputs[2 if add else 1]
    mean = None if rms else op.outputs[-2]
    rstd = op.outputs[-1]
    scale = op.get_attr("scale")
    center = False if rms else op.get_attr("center")
    attrs = dict(begin_norm_axis=op.get_attr("begin_norm_axis"),
                 num_norm_axes=op.get_attr("num_norm_axes"), scale=scale)
    if not rms:
        attrs["center"] = center
    if dy is None:
        dy = tf.zeros_like(x)
    stats = [rstd] if rms else [mean, rstd]
    lib = load_ops()
    if add:
        # A sum nobody differentiates (post-LN) passes an empty dsum: no read.
        # Eagerly, zeros are only known by reading them: the kernel reads
        # dsum instead (one pass, no host sync).
        unused = dsum is None or (not tf.executing_eagerly() and _is_known_zero(dsum))
        ds = tf.zeros([0], x.dtype) if unused else dsum
        grad_op = lib.tf_layernorm_add_rms_norm_grad if rms else \
            lib.tf_layernorm_add_layer_norm_grad
        grads = grad_op(dy, ds, x, gamma, *stats, **attrs)
    else:
        grad_op = lib.tf_layernorm_rms_norm_grad if rms else lib.tf_layernorm_layer_norm_grad
        grads = grad_op(dy, x, gamma, *stats, **attrs)
    dx = grads[0]
    extra = _stats_grad(x, mean, rstd, attrs["begin_norm_axis"], attrs["num_norm_axes"],
                        dmean, drstd)
    if extra is not None:
        dx = dx + tf.cast(extra, dx.dtype)
    params = [grads[1] if scale else None]
    if not rms:
        params.append(grads[2] if center else None)
    return ((dx, dx) if add else (dx,)) + tuple(params)


@tf.RegisterGradient(LAYER_NORM_OP)
def _layer_norm_grad(op, dy, dmean, drstd):
    return _norm_grad(op, dy, None, dmean, drstd, rms=False, add=False)


@tf.RegisterGradient(ADD_LAYER_NORM_OP)
def _add_layer_norm_grad(op, dy, dsum, dmean, drstd):
    return _norm_grad(op, dy, dsum, dmean, drstd, rms=False, add=True)


def _composite_backward(dy, x, gamma, mean, rstd, begin, num, scale):
    """LayerNormGrad (RMSNormGrad when mean is None) in plain TF ops, in the
    statistics dtype, as a function of its inputs: differentiating it gives
    the backward's own gradient."""
    s = rstd.dtype
    rank = tf.rank(x)
    b = begin if begin >= 0 else begin + rank
    axes = tf.range(b, b + num)
    other = tf.concat([tf.range(0, b), tf.range(b + num, rank)], 0)
    xs, dys = tf.cast(x, s), tf.cast(dy, s)
    xhat = (xs if mean is None else xs - mean) * rstd
    g = dys
    if scale:
        # gamma has the normalized dims; ones for the dims after them.
        shape = tf.concat([tf.shape(gamma), tf.ones([rank - b - num], tf.int32)], 0)
        g = g * tf.reshape(tf.cast(gamma, s), shape)
    mean_gx = tf.reduce_mean(g * xhat, axis=axes, keepdims=True)
    dx = rstd * (g - xhat * mean_gx)
    if mean is not None:
        dx = dx - rstd * tf.reduce_mean(g, axis=axes, keepdims=True)
    dgamma = tf.reduce_sum(dys * xhat, axis=other)
    dbeta = tf.reduce_sum(dys, axis=other)
    return dx, dgamma, dbeta


def _grad_of_backward(op, ddx, ddgamma, ddbeta, rms, add=False):
    """Second-order gradients (gradient penalties, Hessian-vector products) of
    LayerNormGrad / RMSNormGrad and their residual-add variants: autodiff of
    the composite backward. mean and rstd are inputs here; their dependence on
    x is carried by the forward op's gradient. Returns the gradients of the
    op's inputs, in their order (the add variants' dx is the norm's dx plus
    dsum, so dsum's gradient is ddx itself)."""
    inputs = list(op.inputs)
    dsum = inputs.pop(1) if add else None
    if rms:
        (dy, x, gamma, rstd), mean, center = inputs, None, False
    else:
        (dy, x, gamma, mean, rstd), center = inputs, op.get_attr("center")
    scale = op.get_attr("scale")
    begin = op.get_attr("begin_norm_axis")
    num = op.get_attr("num_norm_axes")
    stats = [rstd] if rms else [mean, rstd]
    watched = [dy, x] + stats + ([gamma] if scale else [])
    with tf.GradientTape() as tape:
        tape.watch(watched)
        dx, dgamma, dbeta = _composite_backward(dy, x, gamma, mean, rstd, begin, num, scale)
    targets, upstream = [dx], [tf.cast(ddx, dx.dtype) if ddx is not None else tf.zeros_like(dx)]
    for wanted, out, up in ((scale, dgamma, ddgamma), (center, dbeta, ddbeta)):
        if wanted and up is not None:
            targets.append(out)
            upstream.append(tf.cast(up, out.dtype))
    grads = tape.gradient(targets, watched, output_gradients=upstream,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    grads = [tf.cast(g, t.dtype) for g, t in zip(grads, watched)]
    d_gamma = grads.pop() if scale else None
    d_dy, d_x, d_stats = grads[0], grads[1], grads[2:]
    if not add:
        return (d_dy, d_x, d_gamma, *d_stats)
    # An empty dsum (no such term) has no gradient.
    if dsum.shape.num_elements() == 0:
        d_dsum = None
    else:
        d_dsum = tf.zeros_like(dsum) if ddx is None else tf.cast(ddx, dsum.dtype)
    return (d_dy, d_dsum, d_x, d_gamma, *d_stats)


@tf.RegisterGradient(LAYER_NORM_GRAD_OP)
def _layer_norm_grad_grad(op, ddx, ddgamma, ddbeta):
    return _grad_of_backward(op, ddx, ddgamma, ddbeta, rms=False)


@tf.RegisterGradient(ADD_LAYER_NORM_GRAD_OP)
def _add_layer_norm_grad_grad(op, ddx, ddgamma, ddbeta):
    return _grad_of_backward(op, ddx, ddgamma, ddbeta, rms=False, add=True)


@tf.RegisterGradient(ADD_RMS_NORM_GRAD_OP)
def _add_rms_norm_grad_grad(op, ddx, ddgamma):
    return _grad_of_backward(op, ddx, ddgamma, None, rms=True, add=True)


@tf.RegisterGradient(RMS_NORM_OP)
def _rms_norm_grad(op, dy, drstd):
    return _norm_grad(op, dy, None, None, drstd, rms=True, add=False)


@tf.RegisterGradient(ADD_RMS_NORM_OP)
def _add_rms_norm_grad(op, dy, dsum, drstd):
    return _norm_grad(op, dy, dsum, None, drstd, rms=True, add=True)


@tf.RegisterGradient(RMS_NORM_GRAD_OP)
def _rms_norm_grad_grad(op, ddx, ddgamma):
    return _grad_of_backward(op, ddx, ddgamma, None, rms=True)
