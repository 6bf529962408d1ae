"""The Keras layer. It holds weights and configuration; the math is in ops."""
import warnings

import keras
import tensorflow as tf

from tf_layernorm import ops


def _param_shape(layer, input_shape):
    """The weights' shape: the input's dims at the layer's (sorted) axes,
    which must be known."""
    axes = ops._normalize_axes(layer.axis, len(input_shape))
    shape = tuple(input_shape[a] for a in axes)
    if any(d is None for d in shape):
        raise ValueError(
            f"{type(layer).__name__} needs the normalized dims to be known: "
            f"axis={layer.axis!r} of input shape {tuple(input_shape)} gives {shape}")
    return shape


class _NormLayer(keras.layers.Layer):
    """What LayerNorm and RMSNorm share: output in the compute dtype (the ops
    return x's dtype, which under autocast=False may differ), output shape,
    and the residual form `layer(x, residual=r) -> (y, s)`."""

    def _finish(self, outputs):
        if isinstance(outputs, tuple):  # (y, s): s stays x + residual, in x's dtype
            return self._finish(outputs[0]), outputs[1]
        if outputs.dtype != self.compute_dtype:
            outputs = tf.cast(outputs, self.compute_dtype)
        return outputs

    def compute_output_shape(self, input_shape):
        ops._normalize_axes(self.axis, len(input_shape))
        return tuple(input_shape)

    def compute_output_spec(self, inputs, residual=None, **kwargs):
        y = keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype=self.compute_dtype)
        if residual is None:
            return y
        if tuple(residual.shape) != tuple(inputs.shape) and not all(
                a is None or b is None or a == b for a, b in zip(residual.shape, inputs.shape)):
            raise ValueError(
                f"{type(self).__name__}: residual has shape {tuple(residual.shape)}, expected "
                f"the input's shape {tuple(inputs.shape)}")
        return y, keras.KerasTensor(tuple(inputs.shape), dtype=inputs.dtype)


