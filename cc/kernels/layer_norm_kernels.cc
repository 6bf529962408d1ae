// TF binding for the LayerNorm kernels: validate every input (these ops can be
// called raw by anyone), allocate outputs, call the TF-free kernels (CPU, and
// CUDA when built with GOOGLE_CUDA) on the op's thread pool or stream.
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

#include "cc/kernels/layer_norm_cpu.h"
#include "cc/kernels/layer_norm_gpu.h"
#include "cc/ops/layer_norm_types.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/threadpool.h"
#include "tensorflow/core/util/overflow.h"

namespace tf_layernorm {
namespace {

namespace gpu = ::tf_layernorm::gpu;

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;

// What a kernel needs to know about the normalized block of x.
struct ResolvedAxes {
  NormGeometry geometry;
  TensorShape norm_shape;   // shape of gamma/beta/dgamma/dbeta
  TensorShape stats_shape;  // shape of mean/rstd: x with norm dims set to 1
};

Status ResolveAxes(const TensorShape& x, int64_t begin_attr, int64_t num, ResolvedAxes* out) {
  const int64_t rank = x.dims();
  const int64_t begin = begin_attr < 0 ? begin_attr + rank : begin_attr;
  // Written so that no sum can overflow, whatever the attrs hold.
  if (num < 1 || begin < 0 || begin > rank || num > rank - begin) {
    return InvalidArgument("normalized axes [", begin_attr, ", ", begin_attr, " + ", num,
                           ") are out of range for x of rank ", rank, " (shape ",
                           x.DebugString(), ")");
  }
  int64_t outer = 1, norm = 1, inner = 1;
  out->norm_shape = TensorShape();
  out->stats_shape = TensorShape();
  for (int64_t d = 0; d < rank; ++d) {
    const int64_t size = x.dim_size(d);
    const bool normalized = d >= begin && d < begin + num;
    int64_t& product = d < begin ? outer : (normalized ? norm : inner);
    // x itself may hold zero elements while the products of its dims on
    // either side of the block overflow: those shapes are refused, not wrapped.
    product = tensorflow::MultiplyWithoutOverflow(product, size);
    if (product < 0 || !out->stats_shape.AddDimWithStatus(normalized ? 1 : size).ok() ||
        (normalized && !out->norm_shape.AddDimWithStatus(size).ok())) {
      return InvalidArgument("x with shape ", x.DebugString(),
                             " has dims whose product overflows int64 around the normalized "
                             "axes (in gamma's or mean's shape); expected those products to "
                             "fit int64");
    }
  }
  NormGeometry g;
  g.outer = outer;
  g.norm = norm;
  g.inner = inner;
  // A zero-size dim after the block makes inner 0; the kernels want inner >= 1
  // and see no work because outer * inner (the number of rows) is then 0.
  if (g.inner == 0) {
    g.inner = 1;
    g.outer = 0;
  }
  out->geometry = g;
  return Status();
}

Status CheckParam(const char* name, const Tensor& param, const ResolvedAxes& axes,
                  const TensorShape& x, bool used, const char* flag) {
  if (!used) {
    if (param.NumElements() != 0) {
      return InvalidArgument(name, " has shape ", param.shape().DebugString(),
                             " but must be empty (e.g. shape [0]) when ", flag, " is false");
    }
    return Status();
  }
  if (param.shape() != axes.norm_shape) {
    return InvalidArgument(name, " has shape ", param.shape().DebugString(), ", expected ",
                           axes.norm_shape.DebugString(), " (the normalized dims of x with shape ",
                           x.DebugString(), ")");
  }
  return Status();
}

// Hands the op's intra-op thread pool to the TF-free kernels.
ParallelFor MakeParallelFor(OpKernelContext* ctx) {
  tensorflow::thread::ThreadPool* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [pool](int64_t n, int64_t cost, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    pool->ParallelFor(n, cost, fn);
  };
}

// Outputs written into a forwarded input's buffer (y into x's, dx into dy's),
// counted for the tests, which read it through tf_layernorm_forwarded_buffers().
std::atomic<int64_t> forwarded_buffers{0};

// TF_LAYERNORM_FORWARD_BUFFERS=0 turns buffer forwarding off (read once per
// process): for measuring what it saves, or ruling it out.
bool ForwardingEnabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("TF_LAYERNORM_FORWARD_BUFFERS");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// The output `out` of `ctx` in the buffer of one of the inputs `in` (tried
// in order) when TensorFlow allows it (same shape and dtype, and no other
// reference to the buffer) and the kernel path is safe in place; a fresh
// buffer otherwise. A large output then costs no fresh pages: with
// TensorFlow's plain CPU allocator, first-touch page faults are most of a
// large op's time.
Status ForwardOrAllocate(OpKernelContext* ctx, bool in_place_safe, std::initializer_list<int> in,
                         int out, Tensor** result) {
  const Tensor& input = ctx->input(*in.begin());
  if (!in_place_safe || !ForwardingEnabled()) {
    return ctx->allocate_output(out, input.shape(), result);
  }
  TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output(
      absl::Span<const int>(in.begin(), in.size()), out, input.shape(), result));
  for (int i : in) {
    const Tensor& candidate = ctx->input(i);
    if (candidate.NumElements() > 0 && (*result)->data() == candidate.data()) {
      forwarded_buffers.fetch_add(1, std::memory_order_relaxed);
    }
  }
  return Status();
}

using CpuDevice = Eigen::ThreadPoolDevice;
#if GOOGLE_CUDA
using GpuDevice = Eigen::GpuDevice;
#endif

Status ToStatus(KernelStatus s, const char* op) {
  switch (s) {
    case KernelStatus::kOk:
      return Status();
    case KernelStatus::kInvalidGeometry:
      return InvalidArgument(op, ": x has too many elements for int64 indexing");
    case KernelStatus::kNullPointer:
      return tensorflow::errors::Internal(op, ": an input or output buffer is missing");
    case KernelStatus::kUnsupportedTypes:
      return InvalidArgument(op, ": unsupported combination of x and parameter dtypes");
  }
  return tensorflow::errors::Internal(op, ": unknown kernel status");
}

class LayerNormBase : public OpKernel {
 public:
  explicit LayerNormBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("begin_norm_axis", &begin_norm_axis_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_norm_axes", &num_norm_axes_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    // RMSNorm ops have no beta and no "center" attr.
    center_ = false;
    if (ctx->HasAttr("center")) OP_REQUIRES_OK(ctx, ctx->GetAttr("center", &center_));
    OP_REQUIRES(ctx, num_norm_axes_ >= 1 && num_norm_axes_ <= TensorShape::MaxDimensions(),
                InvalidArgument("num_norm_axes must be in [1, ", TensorShape::MaxDimensions(),
                                "], got ", num_norm_axes_));
  }

