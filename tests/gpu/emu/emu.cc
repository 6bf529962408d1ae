// The SIMT emulator's runtime: fibers, the scheduler, barriers, shuffles and
// the few CUDA runtime calls the kernels make. See emu.h and README.md.
#include "tests/gpu/emu/emu.h"

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "tests/gpu/emu/shim/cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define TFLN_EMU_ASAN 1
#else
#define TFLN_EMU_ASAN 0
#endif

// Storage of every __shared__ static of the emulated kernels (see shim).
extern "C" char __start_tfln_shared[] __attribute__((weak));
extern "C" char __stop_tfln_shared[] __attribute__((weak));

namespace tfln_emu {

ThreadRegs* g_regs = nullptr;
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = TFLN_EMU_ASAN ? (1u << 20) : (256u << 10);

enum class State { kRunnable, kBarrier, kWarpSync, kDone };

struct Fiber {
  jmp_buf context;
  ThreadRegs regs;
  State state = State::kDone;
  int index = 0;  // linear thread index in the block
  const char* file = nullptr;
  int line = 0;
  // Shuffle operands and result.
  uint64_t value = 0;
  int arg = 0;
  uint64_t result = 0;
  char* stack = nullptr;  // usable part, above a guard page
};

// Lanes of one warp waiting at the same __shfl_*_sync / __syncwarp.
struct WarpGroup {
  unsigned mask = 0;
  unsigned arrived = 0;
  int kind = 0;
  int size = 0;
  int width = 0;
  const char* file = nullptr;
  int line = 0;
};

struct Runtime {
  std::mutex mutex;  // one launch at a time
  // Device configuration.
  int schedule = 0;
  uint64_t seed = 1;
  int sms = 132;
  bool one_block = false;
  // Errors.
  cudaError_t last_error = cudaSuccess;
  char fault[2048] = "";
  bool faulted = false;
  char error_text[2300] = "";
  // Counters.
  long long launches = 0, blocks = 0, attribute_queries = 0;

