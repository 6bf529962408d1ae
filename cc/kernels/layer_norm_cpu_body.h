// The CPU LayerNorm kernel bodies, written once over a vector-traits type V
// and included textually by each ISA translation unit, inside
//   namespace tf_layernorm::cpu::<isa> { namespace { struct V ...; HERE } }
// so every function below has internal linkage and an ISA-specific home: no
// two TUs compiled with different -m flags ever share a symbol (see
// layer_norm_cpu_isa.h). No include guard on purpose; no #include either (the
// enclosing TU includes what is needed before opening its namespaces), and
// no calls to std:: inline functions.
//
// V (compute type V::C, register V::R of V::kW lanes) provides:
//   Zero, Set1, Add, Sub, Mul, Div, Sqrt, MulAdd(a, b, c) = a * b + c, Sum
//   (horizontal, fixed order), First (lane 0), KeepN(v, n) (zero lanes >= n),
//   and for each storage type S it handles: Load(const S*), LoadN(const S*, n)
//   (n < kW lanes, the rest 0), Store(S*, R), StoreN(S*, R, n), and
//   StoreStream(S*, R) (non-temporal, 64-byte aligned full vectors) with
//   Fence() to order those stores before the range returns.
//
// In place: y may be x's buffer and dx dy's (the binding forwards TensorFlow's
// input buffer when nothing else holds it). Every path reads an element of
// x (dy) for the last time before it writes that element of y (dx), in the
// same thread, and units never share elements; so those pointers carry no
// __restrict (x/y, dy/dx), while the parameters and statistics, which never
// alias an output, keep it.
//
// Numerics (as before the ISA split): statistics in V::C; the mean from sums
// shifted by the row's first element (rows like 1e4 + N(0, 1) keep their
// precision); the variance from a second pass over the cached row, never
// E[x^2] - E[x]^2. Results differ between ISAs in the last bits (lane counts,
// FMA), never between runs or thread counts on one ISA.

template <typename T>
inline T MinI(T a, T b) {
  return a < b ? a : b;
}

// Loads lanes [i, i + n) of p, n <= kW; full vectors take the plain load.
template <class V, class S>
inline typename V::R LoadK(const S* p, int64_t n) {
  return n == V::kW ? V::Load(p) : V::LoadN(p, n);
}
template <class V, class S>
inline void StoreK(S* p, typename V::R v, int64_t n) {
  if (n == V::kW) {
    V::Store(p, v);
  } else {
    V::StoreN(p, v, n);
  }
}

// Calls f(i, n) for the vectors covering [0, len): n == kW except for a last
// partial vector. Inlined, so the full-vector case folds to plain loads.
template <class V, class F>
inline void ForVectors(int64_t len, F&& f) {
  int64_t i = 0;
  for (; i + V::kW <= len; i += V::kW) f(i, static_cast<int64_t>(V::kW));
  if (i < len) f(i, len - i);
}

template <class V>
inline typename V::C Rsqrt(typename V::C sum_sq, typename V::C inv_n, typename V::C eps) {
  using R = typename V::R;
  // Correctly rounded division and square root, as 1 / std::sqrt would be.
  const R v = V::Set1(sum_sq * inv_n + eps);
  return V::First(V::Div(V::Set1(1), V::Sqrt(v)));
}

// Sum over the row of (x - shift) and, in the second call, of (x - mean)^2.
// Four independent accumulators: enough to hide the add latency, and a fixed
// combination order.
template <class V, class S>
inline typename V::C RowSumShifted(const S* __restrict x, int64_t n, typename V::R shift) {
  using R = typename V::R;
  constexpr int64_t W = V::kW;
  R a0 = V::Zero(), a1 = V::Zero(), a2 = V::Zero(), a3 = V::Zero();
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = V::Add(a0, V::Sub(V::Load(x + i), shift));
    a1 = V::Add(a1, V::Sub(V::Load(x + i + W), shift));
    a2 = V::Add(a2, V::Sub(V::Load(x + i + 2 * W), shift));
    a3 = V::Add(a3, V::Sub(V::Load(x + i + 3 * W), shift));
  }
  for (; i + W <= n; i += W) a0 = V::Add(a0, V::Sub(V::Load(x + i), shift));
  if (i < n) a1 = V::Add(a1, V::KeepN(V::Sub(V::LoadN(x + i, n - i), shift), n - i));
  return V::Sum(V::Add(V::Add(a0, a1), V::Add(a2, a3)));
}