 protected:
  int64_t begin_norm_axis_ = -1;
  int64_t num_norm_axes_ = 1;
  bool scale_ = true;
  bool center_ = true;
};

// The device-specific half of each op: run the kernel on validated inputs
// and allocated outputs. Specialized for CPU below and for GPU under GOOGLE_CUDA.
template <typename Device, typename T, typename U>
struct Launch;

template <typename T, typename U>
struct Launch<CpuDevice, T, U> {
  using C = ComputeType<T>;

  // Every CPU path reads an element of x (dy) for the last time before it
  // writes the same element of y (dx), in the same thread: see
  // layer_norm_cpu_body.h.
  // Residual add + norm: s into x's buffer and y into residual's, dx into
  // dy's or dsum's: each element is read before the same element is written.
  static bool ForwardInPlaceSafe(bool, bool, const NormGeometry&) { return true; }
  static bool BackwardInPlaceSafe(bool, bool, const NormGeometry&) { return true; }

  static Status Forward(OpKernelContext* ctx, const char* op, bool rms, const NormGeometry& g,
                        const T* x, const T* residual, const U* gamma, const U* beta,
                        float epsilon, T* y, T* sum, C* mean, C* rstd) {
    return ToStatus(LayerNormForwardCpu<T, U>(g, x, gamma, beta, epsilon, y, mean, rstd,
                                              MakeParallelFor(ctx), rms, residual, sum),
                    op);
  }

