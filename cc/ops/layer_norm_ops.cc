// Op definitions and shape functions. The kernels live in cc/kernels/.
//
// Names are namespaced ("TfLayernorm>") so they can never collide with an op
// of TensorFlow or of another custom-op library.
//
// The normalized dims are one contiguous block of axes of x:
// [begin_norm_axis, begin_norm_axis + num_norm_axes). begin_norm_axis may be
// negative (counted from the end), so graphs built with x of unknown rank
// still work. mean and rstd keep x's rank with the normalized dims set to 1,
// so they broadcast against x.
#include "cc/ops/layer_norm_types.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tf_layernorm {
namespace {

using ::tensorflow::DataType;
using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

Status CheckTypes(InferenceContext* c) {
  DataType t, u, s;
  TF_RETURN_IF_ERROR(c->GetAttr("T", &t));
  TF_RETURN_IF_ERROR(c->GetAttr("U", &u));
  TF_RETURN_IF_ERROR(c->GetAttr("S", &s));
  return CheckLayerNormTypes(t, u, s);
}

// Resolves the normalized block against x's rank (when known) and returns
// the shape of gamma/beta and of mean/rstd.
Status NormShapes(InferenceContext* c, ShapeHandle x, ShapeHandle* norm, ShapeHandle* stats,
                  bool* rank_known) {
  int64_t begin, num;
  TF_RETURN_IF_ERROR(c->GetAttr("begin_norm_axis", &begin));
  TF_RETURN_IF_ERROR(c->GetAttr("num_norm_axes", &num));
  // Bounded before anything is sized by it (an unknown-rank shape of rank num).
  if (num < 1 || num > tensorflow::TensorShape::MaxDimensions()) {
    return tensorflow::errors::InvalidArgument("num_norm_axes must be in [1, ",
                                               tensorflow::TensorShape::MaxDimensions(),
                                               "], got ", num);
  }
  *rank_known = c->RankKnown(x);
  if (!*rank_known) {
    *norm = c->UnknownShapeOfRank(num);
    *stats = c->UnknownShape();
    return Status();
  }
  const int64_t rank = c->Rank(x);
  const int64_t b = begin < 0 ? begin + rank : begin;
  if (b < 0 || b > rank || num > rank - b) {
    return tensorflow::errors::InvalidArgument(
        "normalized axes [", begin, ", ", begin, " + ", num, ") are out of range for x of rank ",
        rank, " (shape ", c->DebugString(x), ")");
  }
  ShapeHandle before, after;
  TF_RETURN_IF_ERROR(c->Subshape(x, 0, b, &before));
  TF_RETURN_IF_ERROR(c->Subshape(x, b, b + num, norm));
  TF_RETURN_IF_ERROR(c->Subshape(x, b + num, rank, &after));
  std::vector<DimensionHandle> ones(num, c->MakeDim(1));
  ShapeHandle tmp;
  TF_RETURN_IF_ERROR(c->Concatenate(before, c->MakeShape(ones), &tmp));
  TF_RETURN_IF_ERROR(c->Concatenate(tmp, after, stats));
  return Status();
}

// A parameter must have the normalized dims' shape, or be empty when its
// switch (scale/center) is off.
Status CheckParam(InferenceContext* c, const char* name, ShapeHandle param, ShapeHandle norm,
                  ShapeHandle x, bool used) {
  if (!c->RankKnown(param)) return Status();
  if (!used) {
    const int64_t n = c->Value(c->NumElements(param));
    if (n != InferenceContext::kUnknownDim && n != 0) {
      return tensorflow::errors::InvalidArgument(
          name, " has shape ", c->DebugString(param), " but must be empty (e.g. shape [0]) when ",
          std::string(name) == "gamma" ? "scale" : "center", " is false");
    }
    return Status();
  }
  ShapeHandle merged;
  if (!c->Merge(param, norm, &merged).ok()) {
    return tensorflow::errors::InvalidArgument(
        name, " has shape ", c->DebugString(param), ", expected ", c->DebugString(norm),
        " (the normalized dims of x with shape ", c->DebugString(x), ")");
  }
  return Status();
}

Status CheckEpsilon(InferenceContext* c) {
  float eps;
  TF_RETURN_IF_ERROR(c->GetAttr("epsilon", &eps));
  if (!(eps >= 0.0f) || !std::isfinite(eps)) {
    return tensorflow::errors::InvalidArgument("epsilon must be finite and >= 0, got ", eps);
  }
  return Status();
}

// LayerNorm (x, gamma, beta) -> (y, mean, rstd); RMSNorm (rms): (x, gamma) ->
// (y, rstd), no beta and no center attr. Residual add + norm (add): x is
// followed by residual (x's shape) and y by sum (s = x + residual, x's shape).
Status NormForwardShape(InferenceContext* c, bool rms, bool add) {
  TF_RETURN_IF_ERROR(CheckTypes(c));
  TF_RETURN_IF_ERROR(CheckEpsilon(c));
  bool scale, center = false, rank_known;
  TF_RETURN_IF_ERROR(c->GetAttr("scale", &scale));
  if (!rms) TF_RETURN_IF_ERROR(c->GetAttr("center", &center));
  ShapeHandle x = c->input(0), norm, stats;
  if (add && !c->Merge(c->input(0), c->input(1), &x).ok()) {
    return tensorflow::errors::InvalidArgument(
        "residual has shape ", c->DebugString(c->input(1)), " but x has shape ",
        c->DebugString(c->input(0)), "; expected equal shapes");
  }
  TF_RETURN_IF_ERROR(NormShapes(c, x, &norm, &stats, &rank_known));
  const int p = add ? 2 : 1;  // gamma's input index
  TF_RETURN_IF_ERROR(CheckParam(c, "gamma", c->input(p), norm, x, scale));
  if (!rms) TF_RETURN_IF_ERROR(CheckParam(c, "beta", c->input(p + 1), norm, x, center));
  const int stats_begin = add ? 2 : 1;
  for (int i = 0; i < stats_begin; ++i) c->set_output(i, x);
  for (int i = stats_begin; i < c->num_outputs(); ++i) c->set_output(i, stats);
  return Status();
}

// LayerNormGrad (dy, x, gamma, mean, rstd) -> (dx, dgamma, dbeta); RMSNormGrad
// (rms): (dy, x, gamma, rstd) -> (dx, dgamma). Residual add + norm (add): dy
// is followed by dsum (x's shape, or empty for none) and x is the forward's s.
Status NormBackwardShape(InferenceContext* c, bool rms, bool add) {
  TF_RETURN_IF_ERROR(CheckTypes(c));
  bool scale, center = false, rank_known;
  TF_RETURN_IF_ERROR(c->GetAttr("scale", &scale));
  if (!rms) TF_RETURN_IF_ERROR(c->GetAttr("center", &center));
  const int xi = add ? 2 : 1;  // x's (s's) input index
  const char* x_name = add ? "sum" : "x";
  ShapeHandle x;
  if (!c->Merge(c->input(0), c->input(xi), &x).ok()) {
    return tensorflow::errors::InvalidArgument("dy has shape ", c->DebugString(c->input(0)),
                                               " but ", x_name, " has shape ",
                                               c->DebugString(c->input(xi)),
                                               "; expected equal shapes");
  }
  if (add) {
    ShapeHandle ds = c->input(1), unused;
    const bool empty = c->RankKnown(ds) && c->Rank(ds) == 1 && c->Value(c->Dim(ds, 0)) == 0;
    if (!empty && !c->Merge(ds, x, &unused).ok()) {
      return tensorflow::errors::InvalidArgument(
          "dsum has shape ", c->DebugString(ds), ", expected ", c->DebugString(x),
          " (sum's shape) or [0] (no gradient reaches sum directly)");
    }
  }
  ShapeHandle norm, stats;
  TF_RETURN_IF_ERROR(NormShapes(c, x, &norm, &stats, &rank_known));
  TF_RETURN_IF_ERROR(CheckParam(c, "gamma", c->input(xi + 1), norm, x, scale));
  for (int i = xi + 2; i < c->num_inputs(); ++i) {
    ShapeHandle unused;
    if (!c->Merge(c->input(i), stats, &unused).ok()) {
      const bool is_rstd = i + 1 == c->num_inputs();
      return tensorflow::errors::InvalidArgument(
          is_rstd ? "rstd" : "mean", " has shape ", c->DebugString(c->input(i)), ", expected ",
          c->DebugString(stats), " (", x_name, "'s shape with the normalized dims set to 1)");
    }
  }
  ShapeHandle empty = c->MakeShape({0});
  c->set_output(0, x);
  c->set_output(1, scale ? norm : empty);
  if (!rms) c->set_output(2, center ? norm : empty);
  return Status();
}

Status ForwardShape(InferenceContext* c) { return NormForwardShape(c, false, false); }
Status BackwardShape(InferenceContext* c) { return NormBackwardShape(c, false, false); }
Status RmsForwardShape(InferenceContext* c) { return NormForwardShape(c, true, false); }
Status RmsBackwardShape(InferenceContext* c) { return NormBackwardShape(c, true, false); }
Status AddForwardShape(InferenceContext* c) { return NormForwardShape(c, false, true); }
Status AddBackwardShape(InferenceContext* c) { return NormBackwardShape(c, false, true); }
Status AddRmsForwardShape(InferenceContext* c) { return NormForwardShape(c, true, true); }
Status AddRmsBackwardShape(InferenceContext* c) { return NormBackwardShape(c, true, true); }

}  // namespace

