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
//   inner > 1 (normalizing a middle axis, e.g. channels of NCHW): a CTA
//     covers a tile of w adjacent inner columns (w = min(32, next power of
//     two of inner); consecutive threads take consecutive columns, so a warp
//     reads 32 / w rows of w adjacent elements: contiguous along inner, no
//     transposes) and spreads D over its tr thread rows; the statistics are
//     sums over the thread rows in a fixed order (a warp butterfly, then the
//     warps in order). Up to 16 rows per thread stay in registers (x is read
//     once), longer columns are streamed. Few (outer, tile) units grow the
//     CTA along D (up to 512 threads); the backward, which has a workspace,
//     also splits D across CTAs (per-chunk sums, added in chunk order by a
//     second dx launch). dgamma/dbeta partials by a kernel of their own,
//     coalesced along inner.
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
// Vectors per thread and array each streaming pass has in flight
// (ForStrided): 4 in the forward's passes over x alone, 2 where a pass reads
// three arrays (the forward's output pass: x, gamma, beta; the backward: x,
// dy, gamma), 6 loads in flight either way. Three arrays of 4 vectors, 12 x N
// values, would not fit the 128 registers of a kStreamBlock CTA (spills).
constexpr int kStreamUnroll = 4;
constexpr int kStreamOutUnroll = 2;
constexpr int kBackwardStreamUnroll = 2;
// Column (inner > 1) kernels: a tile is at most kColumnTileCols adjacent
// inner columns (a warp then reads 128 bytes of one float row); a CTA starts
// at kColumnBlock threads (w columns x kColumnBlock / w rows of D) and grows
// along D up to kMaxColumnBlock while the grid has fewer than
// kColumnFillThreadsPerSm threads per SM (a full SM's worth).
constexpr int kColumnTileCols = 32;
constexpr int kColumnBlock = 256;
constexpr int kMaxColumnBlock = 512;
constexpr int kColumnFillThreadsPerSm = 2048;
// Rows of D per thread the column kernels keep in registers (template
// instantiations: kColumnFewRows, kColumnCachedRows, and 0 = streamed: two
// or three reads of x, the later ones mostly from L2). The forward holds 16
// values, the backward 2 x 16 (xhat and dy * gamma); both spill-free within
// the 128 registers a kMaxColumnBlock CTA leaves (ptxas --resource-usage).
constexpr int kColumnFewRows = 4;
constexpr int kColumnCachedRows = 16;
// The backward splits D across CTAs into chunks of at least this many rows
// per thread: every chunk adds one partial sum per column to the combine, so
// much shorter chunks would cost more in combining than they save.
constexpr int kColumnMinChunkRowsPerThread = 8;
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

// The register kernels' access to vector k of a thread: `n` = elements of
// the thread's valid prefix (ValidPrefix) left at it, k * N subtracted: the
// vector lies in the row iff n > 0, its element j iff j < n (with `vec`, D
// is a multiple of N and n >= N whenever n > 0). Masks that compare a
// constant with one 32-bit register: the 64-bit column of every element,
// invariant along the persistent row loop, was hoisted out of it by the
// compiler and held two registers per element.
template <int N, typename T, typename C>
__device__ __forceinline__ void LoadVecN(const T* __restrict__ p, int n, bool vec, C (&out)[N],
                                         C fill = C(0)) {
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = fill;
  } else if (vec) {
    if (n > 0) {
      const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = static_cast<C>(Convert<T>::Widen(pk.v[j]));
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = fill;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = j < n ? static_cast<C>(Convert<T>::Widen(p[j])) : fill;
  }
}

template <int N, typename T, typename C>
__device__ __forceinline__ void StoreVecN(T* __restrict__ p, int n, bool vec, const C (&in)[N]) {
  if (vec) {
    if (n > 0) {
      Pack<T, N> pk;
#pragma unroll
      for (int j = 0; j < N; ++j) pk.v[j] = Convert<T>::Narrow(in[j]);
      *reinterpret_cast<Pack<T, N>*>(p) = pk;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (j < n) p[j] = Convert<T>::Narrow(in[j]);
    }
  }
}

// `v`, which the compiler cannot see through: addresses and masks derived
// from an Opaque() copy of a loop-invariant value inside the persistent row
// loops are computed where they are used, rather than hoisted out of the
// loop by the compiler's LICM and held in registers for its whole length
// (with clang, two registers per vector per array: spills). A few integer
// instructions per vector in exchange. A no-op outside the device compile.
__device__ __forceinline__ int Opaque(int v) {
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+r"(v));
#endif
  return v;
}
// 32-bit only ("+r"): a wider value must not convert silently.
template <typename V>
V Opaque(V) = delete;

// Elements of row[col .. col + N) inside a row of d (col < d: 1 .. N), as
// LoadVecN counts them.
template <int N>
__device__ __forceinline__ int Remaining(int64_t col, int64_t d) {
  return d - col < N ? static_cast<int>(d - col) : N;
}

// The row a register kernel's thread holds: kVpt vectors of N elements,
// read by LoadVecN and used in several passes as x - shift (C). float and
// double rows are held as x - shift itself. 16-bit rows are held as their
// storage words, two elements per 32-bit register, and widened (exactly) at
// each use: half the registers of a row held in float, the same values
// (x - shift rounds the same wherever it is computed). Refresh() between the
// passes keeps the compiler from reusing one pass's widened values in the
// next (it would hold them all, in float, across the reduction between).
template <typename T, int kVpt, int N, bool kWords = sizeof(T) == 2>
struct HeldRow {
  using C = ComputeT<T>;
  C v[kVpt][N];  // x, then x - shift once Shift() has run
  __device__ __forceinline__ void Load(int k, const T* __restrict__ p, int n, bool vec) {
    LoadVecN<N>(p, n, vec, v[k]);
  }
  // x before Shift(k, j), x - shift after it.
  __device__ __forceinline__ C X(int k, int j) const { return v[k][j]; }
  __device__ __forceinline__ void Shift(int k, int j, C shift) { v[k][j] -= shift; }
  // x again after the double recomputation (shift 0 from then on).
  __device__ __forceinline__ void Reload(int k, const T* __restrict__ p, int n, bool vec) {
    LoadVecN<N>(p, n, vec, v[k]);
  }
  __device__ __forceinline__ void Refresh() {}
  // x - shift, after Shift().
  __device__ __forceinline__ C Dev(int k, int j, C /*shift*/) const { return v[k][j]; }
};

template <typename T>
struct Bits16;
template <>
struct Bits16<__half> {
  static __device__ __forceinline__ unsigned short Of(__half h) { return __half_as_ushort(h); }
  static __device__ __forceinline__ __half From(unsigned short u) { return __ushort_as_half(u); }
};
template <>
struct Bits16<__nv_bfloat16> {
  static __device__ __forceinline__ unsigned short Of(__nv_bfloat16 h) {
    return __bfloat16_as_ushort(h);
  }
  static __device__ __forceinline__ __nv_bfloat16 From(unsigned short u) {
    return __ushort_as_bfloat16(u);
  }
};

template <typename T, int kVpt, int N>
struct HeldRow<T, kVpt, N, true> {
  static_assert(N % 2 == 0, "two 16-bit elements per word");
  using C = ComputeT<T>;
  uint32_t w[kVpt][N / 2];  // element j in bits 16 * (j % 2) of word j / 2; 0 outside the row
  __device__ __forceinline__ void Load(int k, const T* __restrict__ p, int n, bool vec) {
    if (vec) {
      if (n > 0) {
        const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
        for (int j = 0; j < N / 2; ++j) {
          w[k][j] = static_cast<uint32_t>(Bits16<T>::Of(pk.v[2 * j])) |
                    static_cast<uint32_t>(Bits16<T>::Of(pk.v[2 * j + 1])) << 16;
        }
      } else {
#pragma unroll
        for (int j = 0; j < N / 2; ++j) w[k][j] = 0;
      }
    } else {
#pragma unroll
      for (int j = 0; j < N / 2; ++j) {
        const uint32_t lo = 2 * j < n ? Bits16<T>::Of(p[2 * j]) : 0;
        const uint32_t hi = 2 * j + 1 < n ? Bits16<T>::Of(p[2 * j + 1]) : 0;
        w[k][j] = lo | hi << 16;
      }
    }
  }
  __device__ __forceinline__ C X(int k, int j) const { return Dev(k, j, C(0)); }
  __device__ __forceinline__ void Shift(int, int, C) {}
  // The words still hold x.
  __device__ __forceinline__ void Reload(int, const T*, int, bool) {}
  __device__ __forceinline__ void Refresh() {
#if defined(__CUDA_ARCH__)
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
#pragma unroll
      for (int j = 0; j < N / 2; ++j) asm volatile("" : "+r"(w[k][j]));
    }
#endif
  }
  __device__ __forceinline__ C Dev(int k, int j, C shift) const {
    const uint32_t word = w[k][j / 2];
    const unsigned short bits = static_cast<unsigned short>(j % 2 ? word >> 16 : word & 0xffffu);
    return Convert<T>::Widen(Bits16<T>::From(bits)) - shift;
  }
};