  static Status Backward(OpKernelContext* ctx, const char* op, bool rms, const NormGeometry& g,
                         const T* dy, const T* dsum, const T* x, const U* gamma, const C* mean,
                         const C* rstd, T* dx, U* dgamma, U* dbeta) {
    const int64_t ws_size =
        LayerNormBackwardWorkspaceSize(g, dgamma != nullptr, dbeta != nullptr);
    Tensor workspace;
    if (ws_size > 0) {
      TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DataTypeToEnum<C>::value,
                                            TensorShape({ws_size}), &workspace));
    }
    return ToStatus(LayerNormBackwardCpu<T, U>(g, dy, x, gamma, mean, rstd, dx, dgamma, dbeta,
                                               ws_size > 0 ? workspace.flat<C>().data() : nullptr,
                                               MakeParallelFor(ctx), rms, dsum),
                    op);
  }
};

#if GOOGLE_CUDA
template <typename T>
struct GpuType;
template <>
struct GpuType<float> {
  static constexpr gpu::DType value = gpu::DType::kFloat32;
};
template <>
struct GpuType<double> {
  static constexpr gpu::DType value = gpu::DType::kFloat64;
};
template <>
struct GpuType<Eigen::half> {
  static constexpr gpu::DType value = gpu::DType::kFloat16;
};
template <>
struct GpuType<Eigen::bfloat16> {
  static constexpr gpu::DType value = gpu::DType::kBFloat16;
};

Status FromGpu(const gpu::Result& r, const char* op) {
  switch (r.status) {
    case gpu::Status::kOk:
      return Status();
    case gpu::Status::kInvalidArgument:
      return InvalidArgument(op, ": ", r.message);
    case gpu::Status::kCudaError:
      return tensorflow::errors::Internal(op, ": CUDA error ", r.cuda_error, " (", r.message,
                                          ")");
  }
  return tensorflow::errors::Internal(op, ": unknown CUDA kernel status");
}

gpu::Geometry ToGpu(const NormGeometry& g) {
  gpu::Geometry out;
  out.outer = g.outer;
  out.norm = g.norm;
  out.inner = g.inner;
  return out;
}

template <typename T, typename U>
struct Launch<GpuDevice, T, U> {
  using C = ComputeType<T>;

  static gpu::Stream StreamOf(OpKernelContext* ctx) {
    return reinterpret_cast<gpu::Stream>(ctx->eigen_device<GpuDevice>().stream());
  }

  // Residual add + norm: outputs never share an input's buffer on the GPU.
  static bool ForwardInPlaceSafe(bool rms, bool add, const NormGeometry& g) {
    if (add) return false;
    gpu::ForwardArgs a;
    a.rms = rms;
    a.x_type = GpuType<T>::value;
    a.param_type = GpuType<U>::value;
    a.geometry = ToGpu(g);
    return gpu::LayerNormForwardInPlaceSafe(a);
  }

  static bool BackwardInPlaceSafe(bool rms, bool add, const NormGeometry& g) {
    if (add) return false;
    gpu::BackwardArgs a;
    a.rms = rms;
    a.x_type = GpuType<T>::value;
    a.param_type = GpuType<U>::value;
    a.geometry = ToGpu(g);
    return gpu::LayerNormBackwardInPlaceSafe(a);
  }