REGISTER_OP("TfLayernorm>LayerNorm")
    .Input("x: T")
    .Input("gamma: U")
    .Input("beta: U")
    .Output("y: T")
    .Output("mean: S")
    .Output("rstd: S")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {half, bfloat16, float, double}")
    .Attr("S: {float, double} = DT_FLOAT")
    .Attr("epsilon: float = 1e-5")
    .Attr("begin_norm_axis: int = -1")
    .Attr("num_norm_axes: int = 1")
    .Attr("scale: bool = true")
    .Attr("center: bool = true")
    .SetShapeFn(ForwardShape)
    .Doc(R"doc(
Fused Layer Normalization over a contiguous block of axes of x.

y = (x - mean) / sqrt(var + epsilon) * gamma + beta, with mean and var taken
over axes [begin_norm_axis, begin_norm_axis + num_norm_axes) in float32
(float64 when x is float64).

x: the input.
gamma: the scale, shaped like the normalized dims; empty when scale=false.
beta: the offset, shaped like the normalized dims; empty when center=false.
y: the normalized x, in x's dtype.
mean: per-row mean, x's shape with the normalized dims set to 1.
rstd: per-row 1 / sqrt(var + epsilon), same shape as mean.
)doc");

REGISTER_OP("TfLayernorm>LayerNormGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("gamma: U")
    .Input("mean: S")
    .Input("rstd: S")
    .Output("dx: T")
    .Output("dgamma: U")
    .Output("dbeta: U")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {half, bfloat16, float, double}")
    .Attr("S: {float, double} = DT_FLOAT")
    .Attr("begin_norm_axis: int = -1")
    .Attr("num_norm_axes: int = 1")
    .Attr("scale: bool = true")
    .Attr("center: bool = true")
    .SetShapeFn(BackwardShape)
    .Doc(R"doc(
Gradient of TfLayernorm>LayerNorm with respect to x, gamma and beta.

dx in x's dtype; dgamma and dbeta summed over every non-normalized axis, shaped
like the normalized dims (shape [0] when scale/center is false).
)doc");

REGISTER_OP("TfLayernorm>RMSNorm")
    .Input("x: T")
    .Input("gamma: U")
    .Output("y: T")
    .Output("rstd: S")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {half, bfloat16, float, double}")
    .Attr("S: {float, double} = DT_FLOAT")
    .Attr("epsilon: float = 1e-6")
    .Attr("begin_norm_axis: int = -1")
    .Attr("num_norm_axes: int = 1")
    .Attr("scale: bool = true")
    .SetShapeFn(RmsForwardShape)
    .Doc(R"doc(
Fused RMS Normalization over a contiguous block of axes of x (same kernels as
TfLayernorm>LayerNorm, without the mean):

y = x / sqrt(mean(x^2) + epsilon) * gamma, statistics in float32 (float64
when x is float64).

x: the input.
gamma: the scale, shaped like the normalized dims; empty when scale=false.
y: the normalized x, in x's dtype.
rstd: per-row 1 / sqrt(mean(x^2) + epsilon), x's shape with the normalized
  dims set to 1.
)doc");

REGISTER_OP("TfLayernorm>RMSNormGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("gamma: U")
    .Input("rstd: S")
    .Output("dx: T")
    .Output("dgamma: U")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {half, bfloat16, float, double}")
    .Attr("S: {float, double} = DT_FLOAT")
    .Attr("begin_norm_axis: int = -1")
    .Attr("num_norm_axes: int = 1")
    .Attr("scale: bool = true")
    .SetShapeFn(RmsBackwardShape)
    .Doc(R"doc(
Gradient of TfLayernorm>RMSNorm with respect to x and gamma (dgamma has shape
[0] when scale is false).
)doc");

REGISTER_OP("TfLayernorm>AddLayerNorm")
    .Input("x: T")
    .Input("residual: T")
    .Input("gamma: U")
    .Input("beta: U")
    .Output("y: T")
    .Output("sum: T")
    .Output("mean: S")
    .Output("rstd: S")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {half, bfloat16, float, double}")
    .Attr("S: {float, double} = DT_FLOAT")
    .Attr("epsilon: float = 1e-5")
    .Attr("begin_norm_axis: int = -1")
    .Attr("num_norm_axes: int = 1")
    .Attr("scale: bool = true")
    .Attr("center: bool = true")
    .SetShapeFn(AddForwardShape)
    .Doc(R"doc(
Residual add + Layer Normalization in one kernel: sum = x + residual (rounded
to T as an element-wise add in T rounds), y = LayerNorm(sum) as
TfLayernorm>LayerNorm computes it. x and residual are read once.

x: the input.
residual: the residual stream, x's dtype and shape.
gamma: the scale, shaped like the normalized dims; empty when scale=false.
beta: the offset, shaped like the normalized dims; empty when center=false.
y: the normalized sum, in x's dtype.
sum: x + residual, in x's dtype (the next residual stream of a pre-LN block).
mean: per-row mean of sum, x's shape with the normalized dims set to 1.
rstd: per-row 1 / sqrt(var + epsilon), same shape as mean.
)doc");

REGISTER_OP("TfLayernorm>AddLayerNormGrad")
    .Input("dy: T")
    .Input("dsum: T")
    .Input("sum: T")
    .Input("gamma: U")
    .Input("mean: S")
    .Input("rstd: S")
    .Output("dx: T")
    .Output("dgamma: U")
    .Output("dbeta: U")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {half, bfloat16, float, double}")
    .Attr("S: {float, double} = DT_FLOAT")
    .Attr("begin_norm_axis: int = -1")
    .Attr("num_norm_axes: int = 1")
    .Attr("scale: bool = true")
    .Attr("center: bool = true")
    .SetShapeFn(AddBackwardShape)
    .Doc(R"doc(
Gradient of TfLayernorm>AddLayerNorm: dx (which is also the gradient of
residual) = LayerNormGrad's dx at sum + dsum, added before rounding to T;
dgamma and dbeta as TfLayernorm>LayerNormGrad.

dsum: the gradient reaching sum directly, sum's shape, or shape [0] for none.
)doc");

REGISTER_OP("TfLayernorm>AddRMSNorm")
    .Input("x: T")
    .Input("residual: T")
    .Input("gamma: U")
    .Output("y: T")
    .Output("sum: T")
    .Output("rstd: S")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {half, bfloat16, float, double}")
    .Attr("S: {float, double} = DT_FLOAT")
    .Attr("epsilon: float = 1e-6")
    .Attr("begin_norm_axis: int = -1")
    .Attr("num_norm_axes: int = 1")
    .Attr("scale: bool = true")
    .SetShapeFn(AddRmsForwardShape)
    .Doc(R"doc(
Residual add + RMS Normalization in one kernel: sum = x + residual (rounded
to T), y = RMSNorm(sum) as TfLayernorm>RMSNorm computes it.
)doc");

REGISTER_OP("TfLayernorm>AddRMSNormGrad")
    .Input("dy: T")
    .Input("dsum: T")
    .Input("sum: T")
    .Input("gamma: U")
    .Input("rstd: S")
    .Output("dx: T")
    .Output("dgamma: U")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {half, bfloat16, float, double}")
    .Attr("S: {float, double} = DT_FLOAT")
    .Attr("begin_norm_axis: int = -1")
    .Attr("num_norm_axes: int = 1")
    .Attr("scale: bool = true")
    .SetShapeFn(AddRmsBackwardShape)
    .Doc(R"doc(
Gradient of TfLayernorm>AddRMSNorm: dx (also residual's gradient) =
RMSNormGrad's dx at sum + dsum (shape [0]: none), and dgamma.
)doc");

}  // namespace tf_layernorm
