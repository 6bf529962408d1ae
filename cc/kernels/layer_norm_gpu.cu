// CUDA kernels for fused Layer Normalization (see layer_norm_gpu.h for the
// contract). No TensorFlow here: raw pointers, sizes, a stream, a status.
//
// Paths, chosen per call from D and the layout:
//   rows (inner == 1), D small enough for registers:
//     one row per group of `tpr` threads (1..32 lanes of a warp, or a whole
//     CTA of up to 1024 threads); the row is read once into registers, the
//     statistics are two exact passes over those registers, y is written
//     from them. Backward likewise reads x and dy once, and accumulates the
//     dgamma/dbeta contribution of every row the CTA visits in registers
//     (the CTA's columns never change along its persistent row loop).
//   rows, D too large for registers ("streaming"): one CTA per row, three
//     passes over the row (sum, squared deviations, output); the 2nd and 3rd
//     reads of a row mostly hit L2. Any D that fits int64 works.
//   inner > 1 (normalizing a middle axis, e.g. channels of NCHW): one thread
//     per (outer, inner) column walking D with stride `inner`, so a warp's
//     accesses are contiguous along inner; no transposes.
// dgamma/dbeta: fp32 partials [parts, D] written by a fixed set of CTAs (a
// function of the device's SM count and the shape only), then summed by a
// finalize kernel in partial order: deterministic, no atomics.
#include "cc/kernels/layer_norm_gpu.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>

namespace tf_layernorm {
namespace gpu {
namespace {

// ---------------------------------------------------------------------------
// Tuning constants

// One 16-byte access per vector: the widest load every supported GPU issues
// as a single instruction.
constexpr int kVecBytes = 16;
constexpr int kWarp = 32;
constexpr int kMaxThreadsPerBlock = 1024;
// 32-bit registers of row data one thread holds: forward keeps x, backward
// keeps x, dy and two dgamma/dbeta accumulators per element (4 arrays of 16).
// Both stay spill-free within the 128 registers per thread that a CTA of
// kMaxThreadsPerRow allows (ptxas --resource-usage).
constexpr int kForwardRowRegs = 32;
constexpr int kBackwardRowRegs = 16;
// Largest CTA of the register kernels. Rows wider than kMaxThreadsPerRow x
// the per-thread elements take the streaming path: D > 16384 in the forward
// (32 elements per thread), D > 8192 in the backward (16), for every dtype
// but float64 (half of that).
constexpr int kMaxThreadsPerRow = 512;
// Largest template vectors-per-thread; each value is one instantiation.
constexpr int kMaxVpt = 8;
// CTA of the sub-warp / warp per row kernels: 4 warps keep enough CTAs per SM
// resident for latency hiding while the per-CTA partial reduction stays small.
constexpr int kSmallRowsBlock = 128;
// CTA of the streaming (one row per CTA) kernels: 16 warps of loads in flight.
constexpr int kStreamBlock = 512;
// CTA of the column (inner > 1) kernels and of the per-column reductions.
constexpr int kColumnBlock = 256;
// Tiles of the dgamma/dbeta reductions over rows: a warp reads 32 adjacent
// columns (coalesced); 8 warps walk the rows.
constexpr int kTileCols = 32;
constexpr int kTileRows = 8;
// Enough CTAs in the reductions over rows to fill every SM a few times.
constexpr int kReduceCtasPerSm = 4;

// ---------------------------------------------------------------------------
// Types

template <typename T>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};
template <typename T>
using ComputeT = typename ComputeOf<T>::type;

template <typename T>
constexpr int kVecWidth = kVecBytes / static_cast<int>(sizeof(T));

// Vectors of kVecWidth<T> per thread that fit `regs` 32-bit registers.
template <typename T, int kRegs>
constexpr int MaxVpt() {
  constexpr int elems = kRegs / static_cast<int>(sizeof(ComputeT<T>) / 4);
  constexpr int vpt = elems / kVecWidth<T>;
  return vpt < 1 ? 1 : (vpt > kMaxVpt ? kMaxVpt : vpt);
}

// Storage <-> compute conversions (round to nearest even when narrowing).
template <typename T>
struct Convert {
  static __device__ __forceinline__ ComputeT<T> Widen(T v) { return static_cast<ComputeT<T>>(v); }
  template <typename C>
  static __device__ __forceinline__ T Narrow(C v) {
    return static_cast<T>(v);
  }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ float Widen(__half v) { return __half2float(v); }
  template <typename C>
  static __device__ __forceinline__ __half Narrow(C v) {
    return __float2half_rn(static_cast<float>(v));
  }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float Widen(__nv_bfloat16 v) { return __bfloat162float(v); }
  template <typename C>
  static __device__ __forceinline__ __nv_bfloat16 Narrow(C v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
bool PackAligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Pack<T, N>) == 0;
}

template <typename C>
__device__ __forceinline__ C InvSqrt(C v) {
  // Correctly rounded sqrt and division (not rsqrtf's approximation): the same
  // rstd as the CPU kernels and PyTorch up to one rounding.
  return C(1) / sqrt(v);
}

// ---------------------------------------------------------------------------
// Vector access with an aligned fast path (`vec`: pointers aligned to a pack
// and D a multiple of N) and an element-wise path with a tail mask otherwise.
// Out-of-row elements read as `fill`.

template <int N, typename T, typename C>
__device__ __forceinline__ void LoadVec(const T* __restrict__ row, int64_t col, int64_t d,
                                        bool vec, C (&out)[N], C fill = C(0)) {
  if (row == nullptr) {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = fill;
  } else if (vec) {
    if (col < d) {
      const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(row + col);
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = static_cast<C>(Convert<T>::Widen(pk.v[j]));
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = fill;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      out[j] = col + j < d ? static_cast<C>(Convert<T>::Widen(row[col + j])) : fill;
    }
  }
}

template <int N, typename T, typename C>
__device__ __forceinline__ void StoreVec(T* __restrict__ row, int64_t col, int64_t d, bool vec,
                                         const C (&in)[N]) {
  if (vec) {
    if (col < d) {
      Pack<T, N> pk;
#pragma unroll
      for (int j = 0; j < N; ++j) pk.v[j] = Convert<T>::Narrow(in[j]);
      *reinterpret_cast<Pack<T, N>*>(row + col) = pk;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (col + j < d) row[col + j] = Convert<T>::Narrow(in[j]);
    }
  }
}

// ---------------------------------------------------------------------------
// Reductions. Every thread of a row group ends with the same bits: a xor
// butterfly adds the same two operands on both sides (a + b == b + a), and the
// cross-warp step sums the warps in a fixed order.

template <typename C, int K>
__device__ __forceinline__ void WarpAllReduce(C (&v)[K], int width) {
  for (int offset = (width < kWarp ? width : kWarp) / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
}

// Sum over the `tpr` threads of a row. tpr is a power of two <= 32 (several
// rows per warp) or the whole CTA (one row per CTA). `smem` alternates
// between two buffers so one barrier per reduction suffices: a buffer is
// rewritten only after the barrier of the next reduction, which every thread
// reaches after it has read the buffer.
template <typename C, int K, int KS>
__device__ __forceinline__ void RowAllReduce(C (&v)[K], int tpr, C (*smem)[kWarp][KS],
                                             int& parity) {
  static_assert(K <= KS, "shared slots for every value reduced");
  WarpAllReduce(v, tpr);
  if (tpr <= kWarp) return;
  C(*buf)[KS] = smem[parity];
  parity ^= 1;
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) buf[warp][k] = v[k];
  }
  __syncthreads();
  const int warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    C s = 0;
    for (int w = 0; w < warps; ++w) s += buf[w][k];
    v[k] = s;
  }
}

