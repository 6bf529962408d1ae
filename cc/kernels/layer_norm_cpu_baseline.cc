// Baseline x86-64 kernels (SSE2 only, no extra -m flags): run on every CPU
// TensorFlow supports, and the only home of the float64 kernels.
#include <emmintrin.h>

#include <cstdint>
#include <cstring>

#include "cc/kernels/layer_norm_cpu_isa.h"

namespace tf_layernorm {
namespace cpu {
namespace isa_baseline {
namespace {

// IEEE binary16 <-> float in integer arithmetic, bit-for-bit what Eigen's
// portable conversion gives: exact widening (NaN payloads kept), narrowing
// rounded to nearest even, NaN -> sign | 0x7e00. No FP arithmetic, so the
// denormal flags TensorFlow sets on its threads cannot change a result.
inline float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    // Subnormal half: normalize (value = mant * 2^-24).
    uint32_t e = 113;  // exponent of 2^-14 + 127
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t FloatToHalfBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (a >= 0x38800000u) {                       // normal half (>= 2^-14)
    uint32_t r = (a >> 13) - (112u << 10);
    const uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  const uint32_t e = a >> 23;
  if (e < 102) return sign;  // below 2^-25: rounds to zero
  // Subnormal half: value / 2^-24 = mant * 2^(e - 126), shift >= 14.
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - e;
  uint32_t r = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (r & 1u))) ++r;
  return sign | static_cast<uint16_t>(r);
}

// float compute on 4-lane SSE2 registers.
struct V {
  using C = float;
  using R = __m128;
  static constexpr int64_t kW = 4;

  static R Zero() { return _mm_setzero_ps(); }
  static R Set1(float v) { return _mm_set1_ps(v); }
  static R Add(R a, R b) { return _mm_add_ps(a, b); }
  static R Sub(R a, R b) { return _mm_sub_ps(a, b); }
  static R Mul(R a, R b) { return _mm_mul_ps(a, b); }
  static R Div(R a, R b) { return _mm_div_ps(a, b); }
  static R Sqrt(R a) { return _mm_sqrt_ps(a); }
  // No FMA in baseline x86-64: two roundings.
  static R MulAdd(R a, R b, R c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
  static float First(R v) { return _mm_cvtss_f32(v); }
  static float Sum(R v) {
    const R s = _mm_add_ps(v, _mm_movehl_ps(v, v));  // (0+2, 1+3)
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  static __m128i LaneMask(int64_t n) {
    return _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(n)), _mm_setr_epi32(0, 1, 2, 3));
  }
  static R KeepN(R v, int64_t n) { return _mm_and_ps(v, _mm_castsi128_ps(LaneMask(n))); }

  // float
  static R Load(const float* p) { return _mm_loadu_ps(p); }
  static R LoadN(const float* p, int64_t n) {
    alignas(16) float buf[4] = {0, 0, 0, 0};
    std::memcpy(buf, p, n * sizeof(float));
    return _mm_load_ps(buf);
  }
  static void Store(float* p, R v) { _mm_storeu_ps(p, v); }
  static void StoreStream(float* p, R v) { _mm_stream_ps(p, v); }
  static void Fence() { _mm_sfence(); }
  static void StoreN(float* p, R v, int64_t n) {
    alignas(16) float buf[4];
    _mm_store_ps(buf, v);
    std::memcpy(p, buf, n * sizeof(float));
  }