template <class V, class S>
inline typename V::C RowSumSquares(const S* __restrict x, int64_t n, typename V::R mean) {
  using R = typename V::R;
  constexpr int64_t W = V::kW;
  R a0 = V::Zero(), a1 = V::Zero(), a2 = V::Zero(), a3 = V::Zero();
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    const R d0 = V::Sub(V::Load(x + i), mean);
    const R d1 = V::Sub(V::Load(x + i + W), mean);
    const R d2 = V::Sub(V::Load(x + i + 2 * W), mean);
    const R d3 = V::Sub(V::Load(x + i + 3 * W), mean);
    a0 = V::MulAdd(d0, d0, a0);
    a1 = V::MulAdd(d1, d1, a1);
    a2 = V::MulAdd(d2, d2, a2);
    a3 = V::MulAdd(d3, d3, a3);
  }
  for (; i + W <= n; i += W) {
    const R d = V::Sub(V::Load(x + i), mean);
    a0 = V::MulAdd(d, d, a0);
  }
  if (i < n) {
    const R d = V::KeepN(V::Sub(V::LoadN(x + i, n - i), mean), n - i);
    a1 = V::MulAdd(d, d, a1);
  }
  return V::Sum(V::Add(V::Add(a0, a1), V::Add(a2, a3)));
}

// ------------------------------------------------- out-of-range statistics --
//
// float statistics fail on rows whose values are finite but whose squares
// leave float's range: |x - mean| ~ 1e20 and up overflows the sum of squares
// (rstd would be 0 and y = 0: PyTorch gives NaN there), and with epsilon ~ 0
// spreads ~ 1e-20 and below underflow it (rstd = inf, y = +-inf). The exact
// result is finite and representable in both cases, so such rows (rare: they
// are detected from the float statistics at no cost to normal rows) get
// their mean and rstd recomputed in double, which has the range for the
// squares of every float. NaN/Inf rows pass through here too and come out as
// NaN/Inf statistics exactly as before.

// The float statistics are trusted when the mean is finite and the rstd in
// (0, 1e15), i.e. mean square or variance + epsilon in (1e-30, inf).
template <typename C>
inline bool NeedsWideStats(C mu, C rs) {
  if (sizeof(C) != sizeof(float)) return false;  // double statistics have the range
  return !(mu - mu == 0 && rs > 0 && rs < C(1e15));
}

// Mean and rstd of n values at x, x + stride, ... in double. Scalar on
// purpose: only the rows above come here.
template <class V, class S>
void WideStats(const S* __restrict x, int64_t n, int64_t stride, bool rms, double epsilon,
               double* mean, double* rstd) {
  const double shift = rms ? 0.0 : static_cast<double>(V::First(V::LoadN(x, 1)));
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    sum += static_cast<double>(V::First(V::LoadN(x + i * stride, 1))) - shift;
  }
  const double mu = rms ? 0.0 : shift + sum / static_cast<double>(n);
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(V::First(V::LoadN(x + i * stride, 1))) - mu;
    ss += d * d;
  }
  *mean = mu;
  *rstd = 1.0 / __builtin_sqrt(ss / static_cast<double>(n) + epsilon);
}

// y = xhat * gamma + beta for one vector; xhat = (x - mean) * rstd.
template <class V, class P, bool kScale, bool kCenter>
inline typename V::R Affine(typename V::R xhat, const P* gamma, const P* beta, int64_t i,
                            int64_t n) {
  if (kScale && kCenter) return V::MulAdd(xhat, LoadK<V>(gamma + i, n), LoadK<V>(beta + i, n));
  if (kScale) return V::Mul(xhat, LoadK<V>(gamma + i, n));
  if (kCenter) return V::Add(xhat, LoadK<V>(beta + i, n));
  return xhat;
}

// ------------------------------------------------------------------ forward --

// Rows up to this many bytes get the next row prefetched while the current
// one is processed. The hardware prefetchers follow a stream within a 4 KiB
// page but start over at each new page, and rows are often exactly pages
// (1024 floats): without help every row begins with a full memory latency.
constexpr int64_t kPrefetchRowBytes = int64_t{16} << 10;

// Asks for the cache lines of [p, p + bytes) (bytes <= kPrefetchRowBytes).
inline void PrefetchBytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

// Half-precision rows up to this many elements are widened to float once,
// into a stack buffer, and the passes read that (16 KiB: L1-resident). The
// widening of 16-bit values costs about as much as the arithmetic on them, so
// doing it once instead of in every pass is most of a half row's time. The
// values are the same, so are the results.
constexpr int64_t kRowCacheElems = 4096;

// Widens n values at src into dst (full vectors: lanes past n hold zeros).
template <class V, class S>
inline void WidenRow(const S* __restrict src, int64_t n, typename V::C* __restrict dst) {
  ForVectors<V>(n, [&](int64_t i, int64_t k) { V::Store(dst + i, LoadK<V>(src + i, k)); });
}