// Fixed-tree sum over a CTA of kColumnBlock threads; the result is in red[0].
template <typename C>
__device__ __forceinline__ void BlockTreeReduce(C* red) {
  __syncthreads();
  for (int s = kColumnBlock / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Forward kernels

template <typename T, typename U>
struct ForwardParams {
  using C = ComputeT<T>;
  const T* x;
  const U* gamma;  // nullptr: no scale
  const U* beta;   // nullptr: no offset
  T* y;
  C* mean;  // nullptr when rms
  C* rstd;
  bool rms;       // RMSNorm: the mean is 0 by definition
  int64_t rows;   // outer * inner
  int64_t d;
  int64_t inner;
  C eps;
  C inv_d;
};

// Rows whose values are finite but whose squares leave float's range
// (|x - mean| ~ 1e20 and up overflows the sum of squares: rstd 0, y 0; with
// epsilon ~ 0, spreads ~ 1e-20 and below underflow it: rstd inf) have an
// ordinary exact result. They are recognized from the float statistics (mean
// finite, rstd in (0, 1e15)) at no cost to other rows, and recomputed in
// double, which holds the square of every float, by the row's own threads
// together. Rows holding an Inf or NaN are not recomputed: their statistics
// are NaN/Inf either way, as the CPU kernels give.
template <typename C>
__device__ __forceinline__ bool NeedsWideStats(C mean, C rstd) {
  if (sizeof(C) != sizeof(float)) return false;  // double statistics have the range
  return !(mean - mean == C(0) && rstd > C(0) && rstd < C(1e15));
}

// The shift of a row's mean: its first element, or 0 when that is not finite
// (then the row's statistics are NaN/Inf anyway, and an unshifted sum gives
// the same Inf mean as PyTorch).
template <typename C>
__device__ __forceinline__ C MeanShift(C first) {
  return first - first == C(0) ? first : C(0);
}

template <typename C>
struct RowStats {
  C mean;
  C rstd;
};

template <typename C>
__device__ __forceinline__ RowStats<C> FinishWideStats(double mean, double sq, int64_t d,
                                                       C eps) {
  return {static_cast<C>(mean),
          static_cast<C>(1.0 / sqrt(sq / static_cast<double>(d) + static_cast<double>(eps)))};
}

// Double statistics of a row held in registers (v, as the register kernels
// load it), reduced over the row's tpr threads like the float ones. Every
// thread of the row group calls it (warp- or CTA-uniform branch).
template <typename C, int kVpt, int N>
__device__ __forceinline__ RowStats<C> WideStatsRegisters(const C (&v)[kVpt][N], int lane,
                                                          int tpr, int64_t d, bool rms, C eps,
                                                          double (*smem)[kWarp][1],
                                                          int& parity) {
  double s[1] = {0.0};
  if (!rms) {
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * tpr + lane) * N;
#pragma unroll
      for (int j = 0; j < N; ++j) s[0] += col + j < d ? static_cast<double>(v[k][j]) : 0.0;
    }
    RowAllReduce(s, tpr, smem, parity);
  }
  const double mu = rms || d == 0 ? 0.0 : s[0] / static_cast<double>(d);
  double q[1] = {0.0};
#pragma unroll
  for (int k = 0; k < kVpt; ++k) {
    const int64_t col = (static_cast<int64_t>(k) * tpr + lane) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const double dev = static_cast<double>(v[k][j]) - mu;
      q[0] += col + j < d ? dev * dev : 0.0;
    }
  }
  RowAllReduce(q, tpr, smem, parity);
  return FinishWideStats(mu, q[0], d > 0 ? d : 1, eps);
}

// The same for a row in global memory, read by the CTA's threads with the
// streaming kernels' stride (one row per CTA: a CTA-uniform branch).
template <typename T, typename C>
__device__ __forceinline__ RowStats<C> WideStatsStreaming(const T* xr, int64_t d, bool rms,
                                                          C eps, double (*smem)[kWarp][1],
                                                          int& parity) {
  const int tpr = blockDim.x;
  double s[1] = {0.0};
  if (!rms) {
    for (int64_t col = threadIdx.x; col < d; col += tpr) {
      s[0] += static_cast<double>(Convert<T>::Widen(xr[col]));
    }
    RowAllReduce(s, tpr, smem, parity);
  }
  const double mu = rms ? 0.0 : s[0] / static_cast<double>(d);
  double q[1] = {0.0};
  for (int64_t col = threadIdx.x; col < d; col += tpr) {
    const double dev = static_cast<double>(Convert<T>::Widen(xr[col])) - mu;
    q[0] += dev * dev;
  }
  RowAllReduce(q, tpr, smem, parity);
  return FinishWideStats(mu, q[0], d, eps);
}

// Mean and rstd of x[0], x[stride], ... x[(d - 1) * stride] in double, by one
// thread (the column kernels, where a thread owns a column).
template <typename T, typename C>
__device__ __forceinline__ RowStats<C> WideStats(const T* x, int64_t d, int64_t stride, bool rms,
                                                 C eps) {
  double mu = 0;
  if (!rms) {
    double sum = 0;
    for (int64_t k = 0; k < d; ++k) sum += static_cast<double>(Convert<T>::Widen(x[k * stride]));
    mu = sum / static_cast<double>(d);
  }
  double sq = 0;
  for (int64_t k = 0; k < d; ++k) {
    const double dev = static_cast<double>(Convert<T>::Widen(x[k * stride])) - mu;
    sq += dev * dev;
  }
  return FinishWideStats(mu, sq, d, eps);
}

// Row in registers; kVpt vectors of kVecWidth<T> elements per thread. The
// mean is shifted by the row's first element (x - x[0] summed, as the CPU
// kernels do): rows far from 0 relative to their spread keep their bits.
template <typename T, typename U, int kVpt>
__global__ void __launch_bounds__(kMaxThreadsPerRow)
    ForwardRegistersKernel(ForwardParams<T, U> p, int tpr, bool vec) {
  using C = ComputeT<T>;
  constexpr int N = kVecWidth<T>;
  __shared__ C smem[2][kWarp][2];
  __shared__ double wide_smem[2][kWarp][1];
  int parity = 0, wide_parity = 0;
  const int lane = threadIdx.x % tpr;
  const int rows_per_cta = blockDim.x / tpr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_cta;
  // Every thread runs the same trip count (barriers inside); idle rows read
  // zeros and write nothing.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_cta; base < p.rows;
       base += stride) {
    const int64_t row = base + threadIdx.x / tpr;
    const bool active = row < p.rows;
    const int64_t d = active ? p.d : 0;
    const T* xr = p.x + (active ? row : 0) * p.d;
    const C shift = active && !p.rms ? MeanShift(Convert<T>::Widen(xr[0])) : C(0);
    C v[kVpt][N];
    C sum[1] = {C(0)};
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * tpr + lane) * N;
      LoadVec<N>(xr, col, d, vec, v[k]);