  // bfloat16: widening is a 16-bit shift, narrowing rounds to nearest even
  // with NaN -> sign | 0x7fc0 (Eigen's float_to_bfloat16_rtne).
  static R WidenBF16(__m128i h4) {
    return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h4));
  }
  static __m128i NarrowBF16(R v) {
    const __m128i u = _mm_castps_si128(v);
    const __m128i hi = _mm_srli_epi32(u, 16);
    const __m128i lsb = _mm_and_si128(hi, _mm_set1_epi32(1));
    const __m128i r = _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(u, _mm_set1_epi32(0x7fff)), lsb), 16);
    const __m128i nan_bits =
        _mm_or_si128(_mm_and_si128(hi, _mm_set1_epi32(0x8000)), _mm_set1_epi32(0x7fc0));
    const __m128i is_nan = _mm_castps_si128(_mm_cmpunord_ps(v, v));
    const __m128i res = _mm_or_si128(_mm_and_si128(is_nan, nan_bits), _mm_andnot_si128(is_nan, r));
    // Sign-extend the 16-bit results so the signed saturating pack keeps them.
    const __m128i s = _mm_srai_epi32(_mm_slli_epi32(res, 16), 16);
    return _mm_packs_epi32(s, s);  // low 64 bits: 4 x uint16
  }
  static R Load(const BF16* p) {
    return WidenBF16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static R LoadN(const BF16* p, int64_t n) {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, n * sizeof(uint16_t));
    return WidenBF16(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
  static void Store(BF16* p, R v) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), NarrowBF16(v));
  }
  static void StoreStream(BF16* p, R v) {
    _mm_stream_si64(reinterpret_cast<long long*>(p), _mm_cvtsi128_si64(NarrowBF16(v)));
  }
  static void StoreN(BF16* p, R v, int64_t n) {
    alignas(16) uint16_t buf[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), NarrowBF16(v));
    std::memcpy(p, buf, n * sizeof(uint16_t));
  }

  // float16: no F16C in baseline x86-64, so lane by lane in integer code.
  static R LoadN(const F16* p, int64_t n) {
    alignas(16) float buf[4] = {0, 0, 0, 0};
    for (int64_t i = 0; i < n; ++i) buf[i] = HalfBitsToFloat(p[i].bits);
    return _mm_load_ps(buf);
  }
  static R Load(const F16* p) { return LoadN(p, 4); }
  static void StoreN(F16* p, R v, int64_t n) {
    alignas(16) float buf[4];
    _mm_store_ps(buf, v);
    for (int64_t i = 0; i < n; ++i) p[i].bits = FloatToHalfBits(buf[i]);
  }
  static void Store(F16* p, R v) { StoreN(p, v, 4); }
  static void StoreStream(F16* p, R v) { StoreN(p, v, 4); }
};

// double compute on 2-lane SSE2 registers (float64 x and parameters).
struct VD {
  using C = double;
  using R = __m128d;
  static constexpr int64_t kW = 2;

  static R Zero() { return _mm_setzero_pd(); }
  static R Set1(double v) { return _mm_set1_pd(v); }
  static R Add(R a, R b) { return _mm_add_pd(a, b); }
  static R Sub(R a, R b) { return _mm_sub_pd(a, b); }
  static R Mul(R a, R b) { return _mm_mul_pd(a, b); }
  static R Div(R a, R b) { return _mm_div_pd(a, b); }
  static R Sqrt(R a) { return _mm_sqrt_pd(a); }
  static R MulAdd(R a, R b, R c) { return _mm_add_pd(_mm_mul_pd(a, b), c); }
  static double First(R v) { return _mm_cvtsd_f64(v); }
  static double Sum(R v) { return _mm_cvtsd_f64(_mm_add_sd(v, _mm_unpackhi_pd(v, v))); }
  static R KeepN(R v, int64_t n) {
    // n < kW: only lane 0 survives.
    return n >= 1 ? _mm_move_sd(_mm_setzero_pd(), v) : _mm_setzero_pd();
  }
  static R Load(const double* p) { return _mm_loadu_pd(p); }
  static R LoadN(const double* p, int64_t n) { return n >= 1 ? _mm_load_sd(p) : Zero(); }
  static void Store(double* p, R v) { _mm_storeu_pd(p, v); }
  static void StoreStream(double* p, R v) { _mm_stream_pd(p, v); }
  static void Fence() { _mm_sfence(); }
  static void StoreN(double* p, R v, int64_t n) {
    if (n >= 1) _mm_store_sd(p, v);
  }
};

#include "cc/kernels/layer_norm_cpu_body.h"

IsaKernels MakeTable() {
  IsaKernels t{};
  t.name = "baseline";
  FillFloatKernels<V>(&t);
  FillPair<VD, double, double>(&t, kPairF64);
  return t;
}

}  // namespace
}  // namespace isa_baseline

const IsaKernels* BaselineKernels() {
  static const IsaKernels table = isa_baseline::MakeTable();
  return &table;
}

}  // namespace cpu
}  // namespace tf_layernorm