// s = x + r over n elements, rounded to the storage type S exactly as an
// element-wise add in S rounds (computed in V::C: float's 24 bits are at
// least 2p + 2 of float16's and bfloat16's p, so rounding the float sum to S
// again gives the correctly rounded S sum). s may be x's buffer (or r's):
// every element is read before it is written.
template <class V, class S>
inline void AddRow(const S* x, const S* r, S* s, int64_t n) {
  ForVectors<V>(n, [&](int64_t i, int64_t k) {
    StoreK<V>(s + i, V::Add(LoadK<V>(x + i, k), LoadK<V>(r + i, k)), k);
  });
}

// AddRow that also leaves s's values in `cache` (the compute type, full
// vectors, lanes past n zero) for the passes to read, so s itself may be
// written with non-temporal stores (`stream`: n a multiple of kW, s aligned)
// and never read back.
template <class V, class S>
inline void AddRowToCache(const S* x, const S* r, S* s, int64_t n, typename V::C* __restrict cache,
                          bool stream) {
  using R = typename V::R;
  constexpr bool kNarrow = sizeof(S) < sizeof(typename V::C);
  ForVectors<V>(n, [&](int64_t i, int64_t k) {
    R v = V::Add(LoadK<V>(x + i, k), LoadK<V>(r + i, k));
    if (kNarrow) {
      // Rounded to S and widened back (exact): the value s holds.
      alignas(64) S tmp[V::kW];
      V::Store(tmp, v);
      v = V::KeepN(V::Load(tmp), k);
    }
    if (stream) {
      V::StoreStream(s + i, v);
    } else {
      StoreK<V>(s + i, v, k);
    }
    V::Store(cache + i, v);
  });
}

// One row of the forward; X is the type the row is read as: S, or the
// compute type when it was widened into a cache.
template <class V, class X, class S, class P, bool kScale, bool kCenter>
__attribute__((always_inline)) inline void ForwardRow(
    const ForwardArgs& a, int64_t n, typename V::C inv_n, typename V::C eps,
    const X* xr, S* yr, const P* __restrict gamma,
    const P* __restrict beta, typename V::C* __restrict mean, typename V::C* __restrict rstd,
    int64_t r) {
  using C = typename V::C;
  using R = typename V::R;
  C mu = 0;
  if (!a.rms) {
    const C shift = V::First(V::LoadN(xr, 1));
    mu = shift + RowSumShifted<V>(xr, n, V::Set1(shift)) * inv_n;
    mean[r] = mu;
  }
  // RMSNorm: mu == 0, so x - mu is x exactly and the sum of squares is the
  // mean square's.
  C rs = Rsqrt<V>(RowSumSquares<V>(xr, n, V::Set1(mu)), inv_n, eps);
  if (NeedsWideStats(mu, rs)) {
    double wide_mu, wide_rs;
    WideStats<V>(xr, n, 1, a.rms, a.epsilon, &wide_mu, &wide_rs);
    mu = static_cast<C>(wide_mu);
    rs = static_cast<C>(wide_rs);
    if (!a.rms) mean[r] = mu;
  }
  const R muv = V::Set1(mu);
  rstd[r] = rs;
  const R rsv = V::Set1(rs);
  if (a.stream) {
    // The driver guarantees n is a multiple of kW and rows are aligned.
    for (int64_t i = 0; i < n; i += V::kW) {
      const R xhat = V::Mul(V::Sub(V::Load(xr + i), muv), rsv);
      V::StoreStream(yr + i, Affine<V, P, kScale, kCenter>(xhat, gamma, beta, i, V::kW));
    }
  } else {
    ForVectors<V>(n, [&](int64_t i, int64_t k) {
      const R xhat = V::Mul(V::Sub(LoadK<V>(xr + i, k), muv), rsv);
      StoreK<V>(yr + i, Affine<V, P, kScale, kCenter>(xhat, gamma, beta, i, k), k);
    });
  }
}