#pragma unroll
      for (int j = 0; j < N; ++j) sum[0] += col + j < d ? v[k][j] - shift : C(0);
    }
    if (!p.rms) RowAllReduce(sum, tpr, smem, parity);  // uniform branch
    // Deviations are taken as (x - shift) - (mean - shift): exact to the
    // last bits of the spread, however the mean itself rounds.
    const C mean_shifted = p.rms ? C(0) : sum[0] * p.inv_d;
    C mean = shift + mean_shifted;
    // sq[1] sums x - x: 0 for a row of finite values, NaN otherwise.
    C sq[2] = {C(0), C(0)};
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * tpr + lane) * N;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C dev = (v[k][j] - shift) - mean_shifted;
        sq[0] += col + j < d ? dev * dev : C(0);
        sq[1] += v[k][j] - v[k][j];
      }
    }
    RowAllReduce(sq, tpr, smem, parity);
    C rstd = InvSqrt(sq[0] * p.inv_d + p.eps);
    // The same decision in every thread of a row (reduced statistics); the
    // recomputation's shuffles need the whole warp (rows of up to 32 threads)
    // or the whole CTA (one row per CTA, where the decision is CTA-uniform).
    const bool wide = active && sq[1] == C(0) && NeedsWideStats(mean, rstd);
    // y = ((x - y_shift) - center) * rstd. Rows recomputed in double may
    // span more than float's range (x - shift overflows): they use the mean.
    C y_shift = shift, center = mean_shifted;
    if (tpr <= kWarp ? __any_sync(0xffffffffu, wide) : wide) {
      const RowStats<C> w =
          WideStatsRegisters(v, lane, tpr, d, p.rms, p.eps, wide_smem, wide_parity);
      if (wide) {
        mean = center = w.mean;
        rstd = w.rstd;
        y_shift = C(0);
      }
    }
    if (!active) continue;
    if (lane == 0) {
      if (p.mean) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    T* yr = p.y + row * p.d;
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * tpr + lane) * N;
      if (col >= d) break;
      C g[N], b[N], out[N];
      LoadVec<N>(p.gamma, col, d, vec, g, C(1));
      LoadVec<N>(p.beta, col, d, vec, b, C(0));
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = ((v[k][j] - y_shift) - center) * rstd * g[j] + b[j];
      StoreVec<N>(yr, col, d, vec, out);
    }
  }
}

// One CTA per row, three passes over the row in global memory (L2).
template <typename T, typename U>
__global__ void __launch_bounds__(kStreamBlock)
    ForwardStreamingKernel(ForwardParams<T, U> p, bool vec) {
  using C = ComputeT<T>;
  constexpr int N = kVecWidth<T>;
  __shared__ C smem[2][kWarp][2];
  __shared__ double wide_smem[2][kWarp][1];
  int parity = 0, wide_parity = 0;
  const int tpr = blockDim.x;
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  const int64_t d = p.d;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* xr = p.x + row * d;
    C sum[1] = {C(0)};
    C shift = C(0);
    if (!p.rms) {
      shift = MeanShift(Convert<T>::Widen(xr[0]));  // see ForwardRegistersKernel
#pragma unroll 4
      for (int64_t col = static_cast<int64_t>(threadIdx.x) * N; col < d; col += step) {
        C v[N];
        LoadVec<N>(xr, col, d, vec, v);
#pragma unroll
        for (int j = 0; j < N; ++j) sum[0] += col + j < d ? v[j] - shift : C(0);
      }
      RowAllReduce(sum, tpr, smem, parity);
    }
    C center = p.rms ? C(0) : sum[0] * p.inv_d;  // mean - shift, as in ForwardRegistersKernel
    C mean = shift + center;
    C sq[2] = {C(0), C(0)};  // squared deviations; x - x (NaN iff a value is not finite)
#pragma unroll 4
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * N; col < d; col += step) {
      C v[N];
      LoadVec<N>(xr, col, d, vec, v);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C dev = (v[j] - shift) - center;
        sq[0] += col + j < d ? dev * dev : C(0);
        sq[1] += v[j] - v[j];
      }
    }
    RowAllReduce(sq, tpr, smem, parity);
    C rstd = InvSqrt(sq[0] * p.inv_d + p.eps);
    // Uniform over the CTA (one row per CTA).
    if (sq[1] == C(0) && NeedsWideStats(mean, rstd)) {
      const RowStats<C> w = WideStatsStreaming(xr, d, p.rms, p.eps, wide_smem, wide_parity);
      mean = center = w.mean;  // x - shift may overflow here: see ForwardRegistersKernel
      rstd = w.rstd;
      shift = C(0);
    }
    if (threadIdx.x == 0) {
      if (p.mean) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    T* yr = p.y + row * d;
#pragma unroll 4
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * N; col < d; col += step) {
      C v[N], g[N], b[N], out[N];
      LoadVec<N>(xr, col, d, vec, v);
      LoadVec<N>(p.gamma, col, d, vec, g, C(1));
      LoadVec<N>(p.beta, col, d, vec, b, C(0));
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = ((v[j] - shift) - center) * rstd * g[j] + b[j];
      StoreVec<N>(yr, col, d, vec, out);
    }
  }
}

// inner > 1: one thread per (outer, inner) column; neighbours in a warp touch
// neighbouring addresses at every step along D.
template <typename T, typename U>
__global__ void __launch_bounds__(kColumnBlock) ForwardColumnsKernel(ForwardParams<T, U> p) {
  using C = ComputeT<T>;
  const int64_t inner = p.inner, d = p.d;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < p.rows;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = c / inner;
    const int64_t base = o * d * inner + (c - o * inner);
    const T* xc = p.x + base;
    C sum = 0;
    if (!p.rms) {
      for (int64_t k = 0; k < d; ++k) sum += Convert<T>::Widen(xc[k * inner]);
    }
    C mean = sum * p.inv_d;
    C sq = 0;
    for (int64_t k = 0; k < d; ++k) {
      const C dev = Convert<T>::Widen(xc[k * inner]) - mean;
      sq += dev * dev;
    }
    C rstd = InvSqrt(sq * p.inv_d + p.eps);
    if (NeedsWideStats(mean, rstd)) {
      const RowStats<C> w = WideStats(xc, d, inner, p.rms, p.eps);
      mean = w.mean;
      rstd = w.rstd;
    }
    if (p.mean) p.mean[c] = mean;
    p.rstd[c] = rstd;
    T* yc = p.y + base;
    for (int64_t k = 0; k < d; ++k) {
      const C g = p.gamma ? static_cast<C>(Convert<U>::Widen(p.gamma[k])) : C(1);
      const C b = p.beta ? static_cast<C>(Convert<U>::Widen(p.beta[k])) : C(0);
      yc[k * inner] = Convert<T>::Narrow((Convert<T>::Widen(xc[k * inner]) - mean) * rstd * g + b);
    }
  }
}

template <typename C>
__global__ void FillKernel(C* out, int64_t n, C value) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = value;
  }
}

