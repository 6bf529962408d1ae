// AVX-512 (F, BW, VL, DQ) kernels. Built with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq (plus -mavx2 -mfma -mf16c); only called after the
// driver saw those features in CPUID. Must not run static initializers.
#include <immintrin.h>

#include <cstdint>

#include "cc/kernels/layer_norm_cpu_isa.h"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__)
#error "layer_norm_cpu_avx512.cc must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq"
#endif

namespace tf_layernorm {
namespace cpu {
namespace isa_avx512 {
namespace {

struct V {
  using C = float;
  using R = __m512;
  static constexpr int64_t kW = 16;

  static R Zero() { return _mm512_setzero_ps(); }
  static R Set1(float v) { return _mm512_set1_ps(v); }
  static R Add(R a, R b) { return _mm512_add_ps(a, b); }
  static R Sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R Mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R Div(R a, R b) { return _mm512_div_ps(a, b); }
  static R Sqrt(R a) { return _mm512_sqrt_ps(a); }
  static R MulAdd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static float First(R v) { return _mm512_cvtss_f32(v); }
  static float Sum(R v) {
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  static __mmask16 Mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static R KeepN(R v, int64_t n) { return _mm512_maskz_mov_ps(Mask(n), v); }

  // float
  static R Load(const float* p) { return _mm512_loadu_ps(p); }
  static R LoadN(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(Mask(n), p); }
  static void Store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static void StoreN(float* p, R v, int64_t n) { _mm512_mask_storeu_ps(p, Mask(n), v); }
  static void StoreStream(float* p, R v) { _mm512_stream_ps(p, v); }
  static void Fence() { _mm_sfence(); }

  // bfloat16: a 16-bit shift up; down with round to nearest even and
  // NaN -> sign | 0x7fc0, as Eigen's float_to_bfloat16_rtne. (AVX512_BF16's
  // vcvtneps2bf16 is not in the required feature set.)
  static R WidenBF16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static __m256i NarrowBF16(R v) {
    const __m512i u = _mm512_castps_si512(v);
    // Adding 0x7fff plus the lowest kept bit rounds the high half to nearest
    // even (a carry into the exponent is the correct rounding up, to inf
    // included).
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    if (is_nan != 0) {  // rare: NaN lanes become sign | 0x7fc0
      const __m512i nan_bits = _mm512_or_si512(
          _mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0x80000000u))),
          _mm512_set1_epi32(0x7fc00000));
      r = _mm512_mask_mov_epi32(r, is_nan, nan_bits);
    }
    // The high 16-bit word of every lane, in order, into the low 256 bits:
    // one word permute instead of a shift and a narrowing move.
    const __m512i odd_words = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0x001f001d, 0x001b0019,
                                               0x00170015, 0x00130011, 0x000f000d, 0x000b0009,
                                               0x00070005, 0x00030001);
    return _mm512_castsi512_si256(_mm512_permutexvar_epi16(odd_words, r));
  }
  static R Load(const BF16* p) {
    return WidenBF16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static R LoadN(const BF16* p, int64_t n) {
    return WidenBF16(_mm256_maskz_loadu_epi16(Mask(n), p));
  }
  static void Store(BF16* p, R v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), NarrowBF16(v));
  }
  static void StoreStream(BF16* p, R v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), NarrowBF16(v));
  }
  static void StoreN(BF16* p, R v, int64_t n) { _mm256_mask_storeu_epi16(p, Mask(n), NarrowBF16(v)); }

  // float16 through the AVX-512F conversions; NaN lanes replaced by
  // sign | 0x7e00 to stay bit-identical to Eigen (vcvtps2ph keeps payloads).
  // vcvtph2ps quiets signaling NaNs (sets bit 22); Eigen keeps the half's
  // bits as they are. NaN lanes are rare: one compare, and a fix-up only when
  // a vector holds one.
  static R WidenF16(__m256i h) {
    const R r = _mm512_cvtph_ps(h);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
    if (is_nan == 0) return r;
    const __m512i quiet = _mm512_slli_epi32(
        _mm512_and_si512(_mm512_cvtepu16_epi32(h), _mm512_set1_epi32(0x200)), 13);
    const __m512i bits = _mm512_or_si512(
        _mm512_andnot_si512(_mm512_set1_epi32(0x400000), _mm512_castps_si512(r)), quiet);
    return _mm512_mask_mov_ps(r, is_nan, _mm512_castsi512_ps(bits));
  }
  static __m256i NarrowF16(R v) {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    if (is_nan == 0) return h;
    const __m512i u = _mm512_castps_si512(v);
    const __m512i nan_bits = _mm512_or_si512(
        _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000)),
        _mm512_set1_epi32(0x7e00));
    return _mm256_mask_blend_epi16(is_nan, h, _mm512_cvtepi32_epi16(nan_bits));
  }
  static R Load(const F16* p) {
    return WidenF16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static R LoadN(const F16* p, int64_t n) { return WidenF16(_mm256_maskz_loadu_epi16(Mask(n), p)); }
  static void Store(F16* p, R v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), NarrowF16(v));
  }
  static void StoreStream(F16* p, R v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), NarrowF16(v));
  }
  static void StoreN(F16* p, R v, int64_t n) { _mm256_mask_storeu_epi16(p, Mask(n), NarrowF16(v)); }
};

#include "cc/kernels/layer_norm_cpu_body.h"

IsaKernels MakeTable() {
  IsaKernels t{};
  t.name = "avx512";
  FillFloatKernels<V>(&t);
  return t;
}

}  // namespace
}  // namespace isa_avx512

const IsaKernels* Avx512Kernels() {
  static const IsaKernels table = isa_avx512::MakeTable();
  return &table;
}

}  // namespace cpu
}  // namespace tf_layernorm