// inner == 1: units are rows. The first pass reads the row from memory, the
// other two find it in L1/L2 (a 4096-float row is 16 KiB).
template <class V, class S, class P, bool kScale, bool kCenter>
void ForwardRows(const ForwardArgs& a, int64_t row_begin, int64_t row_end) {
  using C = typename V::C;
  constexpr bool kWiden = sizeof(S) < sizeof(C);
  const int64_t n = a.norm;
  const S* x = static_cast<const S*>(a.x);
  const S* res = static_cast<const S*>(a.residual);
  S* sum = static_cast<S*>(a.sum);
  S* y = static_cast<S*>(a.y);
  const P* __restrict gamma = static_cast<const P*>(a.gamma);
  const P* __restrict beta = static_cast<const P*>(a.beta);
  C* __restrict mean = static_cast<C*>(a.mean);
  C* __restrict rstd = static_cast<C*>(a.rstd);
  const C inv_n = C(1) / static_cast<C>(n);
  const C eps = static_cast<C>(a.epsilon);
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(S));
  auto prefetch_next = [&](int64_t r) {
    if (r + 1 >= row_end) return;
    PrefetchBytes(x + (r + 1) * n, row_bytes);
    if (res != nullptr) PrefetchBytes(res + (r + 1) * n, row_bytes);
  };
  // With a residual, rows are summed first (x and residual read from memory
  // once) and the passes read s from cache: from the row cache where rows
  // fit it (half rows, and any row whose s is streamed), else from s.
  if ((kWiden || (res != nullptr && a.stream_sum)) && n <= kRowCacheElems) {
    alignas(64) C cache[kRowCacheElems + V::kW];
    for (int64_t r = row_begin; r < row_end; ++r) {
      prefetch_next(r);
      if (res != nullptr) {
        AddRowToCache<V>(x + r * n, res + r * n, sum + r * n, n, cache, a.stream_sum);
      } else {
        WidenRow<V>(x + r * n, n, cache);
      }
      ForwardRow<V, C, S, P, kScale, kCenter>(a, n, inv_n, eps, cache, y + r * n, gamma, beta,
                                              mean, rstd, r);
    }
  } else {
    const bool prefetch = row_bytes <= kPrefetchRowBytes;
    for (int64_t r = row_begin; r < row_end; ++r) {
      if (prefetch) prefetch_next(r);
      const S* xr = x + r * n;
      if (res != nullptr) {
        AddRow<V>(xr, res + r * n, sum + r * n, n);
        xr = sum + r * n;
      }
      ForwardRow<V, S, S, P, kScale, kCenter>(a, n, inv_n, eps, xr, y + r * n, gamma, beta,
                                              mean, rstd, r);
    }
  }
  if (a.stream || a.stream_sum) V::Fence();
}

// Largest column chunk of the inner > 1 layout (the driver picks the chunk,
// a multiple of 16 up to this): sizes the stack accumulators.
constexpr int64_t kMaxChunkCols = 256;

// inner > 1: unit u is (outer index, chunk of columns), vectorized along the
// columns (contiguous in memory); the D rows of the chunk stream through.
template <class V, class S, class P, bool kScale, bool kCenter>
void ForwardColumns(const ForwardArgs& a, int64_t unit_begin, int64_t unit_end) {
  using C = typename V::C;
  using R = typename V::R;
  const int64_t n = a.norm, inner = a.inner;
  const S* x = static_cast<const S*>(a.x);
  S* y = static_cast<S*>(a.y);
  const P* __restrict gamma = static_cast<const P*>(a.gamma);
  const P* __restrict beta = static_cast<const P*>(a.beta);
  C* __restrict mean = static_cast<C*>(a.mean);
  C* __restrict rstd = static_cast<C*>(a.rstd);
  const C inv_n = C(1) / static_cast<C>(n);
  const R inv_nv = V::Set1(inv_n);
  const R epsv = V::Set1(static_cast<C>(a.epsilon));
  alignas(64) C shift[kMaxChunkCols + 16];
  alignas(64) C acc[kMaxChunkCols + 16];
  for (int64_t u = unit_begin; u < unit_end; ++u) {
    const int64_t o = u / a.chunks;
    const int64_t c0 = (u % a.chunks) * a.chunk;
    const int64_t w = MinI(a.chunk, inner - c0);
    const int64_t base = o * n * inner + c0;
    const S* x0 = x + base;
    if (a.residual != nullptr) {
      // The chunk's D rows summed into s first; the passes then read s.
      const S* r0 = static_cast<const S*>(a.residual) + base;
      S* s0 = static_cast<S*>(a.sum) + base;
      for (int64_t d = 0; d < n; ++d) {
        AddRow<V>(x0 + d * inner, r0 + d * inner, s0 + d * inner, w);
      }
      x0 = s0;
    }
    // Stack vectors are full width; lanes past w hold zeros.
    if (a.rms) {
      // RMSNorm: the mean is 0; shift holds the sum of squares below.
      ForVectors<V>(w, [&](int64_t j, int64_t) {
        V::Store(acc + j, V::Zero());
        V::Store(shift + j, V::Zero());
      });
    } else {
      ForVectors<V>(w, [&](int64_t j, int64_t k) {
        V::Store(shift + j, LoadK<V>(x0 + j, k));
        V::Store(acc + j, V::Zero());
      });
      for (int64_t d = 1; d < n; ++d) {
        const S* xr = x0 + d * inner;
        ForVectors<V>(w, [&](int64_t j, int64_t k) {
          const R t = V::Sub(LoadK<V>(xr + j, k), V::Load(shift + j));
          V::Store(acc + j, V::Add(V::Load(acc + j), t));
        });
      }
      // acc becomes the mean; shift is free for the sum of squares.
      ForVectors<V>(w, [&](int64_t j, int64_t) {
        V::Store(acc + j, V::MulAdd(V::Load(acc + j), inv_nv, V::Load(shift + j)));
        V::Store(shift + j, V::Zero());
      });
    }
    for (int64_t d = 0; d < n; ++d) {
      const S* xr = x0 + d * inner;
      ForVectors<V>(w, [&](int64_t j, int64_t k) {
        const R t = V::Sub(LoadK<V>(xr + j, k), V::Load(acc + j));
        V::Store(shift + j, V::MulAdd(t, t, V::Load(shift + j)));
      });
    }
    C* __restrict m = a.rms ? nullptr : mean + o * inner + c0;
    C* __restrict rs = rstd + o * inner + c0;
    ForVectors<V>(w, [&](int64_t j, int64_t k) {
      const R var = V::MulAdd(V::Load(shift + j), inv_nv, epsv);
      V::Store(shift + j, V::Div(V::Set1(1), V::Sqrt(var)));
    });
    // Columns whose float statistics are out of range (see WideStats).
    for (int64_t j = 0; j < w; ++j) {
      if (NeedsWideStats(acc[j], shift[j])) {
        double wide_mu, wide_rs;
        WideStats<V>(x0 + j, n, inner, a.rms, a.epsilon, &wide_mu, &wide_rs);
        acc[j] = static_cast<C>(wide_mu);
        shift[j] = static_cast<C>(wide_rs);
      }
    }
    ForVectors<V>(w, [&](int64_t j, int64_t k) {
      if (!a.rms) StoreK<V>(m + j, V::Load(acc + j), k);
      StoreK<V>(rs + j, V::Load(shift + j), k);
    });
    for (int64_t d = 0; d < n; ++d) {
      const S* xr = x0 + d * inner;
      S* yr = y + base + d * inner;
      const R gd = kScale ? V::Set1(V::First(V::LoadN(gamma + d, 1))) : V::Zero();
      const R bd = kCenter ? V::Set1(V::First(V::LoadN(beta + d, 1))) : V::Zero();
      ForVectors<V>(w, [&](int64_t j, int64_t k) {
        R t = V::Mul(V::Sub(LoadK<V>(xr + j, k), V::Load(acc + j)), V::Load(shift + j));
        if (kScale && kCenter) {
          t = V::MulAdd(t, gd, bd);
        } else if (kScale) {
          t = V::Mul(t, gd);
        } else if (kCenter) {
          t = V::Add(t, bd);
        }
        // Streaming implies whole aligned vectors (k == kW).
        if (a.stream) {
          V::StoreStream(yr + j, t);
        } else {
          StoreK<V>(yr + j, t, k);
        }
      });
    }
  }
  if (a.stream) V::Fence();
}

