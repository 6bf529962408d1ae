// The conversion sweep shared by nvidia_dump.cu (NVIDIA's headers, built by
// nvcc) and shim_dump.cc (the emulator's shim, built by g++). Include it after
// <cuda_fp16.h> and <cuda_bf16.h>; it touches only the CUDA API names, so both
// programs run the very same sweep and differ only in the implementation.
//
//   prog summary FILE          per table: count and one hash per chunk
//   prog raw TABLE CHUNK FILE  one chunk's (input bits, output) pairs, u64
//                              each, for the test to name the first
//                              differing inputs
//
// Inputs are pure functions of their index (integer arithmetic and exact FP
// operations only), so chunks hash independently on all cores and either
// program can regenerate any chunk.
#ifndef TFLN_EMU_FP16_CHECK_DUMP_DRIVER_H_
#define TFLN_EMU_FP16_CHECK_DUMP_DRIVER_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace fp16_check {

constexpr uint64_t kChunk = uint64_t{1} << 20;

inline uint32_t F2U(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float U2F(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint64_t D2U(double d) {
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}
inline double U2D(uint64_t u) {
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}

inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// ---------------------------------------------------------------------------
// Rounding boundaries of the two 16-bit formats, as exact doubles: for each
// format (0 half, 1 bf16), positive pattern p (15 bits; past the largest
// finite one it repeats that one) and base (0: p's value, 1: the midpoint
// between p and p+1, where ties happen). The midpoint above the largest
// finite value is the overflow threshold (65520, (2 - 2^-8) * 2^127).

constexpr uint64_t kBoundaries = 2 * 32768 * 2;

inline double Boundary(uint64_t k) {
  const bool midpoint = k & 1;
  const uint32_t p = static_cast<uint32_t>((k >> 1) % 32768);
  const bool bf16 = (k >> 16) != 0;
  const unsigned man_bits = bf16 ? 7 : 10;
  const int bias = bf16 ? 127 : 15;
  const uint32_t q = std::min<uint32_t>(p, bf16 ? 0x7f7f : 0x7bff);
  // Decoded by hand; the all-ones exponent of q + 1 decodes as 2^(emax+1).
  auto decode = [&](uint32_t v) {
    const uint64_t exp = v >> man_bits, man = v & ((1u << man_bits) - 1);
    if (exp == 0) {  // man * 2^(1 - bias - man_bits), exact
      return static_cast<double>(man) *
             U2D(static_cast<uint64_t>(1023 + 1 - bias - static_cast<int>(man_bits)) << 52);
    }
    return U2D((exp - bias + 1023) << 52 | man << (52 - man_bits));
  };
  const double lo = decode(q);
  return midpoint ? (lo + decode(q + 1)) / 2 : lo;  // exact
}

// A positive double's bit pattern moved by `delta` ulps, with the sign
// asked for; below +0 it mirrors onto the denormals instead of wrapping into
// the NaNs.
inline uint64_t Nudge(uint64_t bits, int64_t delta, bool negative) {
  int64_t moved = static_cast<int64_t>(bits) + delta;
  if (moved < 0) moved = -moved;
  return (negative ? 0x8000000000000000ull : 0) | static_cast<uint64_t>(moved);
}

// ---------------------------------------------------------------------------
// The double sweep: double -> half/bf16 goes wrong, if anywhere, around
// boundaries and above all just off a midpoint, where rounding to float first
// would land on the midpoint and then tie the wrong way.
//
// [each boundary, both signs, its bit pattern moved by 0, +-1..3 ulps and
// +-2^b ulps for b = 2..51 (b = 29 is one float ulp) | random | specials].

constexpr int kPerturb = 1 + 6 + 2 * 50;
constexpr uint64_t kDoubleNudges = kBoundaries * kPerturb * 2;
constexpr uint64_t kRandomCount = uint64_t{1} << 22;

inline int64_t Perturbation(int j) {
  if (j < 7) return j <= 3 ? j : 3 - j;  // 0, 1, 2, 3, -1, -2, -3
  const int k = j - 7;
  const int64_t step = int64_t{1} << (2 + k / 2);
  return (k % 2) ? -step : step;
}

inline const std::vector<uint64_t>& SpecialDoubles() {
  static const std::vector<uint64_t> v = [] {
    std::vector<uint64_t> s = {
        0x7ff0000000000000ull, 0xfff0000000000000ull,  // +-inf
        0x7ff8000000000000ull, 0xfff8000000000000ull,  // quiet NaNs
        0x7ff0000000000001ull, 0xfff0000000000001ull,  // signalling NaNs
        0x7ff4000000000000ull, 0x7fffffffffffffffull, 0xffffffffffffffffull,
        0x7ff80000deadbeefull,
        0x7ff0000020000000ull,  // signalling, lowest payload bit a float keeps
        0x7ff0000010000000ull,  // signalling, payload a float drops entirely
        0x000fffffffffffffull, 0x0010000000000000ull,  // max denormal, min normal
        0x7fefffffffffffffull, 0xffefffffffffffffull,  // +-DBL_MAX
    };
    // +-3 ulps around powers of two at format edges: float, bf16 and half
    // min subnormal / min normal and their neighbours, overflow points.
    const int exps[] = {-1074, -1022, -151, -150, -149, -148, -135, -134, -133, -127, -126,
                        -125,  -26,   -25,  -24,  -15,  -14,  -13,  15,   16,   17,   127,
                        128,   129};
    for (int e : exps) {
      for (int64_t d = -3; d <= 3; ++d) {
        s.push_back(Nudge(D2U(std::ldexp(1.0, e)), d, false));
        s.push_back(Nudge(D2U(std::ldexp(1.0, e)), d, true));
      }
    }
    // Float's largest value, where a float-first conversion would overflow.
    for (int64_t d : {int64_t{0}, int64_t{1}, int64_t{-1}, int64_t{1} << 28,
                      (int64_t{1} << 28) + 1, (int64_t{1} << 28) - 1, int64_t{1} << 29}) {
      s.push_back(Nudge(D2U(0x1.fffffep127), d, false));
      s.push_back(Nudge(D2U(0x1.fffffep127), d, true));
    }
    return s;
  }();
  return v;
}

inline uint64_t DoubleCount() { return kDoubleNudges + kRandomCount + SpecialDoubles().size(); }

inline double DoubleInput(uint64_t i) {
  if (i < kDoubleNudges) {
    const bool negative = i & 1;
    const int j = static_cast<int>((i >> 1) % kPerturb);
    const double base = Boundary((i >> 1) / kPerturb);
    return U2D(Nudge(D2U(base), Perturbation(j), negative));
  }
  i -= kDoubleNudges;
  if (i < kRandomCount) {
    const uint64_t r = SplitMix64(i);
    const uint64_t sign_man = r & 0x800fffffffffffffull;
    switch (i % 4) {
      case 0:
        return U2D(r);  // anything, NaNs included
      case 1: {         // the half range and a bit around it
        const uint64_t e = 1023 - 30 + (r >> 52) % 50;
        return U2D(sign_man | (e << 52));
      }
      case 2: {  // the bf16 / float range and a bit around it
        const uint64_t e = 1023 - 140 + (r >> 52) % 272;
        return U2D(sign_man | (e << 52));
      }
      default: {  // near-ties: random bits down to the half (bit 42) or bf16
                  // (bit 45) lsb, the round bit set, sparse bits below it
        const uint64_t e = 1023 - 140 + (r >> 52) % 272;
        const unsigned round_bit = (r & 1) ? 41 : 44;
        const uint64_t r2 = SplitMix64(r);
        const uint64_t below = (uint64_t{1} << round_bit) - 1;
        uint64_t man = (r2 & 0x000fffffffffffffull & ~below) | (uint64_t{1} << round_bit);
        man |= SplitMix64(r2) & SplitMix64(r2 + 1) & SplitMix64(r2 + 2) & below;
        if ((r >> 1) % 4 == 0) man &= ~below;  // exact ties
        return U2D((r & 0x8000000000000000ull) | (e << 52) | man);
      }
    }
  }
  i -= kRandomCount;
  return U2D(SpecialDoubles()[i]);
}

// A float sweep for the API aliases and operators: scattered patterns.
inline float ScatteredFloat(uint64_t i) {
  return U2F(static_cast<uint32_t>(i * 0x9e3779b1ull) ^ static_cast<uint32_t>(i >> 9));
}

// ---------------------------------------------------------------------------
// Tables. Eval(i, &input_bits) returns the output (several results packed
// into Out, the narrowest type that holds them: outputs are hashed packed).

struct HalfToFloat {
  using Out = uint32_t;
  static constexpr const char* kName = "half_to_float";
  static uint64_t Count() { return 1u << 16; }
  static uint64_t Eval(uint64_t i, uint64_t* in) {
    *in = i;
    return F2U(__half2float(__ushort_as_half(static_cast<unsigned short>(i))));
  }
};
struct HalfApi {
  using Out = uint64_t;
  static constexpr const char* kName = "half_api";
  static uint64_t Count() { return 1u << 16; }
  static uint64_t Eval(uint64_t i, uint64_t* in) {
    *in = i;
    const __half h = __ushort_as_half(static_cast<unsigned short>(i));
    return __half_as_ushort(h) | uint64_t{F2U(static_cast<float>(h))} << 16;
  }
};
struct Bf16ToFloat {
  using Out = uint32_t;
  static constexpr const char* kName = "bf16_to_float";
  static uint64_t Count() { return 1u << 16; }
  static uint64_t Eval(uint64_t i, uint64_t* in) {
    *in = i;
    return F2U(__bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(i))));
  }
};
struct Bf16Api {
  using Out = uint64_t;
  static constexpr const char* kName = "bf16_api";
  static uint64_t Count() { return 1u << 16; }
  static uint64_t Eval(uint64_t i, uint64_t* in) {
    *in = i;
    const __nv_bfloat16 h = __ushort_as_bfloat16(static_cast<unsigned short>(i));
    return __bfloat16_as_ushort(h) | uint64_t{F2U(static_cast<float>(h))} << 16;
  }
};
struct FloatToHalf {  // every float
  using Out = uint16_t;
  static constexpr const char* kName = "float_to_half";
  static uint64_t Count() { return uint64_t{1} << 32; }
  static uint64_t Eval(uint64_t i, uint64_t* in) {
    *in = i;
    return __half_as_ushort(__float2half_rn(U2F(static_cast<uint32_t>(i))));
  }
};
struct FloatToBf16 {  // every float
  using Out = uint16_t;
  static constexpr const char* kName = "float_to_bf16";
  static uint64_t Count() { return uint64_t{1} << 32; }
  static uint64_t Eval(uint64_t i, uint64_t* in) {
    *in = i;
    return __bfloat16_as_ushort(__float2bfloat16_rn(U2F(static_cast<uint32_t>(i))));
  }
};
struct FloatApiHalf {
  using Out = uint64_t;
  static constexpr const char* kName = "float_api_half";
  static uint64_t Count() { return uint64_t{1} << 22; }
  static uint64_t Eval(uint64_t i, uint64_t* in) {
    const float f = ScatteredFloat(i);
    *in = F2U(f);
    __half assigned;
    assigned = f;
    return uint64_t{__half_as_ushort(__float2half(f))} |
           uint64_t{__half_as_ushort(__half(f))} << 16 |
           uint64_t{__half_as_ushort(assigned)} << 32;
  }
};
struct FloatApiBf16 {
  using Out = uint64_t;
  static constexpr const char* kName = "float_api_bf16";
  static uint64_t Count() { return uint64_t{1} << 22; }
  static uint64_t Eval(uint64_t i, uint64_t* in) {
    const float f = ScatteredFloat(i);
    *in = F2U(f);
    __nv_bfloat16 assigned;
    assigned = f;
    return uint64_t{__bfloat16_as_ushort(__float2bfloat16(f))} |
           uint64_t{__bfloat16_as_ushort(__nv_bfloat16(f))} << 16 |
           uint64_t{__bfloat16_as_ushort(assigned)} << 32;
  }
};
struct DoubleToHalf {  // __double2half, the double constructor and assignment
  using Out = uint64_t;
  static constexpr const char* kName = "double_to_half";
  static uint64_t Count() { return DoubleCount(); }
  static uint64_t Eval(uint64_t i, uint64_t* in) {
    const double d = DoubleInput(i);
    *in = D2U(d);
    __half assigned;
    assigned = d;
    return uint64_t{__half_as_ushort(__double2half(d))} |
           uint64_t{__half_as_ushort(__half(d))} << 16 |
           uint64_t{__half_as_ushort(assigned)} << 32;
  }
};
struct DoubleToBf16 {
  using Out = uint64_t;
  static constexpr const char* kName = "double_to_bf16";
  static uint64_t Count() { return DoubleCount(); }
  static uint64_t Eval(uint64_t i, uint64_t* in) {
    const double d = DoubleInput(i);
    *in = D2U(d);
    __nv_bfloat16 assigned;
    assigned = d;
    return uint64_t{__bfloat16_as_ushort(__double2bfloat16(d))} |
           uint64_t{__bfloat16_as_ushort(__nv_bfloat16(d))} << 16 |
           uint64_t{__bfloat16_as_ushort(assigned)} << 32;
  }
};