// ---------------------------------------------------------------------------
// Backward kernels
//
// With xhat = (x - mean) * rstd and g = dy * gamma:
//   dx = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))
//   dgamma = sum over rows of dy * xhat,  dbeta = sum over rows of dy.

template <typename T, typename U>
struct BackwardParams {
  using C = ComputeT<T>;
  const T* dy;
  const T* x;
  const U* gamma;  // nullptr: no scale
  const C* mean;   // nullptr when rms (mean 0)
  const C* rstd;
  bool rms;        // RMSNorm: no mean terms in dx
  T* dx;
  C* part_dgamma;  // [parts, d] or nullptr
  C* part_dbeta;   // [parts, d] or nullptr
  int64_t rows;
  int64_t d;
  int64_t inner;
  C inv_d;
};

template <typename T, typename U, int kVpt>
__global__ void __launch_bounds__(kMaxThreadsPerRow)
    BackwardRegistersKernel(BackwardParams<T, U> p, int tpr, bool vec) {
  using C = ComputeT<T>;
  constexpr int N = kVecWidth<T>;
  __shared__ C smem[2][kWarp][2];
  __shared__ C red[kSmallRowsBlock];
  int parity = 0;
  const int lane = threadIdx.x % tpr;
  const int rows_per_cta = blockDim.x / tpr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_cta;
  C acc_g[kVpt][N], acc_b[kVpt][N];
#pragma unroll
  for (int k = 0; k < kVpt; ++k) {
#pragma unroll
    for (int j = 0; j < N; ++j) acc_g[k][j] = acc_b[k][j] = C(0);
  }
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_cta; base < p.rows;
       base += stride) {
    const int64_t row = base + threadIdx.x / tpr;
    const bool active = row < p.rows;
    const int64_t d = active ? p.d : 0;
    const int64_t offset = (active ? row : 0) * p.d;
    const C mu = active && p.mean ? p.mean[row] : C(0);
    const C rs = active ? p.rstd[row] : C(0);
    C xh[kVpt][N], g[kVpt][N];
    C s[2] = {C(0), C(0)};
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * tpr + lane) * N;
      C gm[N];
      LoadVec<N>(p.x + offset, col, d, vec, xh[k]);
      LoadVec<N>(p.dy + offset, col, d, vec, g[k]);
      LoadVec<N>(p.gamma, col, d, vec, gm, C(1));
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C xhat = col + j < d ? (xh[k][j] - mu) * rs : C(0);
        const C dyv = g[k][j];  // zero outside the row
        acc_g[k][j] += dyv * xhat;
        acc_b[k][j] += dyv;
        xh[k][j] = xhat;
        g[k][j] = dyv * gm[j];
        s[0] += g[k][j];
        s[1] += g[k][j] * xhat;
      }
    }
    RowAllReduce(s, tpr, smem, parity);
    if (!active) continue;
    const C mean_g = p.rms ? C(0) : s[0] * p.inv_d, mean_gx = s[1] * p.inv_d;
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * tpr + lane) * N;
      if (col >= d) break;
      C out[N];
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = rs * (g[k][j] - mean_g - xh[k][j] * mean_gx);
      StoreVec<N>(p.dx + offset, col, d, vec, out);
    }
  }
  if (p.part_dgamma == nullptr && p.part_dbeta == nullptr) return;
  // This CTA's partial row of dgamma/dbeta: its row groups summed in order.
  const int64_t d = p.d;
  C* pg = p.part_dgamma ? p.part_dgamma + blockIdx.x * d : nullptr;
  C* pb = p.part_dbeta ? p.part_dbeta + blockIdx.x * d : nullptr;
#pragma unroll
  for (int k = 0; k < kVpt; ++k) {
    const int64_t col = (static_cast<int64_t>(k) * tpr + lane) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (rows_per_cta == 1) {
        if (col + j < d) {
          if (pg) pg[col + j] = acc_g[k][j];
          if (pb) pb[col + j] = acc_b[k][j];
        }
        continue;
      }
      for (int which = 0; which < 2; ++which) {
        C* out = which == 0 ? pg : pb;
        if (out == nullptr) continue;  // uniform across the CTA
        red[threadIdx.x] = which == 0 ? acc_g[k][j] : acc_b[k][j];
        __syncthreads();
        if (threadIdx.x < tpr && col + j < d) {
          C t = 0;
          for (int r = 0; r < rows_per_cta; ++r) t += red[r * tpr + threadIdx.x];
          out[col + j] = t;
        }
        __syncthreads();
      }
    }
  }
}

// One CTA per row, two passes over x and dy; dgamma/dbeta by ParamGradRowsKernel.
template <typename T, typename U>
__global__ void __launch_bounds__(kStreamBlock)
    BackwardStreamingKernel(BackwardParams<T, U> p, bool vec) {
  using C = ComputeT<T>;
  constexpr int N = kVecWidth<T>;
  __shared__ C smem[2][kWarp][2];
  int parity = 0;
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  const int64_t d = p.d;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t offset = row * d;
    const C mu = p.mean ? p.mean[row] : C(0), rs = p.rstd[row];
    C s[2] = {C(0), C(0)};
#pragma unroll 2
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * N; col < d; col += step) {
      C xv[N], dyv[N], gm[N];
      LoadVec<N>(p.x + offset, col, d, vec, xv);
      LoadVec<N>(p.dy + offset, col, d, vec, dyv);
      LoadVec<N>(p.gamma, col, d, vec, gm, C(1));
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C xhat = col + j < d ? (xv[j] - mu) * rs : C(0);
        const C g = dyv[j] * gm[j];
        s[0] += g;
        s[1] += g * xhat;
      }
    }
    RowAllReduce(s, static_cast<int>(blockDim.x), smem, parity);
    const C mean_g = p.rms ? C(0) : s[0] * p.inv_d, mean_gx = s[1] * p.inv_d;
#pragma unroll 2
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * N; col < d; col += step) {
      C xv[N], dyv[N], gm[N], out[N];
      LoadVec<N>(p.x + offset, col, d, vec, xv);
      LoadVec<N>(p.dy + offset, col, d, vec, dyv);
      LoadVec<N>(p.gamma, col, d, vec, gm, C(1));
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C xhat = (xv[j] - mu) * rs;
        out[j] = rs * (dyv[j] * gm[j] - mean_g - xhat * mean_gx);
      }
      StoreVec<N>(p.dx + offset, col, d, vec, out);
    }
  }
}

// inner > 1: one thread per (outer, inner) column, two passes along D.
template <typename T, typename U>
__global__ void __launch_bounds__(kColumnBlock) BackwardColumnsKernel(BackwardParams<T, U> p) {
  using C = ComputeT<T>;
  const int64_t inner = p.inner, d = p.d;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < p.rows;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = c / inner;
    const int64_t base = o * d * inner + (c - o * inner);
    const C mu = p.mean ? p.mean[c] : C(0), rs = p.rstd[c];
    C s0 = 0, s1 = 0;
    for (int64_t k = 0; k < d; ++k) {
      const C gm = p.gamma ? static_cast<C>(Convert<U>::Widen(p.gamma[k])) : C(1);
      const C g = Convert<T>::Widen(p.dy[base + k * inner]) * gm;
      s0 += g;
      s1 += g * (Convert<T>::Widen(p.x[base + k * inner]) - mu) * rs;
    }
    const C mean_g = p.rms ? C(0) : s0 * p.inv_d, mean_gx = s1 * p.inv_d;
    for (int64_t k = 0; k < d; ++k) {
      const C gm = p.gamma ? static_cast<C>(Convert<U>::Widen(p.gamma[k])) : C(1);
      const C g = Convert<T>::Widen(p.dy[base + k * inner]) * gm;
      const C xhat = (Convert<T>::Widen(p.x[base + k * inner]) - mu) * rs;
      p.dx[base + k * inner] = Convert<T>::Narrow(rs * (g - mean_g - xhat * mean_gx));
    }
  }
}