  static Status Forward(OpKernelContext* ctx, const char* op, bool rms, const NormGeometry& g,
                        const T* x, const T* residual, const U* gamma, const U* beta,
                        float epsilon, T* y, T* sum, C* mean, C* rstd) {
    gpu::ForwardArgs a;
    a.rms = rms;
    a.x_type = GpuType<T>::value;
    a.param_type = GpuType<U>::value;
    a.geometry = ToGpu(g);
    a.x = x;
    a.gamma = gamma;
    a.beta = beta;
    a.epsilon = epsilon;
    a.y = y;
    a.mean = mean;
    a.rstd = rstd;
    a.residual = residual;
    a.sum = sum;
    return FromGpu(gpu::LayerNormForward(a, StreamOf(ctx)), op);
  }

  static Status Backward(OpKernelContext* ctx, const char* op, bool rms, const NormGeometry& g,
                         const T* dy, const T* dsum, const T* x, const U* gamma, const C* mean,
                         const C* rstd, T* dx, U* dgamma, U* dbeta) {
    gpu::BackwardArgs a;
    a.rms = rms;
    a.x_type = GpuType<T>::value;
    a.param_type = GpuType<U>::value;
    a.geometry = ToGpu(g);
    a.dy = dy;
    a.x = x;
    a.gamma = gamma;
    a.mean = mean;
    a.rstd = rstd;
    a.dx = dx;
    a.dgamma = dgamma;
    a.dbeta = dbeta;
    a.dsum = dsum;
    size_t bytes = 0;
    TF_RETURN_IF_ERROR(FromGpu(gpu::LayerNormBackwardWorkspaceBytes(a, &bytes), op));
    Tensor workspace;
    if (bytes > 0) {
      TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT8,
                                            TensorShape({static_cast<int64_t>(bytes)}),
                                            &workspace));
      a.workspace = workspace.flat<int8_t>().data();
      a.workspace_bytes = bytes;
    }
    return FromGpu(gpu::LayerNormBackward(a, StreamOf(ctx)), op);
  }
};
#endif  // GOOGLE_CUDA

const char* OpName(bool rms, bool add, bool grad) {
  static const char* const kNames[2][2][2] = {
      {{"LayerNorm", "LayerNormGrad"}, {"AddLayerNorm", "AddLayerNormGrad"}},
      {{"RMSNorm", "RMSNormGrad"}, {"AddRMSNorm", "AddRMSNormGrad"}}};
  return kNames[rms][add][grad];
}

// The forward ops. LayerNorm: (x, gamma, beta) -> (y, mean, rstd); RMSNorm
// (kRms): (x, gamma) -> (y, rstd), the same kernels with no mean and no beta.
// Residual add + norm (kAdd): residual follows x and sum follows y.
template <typename Device, typename T, typename U, bool kRms, bool kAdd>
class NormOp : public LayerNormBase {
  using C = ComputeType<T>;
  static constexpr int kGamma = kAdd ? 2 : 1;  // input index of gamma
  static constexpr int kStats = kAdd ? 2 : 1;  // output index of mean (rstd if kRms)