// ----------------------------------------------------------------- backward --

// Adds level 1 of a block's partials into level 0 (or copies it there for the
// block's first group).
template <class V>
inline void FlushCascade(typename V::C* __restrict level0, const typename V::C* __restrict level1,
                         int64_t n, bool first) {
  ForVectors<V>(n, [&](int64_t i, int64_t k) {
    const typename V::R v = LoadK<V>(level1 + i, k);
    StoreK<V>(level0 + i, first ? v : V::Add(LoadK<V>(level0 + i, k), v), k);
  });
}

// One row: the two row reductions and the row's dgamma/dbeta terms in one
// pass over x and dy (from memory), then dx from the cached row.
// kFirst: the row starts a cascade group, so it writes level 1 instead of
// adding to it (no zeroing pass).
template <class V, class S, class P, bool kScale, bool kCenter, bool kFirst>
inline void BackwardRow(int64_t n, const S* __restrict xr, const S* dyr,
                        const P* __restrict gamma, typename V::C mu, typename V::C rs,
                        const S* dsr, S* dxr, typename V::C* __restrict pg,
                        typename V::C* __restrict pb, bool rms, bool stream) {
  using C = typename V::C;
  using R = typename V::R;
  const R muv = V::Set1(mu), rsv = V::Set1(rs);
  R sg = V::Zero(), sgx = V::Zero();
  ForVectors<V>(n, [&](int64_t i, int64_t k) {
    const R dyv = LoadK<V>(dyr + i, k);
    R xh = V::Mul(V::Sub(LoadK<V>(xr + i, k), muv), rsv);
    // Lanes past k load x as 0, so xh there is -mean * rstd: +-inf once
    // |mean| * rstd overflows (e.g. a constant row of 1e20 with epsilon
    // 1e-30), and 0 * inf would put NaN into sgx, hence into every dx of the
    // row. Zero those lanes.
    if (k < V::kW) xh = V::KeepN(xh, k);
    const R gv = kScale ? V::Mul(dyv, LoadK<V>(gamma + i, k)) : dyv;
    // Lanes past k: dy loads as 0, so gv is 0 and nothing is added.
    sg = V::Add(sg, gv);
    sgx = V::MulAdd(gv, xh, sgx);
    if (kScale) {
      StoreK<V>(pg + i, kFirst ? V::Mul(dyv, xh) : V::MulAdd(dyv, xh, LoadK<V>(pg + i, k)), k);
    }
    if (kCenter) StoreK<V>(pb + i, kFirst ? dyv : V::Add(dyv, LoadK<V>(pb + i, k)), k);
  });
  const C inv_n = C(1) / static_cast<C>(n);
  // RMSNorm's dx has no mean(g) term (y does not depend on x's mean).
  const R mean_g = rms ? V::Zero() : V::Set1(V::Sum(sg) * inv_n);
  const R mean_gx = V::Set1(V::Sum(sgx) * inv_n);
  // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); RMSNorm drops mean(g).
  // Residual add + norm: + ds (dsr), before dx is rounded.
  if (stream) {
    for (int64_t i = 0; i < n; i += V::kW) {
      const R dyv = V::Load(dyr + i);
      const R xh = V::Mul(V::Sub(V::Load(xr + i), muv), rsv);
      const R gv = kScale ? V::Mul(dyv, V::Load(gamma + i)) : dyv;
      const R t = V::Sub(V::Sub(gv, mean_g), V::Mul(xh, mean_gx));
      V::StoreStream(dxr + i, dsr ? V::MulAdd(rsv, t, V::Load(dsr + i)) : V::Mul(rsv, t));
    }
    return;
  }
  ForVectors<V>(n, [&](int64_t i, int64_t k) {
    const R dyv = LoadK<V>(dyr + i, k);
    const R xh = V::Mul(V::Sub(LoadK<V>(xr + i, k), muv), rsv);
    const R gv = kScale ? V::Mul(dyv, LoadK<V>(gamma + i, k)) : dyv;
    const R t = V::Sub(V::Sub(gv, mean_g), V::Mul(xh, mean_gx));
    StoreK<V>(dxr + i, dsr ? V::MulAdd(rsv, t, LoadK<V>(dsr + i, k)) : V::Mul(rsv, t), k);
  });
}

