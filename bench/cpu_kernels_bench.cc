// Single-thread timings of the CPU kernels themselves: no TensorFlow, no
// thread pool, no per-call framework cost. What bench_cpu.py cannot separate
// on a shared machine (its TF timings carry ~0.2 ms of tf.function floor and
// the pool's noise), this measures in nanoseconds per element, per ISA:
//
//   bazel build //cc:cpu_kernels_bench
//   bazel-bin/cc/cpu_kernels_bench [rows D [reps]]
//   TF_LAYERNORM_CPU_ISA=avx2 bazel-bin/cc/cpu_kernels_bench 256 768
//
// Prints, for float32, bfloat16 and float16 (float32 parameters for the
// 16-bit types, as under mixed precision): the minimum and median time of
// the forward and the backward over `reps` calls on the same arrays.
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

template <class F>
Stats Time(int reps, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < 3; ++i) f();
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count());
  }
  std::sort(t.begin(), t.end());
  return {t.front(), t[t.size() / 2]};
}

void Serial(int64_t units, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
  fn(0, units);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? std::atoll(argv[1]) : 256;
  const int64_t d = argc > 2 ? std::atoll(argv[2]) : 768;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 200;
  if (rows <= 0 || d <= 0 || reps <= 0) {
    std::fprintf(stderr, "usage: %s [rows > 0] [D > 0] [reps > 0]\n", argv[0]);
    return 2;
  }
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

  std::printf("ISA %s, %lld x %lld, one thread, %d reps: ns per element, min (median)\n",
              tf_layernorm::LayerNormCpuIsa(), static_cast<long long>(rows),
              static_cast<long long>(d), reps);
  std::printf("%-9s %-20s %-20s %-20s\n", "dtype", "forward", "backward", "fwd+bwd us (min)");
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
    void* y = half ? static_cast<void*>(y16.data()) : y32.data();
    void* dx = half ? static_cast<void*>(dx16.data()) : dx32.data();
    bool ok = true;
    const Stats fwd = Time(reps, [&] {
      ok &= tf_layernorm::LayerNormForwardCpu(g, t, CpuDType::kF32, x, gamma.data(), beta.data(),
                                              1e-5, y, mean.data(), rstd.data(), serial) ==
            tf_layernorm::KernelStatus::kOk;
    });
    const Stats bwd = Time(reps, [&] {
      ok &= tf_layernorm::LayerNormBackwardCpu(g, t, CpuDType::kF32, dy, x, gamma.data(),
                                               mean.data(), rstd.data(), dx, dgamma.data(),
                                               dbeta.data(), work.data(), serial) ==
            tf_layernorm::KernelStatus::kOk;
    });
    if (!ok) {
      std::fprintf(stderr, "a kernel call failed\n");
      return 1;
    }
    const char* name = t == CpuDType::kF32 ? "float32" : t == CpuDType::kBF16 ? "bfloat16"
                                                                              : "float16";
    char f[32], b[32];
    std::snprintf(f, sizeof f, "%.3f (%.3f)", fwd.min_ns / n, fwd.median_ns / n);
    std::snprintf(b, sizeof b, "%.3f (%.3f)", bwd.min_ns / n, bwd.median_ns / n);
    std::printf("%-9s %-20s %-20s %.1f\n", name, f, b, (fwd.min_ns + bwd.min_ns) / 1e3);
  }
  return 0;
}