 public:
  explicit NormOp(OpKernelConstruction* ctx) : LayerNormBase(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES(ctx, std::isfinite(epsilon_) && epsilon_ >= 0.0f,
                InvalidArgument("epsilon must be finite and >= 0, got ", epsilon_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& gamma = ctx->input(kGamma);
    if (kAdd) {
      const Tensor& r = ctx->input(1);
      OP_REQUIRES(ctx, r.shape() == x.shape(),
                  InvalidArgument("residual has shape ", r.shape().DebugString(),
                                  " but x has shape ", x.shape().DebugString(),
                                  "; expected equal shapes"));
    }
    ResolvedAxes axes;
    OP_REQUIRES_OK(ctx, ResolveAxes(x.shape(), begin_norm_axis_, num_norm_axes_, &axes));
    OP_REQUIRES_OK(ctx, CheckParam("gamma", gamma, axes, x.shape(), scale_, "scale"));
    const U* beta = nullptr;
    if (!kRms) {
      const Tensor& b = ctx->input(kGamma + 1);
      OP_REQUIRES_OK(ctx, CheckParam("beta", b, axes, x.shape(), center_, "center"));
      if (center_) beta = b.flat<U>().data();
    }

    Tensor *y = nullptr, *sum = nullptr, *mean = nullptr, *rstd = nullptr;
    const bool in_place =
        Launch<Device, T, U>::ForwardInPlaceSafe(kRms, kAdd, axes.geometry);
    if (kAdd) {
      OP_REQUIRES_OK(ctx, ForwardOrAllocate(ctx, in_place, {/*x=*/0}, /*sum=*/1, &sum));
      OP_REQUIRES_OK(ctx, ForwardOrAllocate(ctx, in_place, {/*residual=*/1}, /*y=*/0, &y));
    } else {
      OP_REQUIRES_OK(ctx, ForwardOrAllocate(ctx, in_place, {/*x=*/0}, /*y=*/0, &y));
    }
    if (!kRms) OP_REQUIRES_OK(ctx, ctx->allocate_output(kStats, axes.stats_shape, &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(kRms ? kStats : kStats + 1, axes.stats_shape, &rstd));

    OP_REQUIRES_OK(ctx, (Launch<Device, T, U>::Forward(
                            ctx, OpName(kRms, kAdd, false), kRms, axes.geometry,
                            x.flat<T>().data(), kAdd ? ctx->input(1).flat<T>().data() : nullptr,
                            scale_ ? gamma.flat<U>().data() : nullptr, beta, epsilon_,
                            y->flat<T>().data(), kAdd ? sum->flat<T>().data() : nullptr,
                            kRms ? nullptr : mean->flat<C>().data(), rstd->flat<C>().data())));
  }

 private:
  float epsilon_ = 0.0f;
};

// The backward ops. LayerNormGrad: (dy, x, gamma, mean, rstd) -> (dx, dgamma,
// dbeta); RMSNormGrad (kRms): (dy, x, gamma, rstd) -> (dx, dgamma). Residual
// add + norm (kAdd): dsum (x's shape, or [0] for none) follows dy, and x is
// the forward's sum.
template <typename Device, typename T, typename U, bool kRms, bool kAdd>
class NormGradOp : public LayerNormBase {
  using C = ComputeType<T>;
  static constexpr int kX = kAdd ? 2 : 1;  // input index of x (sum)

 public:
  explicit NormGradOp(OpKernelConstruction* ctx) : LayerNormBase(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const char* x_name = kAdd ? "sum" : "x";
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(kX);
    const Tensor& gamma = ctx->input(kX + 1);
    const Tensor* mean = kRms ? nullptr : &ctx->input(kX + 2);
    const Tensor& rstd = ctx->input(kRms ? kX + 2 : kX + 3);
    OP_REQUIRES(ctx, dy.shape() == x.shape(),
                InvalidArgument("dy has shape ", dy.shape().DebugString(), " but ", x_name,
                                " has shape ", x.shape().DebugString(), "; expected equal shapes"));
    const T* dsum = nullptr;
    if (kAdd) {
      const Tensor& ds = ctx->input(1);
      const bool none = ds.dims() == 1 && ds.dim_size(0) == 0;
      OP_REQUIRES(ctx, none || ds.shape() == x.shape(),
                  InvalidArgument("dsum has shape ", ds.shape().DebugString(), ", expected ",
                                  x.shape().DebugString(),
                                  " (sum's shape) or [0] (no gradient reaches sum directly)"));
      if (!none) dsum = ds.flat<T>().data();
    }
    ResolvedAxes axes;
    OP_REQUIRES_OK(ctx, ResolveAxes(x.shape(), begin_norm_axis_, num_norm_axes_, &axes));
    OP_REQUIRES_OK(ctx, CheckParam("gamma", gamma, axes, x.shape(), scale_, "scale"));
    for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"mean", mean},
                                  std::pair<const char*, const Tensor*>{"rstd", &rstd}}) {
      if (t == nullptr) continue;
      OP_REQUIRES(ctx, t->shape() == axes.stats_shape,
                  InvalidArgument(name, " has shape ", t->shape().DebugString(), ", expected ",
                                  axes.stats_shape.DebugString(), " (", x_name,
                                  "'s shape with the normalized dims set to 1)"));
    }

    Tensor *dx = nullptr, *dgamma = nullptr, *dbeta = nullptr;
    const TensorShape empty({0});
    const bool in_place = Launch<Device, T, U>::BackwardInPlaceSafe(kRms, kAdd, axes.geometry);
    if (dsum != nullptr) {
      OP_REQUIRES_OK(ctx, ForwardOrAllocate(ctx, in_place, {/*dy=*/0, /*dsum=*/1}, 0, &dx));
    } else {
      OP_REQUIRES_OK(ctx, ForwardOrAllocate(ctx, in_place, {/*dy=*/0}, /*dx=*/0, &dx));
    }
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, scale_ ? axes.norm_shape : empty, &dgamma));
    if (!kRms) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(2, center_ ? axes.norm_shape : empty, &dbeta));
    }

    OP_REQUIRES_OK(ctx, (Launch<Device, T, U>::Backward(
                            ctx, OpName(kRms, kAdd, true), kRms, axes.geometry,
                            dy.flat<T>().data(), dsum, x.flat<T>().data(),
                            scale_ ? gamma.flat<U>().data() : nullptr,
                            kRms ? nullptr : mean->flat<C>().data(), rstd.flat<C>().data(),
                            dx->flat<T>().data(), scale_ ? dgamma->flat<U>().data() : nullptr,
                            center_ ? dbeta->flat<U>().data() : nullptr)));
  }
};