template <class V, class S, class P, bool kScale, bool kCenter>
void BackwardRowsBlock(const BackwardArgs& a, int64_t block) {
  using C = typename V::C;
  const int64_t n = a.norm;
  const S* __restrict x = static_cast<const S*>(a.x);
  const S* dy = static_cast<const S*>(a.dy);
  const S* ds = static_cast<const S*>(a.dsum);
  S* dx = static_cast<S*>(a.dx);
  const P* __restrict gamma = static_cast<const P*>(a.gamma);
  const C* __restrict mean = static_cast<const C*>(a.mean);
  const C* __restrict rstd = static_cast<const C*>(a.rstd);
  C* pg0 = kScale ? static_cast<C*>(a.part_g) + block * kPartialLevels * n : nullptr;
  C* pb0 = kCenter ? static_cast<C*>(a.part_b) + block * kPartialLevels * n : nullptr;
  C* pg1 = kScale ? pg0 + n : nullptr;
  C* pb1 = kCenter ? pb0 + n : nullptr;
  const int64_t u0 = block * a.units_per_block;
  const int64_t u1 = MinI(a.units, u0 + a.units_per_block);
  for (int64_t g0 = u0; g0 < u1; g0 += kCascadeRows) {
    const int64_t g1 = MinI(u1, g0 + kCascadeRows);
    for (int64_t r = g0; r < g1; ++r) {
      const int64_t off = r * n;
      if (r == g0) {
        BackwardRow<V, S, P, kScale, kCenter, true>(n, x + off, dy + off, gamma,
                                                    a.rms ? C(0) : mean[r], rstd[r],
                                                    ds ? ds + off : nullptr, dx + off, pg1, pb1,
                                                    a.rms, a.stream);
      } else {
        BackwardRow<V, S, P, kScale, kCenter, false>(n, x + off, dy + off, gamma,
                                                     a.rms ? C(0) : mean[r], rstd[r],
                                                     ds ? ds + off : nullptr, dx + off, pg1,
                                                     pb1, a.rms, a.stream);
      }
    }
    if (kScale) FlushCascade<V>(pg0, pg1, n, g0 == u0);
    if (kCenter) FlushCascade<V>(pb0, pb1, n, g0 == u0);
  }
  if (a.stream) V::Fence();
}