// dgamma/dbeta partials for inner == 1 rows too wide for registers:
// CTA (column tile, row slice) -> part[slice, tile columns].
template <typename T>
__global__ void __launch_bounds__(kTileCols* kTileRows)
    ParamGradRowsKernel(const T* __restrict__ dy, const T* __restrict__ x,
                        const ComputeT<T>* __restrict__ mean, const ComputeT<T>* __restrict__ rstd,
                        int64_t rows, int64_t d, int64_t rows_per_slice, ComputeT<T>* part_dgamma,
                        ComputeT<T>* part_dbeta) {
  using C = ComputeT<T>;
  __shared__ C sg[kTileRows][kTileCols + 1];
  __shared__ C sb[kTileRows][kTileCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t r1 = r0 + rows_per_slice < rows ? r0 + rows_per_slice : rows;
  C ag = 0, ab = 0;
  if (col < d) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileRows) {
      const C dyv = Convert<T>::Widen(dy[r * d + col]);
      const C mu = mean ? mean[r] : C(0);
      ag += dyv * ((Convert<T>::Widen(x[r * d + col]) - mu) * rstd[r]);  // dy * xhat: no overflow
      ab += dyv;
    }
  }
  sg[threadIdx.y][threadIdx.x] = ag;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < d) {
    C tg = 0, tb = 0;
    for (int r = 0; r < kTileRows; ++r) {
      tg += sg[r][threadIdx.x];
      tb += sb[r][threadIdx.x];
    }
    if (part_dgamma) part_dgamma[blockIdx.y * d + col] = tg;
    if (part_dbeta) part_dbeta[blockIdx.y * d + col] = tb;
  }
}

// dgamma/dbeta partials for inner > 1: CTA (index along D, outer slice) sums
// the slice's (outer, inner) elements of that index.
template <typename T>
__global__ void __launch_bounds__(kColumnBlock)
    ParamGradColumnsKernel(const T* __restrict__ dy, const T* __restrict__ x,
                           const ComputeT<T>* __restrict__ mean,
                           const ComputeT<T>* __restrict__ rstd, int64_t outer, int64_t d,
                           int64_t inner, int64_t outer_per_slice, ComputeT<T>* part_dgamma,
                           ComputeT<T>* part_dbeta) {
  using C = ComputeT<T>;
  __shared__ C red[2][kColumnBlock];
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * outer_per_slice;
  const int64_t o1 = o0 + outer_per_slice < outer ? o0 + outer_per_slice : outer;
  const int64_t n = (o1 > o0 ? o1 - o0 : 0) * inner;
  for (int64_t k = blockIdx.x; k < d; k += gridDim.x) {
    C ag = 0, ab = 0;
    for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
      const int64_t o = o0 + t / inner;
      const int64_t i = t % inner;
      const int64_t idx = (o * d + k) * inner + i;
      const int64_t st = o * inner + i;
      const C dyv = Convert<T>::Widen(dy[idx]);
      const C mu = mean ? mean[st] : C(0);
      ag += dyv * (Convert<T>::Widen(x[idx]) - mu) * rstd[st];
      ab += dyv;
    }
    red[0][threadIdx.x] = ag;
    red[1][threadIdx.x] = ab;
    __syncthreads();
    for (int s = kColumnBlock / 2; s > 0; s /= 2) {
      if (threadIdx.x < s) {
        red[0][threadIdx.x] += red[0][threadIdx.x + s];
        red[1][threadIdx.x] += red[1][threadIdx.x + s];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      if (part_dgamma) part_dgamma[blockIdx.y * d + k] = red[0][0];
      if (part_dbeta) part_dbeta[blockIdx.y * d + k] = red[1][0];
    }
    __syncthreads();  // red is rewritten for the next k
  }
}

// out[col] = sum over p of part[p, col], in order p = ty, ty + 8, ... then
// the 8 lanes in order: the same bits on every run.
template <typename U, typename C>
__global__ void __launch_bounds__(kTileCols* kTileRows)
    FinalizeParamGradKernel(const C* __restrict__ part_dgamma, const C* __restrict__ part_dbeta,
                            int64_t parts, int64_t d, U* dgamma, U* dbeta) {
  __shared__ C sg[kTileRows][kTileCols + 1];
  __shared__ C sb[kTileRows][kTileCols + 1];
  for (int64_t tile = blockIdx.x; tile * kTileCols < d; tile += gridDim.x) {
    const int64_t col = tile * kTileCols + threadIdx.x;
    C ag = 0, ab = 0;
    if (col < d) {
      for (int64_t q = threadIdx.y; q < parts; q += kTileRows) {
        if (part_dgamma) ag += part_dgamma[q * d + col];
        if (part_dbeta) ab += part_dbeta[q * d + col];
      }
    }
    sg[threadIdx.y][threadIdx.x] = ag;
    sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && col < d) {
      C tg = 0, tb = 0;
      for (int r = 0; r < kTileRows; ++r) {
        tg += sg[r][threadIdx.x];
        tb += sb[r][threadIdx.x];
      }
      if (dgamma) dgamma[col] = Convert<U>::Narrow(tg);
      if (dbeta) dbeta[col] = Convert<U>::Narrow(tb);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Host side: validation, plans, launches

Result Invalid(const char* message) {
  Result r;
  r.status = Status::kInvalidArgument;
  r.message = message;
  return r;
}

Result FromCuda(cudaError_t e) {
  Result r;
  if (e != cudaSuccess) {
    r.status = Status::kCudaError;
    r.cuda_error = static_cast<int>(e);
    r.message = cudaGetErrorString(e);
  }
  return r;
}

Result LastLaunch() { return FromCuda(cudaGetLastError()); }

// Clears an error an earlier, unrelated runtime call left behind, so that
// LastLaunch() reports this call's launches only. (A sticky error, from a
// kernel that faulted, stays: the next call fails with it, as it must.)
void ClearStaleError() { (void)cudaGetLastError(); }

// Variadic: template arguments in `expr` contain commas.
#define TFLN_RETURN_IF_ERROR(...)      \
  do {                                 \
    const Result _r = (__VA_ARGS__);   \
    if (!_r.ok()) return _r;           \
  } while (0)

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

Result CheckGeometry(const Geometry& g) {
  if (g.outer < 0 || g.norm < 0 || g.inner < 1) {
    return Invalid("geometry must have outer >= 0, norm (D) >= 0 and inner >= 1");
  }
  const int64_t kMax = std::numeric_limits<int64_t>::max();
  if ((g.outer > 0 && g.norm > kMax / g.outer) ||
      (g.outer * g.norm > 0 && g.inner > kMax / (g.outer * g.norm)) ||
      (g.outer > 0 && g.inner > kMax / g.outer)) {
    return Invalid("outer * D * inner overflows int64");
  }
  return Result();
}

Result CheckEpsilon(double eps) {
  if (!(eps >= 0.0) || !std::isfinite(eps)) return Invalid("epsilon must be finite and >= 0");
  return Result();
}

// Device properties and occupancies are queried once per device (and kernel
// and CTA size), not on every call: each query costs microseconds, as much as
// a small kernel. Lock-free: racing first calls store the same value. Devices
// beyond kCachedDevices, and CTA sizes that are not whole warps, just query.
constexpr int kCachedDevices = 16;
std::atomic<int> g_sm_count[kCachedDevices];  // 0: not known yet

struct Device {
  int id = 0;
  int sms = 0;
};

Result CurrentDevice(Device* dev) {
  TFLN_RETURN_IF_ERROR(FromCuda(cudaGetDevice(&dev->id)));
  const bool cached = dev->id >= 0 && dev->id < kCachedDevices;
  if (cached && (dev->sms = g_sm_count[dev->id].load(std::memory_order_relaxed)) > 0) {
    return Result();
  }
  TFLN_RETURN_IF_ERROR(
      FromCuda(cudaDeviceGetAttribute(&dev->sms, cudaDevAttrMultiProcessorCount, dev->id)));
  if (cached && dev->sms > 0) g_sm_count[dev->id].store(dev->sms, std::memory_order_relaxed);
  return Result();
}

template <typename Kernel>
Result BlocksPerSm(Kernel kernel, int block, const Device& dev, int* per_sm) {
  // One table per kernel instantiation: [device][block / 32 - 1]; 0 unknown.
  static std::atomic<int> cache[kCachedDevices][kMaxThreadsPerBlock / kWarp];
  const bool cached = dev.id >= 0 && dev.id < kCachedDevices && block % kWarp == 0 &&
                      block >= kWarp && block <= kMaxThreadsPerBlock;
  std::atomic<int>* slot = cached ? &cache[dev.id][block / kWarp - 1] : nullptr;
  if (slot != nullptr && (*per_sm = slot->load(std::memory_order_relaxed)) > 0) return Result();
  TFLN_RETURN_IF_ERROR(
      FromCuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, block, 0)));
  if (slot != nullptr && *per_sm > 0) slot->store(*per_sm, std::memory_order_relaxed);
  return Result();
}