// ---------------------------------------------------------------------------

inline uint64_t Mix(uint64_t h, uint64_t w) {
  h = (h ^ w) * 0x9e3779b97f4a7c15ull;
  return (h << 29) | (h >> 35);
}

// Outputs go through a small buffer so the conversion loop has no hash in
// it, then are hashed packed, eight bytes at a time, in four lanes to keep
// the multiply latency off the critical path.
template <class T>
uint64_t HashChunk(uint64_t chunk) {
  using Out = typename T::Out;
  constexpr uint64_t kBlock = 1024;  // a multiple of 4 words of any Out
  const uint64_t begin = chunk * kChunk;
  const uint64_t end = begin + kChunk < T::Count() ? begin + kChunk : T::Count();
  uint64_t h0 = 1, h1 = 2, h2 = 3, h3 = 4;
  for (uint64_t b = begin; b < end; b += kBlock) {
    alignas(64) Out out[kBlock] = {};  // a short last block hashes zeros after its end
    const uint64_t n = end - b < kBlock ? end - b : kBlock;
    for (uint64_t k = 0; k < n; ++k) {
      uint64_t in;
      out[k] = static_cast<Out>(T::Eval(b + k, &in));
    }
    uint64_t words[sizeof out / 8];
    std::memcpy(words, out, sizeof out);
    for (size_t w = 0; w < sizeof out / 8; w += 4) {
      h0 = Mix(h0, words[w]);
      h1 = Mix(h1, words[w + 1]);
      h2 = Mix(h2, words[w + 2]);
      h3 = Mix(h3, words[w + 3]);
    }
  }
  return Mix(Mix(Mix(Mix(end - begin, h0), h1), h2), h3);
}

