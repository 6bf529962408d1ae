// C ABI over the CUDA launch API (cc/kernels/layer_norm_gpu.h) for the
// TF-free harness: Python calls it with ctypes on PyTorch CUDA tensors.
// Each call returns the Status as an int and, when not ok, a static message.
#include <cstddef>
#include <cstdint>

#include "cc/kernels/layer_norm_gpu.h"

namespace gpu = tf_layernorm::gpu;

namespace {

int Report(const gpu::Result& r, const char** message) {
  if (message != nullptr) *message = r.message;
  return static_cast<int>(r.status);
}

gpu::Geometry MakeGeometry(int64_t outer, int64_t norm, int64_t inner) {
  gpu::Geometry g;
  g.outer = outer;
  g.norm = norm;
  g.inner = inner;
  return g;
}

gpu::BackwardArgs MakeBackwardArgs(int x_type, int param_type, int64_t outer, int64_t norm,
                                   int64_t inner, int rms, const void* dy, const void* x,
                                   const void* gamma, const void* mean, const void* rstd,
                                   void* dx, void* dgamma, void* dbeta, const void* dsum,
                                   void* workspace, size_t workspace_bytes) {
  gpu::BackwardArgs a;
  a.x_type = static_cast<gpu::DType>(x_type);
  a.param_type = static_cast<gpu::DType>(param_type);
  a.geometry = MakeGeometry(outer, norm, inner);
  a.rms = rms != 0;
  a.dy = dy;
  a.x = x;
  a.gamma = gamma;
  a.mean = mean;
  a.rstd = rstd;
  a.dx = dx;
  a.dgamma = dgamma;
  a.dbeta = dbeta;
  a.dsum = dsum;
  a.workspace = workspace;
  a.workspace_bytes = workspace_bytes;
  return a;
}

}  // namespace

extern "C" {

// residual/sum: the fused residual add (both null: none).
int tfln_forward(int x_type, int param_type, int64_t outer, int64_t norm, int64_t inner,
                 int rms, const void* x, const void* gamma, const void* beta, double epsilon, void* y,
                 void* mean, void* rstd, const void* residual, void* sum, void* stream,
                 const char** message) {
  gpu::ForwardArgs a;
  a.x_type = static_cast<gpu::DType>(x_type);
  a.param_type = static_cast<gpu::DType>(param_type);
  a.geometry = MakeGeometry(outer, norm, inner);
  a.rms = rms != 0;
  a.x = x;
  a.gamma = gamma;
  a.beta = beta;
  a.epsilon = epsilon;
  a.y = y;
  a.mean = mean;
  a.rstd = rstd;
  a.residual = residual;
  a.sum = sum;
  return Report(gpu::LayerNormForward(a, static_cast<gpu::Stream>(stream)), message);
}

int tfln_backward_workspace(int x_type, int param_type, int64_t outer, int64_t norm,
                            int64_t inner, int rms, const void* gamma, void* dgamma, void* dbeta,
                            size_t* bytes, const char** message) {
  // Only the geometry, dtypes and which outputs are wanted shape the plan.
  const gpu::BackwardArgs a = MakeBackwardArgs(x_type, param_type, outer, norm, inner, rms,
                                               nullptr, nullptr, gamma, nullptr, nullptr, nullptr, dgamma,
                                               dbeta, nullptr, nullptr, 0);
  return Report(gpu::LayerNormBackwardWorkspaceBytes(a, bytes), message);
}

// dsum: the residual add's gradient term (null: none).
int tfln_backward(int x_type, int param_type, int64_t outer, int64_t norm, int64_t inner,
                  int rms, const void* dy, const void* x, const void* gamma, const void* mean,
                  const void* rstd, void* dx, void* dgamma, void* dbeta, const void* dsum,
                  void* workspace, size_t workspace_bytes, void* stream, const char** message) {
  const gpu::BackwardArgs a =
      MakeBackwardArgs(x_type, param_type, outer, norm, inner, rms, dy, x, gamma, mean, rstd, dx,
                       dgamma, dbeta, dsum, workspace, workspace_bytes);
  return Report(gpu::LayerNormBackward(a, static_cast<gpu::Stream>(stream)), message);
}

// Whether the launch API allows y == x / dx == dy for these arguments;
// `residual`: with the residual add (forward) / a dsum term (backward), as
// marker pointers (only whether they are set matters).
int tfln_forward_in_place_safe(int x_type, int param_type, int64_t outer, int64_t norm,
                               int64_t inner, int rms, int residual) {
  static char marker[16];
  gpu::ForwardArgs a;
  a.x_type = static_cast<gpu::DType>(x_type);
  a.param_type = static_cast<gpu::DType>(param_type);
  a.geometry = MakeGeometry(outer, norm, inner);
  a.rms = rms != 0;
  if (residual != 0) {
    a.residual = marker;
    a.sum = marker;
  }
  return gpu::LayerNormForwardInPlaceSafe(a) ? 1 : 0;
}

int tfln_backward_in_place_safe(int x_type, int param_type, int64_t outer, int64_t norm,
                                int64_t inner, int rms, int dsum) {
  static char marker[16];
  const gpu::BackwardArgs a = MakeBackwardArgs(x_type, param_type, outer, norm, inner, rms,
                                               nullptr, nullptr, nullptr, nullptr, nullptr,
                                               nullptr, nullptr, nullptr,
                                               dsum != 0 ? marker : nullptr, nullptr, 0);
  return gpu::LayerNormBackwardInPlaceSafe(a) ? 1 : 0;
}

}  // extern "C"
