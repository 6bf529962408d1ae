// The CPU driver: validates geometry, picks the ISA once, partitions the work
// and hands ranges to the per-ISA kernels. Compiled for baseline x86-64.
#include "cc/kernels/layer_norm_cpu.h"

#include <cpuid.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "cc/kernels/layer_norm_cpu_isa.h"

namespace tf_layernorm {
namespace {

using cpu::IsaKernels;

// ------------------------------------------------------------ ISA choice --

bool CpuHasAvx2() {
  __builtin_cpu_init();
  // libgcc reports AVX features only when the OS saves the YMM state.
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return false;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  return (ecx & bit_F16C) != 0;
}

bool CpuHasAvx512() {
  __builtin_cpu_init();
  // ... and AVX-512 features only when it saves the ZMM state too.
  return CpuHasAvx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
}

// nullptr when the name is unknown or the CPU lacks the ISA.
const IsaKernels* KernelsByName(const char* name) {
  if (std::strcmp(name, "baseline") == 0) return cpu::BaselineKernels();
  if (std::strcmp(name, "avx2") == 0) return CpuHasAvx2() ? cpu::Avx2Kernels() : nullptr;
  if (std::strcmp(name, "avx512") == 0) return CpuHasAvx512() ? cpu::Avx512Kernels() : nullptr;
  return nullptr;
}

const IsaKernels* BestKernels() {
  if (CpuHasAvx512()) return cpu::Avx512Kernels();
  if (CpuHasAvx2()) return cpu::Avx2Kernels();
  return cpu::BaselineKernels();
}

const IsaKernels* SelectKernels() {
  const char* forced = std::getenv("TF_LAYERNORM_CPU_ISA");
  if (forced == nullptr || forced[0] == '\0' || std::strcmp(forced, "auto") == 0) {
    return BestKernels();
  }
  if (const IsaKernels* k = KernelsByName(forced)) return k;
  const IsaKernels* best = BestKernels();
  std::fprintf(stderr,
               "tf_layernorm: TF_LAYERNORM_CPU_ISA=%s is not one of baseline, avx2, avx512 "
               "supported by this CPU; using %s\n",
               forced, best->name);
  return best;
}

const IsaKernels& Kernels() {
  static const IsaKernels* const kernels = SelectKernels();
  return *kernels;
}

// ------------------------------------------------------------ partitions --

// The backward's dgamma/dbeta partial buffers: at most this many blocks, and
// at most kPartialBudget elements per parameter and level, whatever D is, so
// the extra memory stays O(D) and independent of the number of rows.
constexpr int64_t kMaxBlocks = 64;
static_assert(kMaxBlocks <= 64, "the kernels' pairwise finalize holds 64 blocks");
constexpr int64_t kPartialBudget = int64_t{1} << 22;
// A block should carry at least this many elements, and at least this many
// units, so the partials (written, accumulated and summed: a few passes over
// D per block) stay a small fraction of the block's own traffic.
constexpr int64_t kMinElementsPerBlock = int64_t{1} << 15;
constexpr int64_t kMinUnitsPerBlock = 8;
// inner > 1: columns per unit. 256 floats = 1 KiB contiguous per row of the
// chunk: long enough runs for the prefetchers, and the chunk's accumulators
// (a few KiB) stay in L1 while its D rows stream through.
constexpr int64_t kChunkCols = 256;
// Cycles per element handed to the thread pool's cost model (Eigen's
// ThreadPool starts another thread per ~100k cycles of work). Measured on a
// 2-core AMD EPYC (Zen 4) with AVX-512: the forward streams ~1 float per
// cycle per core, the backward about half of that.
constexpr int64_t kForwardCostPerElement = 2;
constexpr int64_t kBackwardCostPerElement = 4;
// Outputs (y, dx) at least this large are written with non-temporal stores
// when their rows are 64-byte aligned: they cannot stay in cache for the next
// op anyway, and streaming them skips the read-for-ownership of every line
// (a third of the forward's memory traffic). Not in place (y in x's buffer,
// dx in dy's): there the kernel has just read the line, so there is no
// read-for-ownership to skip, and a non-temporal store to a cached line
// costs its eviction (8192 x 1024 float32 backward in place, one thread,
// AMD EPYC AVX2: 1.45 ns/element with non-temporal stores, 0.70 with plain
// ones; bench/cpu_kernels_bench.cc).
constexpr int64_t kStreamBytes = int64_t{8} << 20;
// Below this many elements the whole op runs on the calling thread: handing
// work to the pool costs ~30-50 us here, about what one thread needs for
// 2^18 to 2^19 elements (forward ~0.2 ns, backward ~0.25 ns per float32
// element). Measured raw ops at 256..1024 x 768: serial is faster up to
// ~600K elements (256 x 768: forward 0.062 -> 0.050 ms, backward 0.079 ->
// 0.061 ms), the pool from ~800K.
constexpr int64_t kSerialElements = int64_t{1} << 19;

// Outputs at least this large, not written in place, are first advised to
// use transparent huge pages (Linux, where THP is in "madvise" mode, as on
// Debian and this project's CI machines). A plain allocator (TensorFlow's on
// CPUs where oneDNN is off, e.g. AMD) hands large outputs over as fresh
// mmap'd memory on every call, and the kernel's first touch of each 4 KiB
// page is a page fault: most of a large op's time (8192 x 1024 float32
// forward: 22.7 ms, against 4.6 ms with TensorFlow's pooled allocator). One
// 2 MiB fault instead of 512 small ones leaves mostly the zeroing. PyTorch's
// CPU allocator gives its large buffers the same advice (THP_MEM_ALLOC_ENABLE).
// TF_LAYERNORM_HUGE_PAGES=0 turns it off.
constexpr int64_t kHugePageAdviceBytes = int64_t{4} << 20;
constexpr uintptr_t kHugePageBytes = uintptr_t{2} << 20;

bool HugePageAdviceEnabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("TF_LAYERNORM_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// Advice only: it changes no data, and a kernel that refuses it (no THP,
// memory already touched, pooled allocators) costs one system call.
void AdviseHugePages(void* out, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kHugePageAdviceBytes || !HugePageAdviceEnabled()) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(out) + kHugePageBytes - 1) &
                          ~(kHugePageBytes - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(out) + static_cast<uintptr_t>(bytes)) &
                        ~(kHugePageBytes - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)out;
  (void)bytes;
#endif
}

struct Columns {
  int64_t chunk = 1;
  int64_t chunks = 1;
};

Columns ColumnChunks(const NormGeometry& g) {
  Columns c;
  if (g.inner > 1) {
    c.chunk = std::min<int64_t>(kChunkCols, (g.inner + 15) / 16 * 16);
    c.chunks = (g.inner + c.chunk - 1) / c.chunk;
  }
  return c;
}

// The fixed partition of the backward's work units into blocks: a function
// of the shape only.
struct BlockPlan {
  int64_t units = 0;  // rows (inner == 1) or (outer, chunk) pairs
  int64_t elems_per_unit = 0;
  int64_t blocks = 0;
  int64_t units_per_block = 0;
};

BlockPlan PlanBlocks(const NormGeometry& g) {
  BlockPlan p;
  const Columns c = ColumnChunks(g);
  p.units = g.outer * c.chunks;
  p.elems_per_unit = g.norm * std::min(c.chunk, g.inner);
  if (p.units == 0 || g.norm == 0) return p;
  const int64_t min_units = std::max<int64_t>(
      kMinUnitsPerBlock, kMinElementsPerBlock / std::max<int64_t>(1, p.elems_per_unit));
  int64_t blocks = (p.units + min_units - 1) / min_units;
  blocks = std::min(blocks, kMaxBlocks);
  blocks = std::min(blocks, std::max<int64_t>(1, kPartialBudget / g.norm));
  p.units_per_block = (p.units + blocks - 1) / blocks;
  p.blocks = (p.units + p.units_per_block - 1) / p.units_per_block;
  return p;
}

void Run(const ParallelFor& parallel_for, int64_t units, int64_t cost_per_unit,
         int64_t total_elements, const std::function<void(int64_t, int64_t)>& fn) {
  if (units <= 0) return;
  if (units == 1 || total_elements < kSerialElements) {
    fn(0, units);
  } else {
    parallel_for(units, cost_per_unit, fn);
  }
}

size_t ElementBytes(CpuDType t) {
  switch (t) {
    case CpuDType::kF64:
      return 8;
    case CpuDType::kF32:
      return 4;
    default:
      return 2;
  }
}

// Every vector the kernels store must start 64-byte aligned and be full:
// rows (inner == 1) of whole 64-byte lines, or for inner > 1 column chunks
// and rows of the [D, inner] slab of whole lines.
bool CanStream(const NormGeometry& g, CpuDType x_type, const void* in, const void* out) {
  const int64_t bytes = static_cast<int64_t>(ElementBytes(x_type));
  if (in == out || g.num_elements() * bytes < kStreamBytes ||
      reinterpret_cast<uintptr_t>(out) % 64 != 0) {
    return false;
  }
  if (g.inner == 1) return g.norm * bytes % 64 == 0;
  return g.inner * bytes % 64 == 0 && ColumnChunks(g).chunk * bytes % 64 == 0;
}

bool ValidGeometry(const NormGeometry& g) {
  if (g.outer < 0 || g.norm < 0 || g.inner < 1) return false;
  // The element count must fit int64 without overflow.
  const int64_t kMax = std::numeric_limits<int64_t>::max();
  if (g.outer > 0 && g.norm > kMax / g.outer) return false;
  if (g.outer * g.norm > 0 && g.inner > kMax / (g.outer * g.norm)) return false;
  return true;
}

// -1 for a combination the kernels do not cover.
int TypePairOf(CpuDType x, CpuDType p) {
  switch (x) {
    case CpuDType::kF32:
      return p == CpuDType::kF32 ? cpu::kPairF32 : -1;
    case CpuDType::kF64:
      return p == CpuDType::kF64 ? cpu::kPairF64 : -1;
    case CpuDType::kF16:
      return p == CpuDType::kF16 ? cpu::kPairF16 : p == CpuDType::kF32 ? cpu::kPairF16F32 : -1;
    case CpuDType::kBF16:
      return p == CpuDType::kBF16 ? cpu::kPairBF16 : p == CpuDType::kF32 ? cpu::kPairBF16F32 : -1;
  }
  return -1;
}

// The ISA's table, or the baseline's for what the ISA leaves to it (float64).
const IsaKernels& TableFor(int pair) {
  const IsaKernels& k = Kernels();
  return k.forward_rows[pair][0] != nullptr ? k : *cpu::BaselineKernels();
}

}  // namespace

