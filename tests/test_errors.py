"""Bad inputs give clear errors (saying what was expected), never crashes."""
import numpy as np
import pytest
import tensorflow as tf

import tf_layernorm as tfln
from tf_layernorm import layer_norm, load_ops

# Errors from a shape function surface as ValueError while a tf.function is
# traced, and kernel checks as InvalidArgumentError when it runs (or eagerly).
GRAPH_OR_KERNEL = (ValueError, tf.errors.InvalidArgumentError)


def _x(shape=(3, 4), dtype=tf.float32):
    return tf.constant(np.random.default_rng(0).standard_normal(shape), dtype)


def _ops():
    return load_ops()


def _run(mode, fn):
    """Calls fn eagerly or inside a tf.function (traced with its constants)."""
    if mode == "eager":
        return fn()
    return tf.function(fn, autograph=False)()


MODES = ["eager", "function"]

# ----------------------------------------------------------- functional API --


@pytest.mark.parametrize("shape,axis,gshape", [
    ((3, 4), -1, (5,)),
    ((3, 4), -1, (1, 4)),
    ((2, 3, 4), [-2, -1], (4, 3)),
    ((2, 3, 4), [0, 2], (2, 3)),
    ((2, 3, 4), 1, (4,)),
], ids=["wrong-size", "wrong-rank", "trailing-swapped", "noncontig", "channel"])
@pytest.mark.parametrize("param", ["gamma", "beta"])
def test_wrong_param_shape(shape, axis, gshape, param):
    kwargs = {param: tf.ones(gshape)}
    with pytest.raises(ValueError, match=rf"{param} has shape .*expected"):
        layer_norm(_x(shape), axis=axis, **kwargs)


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64, tf.bool, tf.complex64, tf.string])
def test_non_float_x(dtype):
    x = tf.zeros([2, 3], dtype) if dtype != tf.string else tf.constant([["a"] * 3] * 2)
    with pytest.raises(TypeError, match="floating-point x"):
        layer_norm(x)


def test_integer_gamma():
    with pytest.raises(TypeError, match="gamma must be floating-point"):
        layer_norm(_x(), gamma=tf.ones([4], tf.int32))


def test_gamma_and_beta_dtype_mismatch():
    with pytest.raises(TypeError, match="gamma and beta must share a dtype"):
        layer_norm(_x(), gamma=tf.ones([4]), beta=tf.ones([4], tf.float64))


@pytest.mark.parametrize("eps", [-1e-5, -1.0, float("nan"), float("inf"), -float("inf")],
                         ids=["neg-small", "neg", "nan", "inf", "neg-inf"])
def test_bad_epsilon_value(eps):
    with pytest.raises(ValueError, match="epsilon must be finite and >= 0"):
        layer_norm(_x(), epsilon=eps)


@pytest.mark.parametrize("eps", ["1e-5", None, True, [1e-5], np.array([1e-5])],
                         ids=["str", "None", "bool", "list", "array"])
def test_bad_epsilon_type(eps):
    with pytest.raises(TypeError, match="epsilon must be a real number"):
        layer_norm(_x(), epsilon=eps)


def test_epsilon_overflowing_float32_is_rejected():
    # Finite in Python but infinite once stored in the op's float32 attr.
    with pytest.raises(GRAPH_OR_KERNEL, match="epsilon must be finite and >= 0"):
        layer_norm(_x(), epsilon=1e300)


@pytest.mark.parametrize("axis", ["-1", 1.0, None, True, [1.0], [True], (0, "1"), {1}],
                         ids=["str", "float", "None", "bool", "list-float", "list-bool",
                              "tuple-str", "set"])
def test_axis_wrong_type(axis):
    with pytest.raises(TypeError, match="^Expected an int or a list/tuple of ints for the "
                                        "argument 'axis', but received: "):
        layer_norm(_x(), axis=axis)