// Persistent grid: as many CTAs as fit on the device at once, no more than
// there is work for.
template <typename Kernel>
Result PersistentGrid(Kernel kernel, int block, const Device& dev, int64_t work, int* grid) {
  int per_sm = 0;
  TFLN_RETURN_IF_ERROR(BlocksPerSm(kernel, block, dev, &per_sm));
  if (per_sm < 1) return Invalid("kernel does not fit on this device");
  *grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work, int64_t{per_sm} * dev.sms)));
  return Result();
}

// How a row of D elements maps onto threads when it fits in registers.
struct RowsPlan {
  int tpr = 0;    // threads per row
  int vpt = 0;    // vectors per thread (template parameter)
  int block = 0;  // CTA size
};

int NextPow2(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// Returns false when the row is too wide for registers.
bool PlanRows(int64_t d, int vec_width, int max_vpt, RowsPlan* plan) {
  const int64_t vecs = CeilDiv(std::max<int64_t>(d, 1), vec_width);
  // Narrow rows: the fewest vectors per thread that fit one warp, so small D
  // gets several rows per warp and the most threads.
  for (int vpt = 1; vpt <= max_vpt; vpt *= 2) {
    if (vecs <= int64_t{kWarp} * vpt) {
      plan->vpt = vpt;
      plan->tpr = NextPow2(CeilDiv(vecs, vpt));
      plan->block = kSmallRowsBlock;
      return true;
    }
  }
  // Wide rows: a CTA per row, whole warps, the most registers per thread.
  const int64_t tpr = CeilDiv(CeilDiv(vecs, max_vpt), kWarp) * kWarp;
  if (tpr > kMaxThreadsPerRow) return false;
  plan->vpt = max_vpt;
  plan->tpr = static_cast<int>(tpr);
  plan->block = static_cast<int>(tpr);
  return true;
}

// Calls f(std::integral_constant<int, vpt>) for vpt in {1, 2, 4, 8} up to
// kMax: only the instantiations a dtype can use get compiled.
template <int kMax, typename F>
Result DispatchVpt(int vpt, F&& f) {
  switch (vpt) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      if constexpr (kMax >= 2) return f(std::integral_constant<int, 2>{});
      break;
    case 4:
      if constexpr (kMax >= 4) return f(std::integral_constant<int, 4>{});
      break;
    case 8:
      if constexpr (kMax >= 8) return f(std::integral_constant<int, 8>{});
      break;
  }
  return Invalid("internal error: no register kernel for this row width");
}

// ---------------------------------------------------------------------------
// Forward

template <typename T, typename U, int kVpt>
Result LaunchForwardRegisters(const ForwardParams<T, U>& p, const RowsPlan& plan, bool vec,
                              const Device& dev, cudaStream_t stream) {
  auto kernel = ForwardRegistersKernel<T, U, kVpt>;
  int grid = 0;
  TFLN_RETURN_IF_ERROR(
      PersistentGrid(kernel, plan.block, dev, CeilDiv(p.rows, plan.block / plan.tpr), &grid));
  kernel<<<grid, plan.block, 0, stream>>>(p, plan.tpr, vec);
  return LastLaunch();
}