template <class V, class S, class P, bool kScale, bool kCenter>
void BackwardColumnsBlock(const BackwardArgs& a, int64_t block) {
  using C = typename V::C;
  using R = typename V::R;
  const int64_t n = a.norm, inner = a.inner;
  const S* __restrict x = static_cast<const S*>(a.x);
  const S* dy = static_cast<const S*>(a.dy);
  const S* ds = static_cast<const S*>(a.dsum);
  S* dx = static_cast<S*>(a.dx);
  const P* __restrict gamma = static_cast<const P*>(a.gamma);
  const C* __restrict mean = static_cast<const C*>(a.mean);
  const C* __restrict rstd = static_cast<const C*>(a.rstd);
  C* pg0 = kScale ? static_cast<C*>(a.part_g) + block * kPartialLevels * n : nullptr;
  C* pb0 = kCenter ? static_cast<C*>(a.part_b) + block * kPartialLevels * n : nullptr;
  C* pg1 = kScale ? pg0 + n : nullptr;
  C* pb1 = kCenter ? pb0 + n : nullptr;
  const C inv_n = C(1) / static_cast<C>(n);
  const R inv_nv = V::Set1(inv_n);
  alignas(64) C sg[kMaxChunkCols + 16];
  alignas(64) C sgx[kMaxChunkCols + 16];
  alignas(64) C mv[kMaxChunkCols + 16];
  alignas(64) C rv[kMaxChunkCols + 16];
  const int64_t u0 = block * a.units_per_block;
  const int64_t u1 = MinI(a.units, u0 + a.units_per_block);
  for (int64_t u = u0; u < u1; ++u) {
    const bool group_first = (u - u0) % kCascadeRows == 0;
    const int64_t o = u / a.chunks;
    const int64_t c0 = (u % a.chunks) * a.chunk;
    const int64_t w = MinI(a.chunk, inner - c0);
    const int64_t base = o * n * inner + c0;
    ForVectors<V>(w, [&](int64_t j, int64_t k) {
      V::Store(mv + j, a.rms ? V::Zero() : LoadK<V>(mean + o * inner + c0 + j, k));
      V::Store(rv + j, LoadK<V>(rstd + o * inner + c0 + j, k));
      V::Store(sg + j, V::Zero());
      V::Store(sgx + j, V::Zero());
    });
    for (int64_t d = 0; d < n; ++d) {
      const S* __restrict xr = x + base + d * inner;
      const S* dyr = dy + base + d * inner;
      const R gd = kScale ? V::Set1(V::First(V::LoadN(gamma + d, 1))) : V::Set1(1);
      R tg = V::Zero(), tb = V::Zero();
      ForVectors<V>(w, [&](int64_t j, int64_t k) {
        const R dyv = LoadK<V>(dyr + j, k);
        const R xh = V::Mul(V::Sub(LoadK<V>(xr + j, k), V::Load(mv + j)), V::Load(rv + j));
        const R gv = kScale ? V::Mul(dyv, gd) : dyv;
        V::Store(sg + j, V::Add(V::Load(sg + j), gv));
        V::Store(sgx + j, V::MulAdd(gv, xh, V::Load(sgx + j)));
        tg = V::MulAdd(dyv, xh, tg);
        tb = V::Add(tb, dyv);
      });
      // Reduced along the chunk's columns in a fixed order.
      if (kScale) pg1[d] = group_first ? V::Sum(tg) : pg1[d] + V::Sum(tg);
      if (kCenter) pb1[d] = group_first ? V::Sum(tb) : pb1[d] + V::Sum(tb);
    }
    ForVectors<V>(w, [&](int64_t j, int64_t) {
      V::Store(sg + j, a.rms ? V::Zero() : V::Mul(V::Load(sg + j), inv_nv));
      V::Store(sgx + j, V::Mul(V::Load(sgx + j), inv_nv));
    });
    for (int64_t d = 0; d < n; ++d) {
      const S* __restrict xr = x + base + d * inner;
      const S* dyr = dy + base + d * inner;
      S* dxr = dx + base + d * inner;
      const S* dsr = ds ? ds + base + d * inner : nullptr;
      const R gd = kScale ? V::Set1(V::First(V::LoadN(gamma + d, 1))) : V::Set1(1);
      ForVectors<V>(w, [&](int64_t j, int64_t k) {
        const R rsj = V::Load(rv + j);
        const R xh = V::Mul(V::Sub(LoadK<V>(xr + j, k), V::Load(mv + j)), rsj);
        const R gv = kScale ? V::Mul(LoadK<V>(dyr + j, k), gd) : LoadK<V>(dyr + j, k);
        const R t = V::Sub(V::Sub(gv, V::Load(sg + j)), V::Mul(xh, V::Load(sgx + j)));
        const R out = dsr ? V::MulAdd(rsj, t, LoadK<V>(dsr + j, k)) : V::Mul(rsj, t);
        if (a.stream) {
          V::StoreStream(dxr + j, out);
        } else {
          StoreK<V>(dxr + j, out, k);
        }
      });
    }
    const bool group_last = (u - u0) % kCascadeRows == kCascadeRows - 1 || u + 1 == u1;
    if (group_last) {
      const bool block_first = u - u0 < kCascadeRows;
      if (kScale) FlushCascade<V>(pg0, pg1, n, block_first);
      if (kCenter) FlushCascade<V>(pb0, pb1, n, block_first);
    }
  }
  if (a.stream) V::Fence();
}