// Elements of a register kernel's thread that lie in a row of d elements:
// its element (k, j) is column (k * tpr + lane) * N + j, so those in the row
// are a prefix in (k, j) order, of the length returned (<= kVpt * N).
template <int kVpt, int N>
__device__ __forceinline__ int ValidPrefix(int64_t d, int tpr, int lane) {
  int n = 0;
  int64_t rem = d - static_cast<int64_t>(lane) * N;
#pragma unroll
  for (int k = 0; k < kVpt; ++k) {
    n += rem <= 0 ? 0 : rem < N ? static_cast<int>(rem) : N;
    rem -= static_cast<int64_t>(tpr) * N;
  }
  return n;
}

// The streaming loops: col = start, start + step, ... < end, kU columns at a
// time (memory-level parallelism: kU loads in flight per thread), as an
// outer runtime loop over whole groups of kU columns whose inner loops have
// a fixed count, then the remaining columns one at a time. load(u, col) for
// the kU columns of a group, then use(u, col) for them in column order: the
// loads are issued before any use (or store) of the group. The caller's
// per-column state is indexed by u (the remainder uses u = 0). clang does
// not runtime-unroll a loop of runtime stride ("#pragma unroll 4" on it was
// ignored, with a warning); this gives the same schedule under any compiler.
template <int kU, typename Load, typename Use>
__device__ __forceinline__ void ForStrided(int64_t start, int64_t step, int64_t end, Load&& load,
                                           Use&& use) {
  int64_t col = start;
  for (; col + (kU - 1) * step < end; col += kU * step) {
#pragma unroll
    for (int u = 0; u < kU; ++u) load(u, col + u * step);
#pragma unroll
    for (int u = 0; u < kU; ++u) use(u, col + u * step);
  }
#pragma unroll 1
  for (; col < end; col += step) {
    load(0, col);
    use(0, col);
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

// ---------------------------------------------------------------------------
// Column tiles (inner > 1)

// Geometry shared by the column kernels (PlanColumns). Unit u of their
// persistent loops is (outer index, tile, chunk of D).
struct ColumnGrid {
  int w;               // columns per tile: a power of two <= kColumnTileCols
  int tr;              // thread rows along D; w * tr <= blockDim.x (the rest idle)
  int64_t tiles;       // ceil(inner / w)
  int64_t chunks;      // CTAs along D per (outer, tile); 1 in the forward
  int64_t chunk_rows;  // rows of D per chunk
  int64_t units;       // outer * tiles * chunks
};

// Thread (tx, ty) of a column CTA in one unit: column i = tile * w + tx of
// outer index o, rows k_begin = chunk * chunk_rows + ty, k_begin + tr, ...
// up to the chunk's end (none for idle threads and columns past inner).
struct ColumnUnit {
  bool column;      // i < inner
  int64_t col;      // statistics index o * inner + i
  int64_t base;     // element index of x[o, 0, i]
  int64_t chunk;    // chunk of D
  int64_t k_begin;  // the thread's first row along D
  int64_t rows;     // its rows: k_begin, k_begin + tr, ... (0 for idle threads)
  int64_t first;    // element index of its first row, x[o, k_begin, i]
};

__device__ __forceinline__ ColumnUnit ColumnUnitOf(const ColumnGrid& g, int64_t u, int64_t d,
                                                   int64_t inner, int tx, int ty) {
  ColumnUnit cu;
  cu.chunk = u % g.chunks;
  const int64_t t = u / g.chunks;
  const int64_t o = t / g.tiles;
  const int64_t i = (t - o * g.tiles) * g.w + tx;
  cu.column = i < inner;
  cu.col = o * inner + i;
  cu.base = o * d * inner + i;
  cu.k_begin = cu.chunk * g.chunk_rows + ty;
  const int64_t end = (cu.chunk + 1) * g.chunk_rows < d ? (cu.chunk + 1) * g.chunk_rows : d;
  cu.rows = cu.column && ty < g.tr && cu.k_begin < end ? (end - cu.k_begin + g.tr - 1) / g.tr : 0;
  cu.first = cu.rows > 0 ? cu.base + cu.k_begin * inner : 0;
  return cu;
}

// Calls f(j) for the thread's rows j = 0 .. rows - 1 of a unit; the caller
// steps its own pointers by tr * inner elements per row (pointers per pass,
// rather than indices shared by the passes, which the compiler would keep
// live across them). kVpt > 0: an unrolled loop of kVpt steps (the caller
// keeps row j in registers; the plan makes sure the chunk fits), else a
// streamed loop.
template <int kVpt, typename F>
__device__ __forceinline__ void ForColumnRows(int64_t rows, F&& f) {
  if constexpr (kVpt > 0) {
    const int n = static_cast<int>(rows);  // <= kVpt
#pragma unroll
    for (int j = 0; j < kVpt; ++j) {
      if (j < n) f(j);
    }
  } else {
    // Groups of 4 rows in straight-line code (4 loads in flight), then the
    // rest: what "#pragma unroll 4" asked for, which clang ignored here.
    int64_t j = 0;
    for (; j + 4 <= rows; j += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) f(0);
    }
#pragma unroll 1
    for (; j < rows; ++j) f(0);
  }
}

// Sum over the thread rows of a column CTA; every thread of a column ends
// with the same bits. Lanes tx, tx + w, ... of a warp hold rows of the same
// column (w divides 32): a xor butterfly over offsets >= w adds them (the
// same two operands on both sides), then the warps' sums are added in warp
// order. `smem` holds 2 x kMaxColumnBlock x K values and alternates halves as
// RowAllReduce does (one barrier per reduction). The double reductions of the
// float kernels use the same bytes: a half of K = 2 floats is a half of
// K = 1 doubles, so the alternation stays valid across the two views.
template <typename C, int K>
__device__ __forceinline__ void ColumnAllReduce(C (&v)[K], int w, C* smem, int& parity) {
  for (int offset = kWarp / 2; offset >= w; offset /= 2) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
  const int warps = blockDim.x / kWarp;
  if (warps == 1) return;
  C* buf = smem + parity * kMaxColumnBlock * K;
  parity ^= 1;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane < w) {
#pragma unroll
    for (int k = 0; k < K; ++k) buf[(warp * w + lane) * K + k] = v[k];
  }
  __syncthreads();
  const int tx = lane % w;
  // The warps' slots are w * K apart; from an Opaque() copy of w, so that the
  // compiler does not hoist the multiples of the stride its unrolling of the
  // loop over the warps uses out of the kernels' unit loops (8 registers held
  // across the whole kernel: spills in BackwardColumnsKernel with clang).
  const int stride = Opaque(w) * K;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    C s = 0;
    const C* b = buf + tx * K + k;
    for (int q = 0; q < warps; ++q, b += stride) s += *b;
    v[k] = s;
  }
}

// Whether any thread of the CTA passes true; the same answer in every thread.
// `smem`: 2 x kMaxColumnBlock / kWarp ints, alternating halves as above.
__device__ __forceinline__ bool BlockAny(bool flag, int* smem, int& parity) {
  int v = flag ? 1 : 0;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v |= __shfl_xor_sync(0xffffffffu, v, offset);
  }
  const int warps = blockDim.x / kWarp;
  if (warps == 1) return v != 0;
  int* buf = smem + parity * (kMaxColumnBlock / kWarp);
  parity ^= 1;
  if (threadIdx.x % kWarp == 0) buf[threadIdx.x / kWarp] = v;
  __syncthreads();
  for (int q = 0; q < warps; ++q) v |= buf[q];
  return v != 0;
}

