"""`fuse(model)`: switch the normalization layers already inside a model to
the fused kernels, leaving everything Keras sees (class, variables, config,
serialization) as it was.

How: each matched layer gets a per-instance `call` attribute (a method bound
to that layer) that computes the class's own math with `layer_norm` /
`rms_norm`. The class is untouched, so `get_config()`, the registered name
in a `.keras` file and the variables are those of the original layer: a
`.keras` file saved after `fuse` loads with Keras's math where tf_layernorm
is not installed, while a traced graph (`tf.function`, `model.export`)
holds our ops. Swapping `__class__` for a generated subclass would change
the class Keras serializes (and its registration) for no gain.

Each rule below mirrors the `call` of one class, including where it casts to
float32 and back; a layer whose class overrides that `call` (a subclass with
its own math) is left alone.
"""
import ast
import hashlib
import inspect
import sys
import textwrap
import types
import warnings

import keras
import tensorflow as tf

from tf_layernorm import ops

_HALF_OR_FLOAT32 = (tf.float16, tf.bfloat16, tf.float32)


def _epsilon(layer):
    eps = layer.epsilon
    return keras.config.epsilon() if eps is None else eps


def _to_float32_compute(x):
    """x as the float32-computing layers see it: half x stays as it is (the
    kernels take float32 parameters and compute in float32), anything else is
    cast to float32 as the layer's own `ops.cast(x, "float32")` does."""
    x = tf.convert_to_tensor(x)
    return x if x.dtype in _HALF_OR_FLOAT32 else tf.cast(x, tf.float32)


def _cast_to(y, dtype):
    return y if y.dtype == dtype else tf.cast(y, dtype)


def _layer_normalization_call(self, inputs):
    # keras.layers.LayerNormalization: statistics in at least float32 (the
    # kernels' float32, float64 for float64), gamma/beta as they are
    # (autocast=False), the result cast to the compute dtype.
    y = ops.layer_norm(inputs, self.gamma, self.beta, axis=self.axis, epsilon=_epsilon(self))
    return _cast_to(y, self.compute_dtype)


def _rms_normalization_call(self, x):
    # keras.layers.RMSNormalization: ops.rms_normalization(x, scale); the scale
    # is read under the layer's autocast (as Keras reads it), the result keeps
    # x's dtype.
    return ops.rms_norm(x, self.scale, axis=self.axis, epsilon=_epsilon(self))


def _gemma_rms_call(self, x):
    # keras_hub Gemma RMSNormalization: float32 x and scale,
    # x * 1/sqrt(mean(x^2) + eps) * (1 + scale), cast to the compute dtype.
    scale = tf.cast(self.scale, tf.float32)
    y = ops.rms_norm(_to_float32_compute(x), 1.0 + scale, axis=-1, epsilon=self.epsilon)
    return _cast_to(y, self.compute_dtype)


def _llama_rms_call(self, x):
    # keras_hub LlamaLayerNorm: float32 x, x * rsqrt(mean(x^2) + eps), times
    # the scale as read in call (autocast), promoted to float32, cast to the
    # compute dtype.
    scale = tf.cast(self.scale, tf.float32)
    y = ops.rms_norm(_to_float32_compute(x), scale, axis=-1, epsilon=self.epsilon)
    return _cast_to(y, self.compute_dtype)


# The `call` each rule was written from (Keras 3.15, keras-hub 0.32): a
# fingerprint of its code (ast.unparse without the docstring: formatting and
# comments do not count). A release that changes that code has math we have
# not read, so its layers are left alone, with a warning.
_KNOWN_CALLS = {
    ("keras.src.layers.normalization.layer_normalization", "LayerNormalization"):
        (_layer_normalization_call, "975582fa0302036c"),
    ("keras.src.layers.normalization.rms_normalization", "RMSNormalization"):
        (_rms_normalization_call, "be297d5dca7a9856"),
    ("keras_hub.src.models.gemma.rms_normalization", "RMSNormalization"):
        (_gemma_rms_call, "1fcc06ca602ce056"),
    ("keras_hub.src.models.llama.llama_layernorm", "LlamaLayerNorm"):
        (_llama_rms_call, "8871bf54eeb21474"),
}


def _fingerprint(function):
    """sha256 (16 hex digits) of a function's code without its docstring, or
    None when its source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(
            getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
        del body[0]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]


def _rules():
    """(class, fused call) for each class we know whose call is the one we
    read. Classes come from sys.modules: a keras-hub class no one imported
    has no instances."""
    rules = []
    for (module, name), (call, fingerprint) in _KNOWN_CALLS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is None:
            continue
        if _fingerprint(cls.call) != fingerprint:
            warnings.warn(
                f"tf_layernorm.fuse: {module}.{name}.call is not the code tf_layernorm "
                f"was written against (Keras 3.15 / keras-hub 0.32); its layers are left "
                f"unfused", stacklevel=3)
            continue
        rules.append((cls, call))
    return rules


def _fused_call_for(layer, rules):
    for cls, call in rules:
        if not (isinstance(layer, cls) and type(layer).call is cls.call):
            continue  # a subclass with its own call has its own math
        if call is _layer_normalization_call and layer.rms_scaling:
            return None  # left as Keras computes it
        return call
    return None


def _is_fused(layer):
    """True when `fuse` has switched this layer."""
    call = layer.__dict__.get("call")
    return isinstance(call, types.MethodType) and call.__func__ in _FUSED_CALLS


_FUSED_CALLS = (_layer_normalization_call, _rms_normalization_call, _gemma_rms_call,
                _llama_rms_call)


def fuse(layer_or_model):
    """Makes every normalization layer inside `layer_or_model` compute with the
    fused kernels, at any depth; returns how many layers it switched.

    Covered: `keras.layers.LayerNormalization` (any axis, center/scale; with
    `rms_scaling=True` it is left as Keras computes it),
    `keras.layers.RMSNormalization`, and keras-hub's Gemma
    `RMSNormalization` and `LlamaLayerNorm`. Other layers, and subclasses that
    override `call`, are left alone. The layers keep their class, variables
    and config; only their computation changes (same math to float32
    rounding). Idempotent: a second call returns 0.

    Like `tfln.LayerNorm`, a switched layer has `supports_jit = False`, so that
    `compile(jit_compile="auto")` keeps the fused kernels: call `fuse` before
    `compile`. Under an explicit XLA compile the layers compute the same math
    with composite ops.
    """
    if not isinstance(layer_or_model, keras.layers.Layer):
        raise TypeError(
            f"fuse expects a keras.layers.Layer or keras.Model, got "
            f"{type(layer_or_model).__name__}")
    rules = _rules()
    switched = 0
    for layer in layer_or_model._flatten_layers(include_self=True, recursive=True):
        if _is_fused(layer):
            continue
        call = _fused_call_for(layer, rules)
        if call is not None:
            # An instance attribute shadows the class's call for this layer only.
            layer.call = types.MethodType(call, layer)
            # As tfln.LayerNorm: Keras's jit_compile="auto" (XLA on GPUs) would
            # compile the composite fallback instead of the fused kernel.
            layer.supports_jit = False
            switched += 1
    return switched
