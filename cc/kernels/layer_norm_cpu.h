// CPU kernels for fused Layer Normalization. Free of TensorFlow: raw pointers,
// sizes and a parallel-for supplied by the caller (the TF binding passes the
// op's intra-op thread pool).
//
// The kernel bodies live in per-ISA translation units (baseline x86-64,
// AVX2+FMA+F16C, AVX-512 F/BW/VL/DQ), one of which is picked once, at first
// use, from CPUID; TF_LAYERNORM_CPU_ISA=baseline|avx2|avx512 forces one (a
// forced ISA the CPU lacks falls back to the best it has). This header and
// layer_norm_cpu.cc (the driver: partitioning, dispatch, block plan) are
// compiled for baseline x86-64. float16/bfloat16 reach the kernels as raw
// 16-bit patterns and are widened to float in registers.
//
// Geometry: x is viewed as [outer, D, inner]. D is the product of the
// normalized dims, inner the product of the dims after them. Statistics
// (mean, rstd) have outer * inner entries, laid out [outer, inner].
//
// Numerics: statistics in ComputeType<T> (float, or double for double), two
// passes over each row while it is in cache (shifted mean, then sum of
// squared deviations): never E[x^2] - E[x]^2.
//
// Determinism: the forward is per row and independent of the partition. The
// backward reduces dgamma/dbeta through per-block partials where the blocks
// are a function of the shape only (never of the thread count), summed in a
// fixed order, so results are bitwise repeatable for a given ISA.
#ifndef TF_LAYERNORM_CC_KERNELS_LAYER_NORM_CPU_H_
#define TF_LAYERNORM_CC_KERNELS_LAYER_NORM_CPU_H_

#include <cstdint>
#include <functional>

// Only named, never used, here: the binding's element types map to the
// kernels' dtype tags (see CpuDTypeOf) without this header including Eigen.
namespace Eigen {
struct half;
struct bfloat16;
}  // namespace Eigen

namespace tf_layernorm {

// fp32 accumulation for every storage type but double.
template <typename T>
struct ComputeTypeOf {
  using type = float;
};
template <>
struct ComputeTypeOf<double> {
  using type = double;
};
template <typename T>
using ComputeType = typename ComputeTypeOf<T>::type;

struct NormGeometry {
  int64_t outer = 0;
  int64_t norm = 0;   // D
  int64_t inner = 1;
  int64_t num_stats() const { return outer * inner; }
  int64_t num_elements() const { return outer * norm * inner; }
};

// Runs fn(begin, end) over disjoint ranges covering [0, num_units). The
// partition may be anything: the kernels never let results depend on it.
using ParallelFor = std::function<void(int64_t num_units, int64_t cost_per_unit,
                                       const std::function<void(int64_t, int64_t)>& fn)>;

enum class KernelStatus { kOk = 0, kInvalidGeometry = 1, kNullPointer = 2, kUnsupportedTypes = 3 };

// Element types of x and of gamma/beta, as the kernels see them.
enum class CpuDType { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

template <typename T>
struct CpuDTypeOf;
template <>
struct CpuDTypeOf<float> {
  static constexpr CpuDType value = CpuDType::kF32;
};
template <>
struct CpuDTypeOf<double> {
  static constexpr CpuDType value = CpuDType::kF64;
};
template <>
struct CpuDTypeOf<Eigen::half> {
  static constexpr CpuDType value = CpuDType::kF16;
};
template <>
struct CpuDTypeOf<Eigen::bfloat16> {
  static constexpr CpuDType value = CpuDType::kBF16;
};

// The ISA whose kernels run ("baseline", "avx2" or "avx512").
const char* LayerNormCpuIsa();

// Elements of ComputeType<T> the backward needs as scratch (dgamma/dbeta
// partials). Zero when neither parameter gradient is wanted.
int64_t LayerNormBackwardWorkspaceSize(const NormGeometry& g, bool scale, bool center);

// Type-erased entry points (layer_norm_cpu.cc); the templates below call them.
// x/y/dy/dx are x_type, gamma/beta/dgamma/dbeta param_type, mean/rstd/
// workspace float (double when x_type is kF64).
KernelStatus LayerNormForwardCpu(const NormGeometry& g, CpuDType x_type, CpuDType param_type,
                                 const void* x, const void* gamma, const void* beta,
                                 double epsilon, void* y, void* mean, void* rstd,
                                 const ParallelFor& parallel_for, bool rms = false,
                                 const void* residual = nullptr, void* sum = nullptr);
KernelStatus LayerNormBackwardCpu(const NormGeometry& g, CpuDType x_type, CpuDType param_type,
                                  const void* dy, const void* x, const void* gamma,
                                  const void* mean, const void* rstd, void* dx, void* dgamma,
                                  void* dbeta, void* workspace, const ParallelFor& parallel_for,
                                  bool rms = false, const void* dsum = nullptr);

// y = (x - mean) * rstd * gamma + beta over the D axis of [outer, D, inner].
// gamma == nullptr: no scale; beta == nullptr: no offset. D == 0 gives NaN
// statistics (the mean of nothing is undefined) and an empty y.
// rms: RMSNorm, y = x * rstd * gamma (+ beta) with rstd = 1 / sqrt(mean(x^2)
// + epsilon); the mean is not computed and `mean` may be nullptr.
// residual (x's type and geometry): residual add + norm. The kernel
// normalizes s = x + residual, rounded to T exactly as an element-wise add in
// T rounds, and writes s to `sum` (required then). x and residual are read
// once. sum may be x's buffer and y residual's; nothing else may overlap.
template <typename T, typename U>
KernelStatus LayerNormForwardCpu(const NormGeometry& g, const T* x, const U* gamma, const U* beta,
                                 double epsilon, T* y, ComputeType<T>* mean,
                                 ComputeType<T>* rstd, const ParallelFor& parallel_for,
                                 bool rms = false, const T* residual = nullptr,
                                 T* sum = nullptr) {
  return LayerNormForwardCpu(g, CpuDTypeOf<T>::value, CpuDTypeOf<U>::value, x, gamma, beta,
                             epsilon, y, mean, rstd, parallel_for, rms, residual, sum);
}

// dx, and dgamma/dbeta summed over outer and inner. dgamma/dbeta may be
// nullptr when not wanted (then gamma == nullptr means "no scale" as in the
// forward). workspace: LayerNormBackwardWorkspaceSize(g, ...) elements.
// rms: the RMSNorm backward (mean unused, may be nullptr).
// dsum: residual add + norm (x is then the forward's s): dx += dsum, the
// gradient reaching s directly, before dx is rounded. nullptr: none.
template <typename T, typename U>
KernelStatus LayerNormBackwardCpu(const NormGeometry& g, const T* dy, const T* x, const U* gamma,
                                  const ComputeType<T>* mean, const ComputeType<T>* rstd, T* dx,
                                  U* dgamma, U* dbeta, ComputeType<T>* workspace,
                                  const ParallelFor& parallel_for, bool rms = false,
                                  const T* dsum = nullptr) {
  return LayerNormBackwardCpu(g, CpuDTypeOf<T>::value, CpuDTypeOf<U>::value, dy, x, gamma, mean,
                              rstd, dx, dgamma, dbeta, workspace, parallel_for, rms, dsum);
}

}  // namespace tf_layernorm

#endif  // TF_LAYERNORM_CC_KERNELS_LAYER_NORM_CPU_H_