// xhat = (x - mean) * rstd, kept finite where it is representable: x - mean
// overflows only for finite x and mean of opposite signs near float's limit
// (2e38 in a column of mostly -2e38); rstd <= sqrt(D) / |x - mean| is then
// tiny, and x * rstd - mean * rstd adds two terms of the same sign (no
// cancellation). NaN/Inf inputs keep their NaN/Inf.
template <typename C>
__device__ __forceinline__ C Normalize(C x, C mean, C rstd) {
  const C dev = x - mean;
  if (!(dev - dev == C(0)) && x - x == C(0) && mean - mean == C(0)) {
    return x * rstd - mean * rstd;
  }
  return dev * rstd;
}

// ---------------------------------------------------------------------------
// Forward kernels

template <typename T, typename U>
struct ForwardParams {
  using C = ComputeT<T>;
  const T* x;  // what the kernels normalize: the caller's x, or `sum` with a residual
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
  // Residual add (residual == nullptr: none, and addend/sum unused): each
  // thread first writes sum = addend + residual (AddRounded) at exactly the
  // elements it reads of x later (x == sum then), in its own thread ->
  // element mapping, and reads them back after: program order, no barrier.
  // The one element other threads read, the first (the mean's shift), they
  // compute from addend and residual themselves (FirstOf). Fields in the
  // constant bank: no register cost when unused.
  const T* addend;  // the caller's x
  const T* residual;
  T* sum;
};

// x + r rounded to T as an element-wise add in T rounds it, widened: the sum
// is taken in C (exact for float/double's own add; for 16-bit T, float has
// more than 2p + 2 bits, so rounding through float is innocuous) and rounded
// once by Convert<T>::Narrow, as StoreVec/StoreVecN round the pre-passes'.
template <typename T>
__device__ __forceinline__ ComputeT<T> AddRounded(T x, T r) {
  return Convert<T>::Widen(Convert<T>::Narrow(Convert<T>::Widen(x) + Convert<T>::Widen(r)));
}

// x[at] (widened) of the row or column being normalized, x + residual with a
// residual: read by threads other than the one that writes sum[at], so taken
// from the inputs rather than from sum.
template <typename T, typename U>
__device__ __forceinline__ ComputeT<T> FirstOf(const ForwardParams<T, U>& p, int64_t at) {
  if (p.residual != nullptr) return AddRounded(p.addend[at], p.residual[at]);
  return Convert<T>::Widen(p.x[at]);
}

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

