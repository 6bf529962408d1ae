// CPU kernels for fused Layer Normalization. Free of TensorFlow: raw pointers,
// sizes and a parallel-for supplied by the caller (the TF binding passes the
// op's intra-op thread pool). Header-only templates so the binding can
// instantiate them for its half/bfloat16 types; the element types only need
// static_cast to and from float/double.
//
// Geometry: x is viewed as [outer, D, inner]. D is the product of the
// normalized dims, inner the product of the dims after them. Statistics
// (mean, rstd) have outer * inner entries, laid out [outer, inner].
//
// Numerics: statistics in ComputeType<T> (float, or double for double), two
// passes over each row while it is in cache (mean, then sum of squared
// deviations): never E[x^2] - E[x]^2.
//
// Determinism: the forward is per row and independent of the partition. The
// backward reduces dgamma/dbeta through per-block partials where the blocks
// are a function of the shape only (never of the thread count) and are summed
// in block order, so results are bitwise repeatable on any machine.
#ifndef TF_LAYERNORM_CC_KERNELS_LAYER_NORM_CPU_H_
#define TF_LAYERNORM_CC_KERNELS_LAYER_NORM_CPU_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>

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

enum class KernelStatus { kOk = 0, kInvalidGeometry = 1, kNullPointer = 2 };

namespace internal {

// Independent accumulators per row reduction: lets the compiler keep
// kLanes partial sums in vector registers without -ffast-math, and shortens
// the dependency chain (and rounding error growth) by the same factor.
constexpr int kLanes = 16;
// Columns of an inner > 1 slab processed together: their running statistics
// (a few KiB) stay in L1 while the D rows of the slab stream through.
constexpr int64_t kInnerChunk = 256;
// The backward's dgamma/dbeta partial buffers: at most this many blocks, and
// at most kPartialBudget elements per parameter, whatever D is, so the extra
// memory stays O(D) and independent of the number of rows.
constexpr int64_t kMaxBlocks = 64;
constexpr int64_t kPartialBudget = int64_t{1} << 22;
// A block should carry at least this many elements, and at least this many
// units, so the partials (zeroed, accumulated and summed: ~3 passes over D per
// block) stay a small fraction of the block's own traffic even when D is huge.
constexpr int64_t kMinElementsPerBlock = int64_t{1} << 15;
constexpr int64_t kMinUnitsPerBlock = 8;
// Rough cycles per element for the cost model of the thread pool.
constexpr int64_t kForwardCostPerElement = 8;
constexpr int64_t kBackwardCostPerElement = 14;

template <typename C>
inline C CombineLanes(const C* acc) {
  // Fixed pairwise order: the result does not depend on the compiler.
  C t[kLanes];
  for (int l = 0; l < kLanes; ++l) t[l] = acc[l];
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) t[l] = t[l] + t[l + width];
  }
  return t[0];
}

// Sum of (x[i] - shift). With shift = x[0] the terms are deviations of the
// order of the row's spread, not of its magnitude: the mean of a row like
// 1e4 + N(0, 1) keeps float32 precision instead of losing ~1e-3 to the sums.
template <typename C, typename T>
inline C RowSum(const T* __restrict x, int64_t n, C shift = C(0)) {
  C acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<C>(x[i + l]) - shift;
  }
  C tail = 0;
  for (; i < n; ++i) tail += static_cast<C>(x[i]) - shift;
  return CombineLanes(acc) + tail;
}

template <typename C, typename T>
inline C RowSumSquaredDeviation(const T* __restrict x, int64_t n, C mean) {
  C acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const C d = static_cast<C>(x[i + l]) - mean;
      acc[l] += d * d;
    }
  }
  C tail = 0;
  for (; i < n; ++i) {
    const C d = static_cast<C>(x[i]) - mean;
    tail += d * d;
  }
  return CombineLanes(acc) + tail;
}

template <typename C>
inline C Rstd(C sum_sq, C inv_n, C eps) {
  return C(1) / std::sqrt(sum_sq * inv_n + eps);
}