// Most backward blocks (see kMaxBlocks in the driver); sizes the pairwise sum.
constexpr int64_t kMaxFinalizeBlocks = 64;

// Sums level 0 of every block's partials, pairwise in a fixed tree order,
// for columns [j0, j1), and narrows to the parameter type P.
template <class V, class P, bool kG, bool kB>
void Finalize(const FinalizeArgs& a, int64_t j0, int64_t j1) {
  using C = typename V::C;
  using R = typename V::R;
  const int64_t n = a.norm, blocks = a.blocks;
  const int64_t stride = kPartialLevels * n;
  for (int pass = 0; pass < 2; ++pass) {
    if ((pass == 0 && !kG) || (pass == 1 && !kB)) continue;
    const C* __restrict part = static_cast<const C*>(pass == 0 ? a.part_g : a.part_b);
    P* __restrict out = static_cast<P*>(pass == 0 ? a.dgamma : a.dbeta);
    ForVectors<V>(j1 - j0, [&](int64_t i, int64_t k) {
      const int64_t j = j0 + i;
      R t[kMaxFinalizeBlocks];
      for (int64_t b = 0; b < blocks; ++b) t[b] = LoadK<V>(part + b * stride + j, k);
      for (int64_t m = blocks; m > 1; m = (m + 1) / 2) {
        for (int64_t q = 0; q < m / 2; ++q) t[q] = V::Add(t[2 * q], t[2 * q + 1]);
        if (m & 1) t[m / 2] = t[m - 1];
      }
      StoreK<V>(out + j, t[0], k);
    });
  }
}

// ----------------------------------------------------------- conversions --

template <class V, class From, class To>
void Convert(const void* in, void* out, int64_t n) {
  const From* __restrict src = static_cast<const From*>(in);
  To* __restrict dst = static_cast<To*>(out);
  ForVectors<V>(n, [&](int64_t i, int64_t k) { StoreK<V>(dst + i, LoadK<V>(src + i, k), k); });
}

// ------------------------------------------------------------------ tables --

template <class V, class S, class P>
void FillPair(IsaKernels* t, int pair) {
  t->forward_rows[pair][0] = &ForwardRows<V, S, P, false, false>;
  t->forward_rows[pair][1] = &ForwardRows<V, S, P, false, true>;
  t->forward_rows[pair][2] = &ForwardRows<V, S, P, true, false>;
  t->forward_rows[pair][3] = &ForwardRows<V, S, P, true, true>;
  t->forward_columns[pair][0] = &ForwardColumns<V, S, P, false, false>;
  t->forward_columns[pair][1] = &ForwardColumns<V, S, P, false, true>;
  t->forward_columns[pair][2] = &ForwardColumns<V, S, P, true, false>;
  t->forward_columns[pair][3] = &ForwardColumns<V, S, P, true, true>;
  t->backward_rows[pair][0] = &BackwardRowsBlock<V, S, P, false, false>;
  t->backward_rows[pair][1] = &BackwardRowsBlock<V, S, P, false, true>;
  t->backward_rows[pair][2] = &BackwardRowsBlock<V, S, P, true, false>;
  t->backward_rows[pair][3] = &BackwardRowsBlock<V, S, P, true, true>;
  t->backward_columns[pair][0] = &BackwardColumnsBlock<V, S, P, false, false>;
  t->backward_columns[pair][1] = &BackwardColumnsBlock<V, S, P, false, true>;
  t->backward_columns[pair][2] = &BackwardColumnsBlock<V, S, P, true, false>;
  t->backward_columns[pair][3] = &BackwardColumnsBlock<V, S, P, true, true>;
  t->finalize[pair][0] = nullptr;  // no parameter gradient wanted: nothing to do
  t->finalize[pair][1] = &Finalize<V, P, false, true>;
  t->finalize[pair][2] = &Finalize<V, P, true, false>;
  t->finalize[pair][3] = &Finalize<V, P, true, true>;
}

// The float-compute pairs and the conversions, for an ISA whose V handles
// float, F16 and BF16 storage.
template <class V>
void FillFloatKernels(IsaKernels* t) {
  FillPair<V, float, float>(t, kPairF32);
  FillPair<V, F16, F16>(t, kPairF16);
  FillPair<V, F16, float>(t, kPairF16F32);
  FillPair<V, BF16, BF16>(t, kPairBF16);
  FillPair<V, BF16, float>(t, kPairBF16F32);
  t->convert[kF16ToF32] = &Convert<V, F16, float>;
  t->convert[kF32ToF16] = &Convert<V, float, F16>;
  t->convert[kBF16ToF32] = &Convert<V, BF16, float>;
  t->convert[kF32ToBF16] = &Convert<V, float, BF16>;
}