  // The launch in progress.
  void (*thunk)(const void*) = nullptr;
  const void* ctx = nullptr;
  std::vector<Fiber> fibers;
  int threads = 0;
  std::vector<std::vector<WarpGroup>> groups;  // per warp
  std::vector<int> runnable_in_warp;
  int runnable = 0;
  int at_barrier = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  int done = 0;
  Fiber* running = nullptr;
  jmp_buf scheduler;
  std::mt19937_64 rng;
  ucontext_t start_context;
  // AddressSanitizer's view of the stacks.
  void* scheduler_fake_stack = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
};

Runtime& R() {
  static Runtime* r = new Runtime;  // never destroyed: fibers may be parked at exit
  return *r;
}

std::vector<char*>& StackPool() {
  static auto* pool = new std::vector<char*>;
  return *pool;
}

char* StackFor(int i) {
  auto& pool = StackPool();
  while (static_cast<int>(pool.size()) <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "tfln_emu: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(p, page, PROT_NONE);  // an overflowing stack faults instead of corrupting
    pool.push_back(static_cast<char*>(p) + page);
  }
  return pool[i];
}

// --- switching --------------------------------------------------------------

void EnterFiber(Fiber* f, bool first) {
  Runtime& r = R();
  r.running = f;
  g_regs = &f->regs;
#if TFLN_EMU_ASAN
  __sanitizer_start_switch_fiber(&r.scheduler_fake_stack, f->stack, kStackBytes);
#endif
  if (_setjmp(r.scheduler) == 0) {
    if (first) {
      setcontext(&r.start_context);
    } else {
      _longjmp(f->context, 1);
    }
  }
#if TFLN_EMU_ASAN
  __sanitizer_finish_switch_fiber(r.scheduler_fake_stack, nullptr, nullptr);
#endif
  r.running = nullptr;
}

void ArrivedInFiber() {
#if TFLN_EMU_ASAN
  Runtime& r = R();
  __sanitizer_finish_switch_fiber(nullptr, &r.main_stack_bottom, &r.main_stack_size);
#endif
}

// From a fiber: back to the scheduler; returns when the scheduler resumes it.
void Yield() {
  Runtime& r = R();
  Fiber* f = r.running;
  if (_setjmp(f->context) == 0) {
#if TFLN_EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, r.main_stack_bottom, r.main_stack_size);
#endif
    _longjmp(r.scheduler, 1);
  }
  ArrivedInFiber();
}

[[noreturn]] void FaultInFiber() {
  Runtime& r = R();
#if TFLN_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, r.main_stack_bottom, r.main_stack_size);
#endif
  _longjmp(r.scheduler, 1);
}

void SetFault(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void SetFault(const char* fmt, ...) {
  Runtime& r = R();
  if (r.faulted) return;
  r.faulted = true;
  int n = 0;
  if (r.running != nullptr) {
    const ThreadRegs& t = r.running->regs;
    n = std::snprintf(r.fault, sizeof(r.fault), "block (%u,%u,%u) thread (%u,%u,%u): ",
                      t.block_idx.x, t.block_idx.y, t.block_idx.z, t.thread_idx.x,
                      t.thread_idx.y, t.thread_idx.z);
  }
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(r.fault + n, sizeof(r.fault) - n, fmt, ap);
  va_end(ap);
}

[[noreturn]] void Fault(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] void Fault(const char* fmt, ...) {
  char buf[1536];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  SetFault("%s", buf);
  FaultInFiber();
}

void FiberMain() {
  Runtime& r = R();
  ArrivedInFiber();
  for (;;) {
    r.thunk(r.ctx);
    // The thread's work in this block is over.
    Fiber* f = r.running;
    const int warp = f->index / kWarp;
    for (const WarpGroup& g : r.groups[warp]) {
      if (g.mask >> (f->index % kWarp) & 1u) {
        Fault("exited while lanes of its warp wait for it at %s at %s:%d",
              g.kind == kSyncWarp ? "__syncwarp" : "a shuffle", g.file, g.line);
      }
    }
    if (r.at_barrier > 0) {
      Fault("exited while %d threads wait at __syncthreads at %s:%d (a barrier some threads "
            "never reach)", r.at_barrier, r.barrier_file, r.barrier_line);
    }
    f->state = State::kDone;
    --r.runnable;
    --r.runnable_in_warp[warp];
    ++r.done;
    Yield();
  }
}

void MakeRunnable(Fiber* f) {
  Runtime& r = R();
  f->state = State::kRunnable;
  ++r.runnable;
  ++r.runnable_in_warp[f->index / kWarp];
}

void Block(Fiber* f, State s, const char* file, int line) {
  Runtime& r = R();
  f->state = s;
  f->file = file;
  f->line = line;
  --r.runnable;
  --r.runnable_in_warp[f->index / kWarp];
}

int LanesInWarp(int warp) { return std::min(kWarp, R().threads - warp * kWarp); }

}  // namespace

// --- sync points ------------------------------------------------------------

void SyncThreads(const char* file, int line) {
  Runtime& r = R();
  Fiber* f = r.running;
  if (f == nullptr) {
    std::fprintf(stderr, "tfln_emu: __syncthreads outside a kernel\n");
    std::abort();
  }
  if (r.done > 0) {
    Fault("__syncthreads at %s:%d after %d threads of the block exited (deadlock on a GPU)",
          file, line, r.done);
  }
  if (r.at_barrier > 0 && (r.barrier_line != line || std::strcmp(r.barrier_file, file) != 0)) {
    Fault("__syncthreads at %s:%d while %d threads wait at __syncthreads at %s:%d "
          "(divergent barriers)", file, line, r.at_barrier, r.barrier_file, r.barrier_line);
  }
  const int warp = f->index / kWarp;
  for (const WarpGroup& g : r.groups[warp]) {
    if (g.mask >> (f->index % kWarp) & 1u) {
      Fault("__syncthreads at %s:%d while lanes of its warp wait for it at %s at %s:%d", file,
            line, g.kind == kSyncWarp ? "__syncwarp" : "a shuffle", g.file, g.line);
    }
  }
  Block(f, State::kBarrier, file, line);
  r.barrier_file = file;
  r.barrier_line = line;
  if (++r.at_barrier == r.threads) {
    r.at_barrier = 0;
    for (int i = 0; i < r.threads; ++i) MakeRunnable(&r.fibers[i]);
  }
  Yield();
}

uint64_t Shuffle(int kind, unsigned mask, uint64_t bits, int size, int arg, int width,
                 const char* file, int line) {
  Runtime& r = R();
  Fiber* f = r.running;
  if (f == nullptr) {
    std::fprintf(stderr, "tfln_emu: warp intrinsic outside a kernel\n");
    std::abort();
  }
  const char* what = kind == kSyncWarp ? "__syncwarp" : (kind == kBallot ? "vote" : "shuffle");
  const int warp = f->index / kWarp, lane = f->index % kWarp;
  const int lanes = LanesInWarp(warp);
  if (!(mask >> lane & 1u)) {
    Fault("%s at %s:%d with mask 0x%08x that excludes the calling lane %d", what, file, line,
          mask, lane);
  }
  if (lanes < kWarp && (mask >> lanes) != 0) {
    Fault("%s at %s:%d with mask 0x%08x naming lanes absent from this %d-lane warp", what, file,
          line, mask, lanes);
  }
  if (width < 1 || width > kWarp || (width & (width - 1)) != 0) {
    Fault("%s at %s:%d with width %d (a power of two <= 32 expected)", what, file, line, width);
  }
  for (int l = 0; l < lanes; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Fiber& o = r.fibers[warp * kWarp + l];
    if (o.state == State::kDone) {
      Fault("%s at %s:%d with mask 0x%08x naming lane %d, which has exited", what, file, line,
            mask, l);
    }
    if (o.state == State::kBarrier) {
      Fault("%s at %s:%d with mask 0x%08x naming lane %d, which waits at __syncthreads at %s:%d",
            what, file, line, mask, l, o.file, o.line);
    }
  }
  auto& groups = r.groups[warp];
  WarpGroup* g = nullptr;
  for (WarpGroup& c : groups) {
    if (c.mask == mask) {
      g = &c;
    } else if (c.mask & mask) {
      Fault("%s at %s:%d with mask 0x%08x while lanes wait at another one at %s:%d with mask "
            "0x%08x", what, file, line, mask, c.file, c.line, c.mask);
    }
  }
  if (g == nullptr) {
    groups.push_back(WarpGroup{mask, 0u, kind, size, width, file, line});
    g = &groups.back();
  } else if (g->kind != kind || g->size != size || g->width != width || g->line != line ||
             std::strcmp(g->file, file) != 0) {
    Fault("lanes of mask 0x%08x meet at different warp operations: %s:%d and %s:%d (kind %d/%d, "
          "size %d/%d, width %d/%d)", mask, g->file, g->line, file, line, g->kind, kind, g->size,
          size, g->width, width);
  }
  f->value = bits;
  f->arg = arg;
  g->arrived |= 1u << lane;
  Block(f, State::kWarpSync, file, line);
  if (g->arrived == mask) {
    // Everyone is here: deliver, as the hardware does for a converged group.
    unsigned ballot = 0;
    for (int l = 0; l < kWarp; ++l) {
      if ((mask >> l & 1u) && r.fibers[warp * kWarp + l].value != 0) ballot |= 1u << l;
    }
    for (int l = 0; l < kWarp; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& dst = r.fibers[warp * kWarp + l];
      if (kind == kBallot) {
        dst.result = ballot;
      } else if (kind != kSyncWarp) {
        const int seg_lo = l & ~(width - 1), seg_hi = seg_lo + width - 1;
        int src = l;
        switch (kind) {
          case kShflIdx: src = seg_lo + (dst.arg & (width - 1)); break;
          case kShflUp: src = l - dst.arg < seg_lo ? l : l - dst.arg; break;
          case kShflDown: src = l + dst.arg > seg_hi ? l : l + dst.arg; break;
          case kShflXor: src = (l ^ dst.arg) > seg_hi ? l : (l ^ dst.arg); break;
        }
        if (src < 0 || src >= kWarp || !(mask >> src & 1u)) {
          r.running = &dst;
          Fault("shuffle at %s:%d: lane %d reads lane %d, outside the mask 0x%08x", file, line,
                l, src, mask);
        }
        dst.result = r.fibers[warp * kWarp + src].value;
      }
    }
    const unsigned m = g->mask;
    groups.erase(groups.begin() + (g - groups.data()));
    for (int l = 0; l < kWarp; ++l) {
      if (m >> l & 1u) MakeRunnable(&r.fibers[warp * kWarp + l]);
    }
  }
  Yield();
  return f->result;
}

// --- the scheduler ------------------------------------------------------------

namespace {

std::string StateSummary() {
  Runtime& r = R();
  std::string s;
  char buf[256];
  int barrier = 0, warp_sync = 0;
  const Fiber* any_sync = nullptr;
  for (int i = 0; i < r.threads; ++i) {
    if (r.fibers[i].state == State::kBarrier) ++barrier;
    if (r.fibers[i].state == State::kWarpSync) {
      ++warp_sync;
      if (any_sync == nullptr) any_sync = &r.fibers[i];
    }
  }
  std::snprintf(buf, sizeof(buf), "%d threads wait at __syncthreads%s%s:%d, %d at warp "
                "operations%s%s:%d, %d exited", barrier, barrier ? " at " : "",
                barrier ? r.barrier_file : "", barrier ? r.barrier_line : 0, warp_sync,
                any_sync ? " (e.g. " : "", any_sync ? any_sync->file : "",
                any_sync ? any_sync->line : 0, r.done);
  s = buf;
  return s;
}

// Next fiber to run under the schedule, or null when none can run.
Fiber* Pick(int* cursor, int* warp_cursor) {
  Runtime& r = R();
  if (r.runnable == 0) return nullptr;
  const int n = r.threads;
  switch (r.schedule) {
    case 0:  // in order, round robin
      for (int k = 0; k < n; ++k) {
        const int i = (*cursor + k) % n;
        if (r.fibers[i].state == State::kRunnable) {
          *cursor = (i + 1) % n;
          return &r.fibers[i];
        }
      }
      break;
    case 1:  // reversed
      for (int k = 0; k < n; ++k) {
        const int i = ((*cursor - k) % n + n) % n;
        if (r.fibers[i].state == State::kRunnable) {
          *cursor = (i - 1 + n) % n;
          return &r.fibers[i];
        }
      }
      break;
    default: {  // random: a random warp runs as far as it can, its lanes in random order
      const int warps = (n + kWarp - 1) / kWarp;
      if (*warp_cursor < 0 || r.runnable_in_warp[*warp_cursor] == 0) {
        const int start = static_cast<int>(r.rng() % warps);
        *warp_cursor = -1;
        for (int k = 0; k < warps; ++k) {
          const int w = (start + k) % warps;
          if (r.runnable_in_warp[w] > 0) {
            *warp_cursor = w;
            break;
          }
        }
      }
      const int w = *warp_cursor;
      const int lanes = LanesInWarp(w);
      const int start = static_cast<int>(r.rng() % lanes);
      for (int k = 0; k < lanes; ++k) {
        Fiber& f = r.fibers[w * kWarp + (start + k) % lanes];
        if (f.state == State::kRunnable) return &f;
      }
      break;
    }
  }
  return nullptr;
}

// Fills every __shared__ static with 0xFF bytes: NaN in every float type, so
// reading shared memory nobody wrote shows. Under AddressSanitizer the section
// also holds the redzones after each static: those are skipped (writing them
// is a report; unpoisoning them would hide overflows of __shared__ arrays).
void PoisonShared() {
  char* p = __start_tfln_shared;
  char* const end = __stop_tfln_shared;
  if (p == nullptr || !(+end > +p)) return;
#if TFLN_EMU_ASAN
  constexpr uintptr_t kGranule = 8;  // ASan's granule: its addressable bytes are a prefix
  while (p < end) {
    char* redzone = static_cast<char*>(__asan_region_is_poisoned(p, end - p));
    if (redzone == nullptr) redzone = end;
    std::memset(p, 0xff, redzone - p);
    p = redzone + (-reinterpret_cast<uintptr_t>(redzone) & (kGranule - 1));
    while (p < end && __asan_address_is_poisoned(p)) p += kGranule;
  }
#else
  std::memset(p, 0xff, end - p);
#endif
}

bool RunBlock(const uint3& block, bool first) {
  Runtime& r = R();
  PoisonShared();
  r.runnable = 0;
  r.done = 0;
  r.at_barrier = 0;
  std::fill(r.runnable_in_warp.begin(), r.runnable_in_warp.end(), 0);
  for (auto& g : r.groups) g.clear();
  for (int i = 0; i < r.threads; ++i) {
    r.fibers[i].regs.block_idx = block;
    MakeRunnable(&r.fibers[i]);
  }
  int cursor = r.schedule == 1 ? r.threads - 1 : 0, warp_cursor = -1;
  std::vector<bool> started(first ? r.threads : 0, false);
  while (Fiber* f = Pick(&cursor, &warp_cursor)) {
    const bool fresh = first && !started[f->index];
    if (fresh) {
      started[f->index] = true;
      getcontext(&r.start_context);
      r.start_context.uc_stack.ss_sp = f->stack;
      r.start_context.uc_stack.ss_size = kStackBytes;
      r.start_context.uc_link = nullptr;
      makecontext(&r.start_context, FiberMain, 0);
    }
    EnterFiber(f, fresh);
    if (r.faulted) return false;
  }
  if (r.done != r.threads) {
    SetFault("block (%u,%u,%u) deadlocked: %s", block.x, block.y, block.z,
             StateSummary().c_str());
    return false;
  }
  ++r.blocks;
  return true;
}

}  // namespace

void Launch(const Config& c, void (*thunk)(const void*), const void* ctx) {
  Runtime& r = R();
  std::lock_guard<std::mutex> lock(r.mutex);
  ++r.launches;
  const uint64_t threads = uint64_t{c.block.x} * c.block.y * c.block.z;
  const uint64_t blocks = uint64_t{c.grid.x} * c.grid.y * c.grid.z;
  if (threads == 0 || threads > kMaxThreads || c.block.z > 64 || blocks == 0 ||
      c.grid.x > 0x7fffffffu || c.grid.y > 65535 || c.grid.z > 65535 || c.smem > 0) {
    // Dynamic shared memory is not emulated: refuse rather than hand out none.
    r.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  r.thunk = thunk;
  r.ctx = ctx;
  r.threads = static_cast<int>(threads);
  r.fibers.assign(r.threads, Fiber());
  r.groups.assign((r.threads + kWarp - 1) / kWarp, {});
  r.runnable_in_warp.assign(r.groups.size(), 0);
  r.faulted = false;
  g_block_dim = c.block;
  g_grid_dim = c.grid;
  for (int i = 0; i < r.threads; ++i) {
    Fiber& f = r.fibers[i];
    f.index = i;
    f.regs.thread_idx = uint3{static_cast<unsigned>(i) % c.block.x,
                              static_cast<unsigned>(i) / c.block.x % c.block.y,
                              static_cast<unsigned>(i) / (c.block.x * c.block.y)};
    f.stack = StackFor(i);
#if TFLN_EMU_ASAN
    // Frames of fibers abandoned by an earlier launch leave poison behind.
    ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
  }
  r.rng.seed(r.seed * 0x9e3779b97f4a7c15ull + r.launches);
  std::vector<uint64_t> order;
  if (r.schedule == 2) {
    order.resize(blocks);
    for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), r.rng);
  }
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t b = r.schedule == 2 ? order[k] : (r.schedule == 1 ? blocks - 1 - k : k);
    const uint3 idx{static_cast<unsigned>(b % c.grid.x),
                    static_cast<unsigned>(b / c.grid.x % c.grid.y),
                    static_cast<unsigned>(b / (uint64_t{c.grid.x} * c.grid.y))};
    if (!RunBlock(idx, k == 0)) {
      r.last_error = cudaErrorLaunchFailure;
      std::fprintf(stderr, "tfln_emu: kernel fault: %s\n", r.fault);
      break;
    }
  }
  g_regs = nullptr;
}

}  // namespace tfln_emu