// Double statistics of a row whose elements the register kernels hold (x
// at the columns (k * tpr + lane) * N + j, as they load it), re-read from
// memory one vector at a time: the register kernels keep x - shift, not x,
// and this rare branch then costs their hot path no registers. Reduced over
// the row's tpr threads like the float statistics, the elements added in
// the same order as from registers. Every thread of the row group calls it
// (warp- or CTA-uniform branch).
template <typename T, typename C, int kVpt, int N>
__device__ __forceinline__ RowStats<C> WideStatsRegisters(const T* xr, bool vec, int lane,
                                                          int tpr, int valid, int64_t d, bool rms,
                                                          C eps, double (*smem)[kWarp][1],
                                                          int& parity) {
  double s[1] = {0.0};
  if (!rms) {
#pragma unroll 1
    for (int k = 0; k < kVpt; ++k) {
      const int n = valid - k * N;
      C v[N];
      LoadVecN<N>(xr + (static_cast<int64_t>(k) * tpr + lane) * N, n, vec, v);
#pragma unroll
      for (int j = 0; j < N; ++j) s[0] += j < n ? static_cast<double>(v[j]) : 0.0;
    }
    RowAllReduce(s, tpr, smem, parity);
  }
  const double mu = rms || d == 0 ? 0.0 : s[0] / static_cast<double>(d);
  double q[1] = {0.0};
#pragma unroll 1
  for (int k = 0; k < kVpt; ++k) {
    const int n = valid - k * N;
    C v[N];
    LoadVecN<N>(xr + (static_cast<int64_t>(k) * tpr + lane) * N, n, vec, v);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const double dev = static_cast<double>(v[j]) - mu;
      q[0] += j < n ? dev * dev : 0.0;
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

// Launch bounds of the register kernels, per instantiation (PlanRows:
// the dtype's most vectors per thread, MaxVpt<T, kRowRegs>(), runs CTAs of up to
// kMaxThreadsPerRow threads; fewer vectors always run kSmallRowsBlock).
// Left to its own occupancy target ptxas settled at 56, 64 or 80 registers
// depending on the arch, and spilled 4-40 bytes in the instantiations whose
// need lies just above: the minimum CTAs per SM pin the register budget.
//  - Max-vpt instantiations: no bound (they fit), except 16-bit rows of 4
//    vectors (16 words held): 1 CTA of 512 per SM, 87-88 registers; the
//    rows held as float took 123-125 registers, also 1 CTA.
//  - kSmallRowsBlock instantiations: 8 CTAs of 128 (64 registers: all of an
//    sm_75 SM's threads, half of an sm_80/sm_90 one) where that does not
//    spill; 7 (72 registers) for float64 forward rows of 4 vectors and
//    16-bit backward rows of 1; 6 (80 registers) where 72 still spilled on
//    some arch: float forward rows of 4 vectors, float backward rows of 2
//    (4 arrays of 8 registers); 5 (96 registers) for float64 backward rows
//    of 2, which spilled at 80 on sm_90.
// Under nvcc the backward fits 64 registers without spills as it is (sm_75,
// sm_90) and pinned budgets only cost occupancy (64 -> 68-76 registers):
// there it keeps the plain kMaxThreadsPerRow bound. The forward needs its
// budgets under both compilers (nvcc without them: 16-bit rows of 2 and 4
// vectors spill 12-36 bytes at 64).
#if defined(__clang__)
constexpr bool kPinBackwardBudgets = true;
#else
constexpr bool kPinBackwardBudgets = false;
#endif
template <typename T, int kRowRegs, int kVpt>
constexpr int RowsMaxThreads() {
  return kVpt < MaxVpt<T, kRowRegs>() ? kSmallRowsBlock : kMaxThreadsPerRow;
}
template <typename T, int kVpt>
constexpr int ForwardRegistersMinBlocks() {
  if (kVpt == MaxVpt<T, kForwardRowRegs>()) return sizeof(T) == 2 && kVpt == 4 ? 1 : 0;
  return sizeof(T) == 4 && kVpt >= 4 ? 6 : sizeof(T) == 8 && kVpt >= 4 ? 7 : 8;
}
template <typename T, int kVpt>
constexpr int BackwardRegistersMinBlocks() {
  if (!kPinBackwardBudgets) return 0;
  if (kVpt == MaxVpt<T, kBackwardRowRegs>()) return 0;
  if (kVpt * kVecWidth<T> * static_cast<int>(sizeof(ComputeT<T>)) / 4 < 8) return 8;
  return sizeof(T) == 2 ? 7 : sizeof(T) == 4 ? 6 : 5;
}

// Row in registers; kVpt vectors of kVecWidth<T> elements per thread. The
// mean is shifted by the row's first element (x - x[0] summed, as the CPU
// kernels do): rows far from 0 relative to their spread keep their bits.
// The registers hold x - shift, the one value of an element that all three
// passes use: holding x as well (for the x - x detector, the output, the
// double recomputation) kept two copies of the row live and spilled.
template <typename T, typename U, int kVpt>
__global__ void __launch_bounds__(RowsMaxThreads<T, kForwardRowRegs, kVpt>(),
                                  ForwardRegistersMinBlocks<T, kVpt>())
    ForwardRegistersKernel(ForwardParams<T, U> p, int tpr, bool vec) {
  using C = ComputeT<T>;
  constexpr int N = kVecWidth<T>;
  __shared__ C smem[2][kWarp][2];
  __shared__ double wide_smem[2][kWarp][1];
  int parity = 0, wide_parity = 0;
  const int lane = threadIdx.x % tpr;
  const int rows_per_cta = blockDim.x / tpr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_cta;
  const int row_valid = ValidPrefix<kVpt, N>(p.d, tpr, lane);  // p.d <= kVpt * tpr * N
  // Every thread runs the same trip count (barriers inside); idle rows read
  // zeros and write nothing.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_cta; base < p.rows;
       base += stride) {
    const int64_t row = base + threadIdx.x / tpr;
    const bool active = row < p.rows;
    const int64_t d = active ? p.d : 0;
    const int valid = active ? row_valid : 0;  // element (k, j) is in the row iff k * N + j < valid
    const int64_t row_at = (active ? row : 0) * p.d;
    if (p.residual != nullptr) {
      // The sum pre-pass over the thread's elements (k * tpr + lane) * N + j
      // of its valid prefix, one vector at a time: nothing of it stays live
      // into the passes below, which read the row back from sum (x).
      const int tpr_add = Opaque(tpr);
#pragma unroll 1
      for (int k = 0; k < kVpt; ++k) {
        const int n = valid - k * N;
        if (n <= 0) break;
        const int64_t at = row_at + (static_cast<int64_t>(k) * tpr_add + lane) * N;
        C a[N], b[N];
        LoadVecN<N>(p.addend + at, n, vec, a);
        LoadVecN<N>(p.residual + at, n, vec, b);
#pragma unroll
        for (int j = 0; j < N; ++j) a[j] += b[j];
        StoreVecN<N>(p.sum + at, n, vec, a);
      }
    }
    const T* xr = p.x + row_at;
    C shift = active && !p.rms ? MeanShift(FirstOf(p, row_at)) : C(0);
    HeldRow<T, kVpt, N> v;
    C sum[1] = {C(0)};
    // sq[1] sums x - x: 0 for a row of finite values, NaN otherwise.
    C sq[2] = {C(0), C(0)};
    const int tpr_in = Opaque(tpr);
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
      v.Load(k, xr + (static_cast<int64_t>(k) * tpr_in + lane) * N, valid - k * N, vec);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C x = v.X(k, j);
        sq[1] += x - x;
        v.Shift(k, j, shift);
        sum[0] += k * N + j < valid ? v.Dev(k, j, shift) : C(0);
      }
    }
    if (!p.rms) RowAllReduce(sum, tpr, smem, parity);  // uniform branch
    // Deviations are taken as (x - shift) - (mean - shift): exact to the
    // last bits of the spread, however the mean itself rounds.
    C center = p.rms ? C(0) : sum[0] * p.inv_d;  // mean - shift
    C mean = shift + center;
    v.Refresh();
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C dev = v.Dev(k, j, shift) - center;
        sq[0] += k * N + j < valid ? dev * dev : C(0);
      }
    }
    RowAllReduce(sq, tpr, smem, parity);
    C rstd = InvSqrt(sq[0] * p.inv_d + p.eps);
    // The same decision in every thread of a row (reduced statistics); the
    // recomputation's shuffles need the whole warp (rows of up to 32 threads)
    // or the whole CTA (one row per CTA, where the decision is CTA-uniform).
    const bool wide = active && sq[1] == C(0) && NeedsWideStats(mean, rstd);
    if (tpr <= kWarp ? __any_sync(0xffffffffu, wide) : wide) {
      const RowStats<C> w = WideStatsRegisters<T, C, kVpt, N>(
          xr, vec, lane, tpr, valid, d, p.rms, p.eps, wide_smem, wide_parity);
      if (wide) {
        // Such rows may span more than float's range (x - shift overflows):
        // y is taken from x and the mean itself. The thread re-reads its own
        // elements only, before it writes them (in place is still safe).
        mean = center = w.mean;
        rstd = w.rstd;
        shift = C(0);
#pragma unroll
        for (int k = 0; k < kVpt; ++k) {
          v.Reload(k, xr + (static_cast<int64_t>(k) * tpr + lane) * N, valid - k * N, vec);
        }
      }
    }
    if (!active) continue;
    if (lane == 0) {
      if (p.mean) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    T* yr = p.y + row * p.d;
    v.Refresh();
    const int tpr_out = Opaque(tpr);
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
      const int n = valid - k * N;
      if (n <= 0) break;
      const int64_t col = (static_cast<int64_t>(k) * tpr_out + lane) * N;
      C g[N], b[N], out[N];
      LoadVecN<N>(p.gamma ? p.gamma + col : nullptr, n, vec, g, C(1));
      LoadVecN<N>(p.beta ? p.beta + col : nullptr, n, vec, b, C(0));
      // ((x - shift) - center), or (x - mean) for rows recomputed in double.
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = (v.Dev(k, j, shift) - center) * rstd * g[j] + b[j];
      StoreVecN<N>(yr + col, n, vec, out);
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
    if (p.residual != nullptr) {
      // The sum pre-pass over the thread's columns threadIdx.x * N + m * step,
      // those of every pass below. WideStatsStreaming reads other threads'
      // columns, but after the __syncthreads of the reductions before it.
      // Held as HeldRow holds a row (16-bit values two to a register).
      const int64_t at = row * d;
      HeldRow<T, kStreamOutUnroll, N> a, b;
      ForStrided<kStreamOutUnroll>(
          static_cast<int64_t>(threadIdx.x) * N, step, d,
          [&](int u, int64_t col) {
            a.Load(u, p.addend + at + col, Remaining<N>(col, d), vec);
            b.Load(u, p.residual + at + col, Remaining<N>(col, d), vec);
          },
          [&](int u, int64_t col) {
            C out[N];
#pragma unroll
            for (int j = 0; j < N; ++j) out[j] = a.X(u, j) + b.X(u, j);
            StoreVec<N>(p.sum + at, col, d, vec, out);
          });
    }
    const T* xr = p.x + row * d;
    C sum[1] = {C(0)};
    C shift = C(0);
    if (!p.rms) {
      shift = MeanShift(FirstOf(p, row * d));  // see ForwardRegistersKernel
      HeldRow<T, kStreamUnroll, N> v;
      ForStrided<kStreamUnroll>(
          static_cast<int64_t>(threadIdx.x) * N, step, d,
          [&](int u, int64_t col) { v.Load(u, xr + col, Remaining<N>(col, d), vec); },
          [&](int u, int64_t col) {
#pragma unroll
            for (int j = 0; j < N; ++j) sum[0] += col + j < d ? v.X(u, j) - shift : C(0);
          });
      RowAllReduce(sum, tpr, smem, parity);
    }
    C center = p.rms ? C(0) : sum[0] * p.inv_d;  // mean - shift, as in ForwardRegistersKernel
    C mean = shift + center;
    C sq[2] = {C(0), C(0)};  // squared deviations; x - x (NaN iff a value is not finite)
    {
      HeldRow<T, kStreamUnroll, N> v;
      ForStrided<kStreamUnroll>(
          static_cast<int64_t>(threadIdx.x) * N, step, d,
          [&](int u, int64_t col) { v.Load(u, xr + col, Remaining<N>(col, d), vec); },
          [&](int u, int64_t col) {
#pragma unroll
            for (int j = 0; j < N; ++j) {
              const C x = v.X(u, j);
              const C dev = (x - shift) - center;
              sq[0] += col + j < d ? dev * dev : C(0);
              sq[1] += x - x;
            }
          });
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
    {
      // In place (y == x): a thread reads x at its own columns before it
      // writes y there.
      HeldRow<T, kStreamOutUnroll, N> v;
      C g[kStreamOutUnroll][N], b[kStreamOutUnroll][N];
      ForStrided<kStreamOutUnroll>(
          static_cast<int64_t>(threadIdx.x) * N, step, d,
          [&](int u, int64_t col) {
            v.Load(u, xr + col, Remaining<N>(col, d), vec);
            LoadVec<N>(p.gamma, col, d, vec, g[u], C(1));
            LoadVec<N>(p.beta, col, d, vec, b[u], C(0));
          },
          [&](int u, int64_t col) {
            C out[N];
#pragma unroll
            for (int j = 0; j < N; ++j) {
              out[j] = ((v.X(u, j) - shift) - center) * rstd * g[u][j] + b[u][j];
            }
            StoreVec<N>(yr, col, d, vec, out);
          });
    }
  }
}