template <typename T, typename U, typename C, bool kScale, bool kCenter>
void ForwardRows(const NormGeometry& g, const T* __restrict x, const U* __restrict gamma,
                 const U* __restrict beta, C eps, T* __restrict y, C* __restrict mean,
                 C* __restrict rstd, int64_t row_begin, int64_t row_end) {
  const int64_t n = g.norm;
  const C inv_n = C(1) / static_cast<C>(n);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* __restrict xr = x + r * n;
    T* __restrict yr = y + r * n;
    const C shift = static_cast<C>(xr[0]);
    const C mu = shift + RowSum<C>(xr, n, shift) * inv_n;
    const C rs = Rstd(RowSumSquaredDeviation<C>(xr, n, mu), inv_n, eps);
    mean[r] = mu;
    rstd[r] = rs;
    for (int64_t i = 0; i < n; ++i) {
      C v = (static_cast<C>(xr[i]) - mu) * rs;
      if (kScale) v *= static_cast<C>(gamma[i]);
      if (kCenter) v += static_cast<C>(beta[i]);
      yr[i] = static_cast<T>(v);
    }
  }
}

// inner > 1: unit u is (outer index, chunk of inner columns). The statistics
// outputs double as the column accumulators.
template <typename T, typename U, typename C, bool kScale, bool kCenter>
void ForwardColumns(const NormGeometry& g, const T* __restrict x, const U* __restrict gamma,
                    const U* __restrict beta, C eps, T* __restrict y, C* __restrict mean,
                    C* __restrict rstd, int64_t unit_begin, int64_t unit_end) {
  const int64_t n = g.norm, inner = g.inner;
  const int64_t chunks = (inner + kInnerChunk - 1) / kInnerChunk;
  const C inv_n = C(1) / static_cast<C>(n);
  for (int64_t u = unit_begin; u < unit_end; ++u) {
    const int64_t o = u / chunks;
    const int64_t c0 = (u % chunks) * kInnerChunk;
    const int64_t w = std::min(kInnerChunk, inner - c0);
    const int64_t base = o * n * inner + c0;
    C* __restrict m = mean + o * inner + c0;
    C* __restrict rs = rstd + o * inner + c0;
    // Shifted by the first row, as in RowSum; rs holds the shift meanwhile.
    const T* __restrict x0 = x + base;
    for (int64_t i = 0; i < w; ++i) {
      m[i] = 0;
      rs[i] = static_cast<C>(x0[i]);
    }
    for (int64_t d = 1; d < n; ++d) {
      const T* __restrict xr = x + base + d * inner;
      for (int64_t i = 0; i < w; ++i) m[i] += static_cast<C>(xr[i]) - rs[i];
    }
    for (int64_t i = 0; i < w; ++i) {
      m[i] = rs[i] + m[i] * inv_n;
      rs[i] = 0;
    }
    for (int64_t d = 0; d < n; ++d) {
      const T* __restrict xr = x + base + d * inner;
      for (int64_t i = 0; i < w; ++i) {
        const C t = static_cast<C>(xr[i]) - m[i];
        rs[i] += t * t;
      }
    }
    for (int64_t i = 0; i < w; ++i) rs[i] = Rstd(rs[i], inv_n, eps);
    for (int64_t d = 0; d < n; ++d) {
      const T* __restrict xr = x + base + d * inner;
      T* __restrict yr = y + base + d * inner;
      const C gd = kScale ? static_cast<C>(gamma[d]) : C(1);
      const C bd = kCenter ? static_cast<C>(beta[d]) : C(0);
      for (int64_t i = 0; i < w; ++i) {
        yr[i] = static_cast<T>((static_cast<C>(xr[i]) - m[i]) * rs[i] * gd + bd);
      }
    }
  }
}

template <typename T, typename U, typename C, bool kScale, bool kCenter>
void Forward(const NormGeometry& g, const T* x, const U* gamma, const U* beta, C eps, T* y,
             C* mean, C* rstd, const ParallelFor& parallel_for) {
  if (g.inner == 1) {
    parallel_for(g.outer, g.norm * kForwardCostPerElement, [&](int64_t b, int64_t e) {
      ForwardRows<T, U, C, kScale, kCenter>(g, x, gamma, beta, eps, y, mean, rstd, b, e);
    });
  } else {
    const int64_t chunks = (g.inner + kInnerChunk - 1) / kInnerChunk;
    const int64_t cost = g.norm * std::min(kInnerChunk, g.inner) * kForwardCostPerElement;
    parallel_for(g.outer * chunks, cost, [&](int64_t b, int64_t e) {
      ForwardColumns<T, U, C, kScale, kCenter>(g, x, gamma, beta, eps, y, mean, rstd, b, e);
    });
  }
}

// ---------------------------------------------------------------- backward --

// The fixed partition of the backward's work units into blocks.
struct BlockPlan {
  int64_t units = 0;        // rows (inner == 1) or (outer, chunk) pairs
  int64_t elems_per_unit = 0;
  int64_t blocks = 0;
  int64_t units_per_block = 0;
};