// --- CUDA runtime stand-ins -----------------------------------------------------

using tfln_emu::R;

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = R().last_error;
  R().last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return R().last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure:
      std::snprintf(R().error_text, sizeof(R().error_text),
                    "unspecified launch failure (emulator: %s)", R().fault);
      return R().error_text;
  }
  return "unrecognized error code";
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  ++R().attribute_queries;
  if (device != 0) return R().last_error = cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 << 10; break;
    case cudaDevAttrMultiProcessorCount: *value = R().sms; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 << 10; break;
    default: return R().last_error = cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t tfln_emu_occupancy(int* blocks, int block_size, size_t) {
  ++R().attribute_queries;
  if (block_size < 1 || block_size > 1024) return R().last_error = cudaErrorInvalidValue;
  *blocks = R().one_block ? 1 : std::max(1, std::min(32, 2048 / block_size));
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes > 0 && p == nullptr) return R().last_error = cudaErrorInvalidValue;
  if (bytes > 0) std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, int, cudaStream_t) {
  if (bytes > 0 && (dst == nullptr || src == nullptr)) return R().last_error = cudaErrorInvalidValue;
  if (bytes > 0) std::memmove(dst, src, bytes);
  return cudaSuccess;
}

void tfln_emu_configure(int schedule, unsigned long long seed, int sms, int one_block) {
  R().schedule = schedule;
  R().seed = seed;
  R().sms = sms;
  R().one_block = one_block != 0;
}

const char* tfln_emu_take_fault(void) {
  static char copy[sizeof(R().fault)];
  std::memcpy(copy, R().fault, sizeof(copy));
  R().fault[0] = '\0';
  return copy;
}

void tfln_emu_set_last_error(int error) { R().last_error = static_cast<cudaError_t>(error); }

void tfln_emu_counters(long long* launches, long long* blocks, long long* attribute_queries) {
  *launches = R().launches;
  *blocks = R().blocks;
  *attribute_queries = R().attribute_queries;
}

void tfln_emu_reset_counters(void) { R().launches = R().blocks = R().attribute_queries = 0; }

}  // extern "C"