const char* LayerNormCpuIsa() { return Kernels().name; }

int64_t LayerNormBackwardWorkspaceSize(const NormGeometry& g, bool scale, bool center) {
  const BlockPlan p = PlanBlocks(g);
  return p.blocks * cpu::kPartialLevels * g.norm * ((scale ? 1 : 0) + (center ? 1 : 0));
}

KernelStatus LayerNormForwardCpu(const NormGeometry& g, CpuDType x_type, CpuDType param_type,
                                 const void* x, const void* gamma, const void* beta,
                                 double epsilon, void* y, void* mean, void* rstd,
                                 const ParallelFor& parallel_for, bool rms,
                                 const void* residual, void* sum) {
  if (!ValidGeometry(g)) return KernelStatus::kInvalidGeometry;
  const int pair = TypePairOf(x_type, param_type);
  if (pair < 0) return KernelStatus::kUnsupportedTypes;
  // A residual needs somewhere to put s, and s nowhere to go without one.
  if ((residual == nullptr) != (sum == nullptr) && g.num_elements() > 0) {
    return KernelStatus::kNullPointer;
  }
  if (g.num_stats() == 0) return KernelStatus::kOk;
  if ((mean == nullptr && !rms) || rstd == nullptr) return KernelStatus::kNullPointer;
  if (g.norm == 0) {
    // The statistics of an empty row are undefined: NaN.
    for (void* stat : {rms ? nullptr : mean, rstd}) {
      if (stat == nullptr) continue;
      if (x_type == CpuDType::kF64) {
        std::fill_n(static_cast<double*>(stat), g.num_stats(),
                    std::numeric_limits<double>::quiet_NaN());
      } else {
        std::fill_n(static_cast<float*>(stat), g.num_stats(),
                    std::numeric_limits<float>::quiet_NaN());
      }
    }
    return KernelStatus::kOk;
  }
  if (x == nullptr || y == nullptr) return KernelStatus::kNullPointer;
  const Columns c = ColumnChunks(g);
  cpu::ForwardArgs a;
  a.norm = g.norm;
  a.inner = g.inner;
  a.chunk = c.chunk;
  a.chunks = c.chunks;
  a.x = x;
  a.gamma = gamma;
  a.beta = beta;
  a.epsilon = epsilon;
  a.y = y;
  a.mean = rms ? nullptr : mean;
  a.rstd = rstd;
  a.rms = rms;
  a.residual = residual;
  a.sum = sum;
  // y in residual's buffer: the kernel has just read it (see CanStream).
  a.stream = CanStream(g, x_type, x, y) && y != residual;
  // s streams on the row path (where the passes read the row cache) when it
  // is not written in place into x's buffer.
  a.stream_sum = sum != nullptr && g.inner == 1 && CanStream(g, x_type, x, sum) &&
                 sum != residual;
  const int64_t bytes = g.num_elements() * static_cast<int64_t>(ElementBytes(x_type));
  if (y != x && y != residual) AdviseHugePages(y, bytes);
  if (sum != nullptr && sum != x) AdviseHugePages(sum, bytes);
  const int affine = 2 * (gamma != nullptr) + (beta != nullptr);
  const IsaKernels& k = TableFor(pair);
  const cpu::ForwardFn fn =
      g.inner == 1 ? k.forward_rows[pair][affine] : k.forward_columns[pair][affine];
  const int64_t units = g.outer * c.chunks;
  const int64_t per_unit = g.norm * std::min(c.chunk, g.inner);
  Run(parallel_for, units, per_unit * kForwardCostPerElement, g.num_elements(),
      [&](int64_t b, int64_t e) { fn(a, b, e); });
  return KernelStatus::kOk;
}

