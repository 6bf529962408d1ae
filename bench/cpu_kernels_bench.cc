// Single-thread timings of the CPU kernels themselves: no TensorFlow, no
// thread pool, no per-call framework cost. What bench_cpu.py cannot separate
// on a shared machine (its TF timings carry ~0.2 ms of tf.function floor and
// the pool's noise), this measures in nanoseconds per element, per ISA:
//
//   bazel build //cc:cpu_kernels_bench
//   bazel-bin/cc/cpu_kernels_bench [rows D [reps [cold]]]
//   TF_LAYERNORM_CPU_ISA=avx2 bazel-bin/cc/cpu_kernels_bench 256 768
//
// Prints, for float32, bfloat16 and float16 (float32 parameters for the
// 16-bit types, as under mixed precision): the minimum and median time of
// the forward and the backward over `reps` calls on the same arrays, the
// same in place (y written into x's buffer, dx into dy's, as the ops do when
// TensorFlow forwards the input buffer), and the roofline: a one-thread
// memcpy of x into y, warm buffers. Per byte moved, the forward moves what
// that copy does (read x, write y) and the backward 1.5 times it (read x and
// dy, write dx); the '/copy' columns divide by those. With `cold`, every
// timed call (kernels and copy alike) starts with its arrays out of cache: a
// 256 MiB buffer is rewritten before it, untimed (the memory-bound case of
// tensors larger than the last-level cache; without it a 32 MiB input can
// stay in a 32 MiB L3 from one call to the next).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cc/kernels/layer_norm_cpu.h"

namespace {

using tf_layernorm::CpuDType;
using tf_layernorm::NormGeometry;

uint16_t ToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

uint16_t ToF16(float f) {  // finite, normal-range values only (the inputs here)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000;
  const int exp = static_cast<int>((u >> 23) & 0xff) - 127 + 15;
  if (exp <= 0) return static_cast<uint16_t>(sign);
  return static_cast<uint16_t>(sign | (exp << 10) | ((u >> 13) & 0x3ff));
}

struct Stats {
  double min_ns, median_ns;
};

// `setup` runs untimed before every call.
template <class F, class G>
Stats Time(int reps, F&& f, G&& setup) {
  std::vector<double> t;
  for (int i = 0; i < 3; ++i) {
    setup();
    f();
  }
  for (int i = 0; i < reps; ++i) {
    setup();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count());
  }
  std::sort(t.begin(), t.end());
  return {t.front(), t[t.size() / 2]};
}

template <class F>
Stats Time(int reps, F&& f) {
  return Time(reps, f, [] {});
}