// The rows of x a forward column thread holds (kVpt > 0), as HeldRow: in
// the compute type, or 16-bit values two to a 32-bit word (row j in bits
// 16 * (j % 2) of word j / 2), widened exactly at each use.
template <typename T, int kVpt, bool kWords = (sizeof(T) == 2 && kVpt > 0 && kVpt % 2 == 0)>
struct HeldColumn {
  using C = ComputeT<T>;
  C v[kVpt > 0 ? kVpt : 1];
  __device__ __forceinline__ void Clear() {
#pragma unroll
    for (int j = 0; j < kVpt; ++j) v[j] = C(0);
  }
  __device__ __forceinline__ void Set(int j, T x) { v[j] = Convert<T>::Widen(x); }
  __device__ __forceinline__ C Get(int j) const { return v[j]; }
  __device__ __forceinline__ void Refresh() {}
};
template <typename T, int kVpt>
struct HeldColumn<T, kVpt, true> {
  using C = ComputeT<T>;
  uint32_t w[kVpt / 2];
  __device__ __forceinline__ void Clear() {
#pragma unroll
    for (int j = 0; j < kVpt / 2; ++j) w[j] = 0;
  }
  __device__ __forceinline__ void Set(int j, T x) {
    w[j / 2] |= static_cast<uint32_t>(Bits16<T>::Of(x)) << (j % 2 ? 16 : 0);
  }
  __device__ __forceinline__ C Get(int j) const {
    const uint32_t word = w[j / 2];
    return Convert<T>::Widen(
        Bits16<T>::From(static_cast<unsigned short>(j % 2 ? word >> 16 : word & 0xffffu)));
  }
  // Between the passes (see HeldRow::Refresh).
  __device__ __forceinline__ void Refresh() {
#if defined(__CUDA_ARCH__)
#pragma unroll
    for (int j = 0; j < kVpt / 2; ++j) asm volatile("" : "+r"(w[j]));
#endif
  }
};

// inner > 1: a CTA per (outer index, column tile) unit, the tile's D rows
// spread over the thread rows. Three passes: the sum of x - shift (MeanShift
// of the column's first element: columns like 1e4 + N(0, 0.1) keep their
// bits), the squared deviations (x - shift) - (mean - shift) (two-pass
// variance, exact to the spread's last bits however the mean rounds) with a
// NaN/Inf detector, then y from the same deviations. kVpt > 0: the thread's
// rows stay in registers between the passes (x is read once).
// Columns whose float statistics are out of range (NeedsWideStats) but whose
// values are all finite get them recomputed in double by all the threads of
// the column (the CTA takes that branch together when any of its columns
// needs it: the reductions have barriers). NaN/Inf columns keep their
// NaN/Inf statistics without it.
// In place (y == x) is safe: every thread writes y only at its own rows,
// after reading x there, and the other threads' reads of the column (its
// first element, the double recomputation) all come before the barrier of
// the last reduction, which precedes the first write of y.
template <typename T, typename U, int kVpt>
__global__ void __launch_bounds__(kMaxColumnBlock)
    ForwardColumnsKernel(ForwardParams<T, U> p, ColumnGrid cg) {
  using C = ComputeT<T>;
  // C[2][kMaxColumnBlock][2], viewed as double[2][kMaxColumnBlock][1] by the
  // double reductions of float kernels (see ColumnAllReduce).
  __shared__ double red_raw[2 * kMaxColumnBlock * 2 * sizeof(C) / sizeof(double)];
  __shared__ int any_smem[2 * kMaxColumnBlock / kWarp];
  C* red = reinterpret_cast<C*>(red_raw);
  int parity = 0, any_parity = 0;
  const int tx = threadIdx.x % cg.w, ty = threadIdx.x / cg.w;
  const int64_t d = p.d, inner = p.inner, step = static_cast<int64_t>(cg.tr) * inner;
  for (int64_t u = blockIdx.x; u < cg.units; u += gridDim.x) {
    const ColumnUnit cu = ColumnUnitOf(cg, u, d, inner, tx, ty);
    if (p.residual != nullptr) {
      // The sum pre-pass over the thread's rows of the unit, those every
      // pass below reads (each_row, each_row_slowly). A rolled loop: grouped
      // rows would have the compiler hold multiples of the step across the
      // kernel (spills, and twice the registers of the streamed kernels).
      int64_t at = cu.first;
#pragma unroll 1
      for (int64_t j = 0; j < cu.rows; ++j, at += step) {
        p.sum[at] = Convert<T>::Narrow(Convert<T>::Widen(p.addend[at]) +
                                       Convert<T>::Widen(p.residual[at]));
      }
    }
    HeldColumn<T, kVpt> v;
    if constexpr (kVpt > 0) {
      const T* xp = p.x + cu.first;
      v.Clear();
      ForColumnRows<kVpt>(cu.rows, [&](int j) {
        v.Set(j, *xp);
        xp += step;
      });
    }
    // f(x) over the thread's rows, from registers or from memory.
    auto each_row = [&](auto&& f) {
      if constexpr (kVpt > 0) {
        v.Refresh();
        ForColumnRows<kVpt>(cu.rows, [&](int j) { f(v.Get(j)); });
      } else {
        const T* xp = p.x + cu.first;
        ForColumnRows<0>(cu.rows, [&](int) {
          f(static_cast<C>(Convert<T>::Widen(*xp)));
          xp += step;
        });
      }
    };
    // The same from memory, one row at a time, for the rare double-precision
    // branch: x is intact until the first write of y, and the branch then
    // costs the hot path no registers.
    auto each_row_slowly = [&](auto&& f) {
      const T* xp = p.x + cu.first;
#pragma unroll 1
      for (int64_t j = 0; j < cu.rows; ++j, xp += step) {
        f(static_cast<C>(Convert<T>::Widen(*xp)));
      }
    };
    // mean = shift + center; RMSNorm: both 0.
    C shift = 0, center = 0;
    if (!p.rms) {
      if (cu.column) {
        shift = MeanShift(static_cast<C>(FirstOf(p, cu.base)));
      }
      C s[1] = {C(0)};
      each_row([&](C xv) { s[0] += xv - shift; });
      ColumnAllReduce(s, cg.w, red, parity);
      center = s[0] * p.inv_d;
    }
    C mean = shift + center;
    // Squared deviations, and x - x: 0, or NaN once the column holds a NaN/Inf.
    C q[2] = {C(0), C(0)};
    each_row([&](C xv) {
      const C dev = (xv - shift) - center;
      q[0] += dev * dev;
      q[1] += xv - xv;
    });
    ColumnAllReduce(q, cg.w, red, parity);
    C rstd = InvSqrt(q[0] * p.inv_d + p.eps);
    if constexpr (sizeof(C) == sizeof(float)) {
      const bool wide = cu.column && q[1] == C(0) && NeedsWideStats(mean, rstd);
      if (BlockAny(wide, any_smem, any_parity)) {  // uniform over the CTA
        double wmu = 0;
        if (!p.rms) {
          double s[1] = {0.0};
          each_row_slowly([&](C xv) {
            s[0] += static_cast<double>(xv) - static_cast<double>(shift);
          });
          ColumnAllReduce(s, cg.w, red_raw, parity);
          wmu = static_cast<double>(shift) + s[0] / static_cast<double>(d);
        }
        double sq[1] = {0.0};
        each_row_slowly([&](C xv) {
          const double dev = static_cast<double>(xv) - wmu;
          sq[0] += dev * dev;
        });
        ColumnAllReduce(sq, cg.w, red_raw, parity);
        if (wide) {
          const RowStats<C> w = FinishWideStats(wmu, sq[0], d, p.eps);
          // Such columns may span more than float's range (x - shift
          // overflows): their deviations are taken from the mean itself.
          mean = center = w.mean;
          rstd = w.rstd;
          shift = C(0);
        }
      }
    }
    if (cu.column && ty == 0) {
      if (p.mean) p.mean[cu.col] = mean;
      p.rstd[cu.col] = rstd;
    }
    T* yp = p.y + cu.first;
    int64_t k = cu.k_begin;
    each_row([&](C xv) {
      const C g = p.gamma ? static_cast<C>(Convert<U>::Widen(p.gamma[k])) : C(1);
      const C b = p.beta ? static_cast<C>(Convert<U>::Widen(p.beta[k])) : C(0);
      *yp = Convert<T>::Narrow(Normalize(xv - shift, center, rstd) * g + b);
      yp += step;
      k += cg.tr;
    });
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
  // nullptr: none. Else dx = (the norm's dx, in C) + dsum, rounded once; read
  // at each element by the thread that writes dx there, right before it does.
  const T* dsum;
  C* part_dgamma;  // [parts, d] or nullptr
  C* part_dbeta;   // [parts, d] or nullptr
  C* col_sums;     // inner > 1 with D split: [chunks, rows, 2] chunk sums
  int64_t rows;
  int64_t d;
  int64_t inner;
  C inv_d;
};

template <typename T, typename U, int kVpt>
__global__ void __launch_bounds__(kPinBackwardBudgets ? RowsMaxThreads<T, kBackwardRowRegs, kVpt>()
                                                      : kMaxThreadsPerRow,
                                  BackwardRegistersMinBlocks<T, kVpt>())
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
  // Masks and addresses as in ForwardRegistersKernel (ValidPrefix, Opaque):
  // 32-bit masks, addresses computed in the row loop rather than hoisted.
  const int row_valid = ValidPrefix<kVpt, N>(p.d, tpr, lane);  // p.d <= kVpt * tpr * N
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_cta; base < p.rows;
       base += stride) {
    const int64_t row = base + threadIdx.x / tpr;
    const bool active = row < p.rows;
    const int valid = active ? row_valid : 0;  // element (k, j) is in the row iff k * N + j < valid
    const int64_t offset = (active ? row : 0) * p.d;
    const C mu = active && p.mean ? p.mean[row] : C(0);
    const C rs = active ? p.rstd[row] : C(0);
    C xh[kVpt][N], g[kVpt][N];
    C s[2] = {C(0), C(0)};
    const int tpr_in = Opaque(tpr);
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * tpr_in + lane) * N;
      const int n = valid - k * N;
      C gm[N];
      LoadVecN<N>(p.x + offset + col, n, vec, xh[k]);
      LoadVecN<N>(p.dy + offset + col, n, vec, g[k]);
      LoadVecN<N>(p.gamma ? p.gamma + col : nullptr, n, vec, gm, C(1));
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const C xhat = j < n ? (xh[k][j] - mu) * rs : C(0);
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
    const int tpr_out = Opaque(tpr);