KernelStatus LayerNormBackwardCpu(const NormGeometry& g, CpuDType x_type, CpuDType param_type,
                                  const void* dy, const void* x, const void* gamma,
                                  const void* mean, const void* rstd, void* dx, void* dgamma,
                                  void* dbeta, void* workspace, const ParallelFor& parallel_for,
                                  bool rms, const void* dsum) {
  if (!ValidGeometry(g)) return KernelStatus::kInvalidGeometry;
  const int pair = TypePairOf(x_type, param_type);
  if (pair < 0) return KernelStatus::kUnsupportedTypes;
  // D == 0: dx, dgamma and dbeta are all empty.
  if (g.norm == 0) return KernelStatus::kOk;
  const bool scale = gamma != nullptr;
  const bool want_dgamma = dgamma != nullptr;
  const bool want_dbeta = dbeta != nullptr;
  // dgamma exists exactly when there is a gamma.
  if (want_dgamma != scale) return KernelStatus::kNullPointer;
  if (g.num_elements() > 0 &&
      (x == nullptr || dy == nullptr || dx == nullptr || (mean == nullptr && !rms) ||
       rstd == nullptr)) {
    return KernelStatus::kNullPointer;
  }
  const int64_t ws = LayerNormBackwardWorkspaceSize(g, want_dgamma, want_dbeta);
  if (g.num_elements() > 0 && ws > 0 && workspace == nullptr) return KernelStatus::kNullPointer;

  const BlockPlan plan = PlanBlocks(g);
  const int64_t n = g.norm;
  const bool f64 = x_type == CpuDType::kF64;
  if (plan.blocks == 0) {
    // No rows: the parameter gradients are sums over nothing. Zero bits are
    // +0 in every float format.
    const size_t bytes = ElementBytes(param_type);
    if (want_dgamma) std::memset(dgamma, 0, n * bytes);
    if (want_dbeta) std::memset(dbeta, 0, n * bytes);
    return KernelStatus::kOk;
  }
  const Columns c = ColumnChunks(g);
  const size_t cbytes = f64 ? 8 : 4;
  char* ws_bytes = static_cast<char*>(workspace);
  cpu::BackwardArgs a;
  a.norm = n;
  a.inner = g.inner;
  a.chunk = c.chunk;
  a.chunks = c.chunks;
  a.units = plan.units;
  a.units_per_block = plan.units_per_block;
  a.dy = dy;
  a.x = x;
  a.gamma = gamma;
  a.mean = rms ? nullptr : mean;
  a.rstd = rstd;
  a.rms = rms;
  a.dx = dx;
  a.dsum = dsum;
  a.stream = CanStream(g, x_type, dy, dx) && dx != dsum;
  if (dx != dy) {
    AdviseHugePages(dx, g.num_elements() * static_cast<int64_t>(ElementBytes(x_type)));
  }
  const int64_t per_param = plan.blocks * cpu::kPartialLevels * n;
  a.part_g = want_dgamma ? ws_bytes : nullptr;
  a.part_b = want_dbeta ? ws_bytes + (want_dgamma ? per_param * cbytes : 0) : nullptr;
  // The kernel variant covers (scale of dx, wants dbeta); dgamma follows scale.
  const int affine = 2 * scale + want_dbeta;
  const IsaKernels& k = TableFor(pair);
  const cpu::BackwardFn fn =
      g.inner == 1 ? k.backward_rows[pair][affine] : k.backward_columns[pair][affine];
  Run(parallel_for, plan.blocks,
      plan.units_per_block * plan.elems_per_unit * kBackwardCostPerElement, g.num_elements(),
      [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) fn(a, b);
      });
  if (!want_dgamma && !want_dbeta) return KernelStatus::kOk;
  cpu::FinalizeArgs f;
  f.norm = n;
  f.blocks = plan.blocks;
  f.part_g = a.part_g;
  f.part_b = a.part_b;
  f.dgamma = dgamma;
  f.dbeta = dbeta;
  const cpu::FinalizeFn fin = k.finalize[pair][2 * want_dgamma + want_dbeta];
  // Columns in ranges of whole 64-byte lines, so threads never share one.
  constexpr int64_t kFinalizeCols = 16;
  const int64_t col_units = (n + kFinalizeCols - 1) / kFinalizeCols;
  Run(parallel_for, col_units, plan.blocks * kFinalizeCols * 2, n * plan.blocks,
      [&](int64_t u0, int64_t u1) {
        fin(f, u0 * kFinalizeCols, std::min(n, u1 * kFinalizeCols));
      });
  return KernelStatus::kOk;
}

}  // namespace tf_layernorm

// ------------------------------------------------------------ test hooks --
// Plain C symbols of the op library, for tests through ctypes: which ISA runs,
// and each ISA's float16/bfloat16 conversions.

extern "C" {

const char* tf_layernorm_cpu_isa() { return tf_layernorm::LayerNormCpuIsa(); }

// 1 when this CPU can run `isa`'s kernels, 0 when not or unknown.
int tf_layernorm_cpu_isa_supported(const char* isa) {
  return tf_layernorm::KernelsByName(isa) != nullptr ? 1 : 0;
}

// op: 0 f16->f32, 1 f32->f16, 2 bf16->f32, 3 f32->bf16 (16-bit types as raw
// uint16 bits). Returns 0 on success, 1 when the CPU lacks the ISA or either
// name is unknown.
int tf_layernorm_cpu_convert(const char* isa, int op, const void* in, void* out, int64_t n) {
  const tf_layernorm::cpu::IsaKernels* k = tf_layernorm::KernelsByName(isa);
  if (k == nullptr || op < 0 || op >= tf_layernorm::cpu::kNumConvertOps) return 1;
  k->convert[op](in, out, n);
  return 0;
}

}  // extern "C"