void Serial(int64_t units, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
  fn(0, units);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? std::atoll(argv[1]) : 256;
  const int64_t d = argc > 2 ? std::atoll(argv[2]) : 768;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 200;
  const bool cold = argc > 4 && std::strcmp(argv[4], "cold") == 0;
  if (rows <= 0 || d <= 0 || reps <= 0 || (argc > 4 && !cold) || argc > 5) {
    std::fprintf(stderr, "usage: %s [rows > 0] [D > 0] [reps > 0] [cold]\n", argv[0]);
    return 2;
  }
  std::vector<char> evict(cold ? size_t{256} << 20 : 0);
  const auto flush = [&] {
    for (size_t i = 0; i < evict.size(); i += 64) evict[i] = static_cast<char>(evict[i] + 1);
  };
  const int64_t n = rows * d;
  NormGeometry g;
  g.outer = rows;
  g.norm = d;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<float> x32(n), dy32(n), gamma(d), beta(d), dgamma(d), dbeta(d), y32(n), dx32(n);
  for (auto& v : x32) v = normal(rng);
  for (auto& v : dy32) v = normal(rng);
  for (auto& v : gamma) v = 1.0f + 0.1f * normal(rng);
  for (auto& v : beta) v = 0.1f * normal(rng);
  std::vector<uint16_t> x16(n), dy16(n), y16(n), dx16(n);
  std::vector<float> mean(rows), rstd(rows);
  std::vector<float> work(tf_layernorm::LayerNormBackwardWorkspaceSize(g, true, true));
  const tf_layernorm::ParallelFor serial = Serial;

  std::printf("ISA %s, %lld x %lld, one thread, %d reps%s: ns per element, min (median)\n",
              tf_layernorm::LayerNormCpuIsa(), static_cast<long long>(rows),
              static_cast<long long>(d), reps, cold ? ", cold caches" : "");
  std::printf("%-9s %-18s %-18s %-18s %-18s %-12s %-8s %-8s\n", "dtype", "forward",
              "backward", "fwd in place", "bwd in place", "copy", "fwd/copy", "bwd/1.5 copy");
  for (CpuDType t : {CpuDType::kF32, CpuDType::kBF16, CpuDType::kF16}) {
    const bool half = t != CpuDType::kF32;
    if (half) {
      for (int64_t i = 0; i < n; ++i) {
        x16[i] = t == CpuDType::kBF16 ? ToBF16(x32[i]) : ToF16(x32[i]);
        dy16[i] = t == CpuDType::kBF16 ? ToBF16(dy32[i]) : ToF16(dy32[i]);
      }
    }
    const void* x = half ? static_cast<const void*>(x16.data()) : x32.data();
    const void* dy = half ? static_cast<const void*>(dy16.data()) : dy32.data();
    // In-place buffers: copies of x and dy, which the kernels overwrite;
    // restored (untimed) before every call.
    const size_t bytes = static_cast<size_t>(n) * (half ? 2 : 4);
    std::vector<char> xi(bytes + 64), dyi(bytes + 64);
    char* xin = xi.data() + (64 - reinterpret_cast<uintptr_t>(xi.data()) % 64) % 64;
    char* dyin = dyi.data() + (64 - reinterpret_cast<uintptr_t>(dyi.data()) % 64) % 64;
    std::memcpy(xin, x, bytes);
    std::memcpy(dyin, dy, bytes);
    void* y = half ? static_cast<void*>(y16.data()) : y32.data();
    void* dx = half ? static_cast<void*>(dx16.data()) : dx32.data();
    bool ok = true;
    const Stats fwd = Time(reps, [&] {
      ok &= tf_layernorm::LayerNormForwardCpu(g, t, CpuDType::kF32, x, gamma.data(), beta.data(),
                                              1e-5, y, mean.data(), rstd.data(), serial) ==
            tf_layernorm::KernelStatus::kOk;
    }, flush);
    const Stats bwd = Time(reps, [&] {
      ok &= tf_layernorm::LayerNormBackwardCpu(g, t, CpuDType::kF32, dy, x, gamma.data(),
                                               mean.data(), rstd.data(), dx, dgamma.data(),
                                               dbeta.data(), work.data(), serial) ==
            tf_layernorm::KernelStatus::kOk;
    }, flush);
    // In place must give the bits out of place gives (y and dx now hold the
    // out-of-place results for x, dy and these statistics): the kernels' own
    // alias check, on every ISA, without TensorFlow.
    ok &= tf_layernorm::LayerNormForwardCpu(g, t, CpuDType::kF32, xin, gamma.data(), beta.data(),
                                            1e-5, xin, mean.data(), rstd.data(), serial) ==
          tf_layernorm::KernelStatus::kOk;
    ok &= tf_layernorm::LayerNormBackwardCpu(g, t, CpuDType::kF32, dyin, x, gamma.data(),
                                             mean.data(), rstd.data(), dyin, dgamma.data(),
                                             dbeta.data(), work.data(), serial) ==
          tf_layernorm::KernelStatus::kOk;
    if (ok && (std::memcmp(xin, y, bytes) != 0 || std::memcmp(dyin, dx, bytes) != 0)) {
      std::fprintf(stderr, "in-place results differ from out-of-place ones\n");
      return 1;
    }
    const Stats fwd_in = Time(reps, [&] {
      ok &= tf_layernorm::LayerNormForwardCpu(g, t, CpuDType::kF32, xin, gamma.data(),
                                              beta.data(), 1e-5, xin, mean.data(), rstd.data(),
                                              serial) == tf_layernorm::KernelStatus::kOk;
    }, [&] {
      std::memcpy(xin, x, bytes);
      flush();
    });
    const Stats bwd_in = Time(reps, [&] {
      ok &= tf_layernorm::LayerNormBackwardCpu(g, t, CpuDType::kF32, dyin, x, gamma.data(),
                                               mean.data(), rstd.data(), dyin, dgamma.data(),
                                               dbeta.data(), work.data(), serial) ==
            tf_layernorm::KernelStatus::kOk;
    }, [&] {
      std::memcpy(dyin, dy, bytes);
      flush();
    });
    const Stats copy = Time(reps, [&] { std::memcpy(y, x, bytes); }, flush);
    if (!ok) {
      std::fprintf(stderr, "a kernel call failed\n");
      return 1;
    }
    const char* name = t == CpuDType::kF32 ? "float32" : t == CpuDType::kBF16 ? "bfloat16"
                                                                              : "float16";
    char f[32], b[32], fi[32], bi[32], c[32];
    std::snprintf(f, sizeof f, "%.3f (%.3f)", fwd.min_ns / n, fwd.median_ns / n);
    std::snprintf(b, sizeof b, "%.3f (%.3f)", bwd.min_ns / n, bwd.median_ns / n);
    std::snprintf(fi, sizeof fi, "%.3f (%.3f)", fwd_in.min_ns / n, fwd_in.median_ns / n);
    std::snprintf(bi, sizeof bi, "%.3f (%.3f)", bwd_in.min_ns / n, bwd_in.median_ns / n);
    std::snprintf(c, sizeof c, "%.3f", copy.min_ns / n);
    std::printf("%-9s %-18s %-18s %-18s %-18s %-12s %-8.2f %.2f\n", name, f, b, fi, bi, c,
                fwd.min_ns / copy.min_ns, bwd.min_ns / (1.5 * copy.min_ns));
  }
  return 0;
}