inline BlockPlan PlanBlocks(const NormGeometry& g) {
  BlockPlan p;
  if (g.inner == 1) {
    p.units = g.outer;
    p.elems_per_unit = g.norm;
  } else {
    const int64_t chunks = (g.inner + kInnerChunk - 1) / kInnerChunk;
    p.units = g.outer * chunks;
    p.elems_per_unit = g.norm * std::min(kInnerChunk, g.inner);
  }
  if (p.units == 0 || g.norm == 0) return p;
  const int64_t min_units = std::max<int64_t>(
      kMinUnitsPerBlock, kMinElementsPerBlock / std::max<int64_t>(1, p.elems_per_unit));
  int64_t blocks = (p.units + min_units - 1) / min_units;
  blocks = std::min(blocks, kMaxBlocks);
  blocks = std::min(blocks, std::max<int64_t>(1, kPartialBudget / g.norm));
  p.units_per_block = (p.units + blocks - 1) / blocks;
  p.blocks = (p.units + p.units_per_block - 1) / p.units_per_block;
  return p;
}

template <typename T, typename U, typename C, bool kScale, bool kCenter>
void BackwardRows(const NormGeometry& g, const T* __restrict dy, const T* __restrict x,
                  const U* __restrict gamma, const C* __restrict mean, const C* __restrict rstd,
                  T* __restrict dx, C* __restrict part_g, C* __restrict part_b, int64_t row_begin,
                  int64_t row_end) {
  const int64_t n = g.norm;
  const C inv_n = C(1) / static_cast<C>(n);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* __restrict xr = x + r * n;
    const T* __restrict dyr = dy + r * n;
    T* __restrict dxr = dx + r * n;
    const C mu = mean[r], rs = rstd[r];
    // Pass 1: the two row reductions, and this row's dgamma/dbeta terms.
    C sg[kLanes] = {}, sgx[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const C dyv = static_cast<C>(dyr[i + l]);
        const C xh = (static_cast<C>(xr[i + l]) - mu) * rs;
        const C gv = kScale ? dyv * static_cast<C>(gamma[i + l]) : dyv;
        sg[l] += gv;
        sgx[l] += gv * xh;
        if (kScale) part_g[i + l] += dyv * xh;
        if (kCenter) part_b[i + l] += dyv;
      }
    }
    C tg = 0, tgx = 0;
    for (; i < n; ++i) {
      const C dyv = static_cast<C>(dyr[i]);
      const C xh = (static_cast<C>(xr[i]) - mu) * rs;
      const C gv = kScale ? dyv * static_cast<C>(gamma[i]) : dyv;
      tg += gv;
      tgx += gv * xh;
      if (kScale) part_g[i] += dyv * xh;
      if (kCenter) part_b[i] += dyv;
    }
    const C mean_g = (CombineLanes(sg) + tg) * inv_n;
    const C mean_gx = (CombineLanes(sgx) + tgx) * inv_n;
    // Pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    for (int64_t j = 0; j < n; ++j) {
      const C dyv = static_cast<C>(dyr[j]);
      const C xh = (static_cast<C>(xr[j]) - mu) * rs;
      const C gv = kScale ? dyv * static_cast<C>(gamma[j]) : dyv;
      dxr[j] = static_cast<T>(rs * (gv - mean_g - xh * mean_gx));
    }
  }
}