template <typename T, typename U>
Result Forward(const ForwardArgs& a, cudaStream_t stream) {
  using C = ComputeT<T>;
  constexpr int N = kVecWidth<T>;
  const Geometry& g = a.geometry;
  const int64_t rows = g.outer * g.inner;
  if (rows == 0) return Result();
  if ((a.mean == nullptr && !a.rms) || a.rstd == nullptr) {
    return Invalid("mean (unless rms) and rstd must not be null");
  }
  C* mean = static_cast<C*>(a.mean);
  C* rstd = static_cast<C*>(a.rstd);
  Device dev;
  TFLN_RETURN_IF_ERROR(CurrentDevice(&dev));
  if (g.norm == 0) {  // the mean of nothing is undefined
    const int grid = static_cast<int>(std::min<int64_t>(CeilDiv(rows, 256), 8 * dev.sms));
    if (mean) FillKernel<C><<<grid, 256, 0, stream>>>(mean, rows, std::numeric_limits<C>::quiet_NaN());
    FillKernel<C><<<grid, 256, 0, stream>>>(rstd, rows, std::numeric_limits<C>::quiet_NaN());
    return LastLaunch();
  }
  if (a.x == nullptr || a.y == nullptr) return Invalid("x and y must not be null");
  ForwardParams<T, U> p;
  p.x = static_cast<const T*>(a.x);
  p.gamma = static_cast<const U*>(a.gamma);
  p.beta = static_cast<const U*>(a.beta);
  p.y = static_cast<T*>(a.y);
  p.mean = mean;
  p.rstd = rstd;
  p.rms = a.rms;
  p.rows = rows;
  p.d = g.norm;
  p.inner = g.inner;
  p.eps = static_cast<C>(a.epsilon);
  p.inv_d = C(1) / static_cast<C>(g.norm);

  if (g.inner > 1) {
    int grid = 0;
    TFLN_RETURN_IF_ERROR(PersistentGrid(ForwardColumnsKernel<T, U>, kColumnBlock, dev,
                                        CeilDiv(rows, kColumnBlock), &grid));
    ForwardColumnsKernel<T, U><<<grid, kColumnBlock, 0, stream>>>(p);
    return LastLaunch();
  }
  const bool vec = g.norm % N == 0 && PackAligned<T, N>(p.x) && PackAligned<T, N>(p.y) &&
                   PackAligned<U, N>(p.gamma) && PackAligned<U, N>(p.beta);
  RowsPlan plan;
  constexpr int kVpt = MaxVpt<T, kForwardRowRegs>();
  if (PlanRows(g.norm, N, kVpt, &plan)) {
    return DispatchVpt<kVpt>(plan.vpt, [&](auto vpt) {
      return LaunchForwardRegisters<T, U, decltype(vpt)::value>(p, plan, vec, dev, stream);
    });
  }
  int grid = 0;
  TFLN_RETURN_IF_ERROR(PersistentGrid(ForwardStreamingKernel<T, U>, kStreamBlock, dev, rows, &grid));
  ForwardStreamingKernel<T, U><<<grid, kStreamBlock, 0, stream>>>(p, vec);
  return LastLaunch();
}

// ---------------------------------------------------------------------------
// Backward

enum class BackwardPath { kRegisters, kStreaming, kColumns };

struct BackwardPlan {
  BackwardPath path = BackwardPath::kRegisters;
  RowsPlan rows;
  bool vec = false;
  int grid = 0;            // CTAs of the dx kernel
  int64_t parts = 0;       // rows of the dgamma/dbeta partials
  int64_t slice = 0;       // rows (streaming) or outer indices (columns) per partial
  int64_t reduce_x = 0;    // gridDim.x of the partial kernel (columns path)
  int64_t part_elems = 0;  // elements of one partial buffer: parts * D
  int buffers = 0;         // partial buffers wanted: dgamma and/or dbeta
  size_t workspace_bytes = 0;
};

template <typename T, typename U>
Result RegistersGrid(const RowsPlan& plan, const Device& dev, int64_t rows, int* grid) {
  const int64_t work = CeilDiv(rows, plan.block / plan.tpr);
  return DispatchVpt<MaxVpt<T, kBackwardRowRegs>()>(plan.vpt, [&](auto vpt) {
    return PersistentGrid(BackwardRegistersKernel<T, U, decltype(vpt)::value>, plan.block, dev,
                          work, grid);
  });
}

template <typename T, typename U>
Result PlanBackward(const BackwardArgs& a, const Device& dev, BackwardPlan* plan) {
  using C = ComputeT<T>;
  constexpr int N = kVecWidth<T>;
  const Geometry& g = a.geometry;
  const int64_t rows = g.outer * g.inner, d = g.norm;
  plan->buffers = (a.dgamma != nullptr ? 1 : 0) + (a.dbeta != nullptr ? 1 : 0);
  if (rows == 0 || d == 0) return Result();  // nothing to reduce
  if (g.inner > 1) {
    plan->path = BackwardPath::kColumns;
    TFLN_RETURN_IF_ERROR(PersistentGrid(BackwardColumnsKernel<T, U>, kColumnBlock, dev,
                                        CeilDiv(rows, kColumnBlock), &plan->grid));
    const int64_t target = int64_t{kReduceCtasPerSm} * dev.sms;
    plan->reduce_x = std::min<int64_t>(d, 1 << 20);
    const int64_t slices = std::min<int64_t>(g.outer, std::max<int64_t>(1, CeilDiv(target, d)));
    plan->slice = CeilDiv(g.outer, slices);
    plan->parts = CeilDiv(g.outer, plan->slice);
  } else {
    plan->vec = d % N == 0 && PackAligned<T, N>(a.x) && PackAligned<T, N>(a.dy) &&
                PackAligned<T, N>(a.dx) && PackAligned<U, N>(a.gamma);
    if (PlanRows(d, N, MaxVpt<T, kBackwardRowRegs>(), &plan->rows)) {
      plan->path = BackwardPath::kRegisters;
      TFLN_RETURN_IF_ERROR(RegistersGrid<T, U>(plan->rows, dev, rows, &plan->grid));
      plan->parts = plan->grid;
    } else {
      plan->path = BackwardPath::kStreaming;
      TFLN_RETURN_IF_ERROR(PersistentGrid(BackwardStreamingKernel<T, U>, kStreamBlock, dev, rows,
                                          &plan->grid));
      const int64_t tiles = CeilDiv(d, kTileCols);
      const int64_t target = int64_t{kReduceCtasPerSm} * dev.sms;
      const int64_t slices = std::min<int64_t>(CeilDiv(rows, kTileRows),
                                               std::max<int64_t>(1, CeilDiv(target, tiles)));
      plan->slice = CeilDiv(rows, slices);
      plan->parts = CeilDiv(rows, plan->slice);
    }
  }
  plan->part_elems = plan->parts * d;
  plan->workspace_bytes = static_cast<size_t>(plan->part_elems) * plan->buffers * sizeof(C);
  return Result();
}

// The CPU kernels' contract (layer_norm_cpu.h): with D == 0 every output is
// empty and nothing is checked; otherwise dgamma exactly when gamma.
template <typename T, typename U>
Result CheckBackwardArgs(const BackwardArgs& a) {
  const Geometry& g = a.geometry;
  if (g.norm == 0) return Result();
  if ((a.gamma == nullptr) != (a.dgamma == nullptr)) {
    return Invalid("dgamma must be given exactly when gamma is");
  }
  const int64_t elements = g.outer * g.norm * g.inner;
  if (elements > 0 && (a.dy == nullptr || a.x == nullptr || a.dx == nullptr ||
                       (a.mean == nullptr && !a.rms) || a.rstd == nullptr)) {
    return Invalid("dy, x, dx, mean (unless rms) and rstd must not be null");
  }
  return Result();
}

template <typename T, typename U>
Result BackwardWorkspace(const BackwardArgs& a, size_t* bytes) {
  Device dev;
  TFLN_RETURN_IF_ERROR(CurrentDevice(&dev));
  BackwardPlan plan;
  TFLN_RETURN_IF_ERROR(PlanBackward<T, U>(a, dev, &plan));
  *bytes = plan.workspace_bytes;
  return Result();
}

