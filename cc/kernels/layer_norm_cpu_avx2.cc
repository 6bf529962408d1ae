// AVX2 + FMA + F16C kernels. Built with -mavx2 -mfma -mf16c; only called
// after the driver saw those features in CPUID. Must not run static
// initializers (they would execute on every CPU at load).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cc/kernels/layer_norm_cpu_isa.h"

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "layer_norm_cpu_avx2.cc must be compiled with -mavx2 -mfma -mf16c"
#endif

namespace tf_layernorm {
namespace cpu {
namespace isa_avx2 {
namespace {

struct V {
  using C = float;
  using R = __m256;
  static constexpr int64_t kW = 8;

  static R Zero() { return _mm256_setzero_ps(); }
  static R Set1(float v) { return _mm256_set1_ps(v); }
  static R Add(R a, R b) { return _mm256_add_ps(a, b); }
  static R Sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R Mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R Div(R a, R b) { return _mm256_div_ps(a, b); }
  static R Sqrt(R a) { return _mm256_sqrt_ps(a); }
  static R MulAdd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static float First(R v) { return _mm256_cvtss_f32(v); }
  static float Sum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  static __m256i LaneMask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static R KeepN(R v, int64_t n) { return _mm256_and_ps(v, _mm256_castsi256_ps(LaneMask(n))); }

  // 8 x uint32 (each <= 0xffff) -> 8 x uint16.
  static __m128i Pack16(__m256i v) {
    return _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  }

  // float
  static R Load(const float* p) { return _mm256_loadu_ps(p); }
  static R LoadN(const float* p, int64_t n) { return _mm256_maskload_ps(p, LaneMask(n)); }
  static void Store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static void StoreN(float* p, R v, int64_t n) { _mm256_maskstore_ps(p, LaneMask(n), v); }
  static void StoreStream(float* p, R v) { _mm256_stream_ps(p, v); }
  static void Fence() { _mm_sfence(); }

  // bfloat16: a 16-bit shift up; down with round to nearest even and
  // NaN -> sign | 0x7fc0, as Eigen's float_to_bfloat16_rtne.
  static R WidenBF16(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static __m128i NarrowBF16(R v) {
    const __m256i u = _mm256_castps_si256(v);
    // Adding 0x7fff plus the lowest kept bit rounds the high half to nearest
    // even (a carry into the exponent is the correct rounding up, to inf
    // included).
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    if (_mm256_movemask_epi8(is_nan) != 0) {  // rare: NaN lanes become sign | 0x7fc0
      const __m256i nan_bits = _mm256_or_si256(
          _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)),
          _mm256_set1_epi32(0x7fc0));
      r = _mm256_blendv_epi8(r, nan_bits, is_nan);
    }
    return Pack16(r);
  }
  static R Load(const BF16* p) {
    return WidenBF16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static R LoadN(const BF16* p, int64_t n) {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, n * sizeof(uint16_t));
    return WidenBF16(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
  static void Store(BF16* p, R v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), NarrowBF16(v));
  }
  static void StoreStream(BF16* p, R v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), NarrowBF16(v));
  }
  static void StoreN(BF16* p, R v, int64_t n) {
    alignas(16) uint16_t buf[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), NarrowBF16(v));
    std::memcpy(p, buf, n * sizeof(uint16_t));
  }

  // float16 through F16C. vcvtps2ph rounds to nearest even like Eigen but
  // keeps NaN payload bits; Eigen writes sign | 0x7e00, so NaN lanes are
  // replaced to stay bit-identical.
  // vcvtph2ps quiets signaling NaNs (sets bit 22); Eigen keeps the half's
  // bits as they are. NaN lanes are rare: one compare, and a fix-up only when
  // a vector holds one.
  static R WidenF16(__m128i h) {
    const R r = _mm256_cvtph_ps(h);
    const R is_nan = _mm256_cmp_ps(r, r, _CMP_UNORD_Q);
    if (_mm256_movemask_ps(is_nan) == 0) return r;
    const __m256i quiet = _mm256_slli_epi32(
        _mm256_and_si256(_mm256_cvtepu16_epi32(h), _mm256_set1_epi32(0x200)), 13);
    const __m256i bits = _mm256_or_si256(
        _mm256_andnot_si256(_mm256_set1_epi32(0x400000), _mm256_castps_si256(r)), quiet);
    return _mm256_blendv_ps(r, _mm256_castsi256_ps(bits), is_nan);
  }
  static __m128i NarrowF16(R v) {
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    if (_mm256_movemask_epi8(is_nan) == 0) return h;  // NaN lanes are rare
    const __m256i u = _mm256_castps_si256(v);
    const __m256i nan_bits = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)),
        _mm256_set1_epi32(0x7e00));
    // 32-bit all-ones masks pack (signed saturation) to 16-bit all-ones.
    const __m128i is_nan16 =
        _mm_packs_epi32(_mm256_castsi256_si128(is_nan), _mm256_extracti128_si256(is_nan, 1));
    return _mm_blendv_epi8(h, Pack16(nan_bits), is_nan16);
  }
  static R Load(const F16* p) {
    return WidenF16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static R LoadN(const F16* p, int64_t n) {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, n * sizeof(uint16_t));
    return WidenF16(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
  static void Store(F16* p, R v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), NarrowF16(v));
  }
  static void StoreStream(F16* p, R v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), NarrowF16(v));
  }
  static void StoreN(F16* p, R v, int64_t n) {
    alignas(16) uint16_t buf[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), NarrowF16(v));
    std::memcpy(p, buf, n * sizeof(uint16_t));
  }
};

#include "cc/kernels/layer_norm_cpu_body.h"

IsaKernels MakeTable() {
  IsaKernels t{};
  t.name = "avx2";
  FillFloatKernels<V>(&t);
  return t;
}

}  // namespace
}  // namespace isa_avx2

const IsaKernels* Avx2Kernels() {
  static const IsaKernels table = isa_avx2::MakeTable();
  return &table;
}

}  // namespace cpu
}  // namespace tf_layernorm