template <class T>
void RawChunk(uint64_t chunk, std::vector<uint64_t>* pairs) {
  const uint64_t begin = chunk * kChunk;
  uint64_t end = begin + kChunk;
  if (end > T::Count()) end = T::Count();
  for (uint64_t i = begin; i < end; ++i) {
    uint64_t in;
    const uint64_t out = T::Eval(i, &in);
    pairs->push_back(in);
    pairs->push_back(out);
  }
}

struct TableInfo {
  const char* name;
  uint64_t (*count)();
  uint64_t (*hash_chunk)(uint64_t);
  void (*raw_chunk)(uint64_t, std::vector<uint64_t>*);
};

#define FP16_CHECK_TABLE(T) {T::kName, &T::Count, &HashChunk<T>, &RawChunk<T>}
inline const std::vector<TableInfo>& Tables() {
  static const std::vector<TableInfo> tables = {
      FP16_CHECK_TABLE(HalfToFloat),  FP16_CHECK_TABLE(HalfApi),
      FP16_CHECK_TABLE(Bf16ToFloat),  FP16_CHECK_TABLE(Bf16Api),
      FP16_CHECK_TABLE(FloatToHalf),  FP16_CHECK_TABLE(FloatToBf16),
      FP16_CHECK_TABLE(FloatApiHalf), FP16_CHECK_TABLE(FloatApiBf16),
      FP16_CHECK_TABLE(DoubleToHalf), FP16_CHECK_TABLE(DoubleToBf16),
  };
  return tables;
}
#undef FP16_CHECK_TABLE