@pytest.mark.parametrize("make", [lambda a: tfln.LayerNorm(axis=a), lambda a: tfln.RMSNorm(axis=a),
                                  lambda a: tfln.rms_norm(_x(), axis=a)],
                         ids=["LayerNorm", "RMSNorm", "rms_norm"])
def test_axis_wrong_type_says_what_keras_says(make):
    # keras.layers.LayerNormalization's message, which Keras's own tests match.
    with pytest.raises(TypeError, match="^Expected an int or a list/tuple of ints for the "
                                        "argument 'axis', but received: {'axis': -1}"):
        make({"axis": -1})


@pytest.mark.parametrize("axis", [2, -3, [0, 2], [-3, -1], 100])
def test_axis_out_of_range(axis):
    with pytest.raises(ValueError, match="out of range for x of rank 2"):
        layer_norm(_x(), axis=axis)


@pytest.mark.parametrize("axis", [[1, 1], [1, -1], (0, -2, 1)])
def test_axis_duplicated(axis):
    with pytest.raises(ValueError, match="names the same axis twice"):
        layer_norm(_x(), axis=axis)


def test_axis_empty():
    with pytest.raises(ValueError, match="at least one axis"):
        layer_norm(_x(), axis=[])


def test_positive_axis_needs_known_rank():
    fn = tf.function(lambda x: layer_norm(x, axis=1),
                     input_signature=[tf.TensorSpec(None, tf.float32)])
    with pytest.raises(ValueError, match="needs x to have a known rank"):
        fn.get_concrete_function()