#define TFLN_REGISTER_OP(NAME, DEVICE, T, U, ...)                                  \
  REGISTER_KERNEL_BUILDER(Name(NAME)                                              \
                              .Device(DEVICE)                                     \
                              .TypeConstraint<T>("T")                             \
                              .TypeConstraint<U>("U")                             \
                              .TypeConstraint<ComputeType<T>>("S"),               \
                          __VA_ARGS__);

#define TFLN_REGISTER(DEVICE, DeviceType, T, U)                                                 \
  TFLN_REGISTER_OP("TfLayernorm>LayerNorm", DEVICE, T, U, NormOp<DeviceType, T, U, false, false>) \
  TFLN_REGISTER_OP("TfLayernorm>LayerNormGrad", DEVICE, T, U,                                   \
                   NormGradOp<DeviceType, T, U, false, false>)                                  \
  TFLN_REGISTER_OP("TfLayernorm>RMSNorm", DEVICE, T, U, NormOp<DeviceType, T, U, true, false>)   \
  TFLN_REGISTER_OP("TfLayernorm>RMSNormGrad", DEVICE, T, U,                                     \
                   NormGradOp<DeviceType, T, U, true, false>)                                   \
  TFLN_REGISTER_OP("TfLayernorm>AddLayerNorm", DEVICE, T, U,                                    \
                   NormOp<DeviceType, T, U, false, true>)                                       \
  TFLN_REGISTER_OP("TfLayernorm>AddLayerNormGrad", DEVICE, T, U,                                \
                   NormGradOp<DeviceType, T, U, false, true>)                                   \
  TFLN_REGISTER_OP("TfLayernorm>AddRMSNorm", DEVICE, T, U, NormOp<DeviceType, T, U, true, true>) \
  TFLN_REGISTER_OP("TfLayernorm>AddRMSNormGrad", DEVICE, T, U,                                  \
                   NormGradOp<DeviceType, T, U, true, true>)

