// Stand-in for CUDA's <cuda_bf16.h> when a .cu is compiled as C++ for the SIMT
// emulator (tests/gpu/emu). Only the storage type and the conversions the
// kernels use, bit-identical to NVIDIA's host implementation in
// cuda_bf16.hpp: round to nearest even, overflow to inf, any NaN -> 0x7fff
// (sign dropped); bf16 -> float is exact and keeps NaN payloads.
// tests/gpu/test_emu_fp16.py proves that against nvcc over every bf16 and
// every float. Standalone on purpose: no other shim header, no macros.
#ifndef TFLN_EMU_SHIM_CUDA_BF16_H_
#define TFLN_EMU_SHIM_CUDA_BF16_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace tfln_emu_bf {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint64_t DoubleBits(double d) {
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}

// m / 2^s rounded to nearest, ties to even (adding just under half, plus
// the kept lsb, carries exactly when the dropped part is over half or a tie
// next to an odd lsb); m + 2^(s-1) must not overflow U. Used on a magnitude
// whose exponent and mantissa fields are contiguous, so a carry out of the
// mantissa bumps the exponent (subnormal -> normal, largest finite -> inf)
// with no special case.
template <typename U>
inline U ShiftRoundNearestEven(U m, unsigned s) {
  return (m + ((U{1} << (s - 1)) - 1) + ((m >> s) & 1)) >> s;
}

}  // namespace tfln_emu_bf

struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __nv_bfloat16;
inline float __bfloat162float(__nv_bfloat16 h);
inline __nv_bfloat16 __float2bfloat16_rn(float f);
inline __nv_bfloat16 __double2bfloat16(double d);

// Trivial (so __nv_bfloat16{} is zero and arrays of it live in aggregates
// and alignas packs) with CUDA's implicit float/double conversions on top.
struct alignas(2) __nv_bfloat16 {
  unsigned short __x;  // raw bits: the top half of a binary32

  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  inline __nv_bfloat16(float f);
  inline __nv_bfloat16(double d);
  inline operator float() const;
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
  __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) {
    __x = r.x;
    return *this;
  }
  inline __nv_bfloat16& operator=(float f);
  inline __nv_bfloat16& operator=(double d);
};

static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2,
              "__nv_bfloat16 must be 2 bytes");
static_assert(std::is_trivially_copyable<__nv_bfloat16>::value,
              "__nv_bfloat16 must be trivially copyable");
static_assert(std::is_trivially_default_constructible<__nv_bfloat16>::value,
              "__nv_bfloat16 must be trivially default constructible");
static_assert(std::is_standard_layout<__nv_bfloat16>::value,
              "__nv_bfloat16 must be standard layout");

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16_raw{u}; }

inline float __bfloat162float(__nv_bfloat16 h) {
  return tfln_emu_bf::BitsFloat(static_cast<uint32_t>(h.__x) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = tfln_emu_bf::FloatBits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return __nv_bfloat16_raw{0x7fff};  // any NaN -> NVIDIA's canonical NaN, sign dropped
  }
  // Same exponent range as float: just round off the low 16 bits. The sign
  // bit is out of reach of the carry because NaNs are gone.
  return __nv_bfloat16_raw{
      static_cast<unsigned short>(tfln_emu_bf::ShiftRoundNearestEven(x, 16))};
}

inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// Rounds once, straight from the double (no double rounding via float).
inline __nv_bfloat16 __double2bfloat16(double d) {
  const uint64_t x = tfln_emu_bf::DoubleBits(d);
  const unsigned short sign = static_cast<unsigned short>((x >> 48) & 0x8000u);
  const uint64_t mag = x & 0x7fffffffffffffffull;
  unsigned short bits;
  if (mag > 0x7ff0000000000000ull) {
    bits = 0x7fff;  // NaN, as for float
  } else if (mag >= 0x47eff00000000000ull) {
    bits = sign | 0x7f80;  // >= (2 - 2^-8) * 2^127, halfway from bf16 max to 2^128 (or inf)
  } else if (mag >= 0x3810000000000000ull) {
    // Normal (>= 2^-126): rebias to float's exponent, round off 45 mantissa bits.
    bits = sign | static_cast<unsigned short>(
                      tfln_emu_bf::ShiftRoundNearestEven(mag - ((1023ull - 127ull) << 52), 45));
  } else if (mag >= 0x3790000000000000ull) {
    // Subnormal bf16 (units of 2^-133); 2^-134 itself ties to 0.
    const unsigned exp = static_cast<unsigned>(mag >> 52);
    const uint64_t man = (mag & 0xfffffffffffffull) | (1ull << 52);  // man * 2^(exp-1075)
    bits = sign | static_cast<unsigned short>(tfln_emu_bf::ShiftRoundNearestEven(man, 942 - exp));
  } else {
    bits = sign;  // below 2^-134: rounds to zero
  }
  return __nv_bfloat16_raw{bits};
}

inline __nv_bfloat16::__nv_bfloat16(float f) : __x(__float2bfloat16_rn(f).__x) {}
inline __nv_bfloat16::__nv_bfloat16(double d) : __x(__double2bfloat16(d).__x) {}
inline __nv_bfloat16::operator float() const { return __bfloat162float(*this); }
inline __nv_bfloat16& __nv_bfloat16::operator=(float f) {
  __x = __float2bfloat16_rn(f).__x;
  return *this;
}
inline __nv_bfloat16& __nv_bfloat16::operator=(double d) {
  __x = __double2bfloat16(d).__x;
  return *this;
}

#endif  // TFLN_EMU_SHIM_CUDA_BF16_H_
