"""tf_layernorm: fused Layer Normalization for TensorFlow and Keras.

    import tf_layernorm as tfln
    y = tfln.LayerNorm()(x)              # Keras layer
    y = tfln.layer_norm(x, gamma, beta)  # functional op
    y = tfln.RMSNorm()(x)                # RMS normalization, same kernels
    y = tfln.rms_norm(x, gamma)
    y, s = tfln.add_layer_norm(x, residual, gamma, beta)  # s = x + residual, y = norm(s)
    y, s = tfln.LayerNorm()(x, residual=r)               # the same, as a layer
    tfln.fuse(model)                     # a model's Keras/keras-hub norm layers, fused

Importing the package loads the op library, which must happen before a
SavedModel that uses the ops is loaded.
"""
from tf_layernorm.ops import (add_layer_norm, add_rms_norm, build_info, layer_norm, load_ops,
                              rms_norm)

load_ops()

from tf_layernorm.layer import LayerNorm, RMSNorm  # noqa: E402  (needs the ops loaded)
from tf_layernorm.fusion import fuse  # noqa: E402

__version__ = "0.1.0"

__all__ = ["LayerNorm", "RMSNorm", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm",
           "fuse", "load_ops", "build_info", "__version__"]