template <typename T, typename U, typename C, bool kScale, bool kCenter>
void BackwardColumns(const NormGeometry& g, const T* __restrict dy, const T* __restrict x,
                     const U* __restrict gamma, const C* __restrict mean,
                     const C* __restrict rstd, T* __restrict dx, C* __restrict part_g,
                     C* __restrict part_b, int64_t unit_begin, int64_t unit_end) {
  const int64_t n = g.norm, inner = g.inner;
  const int64_t chunks = (inner + kInnerChunk - 1) / kInnerChunk;
  const C inv_n = C(1) / static_cast<C>(n);
  C sg[kInnerChunk], sgx[kInnerChunk], t_g[kInnerChunk], t_b[kInnerChunk];
  for (int64_t u = unit_begin; u < unit_end; ++u) {
    const int64_t o = u / chunks;
    const int64_t c0 = (u % chunks) * kInnerChunk;
    const int64_t w = std::min(kInnerChunk, inner - c0);
    const int64_t base = o * n * inner + c0;
    const C* __restrict m = mean + o * inner + c0;
    const C* __restrict rs = rstd + o * inner + c0;
    for (int64_t i = 0; i < w; ++i) sg[i] = sgx[i] = 0;
    for (int64_t d = 0; d < n; ++d) {
      const T* __restrict xr = x + base + d * inner;
      const T* __restrict dyr = dy + base + d * inner;
      const C gd = kScale ? static_cast<C>(gamma[d]) : C(1);
      for (int64_t i = 0; i < w; ++i) {
        const C dyv = static_cast<C>(dyr[i]);
        const C xh = (static_cast<C>(xr[i]) - m[i]) * rs[i];
        const C gv = dyv * gd;
        sg[i] += gv;
        sgx[i] += gv * xh;
        t_g[i] = dyv * xh;
        t_b[i] = dyv;
      }
      // Reduced along the columns with the lane sums: a fixed order.
      if (kScale) part_g[d] += RowSum<C>(t_g, w);
      if (kCenter) part_b[d] += RowSum<C>(t_b, w);
    }
    for (int64_t i = 0; i < w; ++i) {
      sg[i] *= inv_n;
      sgx[i] *= inv_n;
    }
    for (int64_t d = 0; d < n; ++d) {
      const T* __restrict xr = x + base + d * inner;
      const T* __restrict dyr = dy + base + d * inner;
      T* __restrict dxr = dx + base + d * inner;
      const C gd = kScale ? static_cast<C>(gamma[d]) : C(1);
      for (int64_t i = 0; i < w; ++i) {
        const C xh = (static_cast<C>(xr[i]) - m[i]) * rs[i];
        const C gv = static_cast<C>(dyr[i]) * gd;
        dxr[i] = static_cast<T>(rs[i] * (gv - sg[i] - xh * sgx[i]));
      }
    }
  }
}

template <typename T, typename U, typename C, bool kScale, bool kCenter>
void Backward(const NormGeometry& g, const T* dy, const T* x, const U* gamma, const C* mean,
              const C* rstd, T* dx, U* dgamma, U* dbeta, C* workspace,
              const ParallelFor& parallel_for) {
  const BlockPlan plan = PlanBlocks(g);
  const int64_t n = g.norm;
  if (plan.blocks == 0) {
    // No rows (or D == 0): dx is empty, and the parameter gradients are sums
    // over nothing.
    for (int64_t i = 0; i < n; ++i) {
      if (kScale) dgamma[i] = static_cast<U>(0);
      if (kCenter) dbeta[i] = static_cast<U>(0);
    }
    return;
  }
  C* part_g = workspace;
  C* part_b = workspace + (kScale ? plan.blocks * n : 0);
  parallel_for(plan.blocks, plan.units_per_block * plan.elems_per_unit * kBackwardCostPerElement,
               [&](int64_t b0, int64_t b1) {
                 for (int64_t b = b0; b < b1; ++b) {
                   C* pg = kScale ? part_g + b * n : nullptr;
                   C* pb = kCenter ? part_b + b * n : nullptr;
                   if (kScale) std::fill(pg, pg + n, C(0));
                   if (kCenter) std::fill(pb, pb + n, C(0));
                   const int64_t u0 = b * plan.units_per_block;
                   const int64_t u1 = std::min(plan.units, u0 + plan.units_per_block);
                   if (g.inner == 1) {
                     BackwardRows<T, U, C, kScale, kCenter>(g, dy, x, gamma, mean, rstd, dx, pg,
                                                            pb, u0, u1);
                   } else {
                     BackwardColumns<T, U, C, kScale, kCenter>(g, dy, x, gamma, mean, rstd, dx,
                                                               pg, pb, u0, u1);
                   }
                 }
               });
  if (!kScale && !kCenter) return;
  // Finalize: sum the partials in block order, parallel over D.
  parallel_for(n, plan.blocks * 2, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      C sg = 0, sb = 0;
      for (int64_t b = 0; b < plan.blocks; ++b) {
        if (kScale) sg += part_g[b * n + j];
        if (kCenter) sb += part_b[b * n + j];
      }
      if (kScale) dgamma[j] = static_cast<U>(sg);
      if (kCenter) dbeta[j] = static_cast<U>(sb);
    }
  });
}

template <typename F>
inline void DispatchAffine(bool scale, bool center, F&& f) {
  if (scale && center) {
    f(std::true_type{}, std::true_type{});
  } else if (scale) {
    f(std::true_type{}, std::false_type{});
  } else if (center) {
    f(std::false_type{}, std::true_type{});
  } else {
    f(std::false_type{}, std::false_type{});
  }
}