def test_unknown_shapes_wrong_gamma_reaches_kernel_check():
    fn = tf.function(lambda x, g: layer_norm(x, g),
                     input_signature=[tf.TensorSpec(None, tf.float32),
                                      tf.TensorSpec(None, tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"gamma has shape \[5\], expected \[4\]"):
        fn(_x(), tf.ones([5]))


# ------------------------------------------------------------------ raw op --


@pytest.mark.parametrize("param", ["gamma", "beta"])
@pytest.mark.parametrize("bad", [(5,), (2, 2), (4, 1)])
def test_raw_op_param_shape_mismatch_unknown_shapes(param, bad):
    """Shapes unknown at trace time: the kernel's runtime check must fire."""
    fn = tf.function(lambda x, g, b: _ops().tf_layernorm_layer_norm(x, g, b),
                     input_signature=[tf.TensorSpec(None, tf.float32)] * 3)
    g = tf.ones(bad) if param == "gamma" else tf.ones([4])
    b = tf.ones(bad) if param == "beta" else tf.ones([4])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{param} has shape \[.*\], expected \[4\]"):
        fn(_x(), g, b)


@pytest.mark.parametrize("mode", MODES)
def test_raw_op_param_shape_mismatch_known_shapes(mode):
    with pytest.raises(GRAPH_OR_KERNEL, match=r"gamma has shape \[5\], expected \[4\]"):
        _run(mode, lambda: _ops().tf_layernorm_layer_norm(_x(), tf.ones([5]), tf.ones([4])))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", ["scale", "center"])
def test_raw_op_disabled_param_must_be_empty(flag, mode):
    name = "gamma" if flag == "scale" else "beta"
    with pytest.raises(GRAPH_OR_KERNEL,
                       match=rf"{name} has shape \[4\] but must be empty .*when {flag} is false"):
        _run(mode, lambda: _ops().tf_layernorm_layer_norm(
            _x(), tf.ones([4]), tf.ones([4]), **{flag: False}))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("begin,num", [(2, 1), (-3, 1), (-1, 2), (1, 2), (5, 1)])
def test_raw_op_axes_out_of_range(begin, num, mode):
    with pytest.raises(GRAPH_OR_KERNEL, match="are out of range for x of rank 2"):
        _run(mode, lambda: _ops().tf_layernorm_layer_norm(
            _x(), tf.zeros([0]), tf.zeros([0]), begin_norm_axis=begin, num_norm_axes=num,
            scale=False, center=False))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num", [0, -1])
def test_raw_op_num_norm_axes_must_be_positive(num, mode):
    with pytest.raises(GRAPH_OR_KERNEL, match=rf"num_norm_axes must be in \[1, 254\], got {num}"):
        _run(mode, lambda: _ops().tf_layernorm_layer_norm(
            _x(), tf.zeros([0]), tf.zeros([0]), num_norm_axes=num, scale=False, center=False))


@pytest.mark.parametrize("mode", MODES)
def test_raw_grad_op_num_norm_axes_must_be_positive(mode):
    x = _x()
    with pytest.raises(GRAPH_OR_KERNEL, match=r"num_norm_axes must be in \[1, 254\], got 0"):
        _run(mode, lambda: _ops().tf_layernorm_layer_norm_grad(
            x, x, tf.ones([4]), tf.zeros([3, 1]), tf.ones([3, 1]), num_norm_axes=0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")], ids=["neg", "nan", "inf"])
def test_raw_op_bad_epsilon_attr(eps, mode):
    with pytest.raises(GRAPH_OR_KERNEL, match="epsilon must be finite and >= 0"):
        _run(mode, lambda: _ops().tf_layernorm_layer_norm(
            _x(), tf.ones([4]), tf.ones([4]), epsilon=eps))


def _stats(x, **kw):
    _, mean, rstd = _ops().tf_layernorm_layer_norm(x, tf.ones([4]), tf.ones([4]), **kw)
    return mean, rstd


@pytest.mark.parametrize("mode", MODES)
def test_raw_grad_op_dy_x_shape_mismatch(mode):
    x = _x()
    mean, rstd = _stats(x)
    with pytest.raises(GRAPH_OR_KERNEL,
                       match=r"dy has shape \[3,5\] but x has shape \[3,4\]; expected equal"):
        _run(mode, lambda: _ops().tf_layernorm_layer_norm_grad(
            tf.ones([3, 5]), x, tf.ones([4]), mean, rstd))


def test_raw_grad_op_dy_x_shape_mismatch_unknown_shapes():
    fn = tf.function(lambda dy, x, g, m, r: _ops().tf_layernorm_layer_norm_grad(dy, x, g, m, r),
                     input_signature=[tf.TensorSpec(None, tf.float32)] * 5)
    x = _x()
    mean, rstd = _stats(x)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"dy has shape \[4,3\] but x has shape \[3,4\]; expected equal"):
        fn(tf.ones([4, 3]), x, tf.ones([4]), mean, rstd)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["mean", "rstd"])
@pytest.mark.parametrize("bad", [(3,), (1, 3), (3, 4), (3, 1, 1)])
def test_raw_grad_op_wrong_stats_shape(bad, which, mode):
    x = _x()
    mean, rstd = _stats(x)
    if which == "mean":
        mean = tf.zeros(bad)
    else:
        rstd = tf.ones(bad)
    with pytest.raises(GRAPH_OR_KERNEL,
                       match=rf"{which} has shape \[.*\], expected \[3,1\] \(x's shape with"):
        _run(mode, lambda: _ops().tf_layernorm_layer_norm_grad(x, x, tf.ones([4]), mean, rstd))


def test_raw_grad_op_wrong_stats_shape_unknown_shapes():
    fn = tf.function(lambda dy, x, g, m, r: _ops().tf_layernorm_layer_norm_grad(dy, x, g, m, r),
                     input_signature=[tf.TensorSpec(None, tf.float32)] * 5)
    x = _x()
    mean, rstd = _stats(x)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"mean has shape \[1,3\], expected"):
        fn(x, x, tf.ones([4]), tf.zeros([1, 3]), rstd)


@pytest.mark.parametrize("mode", MODES)
def test_raw_grad_op_wrong_gamma_shape(mode):
    x = _x()
    mean, rstd = _stats(x)
    with pytest.raises(GRAPH_OR_KERNEL, match=r"gamma has shape \[3\], expected \[4\]"):
        _run(mode, lambda: _ops().tf_layernorm_layer_norm_grad(x, x, tf.ones([3]), mean, rstd))


@pytest.mark.parametrize("mode", MODES)
def test_raw_grad_op_disabled_gamma_must_be_empty(mode):
    x = _x()
    mean, rstd = _stats(x)
    with pytest.raises(GRAPH_OR_KERNEL, match="gamma has shape \\[4\\] but must be empty"):
        _run(mode, lambda: _ops().tf_layernorm_layer_norm_grad(
            x, x, tf.ones([4]), mean, rstd, scale=False))


# Unsupported dtype combinations: the shape function (in a tf.function) and
# the kernel (eager calls run no shape function) give the same message.

_TF_TYPE_NAMES = {tf.float16: "half", tf.bfloat16: "bfloat16", tf.float32: "float",
                  tf.float64: "double"}


def _types_msg(xd, gd, sd):
    n = _TF_TYPE_NAMES
    want_s = "double" if xd == tf.float64 else "float"
    return (rf"unsupported dtypes: x {n[xd]}, gamma/beta {n[gd]}, statistics S {n[sd]}; "
            rf"expected gamma/beta of x's dtype \(or float32 when x is float16/bfloat16\) "
            rf"and S {want_s}")


DTYPE_COMBOS = [
    # (x dtype, gamma dtype, S)
    (tf.float32, tf.float32, tf.float64),
    (tf.float64, tf.float64, tf.float32),
    (tf.float64, tf.float32, tf.float64),
    (tf.float32, tf.float16, tf.float32),
    (tf.float16, tf.bfloat16, tf.float32),
    (tf.float16, tf.float16, tf.float64),
]
DTYPE_COMBOS = [(x, g, s, _types_msg(x, g, s)) for x, g, s in DTYPE_COMBOS]
DTYPE_IDS = ["x32-S64", "x64-S32", "x64-g32", "x32-g16", "x16-gbf16", "x16-S64"]


@pytest.mark.parametrize("xd,gd,sd,msg", DTYPE_COMBOS, ids=DTYPE_IDS)
def test_raw_op_unsupported_dtypes_in_function(xd, gd, sd, msg):
    fn = tf.function(lambda: _ops().tf_layernorm_layer_norm(
        tf.ones([3, 4], xd), tf.ones([4], gd), tf.ones([4], gd), S=sd), autograph=False)
    with pytest.raises(ValueError, match=msg):
        fn()


@pytest.mark.parametrize("xd,gd,sd,msg", DTYPE_COMBOS, ids=DTYPE_IDS)
def test_raw_grad_op_unsupported_dtypes_in_function(xd, gd, sd, msg):
    fn = tf.function(lambda: _ops().tf_layernorm_layer_norm_grad(
        tf.ones([3, 4], xd), tf.ones([3, 4], xd), tf.ones([4], gd),
        tf.zeros([3, 1], sd), tf.ones([3, 1], sd)), autograph=False)
    with pytest.raises(ValueError, match=msg):
        fn()


@pytest.mark.parametrize("xd,gd,sd,msg", DTYPE_COMBOS, ids=DTYPE_IDS)
def test_raw_op_unsupported_dtypes_eager(xd, gd, sd, msg):
    with pytest.raises(tf.errors.InvalidArgumentError, match=msg):
        _ops().tf_layernorm_layer_norm(
            tf.ones([3, 4], xd), tf.ones([4], gd), tf.ones([4], gd), S=sd)


@pytest.mark.parametrize("xd,gd,sd,msg", DTYPE_COMBOS, ids=DTYPE_IDS)
def test_raw_grad_op_unsupported_dtypes_eager(xd, gd, sd, msg):
    with pytest.raises(tf.errors.InvalidArgumentError, match=msg):
        _ops().tf_layernorm_layer_norm_grad(
            tf.ones([3, 4], xd), tf.ones([3, 4], xd), tf.ones([4], gd),
            tf.zeros([3, 1], sd), tf.ones([3, 1], sd))


# ------------------------------------------------------------ no crash zone --

@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 0)])
def test_degenerate_shapes_do_not_crash(shape):
    """Scalars are rejected with a message; empty tensors just work."""
    x = tf.zeros(shape)
    if len(shape) == 0:
        with pytest.raises(ValueError, match="out of range for x of rank 0"):
            layer_norm(x)
    else:
        assert tuple(layer_norm(x).shape) == shape