// Same-dtype parameters, plus float32 parameters for half-precision x (the
// mixed-precision layout: float32 variables, float16/bfloat16 activations).
#define TFLN_REGISTER_ALL(DEVICE, DeviceType)                   \
  TFLN_REGISTER(DEVICE, DeviceType, Eigen::half, Eigen::half)         \
  TFLN_REGISTER(DEVICE, DeviceType, Eigen::half, float)               \
  TFLN_REGISTER(DEVICE, DeviceType, Eigen::bfloat16, Eigen::bfloat16) \
  TFLN_REGISTER(DEVICE, DeviceType, Eigen::bfloat16, float)           \
  TFLN_REGISTER(DEVICE, DeviceType, float, float)                     \
  TFLN_REGISTER(DEVICE, DeviceType, double, double)

TFLN_REGISTER_ALL(tensorflow::DEVICE_CPU, CpuDevice)
#if GOOGLE_CUDA
TFLN_REGISTER_ALL(tensorflow::DEVICE_GPU, GpuDevice)
#endif

#undef TFLN_REGISTER_ALL
#undef TFLN_REGISTER
#undef TFLN_REGISTER_OP

// Every other dtype combination gets a kernel that fails with a clear
// InvalidArgument naming the accepted ones. Without it an eager call (which
// runs no shape function) would end in a NotFoundError about kernels.
class UnsupportedTypesOp : public OpKernel {
 public:
  explicit UnsupportedTypesOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    tensorflow::DataType t, u, s;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &t));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("U", &u));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("S", &s));
    OP_REQUIRES_OK(ctx, CheckLayerNormTypes(t, u, s));
    ctx->CtxFailure(tensorflow::errors::Internal("unsupported dtype combination"));
  }
  void Compute(OpKernelContext*) override {}
};

OpKernel* CreateUnsupportedTypesOp(OpKernelConstruction* ctx) {
  return new UnsupportedTypesOp(ctx);
}

const bool kUnsupportedTypesRegistered = [] {
  const tensorflow::DataType kTypes[] = {tensorflow::DT_HALF, tensorflow::DT_BFLOAT16,
                                         tensorflow::DT_FLOAT, tensorflow::DT_DOUBLE};
  const tensorflow::DataType kStats[] = {tensorflow::DT_FLOAT, tensorflow::DT_DOUBLE};
  const char* kDevices[] = {
      tensorflow::DEVICE_CPU,
#if GOOGLE_CUDA
      tensorflow::DEVICE_GPU,
#endif
  };
  for (const char* device : kDevices) {
    for (const char* op : {"TfLayernorm>LayerNorm", "TfLayernorm>LayerNormGrad",
                           "TfLayernorm>RMSNorm", "TfLayernorm>RMSNormGrad",
                           "TfLayernorm>AddLayerNorm", "TfLayernorm>AddLayerNormGrad",
                           "TfLayernorm>AddRMSNorm", "TfLayernorm>AddRMSNormGrad"}) {
      for (auto t : kTypes) {
        for (auto u : kTypes) {
          for (auto s : kStats) {
            if (ValidLayerNormTypes(t, u, s)) continue;
            // Registrars live for the whole process, like REGISTER_KERNEL_BUILDER's statics.
            new tensorflow::kernel_factory::OpKernelRegistrar(
                tensorflow::KernelDefBuilder(op)
                    .Device(device)
                    .TypeConstraint("T", t)
                    .TypeConstraint("U", u)
                    .TypeConstraint("S", s)
                    .Build(),
                "UnsupportedTypesOp", CreateUnsupportedTypesOp);
          }
        }
      }
    }
  }
  return true;
}();

}  // namespace
}  // namespace tf_layernorm

// Test hook (a plain C symbol of the op library, read through ctypes): how
// many outputs so far were written into their input's forwarded buffer.
extern "C" int64_t tf_layernorm_forwarded_buffers() {
  return tf_layernorm::forwarded_buffers.load(std::memory_order_relaxed);
}