#pragma unroll
    for (int k = 0; k < kVpt; ++k) {
      const int n = valid - k * N;
      if (n <= 0) break;
      const int64_t col = (static_cast<int64_t>(k) * tpr_out + lane) * N;
      // Plus dsum (nothing added without it: -0 stays -0). 16-bit values
      // element by element, each load next to its use: a vector of them
      // loaded ahead spilled the 16-bit rows of one vector at their
      // 72-register budget (clang, sm_75), while element-wise loads, or a
      // vector loaded before dx's values are formed, spilled float64 rows of
      // 4 vectors at 128 (sm_90). ptxas -v on every arch, this form: none.
      if constexpr (sizeof(T) == 2) {
        const T* dsr = p.dsum != nullptr ? p.dsum + offset + col : nullptr;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          g[k][j] = rs * (g[k][j] - mean_g - xh[k][j] * mean_gx);
          if (dsr != nullptr && j < n) g[k][j] += static_cast<C>(Convert<T>::Widen(dsr[j]));
        }
        StoreVecN<N>(p.dx + offset + col, n, vec, g[k]);
      } else {
        C out[N];
#pragma unroll
        for (int j = 0; j < N; ++j) out[j] = rs * (g[k][j] - mean_g - xh[k][j] * mean_gx);
        if (p.dsum != nullptr) {
          C ds[N];
          LoadVecN<N>(p.dsum + offset + col, n, vec, ds);
#pragma unroll
          for (int j = 0; j < N; ++j) out[j] += ds[j];
        }
        StoreVecN<N>(p.dx + offset + col, n, vec, out);
      }
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
    C xv[kBackwardStreamUnroll][N], dyv[kBackwardStreamUnroll][N], gm[kBackwardStreamUnroll][N];
    auto load = [&](int u, int64_t col) {
      LoadVec<N>(p.x + offset, col, d, vec, xv[u]);
      LoadVec<N>(p.dy + offset, col, d, vec, dyv[u]);
      LoadVec<N>(p.gamma, col, d, vec, gm[u], C(1));
    };
    ForStrided<kBackwardStreamUnroll>(
        static_cast<int64_t>(threadIdx.x) * N, step, d, load, [&](int u, int64_t col) {
#pragma unroll
          for (int j = 0; j < N; ++j) {
            const C xhat = col + j < d ? (xv[u][j] - mu) * rs : C(0);
            const C g = dyv[u][j] * gm[u][j];
            s[0] += g;
            s[1] += g * xhat;
          }
        });
    RowAllReduce(s, static_cast<int>(blockDim.x), smem, parity);
    const C mean_g = p.rms ? C(0) : s[0] * p.inv_d, mean_gx = s[1] * p.inv_d;
    // dsum in flight with the other loads, held as HeldRow holds a row (16-bit
    // values two to a register): one more vector of registers per group.
    HeldRow<T, kBackwardStreamUnroll, N> dsv;
    ForStrided<kBackwardStreamUnroll>(
        static_cast<int64_t>(threadIdx.x) * N, step, d,
        [&](int u, int64_t col) {
          load(u, col);
          if (p.dsum != nullptr) dsv.Load(u, p.dsum + offset + col, Remaining<N>(col, d), vec);
        },
        [&](int u, int64_t col) {
          C out[N];
#pragma unroll
          for (int j = 0; j < N; ++j) {
            const C xhat = (xv[u][j] - mu) * rs;
            out[j] = rs * (dyv[u][j] * gm[u][j] - mean_g - xhat * mean_gx);
            if (p.dsum != nullptr) out[j] += dsv.X(u, j);
          }
          StoreVec<N>(p.dx + offset, col, d, vec, out);
        });
  }
}

// What a launch of BackwardColumnsKernel does to its units.
enum ColumnPhase : int {
  kColumnAll = 0,   // D in one chunk: the two sums over D, then dx
  kColumnSums = 1,  // D split: the chunk's sums into p.col_sums
  kColumnDx = 2,    // D split: the chunks' sums added, then the chunk's dx
};