inline bool ValidGeometry(const NormGeometry& g) {
  if (g.outer < 0 || g.norm < 0 || g.inner < 1) return false;
  // The element count must fit int64 without overflow.
  const int64_t kMax = std::numeric_limits<int64_t>::max();
  if (g.outer > 0 && g.norm > kMax / g.outer) return false;
  if (g.outer * g.norm > 0 && g.inner > kMax / (g.outer * g.norm)) return false;
  return true;
}

}  // namespace internal

// Elements of ComputeType<T> the backward needs as scratch (dgamma/dbeta
// partials). Zero when neither parameter gradient is wanted.
inline int64_t LayerNormBackwardWorkspaceSize(const NormGeometry& g, bool scale, bool center) {
  const internal::BlockPlan p = internal::PlanBlocks(g);
  return p.blocks * g.norm * ((scale ? 1 : 0) + (center ? 1 : 0));
}

// y = (x - mean) * rstd * gamma + beta over the D axis of [outer, D, inner].
// gamma == nullptr: no scale; beta == nullptr: no offset. D == 0 gives NaN
// statistics (the mean of nothing is undefined) and an empty y.
template <typename T, typename U>
KernelStatus LayerNormForwardCpu(const NormGeometry& g, const T* x, const U* gamma, const U* beta,
                                 double epsilon, T* y, ComputeType<T>* mean,
                                 ComputeType<T>* rstd, const ParallelFor& parallel_for) {
  using C = ComputeType<T>;
  if (!internal::ValidGeometry(g)) return KernelStatus::kInvalidGeometry;
  if (g.num_stats() == 0) return KernelStatus::kOk;
  if (mean == nullptr || rstd == nullptr) return KernelStatus::kNullPointer;
  if (g.norm == 0) {
    std::fill(mean, mean + g.num_stats(), std::numeric_limits<C>::quiet_NaN());
    std::fill(rstd, rstd + g.num_stats(), std::numeric_limits<C>::quiet_NaN());
    return KernelStatus::kOk;
  }
  if (x == nullptr || y == nullptr) return KernelStatus::kNullPointer;
  const C eps = static_cast<C>(epsilon);
  internal::DispatchAffine(gamma != nullptr, beta != nullptr, [&](auto scale, auto center) {
    internal::Forward<T, U, C, decltype(scale)::value, decltype(center)::value>(
        g, x, gamma, beta, eps, y, mean, rstd, parallel_for);
  });
  return KernelStatus::kOk;
}

// dx, and dgamma/dbeta summed over outer and inner. dgamma/dbeta may be
// nullptr when not wanted (then gamma == nullptr means "no scale" as in the
// forward). workspace: LayerNormBackwardWorkspaceSize(g, ...) elements.
template <typename T, typename U>
KernelStatus LayerNormBackwardCpu(const NormGeometry& g, const T* dy, const T* x, const U* gamma,
                                  const ComputeType<T>* mean, const ComputeType<T>* rstd, T* dx,
                                  U* dgamma, U* dbeta, ComputeType<T>* workspace,
                                  const ParallelFor& parallel_for) {
  using C = ComputeType<T>;
  if (!internal::ValidGeometry(g)) return KernelStatus::kInvalidGeometry;
  // D == 0: dx, dgamma and dbeta are all empty.
  if (g.norm == 0) return KernelStatus::kOk;
  const bool scale = gamma != nullptr;
  const bool want_dgamma = dgamma != nullptr;
  const bool want_dbeta = dbeta != nullptr;
  // dgamma exists exactly when there is a gamma.
  if (want_dgamma != scale) return KernelStatus::kNullPointer;
  if (g.num_elements() > 0 &&
      (x == nullptr || dy == nullptr || dx == nullptr || mean == nullptr || rstd == nullptr)) {
    return KernelStatus::kNullPointer;
  }
  if (g.num_elements() > 0 && LayerNormBackwardWorkspaceSize(g, want_dgamma, want_dbeta) > 0 &&
      workspace == nullptr) {
    return KernelStatus::kNullPointer;
  }
  // The scale of dx (gamma) and the wanted parameter gradients are separate
  // switches; the template covers (scale, wants-dbeta) and dgamma follows scale.
  internal::DispatchAffine(scale, want_dbeta, [&](auto s, auto c) {
    internal::Backward<T, U, C, decltype(s)::value, decltype(c)::value>(
        g, dy, x, gamma, mean, rstd, dx, dgamma, dbeta, workspace, parallel_for);
  });
  return KernelStatus::kOk;
}

}  // namespace tf_layernorm

#endif  // TF_LAYERNORM_CC_KERNELS_LAYER_NORM_CPU_H_
