// The dtype combinations the LayerNorm ops accept, shared by the shape
// functions (graph construction) and the kernels (eager calls run no shape
// function, so they need the same clear error).
#ifndef TF_LAYERNORM_CC_OPS_LAYER_NORM_TYPES_H_
#define TF_LAYERNORM_CC_OPS_LAYER_NORM_TYPES_H_

#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/platform/status.h"

namespace tf_layernorm {

// x: T; gamma/beta: U = T, or float32 when T is float16/bfloat16;
// mean/rstd: S = float64 for float64 x, float32 otherwise.
inline bool ValidLayerNormTypes(tensorflow::DataType t, tensorflow::DataType u,
                                tensorflow::DataType s) {
  const bool half_like = t == tensorflow::DT_HALF || t == tensorflow::DT_BFLOAT16;
  const tensorflow::DataType want_s =
      t == tensorflow::DT_DOUBLE ? tensorflow::DT_DOUBLE : tensorflow::DT_FLOAT;
  return (u == t || (half_like && u == tensorflow::DT_FLOAT)) && s == want_s;
}

inline tensorflow::Status CheckLayerNormTypes(tensorflow::DataType t, tensorflow::DataType u,
                                              tensorflow::DataType s) {
  if (ValidLayerNormTypes(t, u, s)) return tensorflow::Status();
  const tensorflow::DataType want_s =
      t == tensorflow::DT_DOUBLE ? tensorflow::DT_DOUBLE : tensorflow::DT_FLOAT;
  return tensorflow::errors::InvalidArgument(
      "unsupported dtypes: x ", tensorflow::DataTypeString(t), ", gamma/beta ",
      tensorflow::DataTypeString(u), ", statistics S ", tensorflow::DataTypeString(s),
      "; expected gamma/beta of x's dtype (or float32 when x is float16/bfloat16) and S ",
      tensorflow::DataTypeString(want_s));
}

}  // namespace tf_layernorm

#endif  // TF_LAYERNORM_CC_OPS_LAYER_NORM_TYPES_H_