template <typename T, typename U>
Result Backward(const BackwardArgs& a, cudaStream_t stream) {
  using C = ComputeT<T>;
  const Geometry& g = a.geometry;
  TFLN_RETURN_IF_ERROR(CheckBackwardArgs<T, U>(a));
  const int64_t rows = g.outer * g.inner, d = g.norm;
  if (d == 0) return Result();  // dx, dgamma, dbeta are all empty
  if (rows == 0) {              // sums over no rows
    if (a.dgamma) TFLN_RETURN_IF_ERROR(FromCuda(cudaMemsetAsync(a.dgamma, 0, d * sizeof(U), stream)));
    if (a.dbeta) TFLN_RETURN_IF_ERROR(FromCuda(cudaMemsetAsync(a.dbeta, 0, d * sizeof(U), stream)));
    return Result();
  }
  Device dev;
  TFLN_RETURN_IF_ERROR(CurrentDevice(&dev));
  BackwardPlan plan;
  TFLN_RETURN_IF_ERROR(PlanBackward<T, U>(a, dev, &plan));
  if (plan.workspace_bytes > 0 &&
      (a.workspace == nullptr || a.workspace_bytes < plan.workspace_bytes ||
       reinterpret_cast<uintptr_t>(a.workspace) % kVecBytes != 0)) {
    return Invalid("workspace is missing, misaligned or smaller than LayerNormBackwardWorkspaceBytes()");
  }
  C* ws = static_cast<C*>(a.workspace);
  C* part_dgamma = a.dgamma ? ws : nullptr;
  C* part_dbeta = a.dbeta ? ws + (a.dgamma ? plan.part_elems : 0) : nullptr;

  BackwardParams<T, U> p;
  p.dy = static_cast<const T*>(a.dy);
  p.x = static_cast<const T*>(a.x);
  p.gamma = static_cast<const U*>(a.gamma);
  p.mean = a.rms ? nullptr : static_cast<const C*>(a.mean);
  p.rstd = static_cast<const C*>(a.rstd);
  p.rms = a.rms;
  p.dx = static_cast<T*>(a.dx);
  p.part_dgamma = part_dgamma;
  p.part_dbeta = part_dbeta;
  p.rows = rows;
  p.d = d;
  p.inner = g.inner;
  p.inv_d = C(1) / static_cast<C>(d);

  switch (plan.path) {
    case BackwardPath::kRegisters:
      TFLN_RETURN_IF_ERROR(
          DispatchVpt<MaxVpt<T, kBackwardRowRegs>()>(plan.rows.vpt, [&](auto vpt) {
            BackwardRegistersKernel<T, U, decltype(vpt)::value>
                <<<plan.grid, plan.rows.block, 0, stream>>>(p, plan.rows.tpr, plan.vec);
            return Result();
          }));
      break;
    case BackwardPath::kStreaming:
      BackwardStreamingKernel<T, U><<<plan.grid, kStreamBlock, 0, stream>>>(p, plan.vec);
      if (plan.buffers > 0) {
        TFLN_RETURN_IF_ERROR(LastLaunch());
        const dim3 grid(static_cast<unsigned>(CeilDiv(d, kTileCols)),
                        static_cast<unsigned>(plan.parts));
        ParamGradRowsKernel<T><<<grid, dim3(kTileCols, kTileRows), 0, stream>>>(
            p.dy, p.x, p.mean, p.rstd, rows, d, plan.slice, part_dgamma, part_dbeta);
      }
      break;
    case BackwardPath::kColumns:
      BackwardColumnsKernel<T, U><<<plan.grid, kColumnBlock, 0, stream>>>(p);
      if (plan.buffers > 0) {
        TFLN_RETURN_IF_ERROR(LastLaunch());
        const dim3 grid(static_cast<unsigned>(plan.reduce_x), static_cast<unsigned>(plan.parts));
        ParamGradColumnsKernel<T><<<grid, kColumnBlock, 0, stream>>>(
            p.dy, p.x, p.mean, p.rstd, g.outer, d, g.inner, plan.slice, part_dgamma, part_dbeta);
      }
      break;
  }
  TFLN_RETURN_IF_ERROR(LastLaunch());
  if (plan.buffers == 0) return Result();
  const int grid = static_cast<int>(std::min<int64_t>(CeilDiv(d, kTileCols), 1 << 20));
  FinalizeParamGradKernel<U, C><<<grid, dim3(kTileCols, kTileRows), 0, stream>>>(
      part_dgamma, part_dbeta, plan.parts, d, static_cast<U*>(a.dgamma), static_cast<U*>(a.dbeta));
  return LastLaunch();
}

// ---------------------------------------------------------------------------
// dtype dispatch

template <typename F>
Result DispatchTypes(DType x, DType param, F&& f) {
  switch (x) {
    case DType::kFloat32:
      if (param == DType::kFloat32) return f(float{}, float{});
      break;
    case DType::kFloat16:
      if (param == DType::kFloat16) return f(__half{}, __half{});
      if (param == DType::kFloat32) return f(__half{}, float{});
      break;
    case DType::kBFloat16:
      if (param == DType::kBFloat16) return f(__nv_bfloat16{}, __nv_bfloat16{});
      if (param == DType::kFloat32) return f(__nv_bfloat16{}, float{});
      break;
    case DType::kFloat64:
      if (param == DType::kFloat64) return f(double{}, double{});
      break;
  }
  return Invalid(
      "unsupported dtypes: x must be float32, float16, bfloat16 or float64, and the parameters "
      "x's dtype or float32 for float16/bfloat16 x");
}

}  // namespace

Result LayerNormForward(const ForwardArgs& args, Stream stream) {
  TFLN_RETURN_IF_ERROR(CheckGeometry(args.geometry));
  ClearStaleError();
  TFLN_RETURN_IF_ERROR(CheckEpsilon(args.epsilon));
  return DispatchTypes(args.x_type, args.param_type, [&](auto t, auto u) {
    return Forward<decltype(t), decltype(u)>(args, reinterpret_cast<cudaStream_t>(stream));
  });
}

Result LayerNormBackwardWorkspaceBytes(const BackwardArgs& args, size_t* bytes) {
  if (bytes == nullptr) return Invalid("bytes must not be null");
  *bytes = 0;
  TFLN_RETURN_IF_ERROR(CheckGeometry(args.geometry));
  return DispatchTypes(args.x_type, args.param_type, [&](auto t, auto u) {
    return BackwardWorkspace<decltype(t), decltype(u)>(args, bytes);
  });
}

bool LayerNormForwardInPlaceSafe(const ForwardArgs& args) {
  // Every forward path qualifies (see the header).
  return CheckGeometry(args.geometry).ok();
}

bool LayerNormBackwardInPlaceSafe(const BackwardArgs& args) {
  if (!CheckGeometry(args.geometry).ok() || args.geometry.inner != 1) return false;
  bool registers = false;
  // PlanBackward's choice for inner == 1, which depends on D and the dtype only.
  const Result r = DispatchTypes(args.x_type, args.param_type, [&](auto t, auto) {
    using T = decltype(t);
    RowsPlan plan;
    registers = PlanRows(args.geometry.norm, kVecWidth<T>, MaxVpt<T, kBackwardRowRegs>(), &plan);
    return Result();
  });
  return r.ok() && registers;
}

Result LayerNormBackward(const BackwardArgs& args, Stream stream) {
  TFLN_RETURN_IF_ERROR(CheckGeometry(args.geometry));
  ClearStaleError();
  return DispatchTypes(args.x_type, args.param_type, [&](auto t, auto u) {
    return Backward<decltype(t), decltype(u)>(args, reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace gpu
}  // namespace tf_layernorm
