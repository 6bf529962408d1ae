// Stand-in for CUDA's <cuda_fp16.h> when a .cu is compiled as C++ for the SIMT
// emulator (tests/gpu/emu). Only the storage type and the conversions the
// kernels use, bit-identical to NVIDIA's host implementation in
// cuda_fp16.hpp: round to nearest even, gradual underflow, overflow to inf,
// and NVIDIA's canonical NaNs (half 0x7fff, float 0x7fffffff, sign dropped).
// tests/gpu/test_emu_fp16.py proves that against nvcc over every half and
// every float. Standalone on purpose: no other shim header, no macros.
#ifndef TFLN_EMU_SHIM_CUDA_FP16_H_
#define TFLN_EMU_SHIM_CUDA_FP16_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace tfln_emu_fp {

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
// mantissa bumps the exponent (into the next binade, or from the largest
// subnormal to the smallest normal) with no special case.
template <typename U>
inline U ShiftRoundNearestEven(U m, unsigned s) {
  return (m + ((U{1} << (s - 1)) - 1) + ((m >> s) & 1)) >> s;
}

}  // namespace tfln_emu_fp

struct __half_raw {
  unsigned short x;
};

struct __half;
inline float __half2float(__half h);
inline __half __float2half_rn(float f);
inline __half __double2half(double d);

// Trivial (so __half{} is zero and arrays of it live in aggregates and
// alignas packs) with CUDA's implicit float/double conversions on top.
struct alignas(2) __half {
  unsigned short __x;  // raw IEEE binary16 bits

  __half() = default;
  constexpr __half(const __half_raw& r) : __x(r.x) {}
  inline __half(float f);
  inline __half(double d);
  inline operator float() const;
  operator __half_raw() const { return __half_raw{__x}; }
  __half& operator=(const __half_raw& r) {
    __x = r.x;
    return *this;
  }
  inline __half& operator=(float f);
  inline __half& operator=(double d);
};

static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half must be 2 bytes");
static_assert(std::is_trivially_copyable<__half>::value, "__half must be trivially copyable");
static_assert(std::is_trivially_default_constructible<__half>::value,
              "__half must be trivially default constructible");
static_assert(std::is_standard_layout<__half>::value, "__half must be standard layout");

inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t exp = (h.__x >> 10) & 0x1fu;
  const uint32_t man = h.__x & 0x3ffu;
  if (exp == 0x1f) {
    // NVIDIA's host code returns one canonical NaN, dropping sign and payload.
    return tfln_emu_fp::BitsFloat(man != 0 ? 0x7fffffffu : (sign | 0x7f800000u));
  }
  if (exp == 0) {
    // Zero or subnormal: man * 2^-24 is exact in float (and a float normal).
    const float mag = static_cast<float>(man) * 0x1p-24f;
    return tfln_emu_fp::BitsFloat(sign | tfln_emu_fp::FloatBits(mag));
  }
  return tfln_emu_fp::BitsFloat(sign | ((exp + (127 - 15)) << 23) | (man << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t x = tfln_emu_fp::FloatBits(f);
  const unsigned short sign = static_cast<unsigned short>((x >> 16) & 0x8000u);
  const uint32_t mag = x & 0x7fffffffu;
  unsigned short bits;
  if (mag > 0x7f800000u) {
    bits = 0x7fff;  // any NaN -> NVIDIA's canonical half NaN, sign dropped
  } else if (mag >= 0x477ff000u) {
    bits = sign | 0x7c00;  // >= 65520, halfway from 65504 to 2^16 (or inf)
  } else if (mag >= 0x38800000u) {
    // Normal half: rebias the exponent, round off 13 mantissa bits.
    bits = sign | static_cast<unsigned short>(
                      tfln_emu_fp::ShiftRoundNearestEven(mag - ((127u - 15u) << 23), 13));
  } else if (mag >= 0x33000000u) {
    // Subnormal half (units of 2^-24); 2^-25 itself ties to 0.
    const uint32_t exp = mag >> 23;
    const uint32_t man = (mag & 0x7fffffu) | 0x800000u;  // value = man * 2^(exp-150)
    bits = sign | static_cast<unsigned short>(tfln_emu_fp::ShiftRoundNearestEven(man, 126 - exp));
  } else {
    bits = sign;  // below 2^-25: rounds to zero
  }
  return __half_raw{bits};
}

inline __half __float2half(float f) { return __float2half_rn(f); }

// Rounds once, straight from the double (no double rounding via float).
inline __half __double2half(double d) {
  const uint64_t x = tfln_emu_fp::DoubleBits(d);
  const unsigned short sign = static_cast<unsigned short>((x >> 48) & 0x8000u);
  const uint64_t mag = x & 0x7fffffffffffffffull;
  unsigned short bits;
  if (mag > 0x7ff0000000000000ull) {
    bits = 0x7fff;  // NaN, as for float
  } else if (mag >= 0x40effe0000000000ull) {
    bits = sign | 0x7c00;  // >= 65520
  } else if (mag >= 0x3f10000000000000ull) {
    // Normal half (>= 2^-14): rebias, round off 42 mantissa bits.
    bits = sign | static_cast<unsigned short>(
                      tfln_emu_fp::ShiftRoundNearestEven(mag - ((1023ull - 15ull) << 52), 42));
  } else if (mag >= 0x3e60000000000000ull) {
    // Subnormal half (units of 2^-24); 2^-25 itself ties to 0.
    const unsigned exp = static_cast<unsigned>(mag >> 52);
    const uint64_t man = (mag & 0xfffffffffffffull) | (1ull << 52);  // man * 2^(exp-1075)
    bits = sign | static_cast<unsigned short>(tfln_emu_fp::ShiftRoundNearestEven(man, 1051 - exp));
  } else {
    bits = sign;
  }
  return __half_raw{bits};
}

inline __half::__half(float f) : __x(__float2half_rn(f).__x) {}
inline __half::__half(double d) : __x(__double2half(d).__x) {}
inline __half::operator float() const { return __half2float(*this); }
inline __half& __half::operator=(float f) {
  __x = __float2half_rn(f).__x;
  return *this;
}
inline __half& __half::operator=(double d) {
  __x = __double2half(d).__x;
  return *this;
}

#endif  // TFLN_EMU_SHIM_CUDA_FP16_H_