def test_raw_op_scalar_x():
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="are out of range for x of rank 0"):
        _ops().tf_layernorm_layer_norm(tf.constant(1.0), tf.zeros([0]), tf.zeros([0]),
                                       scale=False, center=False)


# ------------------------------------------------ overflow and absurd attrs --
# Each of these aborted the process (TensorShape CHECK) or silently
# normalized nothing before the kernels bounded every product and sum.

OVERFLOW_CASES = [
    # (x shape, begin_norm_axis, num_norm_axes): x has 0 elements, but the
    # dims on one side of the normalized block multiply past int64.
    ((0, 2**32, 2**32), 1, 2),
    ((2**32, 0, 2**32), 1, 1),
    ((0, 2**62 + 1, 3), 1, 2),
]


@pytest.mark.parametrize("shape,begin,num", OVERFLOW_CASES, ids=["norm", "stats", "norm-2"])
def test_raw_op_dim_products_overflowing_int64_are_refused(shape, begin, num):
    x = tf.zeros(shape)
    with pytest.raises(tf.errors.InvalidArgumentError, match="overflows int64"):
        _ops().tf_layernorm_layer_norm(x, tf.zeros([0]), tf.zeros([0]), begin_norm_axis=begin,
                                       num_norm_axes=num, scale=False, center=False)
    # The axes are resolved before mean/rstd are checked, so any stats do.
    st = tf.zeros([0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="overflows int64"):
        _ops().tf_layernorm_layer_norm_grad(x, x, tf.zeros([0]), st, st, begin_norm_axis=begin,
                                            num_norm_axes=num, scale=False, center=False)


def test_public_api_overflowing_shape_is_refused_under_unknown_shapes():
    f = tf.function(lambda x: layer_norm(x, axis=[1, 2]),
                    input_signature=[tf.TensorSpec([None, None, None])])
    with pytest.raises(tf.errors.InvalidArgumentError, match="overflows int64"):
        f(tf.zeros([0, 2**32, 2**32]))


@pytest.mark.parametrize("mode", MODES)
def test_begin_plus_num_overflow_is_out_of_range(mode):
    x = _x((2, 3, 4))
    with pytest.raises(GRAPH_OR_KERNEL, match="out of range for x of rank 3"):
        _run(mode, lambda: _ops().tf_layernorm_layer_norm(
            x, tf.constant(2.0), tf.constant(1.0), begin_norm_axis=2**63 - 1, num_norm_axes=1))


def test_huge_num_norm_axes_with_unknown_rank_is_refused_before_shape_inference():
    f = tf.function(lambda x: _ops().tf_layernorm_layer_norm(
        x, tf.zeros([0]), tf.zeros([0]), num_norm_axes=4_000_000_000, scale=False,
        center=False), input_signature=[tf.TensorSpec(None, tf.float32)])
    with pytest.raises(GRAPH_OR_KERNEL, match=r"num_norm_axes must be in \[1, 254\]"):
        f(tf.ones([2, 3]))


def test_numpy_scalar_epsilon_is_accepted():
    x = _x()
    np.testing.assert_allclose(layer_norm(x, epsilon=np.float32(1e-3)).numpy(),
                               layer_norm(x, epsilon=1e-3).numpy(), rtol=0, atol=0)


def test_layer_rejects_bad_epsilon_at_construction():
    from tf_layernorm import LayerNorm

    with pytest.raises(ValueError, match="epsilon must be finite and >= 0"):
        LayerNorm(epsilon=-1.0)
    with pytest.raises(TypeError, match="epsilon must be a real number"):
        LayerNorm(epsilon="1e-5")
