// A SIMT emulator for CUDA kernels compiled as plain C++ (g++), for checking
// the kernels' logic on machines without a GPU. See README.md beside this file
// for what it models and what it does not.
//
// Every CUDA thread of a block is a fiber on one OS thread; blocks run one
// after another. __syncthreads, __syncwarp and the __shfl_*_sync family are the
// only switch points, and each checks its CUDA contract (who may take part,
// who must have arrived) and fails the launch with a message when it is
// broken. The order in which runnable threads and blocks run is a policy
// (in order, reversed, random): race-free kernels give the same bits under all.
#ifndef TFLN_EMU_EMU_H_
#define TFLN_EMU_EMU_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace tfln_emu {

// Per-fiber registers read through threadIdx / blockIdx.
struct ThreadRegs {
  uint3 thread_idx;
  uint3 block_idx;
};
extern ThreadRegs* g_regs;  // the running fiber's
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

enum ShuffleKind : int {
  kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3, kSyncWarp = 4, kBallot = 5
};

void SyncThreads(const char* file, int line);
uint64_t Shuffle(int kind, unsigned mask, uint64_t bits, int size, int arg, int width,
                 const char* file, int line);

template <typename T>
inline T Shfl(int kind, unsigned mask, T v, const char* file, int line, int arg,
              int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "shuffled values are at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = Shuffle(kind, mask, bits, static_cast<int>(sizeof(T)), arg, width, file, line);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// __ballot_sync: bit l set for each lane l of `mask` whose predicate is non-zero.
inline unsigned Ballot(const char* file, int line, unsigned mask, int predicate) {
  return static_cast<unsigned>(Shuffle(kBallot, mask, predicate != 0, 4, 0, 32, file, line));
}

inline void SyncWarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  Shuffle(kSyncWarp, mask, 0, 0, 0, 32, file, line);
}

// kernel<<<grid, block, smem, stream>>>(args) is rewritten (emu/build.py) into
// kernel % Config(grid, block, smem, stream) % Args(args): the launch runs
// to completion before the expression returns (a synchronous stream).
struct Config {
  dim3 grid, block;
  size_t smem;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

template <typename... A>
struct Pending {
  void (*kernel)(A...);
  Config config;
};

template <typename... A>
Pending<A...> operator%(void (*kernel)(A...), const Config& c) {
  return {kernel, c};
}

template <typename... P>
struct ArgPack {
  std::tuple<P...> values;
};

template <typename... P>
ArgPack<std::decay_t<P>...> Args(P&&... p) {
  return {std::tuple<std::decay_t<P>...>(std::forward<P>(p)...)};
}

// Runs thunk(ctx) once per thread of every block of the launch.
void Launch(const Config& c, void (*thunk)(const void*), const void* ctx);

template <typename... A, typename... P>
void operator%(const Pending<A...>& pending, ArgPack<P...>&& pack) {
  static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong argument count");
  struct Bound {
    void (*kernel)(A...);
    std::tuple<A...> args;  // converted as at a real launch
  };
  const Bound bound{pending.kernel, std::apply([](auto&&... v) { return std::tuple<A...>(v...); },
                                               pack.values)};
  Launch(pending.config,
         [](const void* p) {
           const Bound* b = static_cast<const Bound*>(p);
           std::apply(b->kernel, b->args);  // each thread gets its own copies
         },
         &bound);
}

}  // namespace tfln_emu

extern "C" {
// Emulated device: SM count, one resident block per SM (`one_block`), the
// schedule (0 in order, 1 reversed, 2 random with `seed`).
void tfln_emu_configure(int schedule, unsigned long long seed, int sms, int one_block);
// The last kernel fault ("" if none); reading it clears it.
const char* tfln_emu_take_fault(void);
// Leaves `error` as the runtime's last error, as a failed earlier CUDA call would.
void tfln_emu_set_last_error(int error);
// Counters since the last reset: launches, blocks, device attribute queries
// (cudaDeviceGetAttribute + occupancy queries).
void tfln_emu_counters(long long* launches, long long* blocks, long long* attribute_queries);
void tfln_emu_reset_counters(void);
}

#endif  // TFLN_EMU_EMU_H_
