// The interface between the CPU driver (layer_norm_cpu.cc, baseline x86-64)
// and the per-ISA kernel translation units (layer_norm_cpu_{baseline,avx2,
// avx512}.cc, each compiled with its own -m flags).
//
// ODR rule for this file: it is included by TUs compiled with different -m
// flags, so it declares only plain data (structs without member functions,
// enums, constants) and function declarations. An inline function here would
// be emitted by every TU and the linker would keep any one copy, e.g. an
// AVX-512 one for a baseline caller (SIGILL on older CPUs). The ISA TUs put
// all their code in an anonymous namespace inside a per-ISA namespace, call
// no std:: inline functions, and see half/bfloat16 only as raw uint16 bits.
#ifndef TF_LAYERNORM_CC_KERNELS_LAYER_NORM_CPU_ISA_H_
#define TF_LAYERNORM_CC_KERNELS_LAYER_NORM_CPU_ISA_H_

#include <cstdint>

namespace tf_layernorm {
namespace cpu {

// Storage types. F16/BF16 hold the raw bits of an IEEE binary16 / bfloat16
// (same layout as Eigen::half / Eigen::bfloat16: one uint16_t).
struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3, kNumDTypes = 4 };

// (x storage, gamma/beta storage) pairs the float-compute kernels cover.
// float64 x (double compute, float64 parameters) has its own entry.
enum TypePair : int {
  kPairF32 = 0,      // x f32,  params f32
  kPairF16 = 1,      // x f16,  params f16
  kPairF16F32 = 2,   // x f16,  params f32
  kPairBF16 = 3,     // x bf16, params bf16
  kPairBF16F32 = 4,  // x bf16, params f32
  kPairF64 = 5,      // x f64,  params f64 (double compute)
  kNumPairs = 6,
};

// Index of the (scale, center) variant: 2 * scale + center.
constexpr int kNumAffine = 4;

// Everything a forward range needs. mean/rstd are float (double for kPairF64).
struct ForwardArgs {
  int64_t norm;   // D
  int64_t inner;  // columns after the normalized dims (1: contiguous rows)
  int64_t chunk;  // inner > 1: columns per work unit
  int64_t chunks; // inner > 1: units per outer index
  const void* x;
  const void* gamma;  // nullptr without scale
  const void* beta;   // nullptr without center
  double epsilon;
  void* y;
  void* mean;  // nullptr for RMSNorm
  void* rstd;
  // RMSNorm: no centering (the mean is taken as 0 and not stored).
  bool rms;
  // Write y with non-temporal stores: set by the driver only when every row
  // of y starts 64-byte aligned, D fills whole vectors, and y is too large
  // to still be in cache when the next op reads it.
  bool stream;
  // Residual add + norm: with residual set (x's storage type), the row (or
  // column chunk) is first summed, s = x + residual rounded to the storage
  // type, into `sum`, and the passes then read s (from cache). sum may be
  // x's buffer and y residual's: each element of x and residual is read
  // before the same element of s or y is written. nullptr: plain norm.
  const void* residual;
  void* sum;
  // Write s with non-temporal stores (as `stream`, for s's buffer); the
  // passes then read the row from a cache of its values, never s.
  bool stream_sum;
};

// Everything a backward block needs. Partials: per block, kPartialLevels
// buffers of D compute-type elements per wanted parameter (see the driver).
struct BackwardArgs {
  int64_t norm;
  int64_t inner;
  int64_t chunk;
  int64_t chunks;
  int64_t units;            // rows (inner == 1) or (outer, chunk) pairs
  int64_t units_per_block;
  const void* dy;
  const void* x;
  const void* gamma;  // nullptr without scale
  const void* mean;  // nullptr for RMSNorm
  const void* rstd;
  bool rms;          // RMSNorm: mean 0, and no mean(g) term in dx
  void* dx;
  void* part_g;  // [blocks][2][D] or nullptr when dgamma is not wanted
  void* part_b;  // [blocks][2][D] or nullptr when dbeta is not wanted
  bool stream;   // dx with non-temporal stores (as ForwardArgs::stream)
  // Residual add + norm: dx += dsum (the gradient reaching s directly), in
  // the compute type before dx is rounded. nullptr: no such term.
  const void* dsum;
};

// Sums the block partials (level 0 of each block) in a fixed pairwise order
// and narrows to the parameter dtype.
struct FinalizeArgs {
  int64_t norm;
  int64_t blocks;
  const void* part_g;
  const void* part_b;
  void* dgamma;
  void* dbeta;
};

using ForwardFn = void (*)(const ForwardArgs&, int64_t unit_begin, int64_t unit_end);
using BackwardFn = void (*)(const BackwardArgs&, int64_t block);
using FinalizeFn = void (*)(const FinalizeArgs&, int64_t col_begin, int64_t col_end);
// Element-wise conversions, exposed for the exhaustive conversion tests.
using ConvertFn = void (*)(const void* in, void* out, int64_t n);

enum ConvertOp : int {
  kF16ToF32 = 0,
  kF32ToF16 = 1,
  kBF16ToF32 = 2,
  kF32ToBF16 = 3,
  kNumConvertOps = 4,
};

// One ISA's kernels. Entries are nullptr where an ISA leaves a case to the
// baseline (float64).
struct IsaKernels {
  const char* name;
  ForwardFn forward_rows[kNumPairs][kNumAffine];
  ForwardFn forward_columns[kNumPairs][kNumAffine];
  BackwardFn backward_rows[kNumPairs][kNumAffine];
  BackwardFn backward_columns[kNumPairs][kNumAffine];
  // Indexed by the parameter dtype of the pair and (dgamma wanted, dbeta wanted).
  FinalizeFn finalize[kNumPairs][kNumAffine];
  ConvertFn convert[kNumConvertOps];
};

// Levels of the backward's per-block partial sums: level 1 collects
// kCascadeRows rows, then is added to level 0 (the block's sum). Two short
// chains instead of one long one: the rounding error of a dgamma/dbeta sum
// over m rows grows like m / kCascadeRows + kCascadeRows, not like m.
constexpr int64_t kPartialLevels = 2;
constexpr int64_t kCascadeRows = 32;

// Defined by each ISA TU. Only call one whose instructions the CPU has.
const IsaKernels* BaselineKernels();
const IsaKernels* Avx2Kernels();
const IsaKernels* Avx512Kernels();

}  // namespace cpu
}  // namespace tf_layernorm

#endif  // TF_LAYERNORM_CC_KERNELS_LAYER_NORM_CPU_ISA_H_