@keras.saving.register_keras_serializable(package="tf_layernorm")
class LayerNorm(_NormLayer):
    """Layer normalization on a fused kernel; a drop-in for
    `keras.layers.LayerNormalization` with the seeds' API (MXNet
    `gluon.nn.LayerNorm`, apex `FusedLayerNorm`).

    Args:
      axis: int or list/tuple of ints: the axes to normalize over (e.g. -1,
        [-2, -1], or 1 for the channel axis of (N, C, L)).
      epsilon: added to the variance. Defaults to 1e-5 as in MXNet, apex and
        PyTorch; pass 1e-3 to reproduce `keras.layers.LayerNormalization`.
      center: add the learned offset `beta`.
      scale: multiply by the learned scale `gamma`.
      beta_initializer, gamma_initializer: initializers of the weights.
      beta_regularizer, gamma_regularizer: optional regularizers.
      beta_constraint, gamma_constraint: optional constraints.
      in_channels: if > 0, the size of the (single) normalized axis; the
        weights are then created at construction instead of at first call.
      **kwargs: base layer arguments (`name`, `dtype`, `trainable`, ...), and
        `rms_scaling`, accepted and computed as Keras 3.15 does (deprecated
        there: x * rsqrt(var + epsilon) * gamma with no mean subtraction and
        no beta; composite ops, not the fused kernel). For RMS normalization
        use `keras.layers.RMSNormalization`.

    Called as `layer(x, residual=r)` it returns `(y, s)`: s = x + r and
    y = the normalized s, from one fused kernel (`tfln.add_layer_norm`).

    `supports_jit` is False: with `jit_compile="auto"` Keras then runs the
    fused kernel instead of XLA. Under an explicit XLA compile the layer
    computes the same math with composite ops.
    """

    def __init__(self, axis=-1, epsilon=1e-5, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones", beta_regularizer=None,
                 gamma_regularizer=None, beta_constraint=None, gamma_constraint=None,
                 in_channels=0, **kwargs):
        rms_scaling = kwargs.pop("rms_scaling", False)
        if rms_scaling:
            warnings.warn(
                "You passed `rms_scaling=True`, which is deprecated in Keras: it scales the "
                "input by the variance, not the root mean square, and runs on composite ops "
                "here. For RMS normalization use keras.layers.RMSNormalization.",
                stacklevel=2)
        super().__init__(**kwargs)
        self.rms_scaling = bool(rms_scaling)
        # XLA cannot compile the custom op: keep Keras's jit_compile="auto" off.
        self.supports_jit = False
        ops._check_axis_type(axis)
        self.axis = list(axis) if isinstance(axis, (list, tuple)) else axis
        self.epsilon = ops._check_epsilon(epsilon)
        self.center = center
        self.scale = scale
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 0:
            raise ValueError(f"in_channels must be an int >= 0, got {in_channels!r}")
        self.in_channels = in_channels
        self.supports_masking = True
        # Like keras.layers.LayerNormalization: inputs keep their dtype (a
        # float16 x runs the fused kernel with float32 gamma/beta).
        self.autocast = False
        self.gamma = None
        self.beta = None
        if in_channels:
            if len(self._axes_list()) != 1:
                raise ValueError(
                    f"in_channels={in_channels} gives the size of one normalized axis, but "
                    f"axis={axis!r} names {len(self._axes_list())}")
            self._create_weights((in_channels,))
            self.built = True

    def _axes_list(self):
        return [self.axis] if isinstance(self.axis, int) else list(self.axis)

    def _create_weights(self, shape):
        if self.scale or self.rms_scaling:
            self.gamma = self.add_weight(
                name="gamma", shape=shape, initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint,
                trainable=True, autocast=False)
        if self.center and not self.rms_scaling:
            self.beta = self.add_weight(
                name="beta", shape=shape, initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint,
                trainable=True, autocast=False)

    def build(self, input_shape):
        self._create_weights(_param_shape(self, input_shape))

    def call(self, inputs, residual=None):
        """y = norm(inputs); with `residual`, (y, s): s = inputs + residual
        (the fused add, one kernel) and y = norm(s)."""
        if self.in_channels:
            axes = ops._normalize_axes(self.axis, inputs.shape.rank)
            got = inputs.shape[axes[0]]
            if got is not None and got != self.in_channels:
                raise ValueError(
                    f"LayerNorm was built with in_channels={self.in_channels}, but axis "
                    f"{self.axis} of the input (shape {tuple(inputs.shape)}) has size {got}")
        if self.rms_scaling:
            # Keras's deprecated composite math: nothing to fuse.
            s = inputs if residual is None else inputs + ops._check_residual(residual, inputs)
            y = ops.keras_rms_scaling(s, self.gamma, self.axis, self.epsilon)
            outputs = y if residual is None else (y, s)
        elif residual is None:
            outputs = ops.layer_norm(inputs, self.gamma, self.beta, axis=self.axis,
                                     epsilon=self.epsilon)
        else:
            outputs = ops.add_layer_norm(inputs, residual, self.gamma, self.beta,
                                         axis=self.axis, epsilon=self.epsilon)
        return self._finish(outputs)

    def get_config(self):
        config = super().get_config()
        config.update({
            "axis": self.axis,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "rms_scaling": self.rms_scaling,
            "beta_initializer": keras.initializers.serialize(self.beta_initializer),
            "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
            "beta_regularizer": keras.regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": keras.regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": keras.constraints.serialize(self.beta_constraint),
            "gamma_constraint": keras.constraints.serialize(self.gamma_constraint),
            "in_channels": self.in_channels,
        })
        return config


@keras.saving.register_keras_serializable(package="tf_layernorm")
class RMSNorm(_NormLayer):
    """RMS normalization on the fused LayerNorm kernels; a drop-in for
    `keras.layers.RMSNormalization` (same arguments, defaults, weight name
    `scale`, config).

    y = x / sqrt(mean(x^2) + epsilon) * scale over `axis`.

    Args:
      axis: int or list/tuple of ints: the axes to normalize over.
      epsilon: added to the mean square (default 1e-6, as Keras).
      **kwargs: base layer arguments (`name`, `dtype`, `trainable`, ...).

    Called as `layer(x, residual=r)` it returns `(y, s)`: s = x + r and
    y = the normalized s, from one fused kernel (`tfln.add_rms_norm`).
    """

    def __init__(self, axis=-1, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        ops._check_axis_type(axis)
        self.axis = list(axis) if isinstance(axis, (list, tuple)) else axis
        self.epsilon = ops._check_epsilon(epsilon)
        self.supports_masking = True
        # Half-precision inputs run the kernel with the float32 scale directly.
        self.autocast = False
        self.supports_jit = False

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=_param_shape(self, input_shape),
                                     initializer="ones", autocast=False)

    def call(self, inputs, residual=None):
        """y = norm(inputs); with `residual`, (y, s): s = inputs + residual
        (the fused add, one kernel) and y = norm(s)."""
        if residual is None:
            return self._finish(ops.rms_norm(inputs, self.scale, axis=self.axis,
                                             epsilon=self.epsilon))
        return self._finish(ops.add_rms_norm(inputs, residual, self.scale, axis=self.axis,
                                             epsilon=self.epsilon))

    def get_config(self):
        config = super().get_config()
        config.update({"axis": self.axis, "epsilon": self.epsilon})
        return config