// Summary file, little-endian: per table a 32-byte NUL-padded name, u64 count,
// u64 chunk count, then the chunk hashes.
inline int WriteSummary(const char* path) {
  const std::vector<TableInfo>& tables = Tables();
  struct Job {
    size_t table;
    uint64_t chunk;
  };
  std::vector<Job> jobs;
  std::vector<std::vector<uint64_t>> hashes;
  for (size_t t = 0; t < tables.size(); ++t) {
    const uint64_t n = (tables[t].count() + kChunk - 1) / kChunk;
    hashes.emplace_back(n);
    for (uint64_t c = 0; c < n; ++c) jobs.push_back({t, c});
  }
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t k; (k = next.fetch_add(1)) < jobs.size();) {
      const Job& j = jobs[k];
      hashes[j.table][j.chunk] = tables[j.table].hash_chunk(j.chunk);
    }
  };
  unsigned n_threads = std::thread::hardware_concurrency();
  if (const char* env = std::getenv("FP16_CHECK_THREADS")) n_threads = std::atoi(env);
  if (n_threads < 1) n_threads = 1;
  std::vector<std::thread> threads;
  for (unsigned t = 1; t < n_threads; ++t) threads.emplace_back(worker);
  worker();
  for (auto& t : threads) t.join();

  FILE* f = std::fopen(path, "wb");
  if (!f) return 1;
  for (size_t t = 0; t < tables.size(); ++t) {
    char name[32] = {};
    std::strncpy(name, tables[t].name, sizeof name - 1);
    const uint64_t head[2] = {tables[t].count(), hashes[t].size()};
    std::fwrite(name, 1, sizeof name, f);
    std::fwrite(head, sizeof head[0], 2, f);
    std::fwrite(hashes[t].data(), sizeof(uint64_t), hashes[t].size(), f);
  }
  return std::fclose(f) == 0 ? 0 : 1;
}

inline int WriteRaw(const std::string& table, uint64_t chunk, const char* path) {
  for (const TableInfo& t : Tables()) {
    if (table != t.name) continue;
    std::vector<uint64_t> pairs;
    t.raw_chunk(chunk, &pairs);
    FILE* f = std::fopen(path, "wb");
    if (!f) return 1;
    std::fwrite(pairs.data(), sizeof(uint64_t), pairs.size(), f);
    return std::fclose(f) == 0 ? 0 : 1;
  }
  std::fprintf(stderr, "unknown table %s\n", table.c_str());
  return 2;
}

inline int Main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (argc == 3 && cmd == "summary") return WriteSummary(argv[2]);
  if (argc == 5 && cmd == "raw") {
    return WriteRaw(argv[2], std::strtoull(argv[3], nullptr, 10), argv[4]);
  }
  std::fprintf(stderr, "usage: %s summary FILE | raw TABLE CHUNK FILE\n", argv[0]);
  return 2;
}

}  // namespace fp16_check

#endif  // TFLN_EMU_FP16_CHECK_DUMP_DRIVER_H_
