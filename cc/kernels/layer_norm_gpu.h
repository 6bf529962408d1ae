// CUDA kernels for fused Layer Normalization: the launch API. Free of
// TensorFlow and of CUDA headers, so the TF binding (g++) and a TF-free test
// harness (nvcc + PyTorch) call the same entry points.
//
// Geometry, dtypes and semantics are those of the CPU kernels
// (layer_norm_cpu.h): x is [outer, D, inner], statistics are [outer, inner];
// gamma/beta == nullptr switch scale/offset off; D == 0 gives NaN statistics.
// x in {float32, float16, bfloat16, float64}; parameters of x's dtype, or
// float32 for float16/bfloat16 x; statistics float32 (float64 for float64).
//
// RMSNorm shares every kernel: with `rms` set, the mean is taken as 0 (y =
// x * rstd * gamma + beta, rstd = 1 / sqrt(mean(x^2) + epsilon); the ops pass
// no beta), mean may be null, and the backward drops the mean terms.
//
// The argument contract is the CPU kernels' (layer_norm_cpu.h): the same
// calls are accepted and refused by both.
//
// Aliasing: outputs must not overlap inputs or each other, except that y may
// be x's own buffer where LayerNormForwardInPlaceSafe() holds for the call,
// and dx dy's where LayerNormBackwardInPlaceSafe() does.
//
// Every call validates its arguments and returns a status; it never aborts.
// An error an earlier, unrelated CUDA runtime call left pending is cleared
// first (a sticky device error is not: it fails the call). Device properties
// and occupancies are queried once per device and cached. Work is enqueued
// on `stream`; nothing synchronizes the host.
#ifndef TF_LAYERNORM_CC_KERNELS_LAYER_NORM_GPU_H_
#define TF_LAYERNORM_CC_KERNELS_LAYER_NORM_GPU_H_

#include <cstddef>
#include <cstdint>

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace tf_layernorm {
namespace gpu {

using Stream = CUstream_st*;

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

enum class Status : int {
  kOk = 0,
  kInvalidArgument = 1,  // bad geometry, dtype combination, pointer or epsilon
  kCudaError = 2,        // a CUDA call failed; Result::message says which error
};

struct Result {
  Status status = Status::kOk;
  int cuda_error = 0;         // cudaError_t when status == kCudaError
  const char* message = "";  // static string, never freed
  bool ok() const { return status == Status::kOk; }
};

struct Geometry {
  int64_t outer = 0;
  int64_t norm = 0;  // D
  int64_t inner = 1;
};

struct ForwardArgs {
  DType x_type = DType::kFloat32;
  DType param_type = DType::kFloat32;
  Geometry geometry;
  const void* x = nullptr;
  const void* gamma = nullptr;  // nullptr: no scale
  const void* beta = nullptr;   // nullptr: no offset
  double epsilon = 1e-5;
  bool rms = false;  // RMSNorm: no mean subtraction
  void* y = nullptr;
  void* mean = nullptr;  // [outer, inner], float32 (float64 for float64 x); may be null if rms
  void* rstd = nullptr;
  // Residual add + norm: with `residual` set (x's dtype and shape), the
  // kernels normalize s = x + residual, rounded to x's dtype exactly as an
  // element-wise x + residual rounds there, and write s to `sum` (required
  // then, and refused without a residual; it must not overlap x, residual or
  // y, nor y x or residual: no in-place forward). x and residual are each
  // read once, s and y written once, in one kernel launch. mean/rstd/y are
  // those of LayerNorm(s), bitwise what a call on s without a residual gives.
  const void* residual = nullptr;
  void* sum = nullptr;
};

struct BackwardArgs {
  DType x_type = DType::kFloat32;
  DType param_type = DType::kFloat32;
  Geometry geometry;
  const void* dy = nullptr;
  const void* x = nullptr;
  const void* gamma = nullptr;  // nullptr: the forward had no scale
  bool rms = false;             // RMSNorm: mean is unused (may be null)
  const void* mean = nullptr;
  const void* rstd = nullptr;
  void* dx = nullptr;
  void* dgamma = nullptr;  // must be set exactly when gamma is (unless D == 0)
  void* dbeta = nullptr;   // nullptr: not wanted
  // Residual add + norm backward (x is then the forward's s): dx = the norm's
  // dx + dsum (the gradient reaching s directly), added in the compute type
  // and rounded once. nullptr: no such term (dsum known to be zero). Each
  // element of dsum is read by the thread that writes dx there, right before
  // it does: LayerNormBackwardInPlaceSafe() (dx with dy) is unchanged by it.
  const void* dsum = nullptr;
  void* workspace = nullptr;  // LayerNormBackwardWorkspaceBytes() bytes, 16-byte aligned
  size_t workspace_bytes = 0;
};

// y, mean, rstd = LayerNorm(x) over D.
Result LayerNormForward(const ForwardArgs& args, Stream stream);

// Scratch the backward needs for deterministic dgamma/dbeta partials and,
// for inner > 1 with D split across CTAs, per-chunk column sums, on the
// current CUDA device (it depends on the device's SM count, never on timing).
Result LayerNormBackwardWorkspaceBytes(const BackwardArgs& args, size_t* bytes);

// dx, dgamma, dbeta. dgamma/dbeta are reduced over outer and inner, and for
// inner > 1 dx's sums over D, in a fixed order: bitwise repeatable for a
// given device (SM count) and shape.
Result LayerNormBackward(const BackwardArgs& args, Stream stream);

// Whether the output may share the input's buffer (y with x, dx with dy), so
// the binding can hand TensorFlow's forwarded input buffer to the kernel.
// True only for kernel paths where every input element is read before any
// thread writes the output element at its index, with no later kernel
// reading the input. The forward with a residual: never (y overlaps nothing
// there). The forward's row paths: a row's threads read it (and
// its first element, the mean's shift) before the reductions that precede
// every write; the streaming path re-reads only elements the reading thread
// itself writes, later. The forward's column path: see the kernel. The
// backward's register path (rows read once into registers). Not the
// backward's streaming or column paths: the dgamma/dbeta kernels read dy
// after dx is written. Invalid arguments give false. The emulated harness
// (tests/gpu) runs every case in place where these say so.
bool LayerNormForwardInPlaceSafe(const ForwardArgs& args);
bool LayerNormBackwardInPlaceSafe(const BackwardArgs& args);

}  // namespace gpu
}  // namespace tf_layernorm

#endif  // TF_LAYERNORM_CC_KERNELS_LAYER_NORM_GPU_H_