// inner > 1: a CTA per (outer index, column tile, chunk of D) unit. With D
// split, kColumnDx adds the chunks' sums of a column in a fixed order: chunk
// c by thread row c % tr (in chunk order), then the thread rows as
// ColumnAllReduce adds them. kVpt > 0 (kColumnAll only): xhat and dy * gamma
// stay in registers between the passes.
template <typename T, typename U, int kVpt>
__global__ void __launch_bounds__(kMaxColumnBlock)
    BackwardColumnsKernel(BackwardParams<T, U> p, ColumnGrid cg, int phase) {
  using C = ComputeT<T>;
  __shared__ C red[2 * kMaxColumnBlock * 2];
  int parity = 0;
  const int tx = threadIdx.x % cg.w, ty = threadIdx.x / cg.w;
  const int64_t d = p.d, inner = p.inner, step = static_cast<int64_t>(cg.tr) * inner;
  for (int64_t u = blockIdx.x; u < cg.units; u += gridDim.x) {
    const ColumnUnit cu = ColumnUnitOf(cg, u, d, inner, tx, ty);
    const C mu = cu.column && p.mean ? p.mean[cu.col] : C(0);
    const C rs = cu.column ? p.rstd[cu.col] : C(0);
    C xh[kVpt > 0 ? kVpt : 1], gd[kVpt > 0 ? kVpt : 1];
    // f(j, xhat, g = dy * gamma) over the thread's rows, from memory (and
    // into registers when `keep`).
    auto read_rows = [&](bool keep, auto&& f) {
      const T* xp = p.x + cu.first;
      const T* dyp = p.dy + cu.first;
      int64_t k = cu.k_begin;
      ForColumnRows<kVpt>(cu.rows, [&](int j) {
        const C gm = p.gamma ? static_cast<C>(Convert<U>::Widen(p.gamma[k])) : C(1);
        const C xhat = Normalize(static_cast<C>(Convert<T>::Widen(*xp)), mu, rs);
        const C g = static_cast<C>(Convert<T>::Widen(*dyp)) * gm;
        if constexpr (kVpt > 0) {
          if (keep) {
            xh[j] = xhat;
            gd[j] = g;
          }
        }
        f(xhat, g);
        xp += step;
        dyp += step;
        k += cg.tr;
      });
    };
    C s[2] = {C(0), C(0)};  // sum of g, sum of g * xhat
    if (phase != kColumnDx) {
      read_rows(true, [&](C xhat, C g) {
        s[0] += g;
        s[1] += g * xhat;
      });
      ColumnAllReduce(s, cg.w, red, parity);
      if (phase == kColumnSums) {
        if (cu.column && ty == 0) {
          C* out = p.col_sums + (cu.chunk * p.rows + cu.col) * 2;
          out[0] = s[0];
          out[1] = s[1];
        }
        continue;  // uniform: the phase is the launch's
      }
    } else {
      if (cu.column && ty < cg.tr) {
        for (int64_t c = ty; c < cg.chunks; c += cg.tr) {
          const C* in = p.col_sums + (c * p.rows + cu.col) * 2;
          s[0] += in[0];
          s[1] += in[1];
        }
      }
      ColumnAllReduce(s, cg.w, red, parity);
    }
    const C mean_g = p.rms ? C(0) : s[0] * p.inv_d, mean_gx = s[1] * p.inv_d;
    // dx, plus dsum at the same element (read right before dx is written
    // there, by the thread that writes it). How the two addresses are formed
    // is what kept each instantiation at its registers without spills
    // (ptxas -v): one index for both with the rows in registers, dx's
    // pointer and its offset with the streamed rows (an index there had the
    // compiler hold its multiples, up to twice the registers).
    auto dx_of = [&](C xhat, C g, const T* ds) {
      const C out = rs * (g - mean_g - xhat * mean_gx);
      return Convert<T>::Narrow(ds != nullptr ? out + static_cast<C>(Convert<T>::Widen(*ds)) : out);
    };
    if constexpr (kVpt > 0) {  // kColumnAll: the rows are in registers
      int64_t at = cu.first;
      ForColumnRows<kVpt>(cu.rows, [&](int j) {
        p.dx[at] = dx_of(xh[j], gd[j], p.dsum != nullptr ? p.dsum + at : nullptr);
        at += step;
      });
    } else {
      T* dxp = p.dx + cu.first;
      read_rows(false, [&](C xhat, C g) {
        *dxp = dx_of(xhat, g, p.dsum != nullptr ? p.dsum + (dxp - p.dx) : nullptr);
        dxp += step;
      });
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

// dgamma/dbeta partials for inner > 1: CTA (block of tr indices along D,
// slice of the flattened (outer, inner) columns j = o * inner + i) ->
// part[slice, k]. Thread (tx, ty) sums index k = block * tr + ty over the
// slice's columns j0 + tx, j0 + tx + w, ...: with w the column tiles' width,
// a warp reads 32 / w rows of w adjacent columns (coalesced along inner).
// The element index advances by fixed steps with a carry at the end of an
// outer index: no division per element. The w lanes of a row are added by a
// xor butterfly (fixed order).
template <typename T>
__global__ void __launch_bounds__(kColumnBlock)
    ParamGradColumnsKernel(const T* __restrict__ dy, const T* __restrict__ x,
                           const ComputeT<T>* __restrict__ mean,
                           const ComputeT<T>* __restrict__ rstd, int64_t rows, int64_t d,
                           int64_t inner, int w, int tr, int64_t slice_cols,
                           ComputeT<T>* part_dgamma, ComputeT<T>* part_dbeta) {
  using C = ComputeT<T>;
  const int tx = threadIdx.x % w, ty = threadIdx.x / w;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * slice_cols;
  const int64_t j1 = j0 + slice_cols < rows ? j0 + slice_cols : rows;
  const int64_t plane = d * inner;
  // j += w moves i by w % inner and o by w / inner, plus a carry.
  const int64_t step_i = w % inner, step_idx = (w / inner) * plane + step_i;
  const int64_t o0 = (j0 + tx) / inner, i0 = j0 + tx - o0 * inner;
  for (int64_t kb = blockIdx.x; kb * tr < d; kb += gridDim.x) {
    const int64_t k = kb * tr + ty;
    C ag = 0, ab = 0;
    if (k < d) {
      int64_t i = i0, idx = o0 * plane + k * inner + i0;
      auto column = [&](int64_t j) {
        const C dyv = Convert<T>::Widen(dy[idx]);
        ag += dyv * Normalize(static_cast<C>(Convert<T>::Widen(x[idx])), mean ? mean[j] : C(0),
                              rstd[j]);
        ab += dyv;
        i += step_i;
        idx += step_idx;
        if (i >= inner) {
          i -= inner;
          idx += plane - inner;
        }
      };
      // Two columns per iteration in straight-line code, then the last one:
      // what "#pragma unroll 2" asked for, which clang ignored here.
      int64_t j = j0 + tx;
      for (; j + w < j1; j += 2 * w) {
        column(j);
        column(j + w);
      }
      if (j < j1) column(j);
    }
    for (int offset = w / 2; offset > 0; offset /= 2) {
      ag += __shfl_xor_sync(0xffffffffu, ag, offset);
      ab += __shfl_xor_sync(0xffffffffu, ab, offset);
    }
    if (tx == 0 && k < d) {
      const int64_t at = static_cast<int64_t>(blockIdx.y) * d + k;
      if (part_dgamma) part_dgamma[at] = ag;
      if (part_dbeta) part_dbeta[at] = ab;
    }
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

// Whether [a, a + bytes) and [b, b + bytes) share a byte (null never does).
bool Overlap(const void* a, const void* b, size_t bytes) {
  if (a == nullptr || b == nullptr) return false;
  const uintptr_t pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return (pa < pb ? pb - pa : pa - pb) < bytes;
}

// Bytes of `elements` values of `size` bytes, saturated (an overlap check
// with it is then conservative, never wrong by wrapping).
size_t SpanBytes(int64_t elements, size_t size) {
  const size_t n = static_cast<size_t>(elements);
  return n > std::numeric_limits<size_t>::max() / size ? std::numeric_limits<size_t>::max()
                                                       : n * size;
}

// The residual add's arguments (x, y not null: checked before): residual and
// sum together, and no overlap between sum, x, residual and y but x's with
// residual (two inputs). y shares no buffer with an input here
// (LayerNormForwardInPlaceSafe() is false with a residual): the sum is the
// tensor the binding would forward. Overlaps are checked as byte ranges of the
// whole tensor.
template <typename T>
Result CheckResidual(const ForwardArgs& a, int64_t elements) {
  if (a.residual != nullptr && a.sum == nullptr) {
    return Invalid("residual given without sum: the fused add writes x + residual to sum");
  }
  if (a.sum != nullptr && a.residual == nullptr) {
    return Invalid("sum given without residual: sum is written only by the fused residual add");
  }
  if (a.residual == nullptr) return Result();
  const size_t bytes = SpanBytes(elements, sizeof(T));
  if (Overlap(a.sum, a.x, bytes) || Overlap(a.sum, a.residual, bytes) ||
      Overlap(a.sum, a.y, bytes)) {
    return Invalid("sum must not overlap x, residual or y");
  }
  if (Overlap(a.y, a.residual, bytes) || Overlap(a.y, a.x, bytes)) {
    return Invalid("with a residual, y must not overlap x or residual (no in-place forward)");
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

// Calls f(std::integral_constant<int, vpt>) for the column kernels' rows per
// thread in registers: 0 (streamed), kColumnFewRows or kColumnCachedRows.
template <typename F>
Result DispatchColumnVpt(int vpt, F&& f) {
  switch (vpt) {
    case 0:
      return f(std::integral_constant<int, 0>{});
    case kColumnFewRows:
      return f(std::integral_constant<int, kColumnFewRows>{});
    case kColumnCachedRows:
      return f(std::integral_constant<int, kColumnCachedRows>{});
  }
  return Invalid("internal error: no column kernel for this row count");
}

int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

// How the column kernels (inner > 1) cover [outer, D, inner].
struct ColumnsPlan {
  ColumnGrid grid;
  int block = 0;  // threads per CTA: w * tr rounded up to whole warps
  int vpt = 0;    // rows per thread held in registers (template parameter)
};

// Tiles of w = min(kColumnTileCols, next power of two of inner) columns; a
// CTA of kColumnBlock threads, grown along D (up to kMaxColumnBlock) while
// the (outer, tile) units cannot fill the device. `split` (the backward,
// which has a workspace for the chunk sums): D is then also cut into chunks
// of at least kColumnMinChunkRowsPerThread rows per thread, one CTA each,
// until the grid fills the device. A function of the shape and the SM count.
ColumnsPlan PlanColumns(const Geometry& g, const Device& dev, bool split) {
  ColumnsPlan plan;
  ColumnGrid& cg = plan.grid;
  const int64_t d = g.norm;
  cg.w = NextPow2(std::min<int64_t>(g.inner, kColumnTileCols));
  cg.tiles = CeilDiv(g.inner, cg.w);
  const int64_t units = g.outer * cg.tiles;
  const int64_t fill = int64_t{kColumnFillThreadsPerSm} * dev.sms;
  int tr = kColumnBlock / cg.w;
  while (2 * tr * cg.w <= kMaxColumnBlock && units * cg.w * tr < fill && tr < d) tr *= 2;
  cg.tr = static_cast<int>(std::min<int64_t>(tr, d));
  plan.block = static_cast<int>(RoundUp(int64_t{cg.w} * cg.tr, kWarp));
  cg.chunks = 1;
  const int64_t threads = units * plan.block;
  if (split && threads < fill) {
    const int64_t most = d / (int64_t{cg.tr} * kColumnMinChunkRowsPerThread);
    cg.chunks = std::max<int64_t>(1, std::min(most, CeilDiv(fill, threads)));
  }
  cg.chunk_rows = CeilDiv(d, cg.chunks);
  cg.chunks = CeilDiv(d, cg.chunk_rows);
  cg.units = units * cg.chunks;
  const int64_t per_thread = CeilDiv(cg.chunk_rows, cg.tr);
  // Registers pay only when one kernel makes all the passes (no split).
  plan.vpt = cg.chunks > 1                      ? 0
             : per_thread <= kColumnFewRows    ? kColumnFewRows
             : per_thread <= kColumnCachedRows ? kColumnCachedRows
                                               : 0;
  return plan;
}

// ---------------------------------------------------------------------------
// Forward

// The register kernels' __launch_bounds__ assume PlanRows's rule (fewer
// vectors per thread than the dtype's most: kSmallRowsBlock-thread CTAs). A
// larger CTA would fail to launch on a GPU, while the emulator, which has no
// launch bounds, would run it: checked in every build, against the tightest
// bound any build uses.
template <typename T, int kRowRegs, int kVpt>
Result CheckRowsBlock(const RowsPlan& plan) {
  if (plan.block > RowsMaxThreads<T, kRowRegs, kVpt>()) {
    return Invalid("internal error: a register-kernel CTA exceeds its launch bounds");
  }
  return Result();
}

template <typename T, typename U, int kVpt>
Result LaunchForwardRegisters(const ForwardParams<T, U>& p, const RowsPlan& plan, bool vec,
                              const Device& dev, cudaStream_t stream) {
  TFLN_RETURN_IF_ERROR((CheckRowsBlock<T, kForwardRowRegs, kVpt>(plan)));
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
  TFLN_RETURN_IF_ERROR(CheckResidual<T>(a, rows * g.norm));
  ForwardParams<T, U> p;
  p.residual = static_cast<const T*>(a.residual);
  p.addend = p.residual ? static_cast<const T*>(a.x) : nullptr;
  p.sum = static_cast<T*>(a.sum);
  // The kernels normalize sum, which they write first, when there is a residual.
  p.x = p.residual ? p.sum : static_cast<const T*>(a.x);
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
    const ColumnsPlan plan = PlanColumns(g, dev, /*split=*/false);
    return DispatchColumnVpt(plan.vpt, [&](auto vpt) {
      auto kernel = ForwardColumnsKernel<T, U, decltype(vpt)::value>;
      int grid = 0;
      TFLN_RETURN_IF_ERROR(PersistentGrid(kernel, plan.block, dev, plan.grid.units, &grid));
      kernel<<<grid, plan.block, 0, stream>>>(p, plan.grid);
      return LastLaunch();
    });
  }
  const bool vec = g.norm % N == 0 && PackAligned<T, N>(p.x) && PackAligned<T, N>(p.y) &&
                   PackAligned<U, N>(p.gamma) && PackAligned<U, N>(p.beta) &&
                   PackAligned<T, N>(p.addend) && PackAligned<T, N>(p.residual);
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
  ColumnsPlan columns;     // columns path: the dx kernel's tiles
  int grid = 0;            // CTAs of the dx kernel
  int64_t parts = 0;       // rows of the dgamma/dbeta partials
  int64_t slice = 0;       // rows (streaming) or flattened columns (columns) per partial
  int64_t reduce_x = 0;    // gridDim.x of the partial kernel (columns path)
  int reduce_tr = 0;       // indices along D per partial CTA (columns path)
  int64_t part_elems = 0;  // elements of one partial buffer: parts * D
  int buffers = 0;         // partial buffers wanted: dgamma and/or dbeta
  int64_t col_sum_elems = 0;  // columns path with D split: chunks * rows * 2
  size_t workspace_bytes = 0;
};

template <typename T, typename U>
Result RegistersGrid(const RowsPlan& plan, const Device& dev, int64_t rows, int* grid) {
  const int64_t work = CeilDiv(rows, plan.block / plan.tpr);
  return DispatchVpt<MaxVpt<T, kBackwardRowRegs>()>(plan.vpt, [&](auto vpt) {
    TFLN_RETURN_IF_ERROR((CheckRowsBlock<T, kBackwardRowRegs, decltype(vpt)::value>(plan)));
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
    const ColumnsPlan& cp = plan->columns = PlanColumns(g, dev, /*split=*/true);
    TFLN_RETURN_IF_ERROR(DispatchColumnVpt(cp.vpt, [&](auto vpt) {
      return PersistentGrid(BackwardColumnsKernel<T, U, decltype(vpt)::value>, cp.block, dev,
                            cp.grid.units, &plan->grid);
    }));
    if (cp.grid.chunks > 1) plan->col_sum_elems = cp.grid.chunks * rows * 2;
    // dgamma/dbeta: CTAs of w columns x reduce_tr indices along D (whole
    // warps), the flattened columns cut into slices until the grid fills the
    // device a few times.
    const int w = cp.grid.w;
    plan->reduce_tr =
        static_cast<int>(std::min<int64_t>(kColumnBlock / w, RoundUp(d, kWarp / w)));
    const int64_t d_blocks = CeilDiv(d, plan->reduce_tr);
    plan->reduce_x = std::min<int64_t>(d_blocks, 1 << 20);
    const int64_t target = int64_t{kReduceCtasPerSm} * dev.sms;
    const int64_t slices = std::min<int64_t>(std::min<int64_t>(CeilDiv(rows, w), 65535),
                                             std::max<int64_t>(1, CeilDiv(target, d_blocks)));
    plan->slice = RoundUp(CeilDiv(rows, slices), w);
    plan->parts = CeilDiv(rows, plan->slice);
  } else {
    plan->vec = d % N == 0 && PackAligned<T, N>(a.x) && PackAligned<T, N>(a.dy) &&
                PackAligned<T, N>(a.dx) && PackAligned<U, N>(a.gamma) &&
                PackAligned<T, N>(a.dsum);
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
  plan->workspace_bytes =
      static_cast<size_t>(plan->part_elems * plan->buffers + plan->col_sum_elems) * sizeof(C);
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
  C* col_sums = plan.col_sum_elems > 0 ? ws + plan.part_elems * plan.buffers : nullptr;

  BackwardParams<T, U> p;
  p.dy = static_cast<const T*>(a.dy);
  p.x = static_cast<const T*>(a.x);
  p.gamma = static_cast<const U*>(a.gamma);
  p.mean = a.rms ? nullptr : static_cast<const C*>(a.mean);
  p.rstd = static_cast<const C*>(a.rstd);
  p.rms = a.rms;
  p.dx = static_cast<T*>(a.dx);
  p.dsum = static_cast<const T*>(a.dsum);
  p.part_dgamma = part_dgamma;
  p.part_dbeta = part_dbeta;
  p.col_sums = col_sums;
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
    case BackwardPath::kColumns: {
      const ColumnsPlan& cp = plan.columns;
      TFLN_RETURN_IF_ERROR(DispatchColumnVpt(cp.vpt, [&](auto vpt) {
        auto kernel = BackwardColumnsKernel<T, U, decltype(vpt)::value>;
        if (cp.grid.chunks == 1) {
          kernel<<<plan.grid, cp.block, 0, stream>>>(p, cp.grid, kColumnAll);
          return LastLaunch();
        }
        kernel<<<plan.grid, cp.block, 0, stream>>>(p, cp.grid, kColumnSums);
        TFLN_RETURN_IF_ERROR(LastLaunch());
        kernel<<<plan.grid, cp.block, 0, stream>>>(p, cp.grid, kColumnDx);
        return LastLaunch();
      }));
      if (plan.buffers > 0) {
        const int w = cp.grid.w;
        const dim3 grid(static_cast<unsigned>(plan.reduce_x), static_cast<unsigned>(plan.parts));
        ParamGradColumnsKernel<T><<<grid, w * plan.reduce_tr, 0, stream>>>(
            p.dy, p.x, p.mean, p.rstd, rows, d, g.inner, w, plan.reduce_tr, plan.slice,
            part_dgamma, part_dbeta);
      }
      break;
    }
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
  // Every forward path qualifies (see the header), without a residual add.
  // With one, y may overlap nothing (CheckResidual): kept out of the
  // residual path's contract rather than argued for each kernel.
  if (args.residual != nullptr || args.sum != nullptr) return false;
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
