// Stand-in for the CUDA runtime header when a .cu is compiled as C++ for the
// SIMT emulator (tests/gpu/emu). Only what the kernels use.
#ifndef TFLN_EMU_SHIM_CUDA_RUNTIME_H_
#define TFLN_EMU_SHIM_CUDA_RUNTIME_H_

#include <math.h>  // float overloads of sqrt & co. in the global namespace, as in CUDA

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "tests/gpu/emu/emu.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Block-shared storage is a static: blocks run one at a time. The build
// renames the object's .bss (where only these statics live) to tfln_shared so
// the emulator can poison it before every block.
#define __shared__ static

#define threadIdx (::tfln_emu::g_regs->thread_idx)
#define blockIdx (::tfln_emu::g_regs->block_idx)
#define blockDim (::tfln_emu::g_block_dim)
#define gridDim (::tfln_emu::g_grid_dim)
#define warpSize 32

#define __syncthreads() ::tfln_emu::SyncThreads(__FILE__, __LINE__)
#define __syncwarp(...) ::tfln_emu::SyncWarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, v, ...) \
  ::tfln_emu::Shfl(::tfln_emu::kShflIdx, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) \
  ::tfln_emu::Shfl(::tfln_emu::kShflUp, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) \
  ::tfln_emu::Shfl(::tfln_emu::kShflDown, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) \
  ::tfln_emu::Shfl(::tfln_emu::kShflXor, mask, v, __FILE__, __LINE__, __VA_ARGS__)

#define __ballot_sync(mask, pred) ::tfln_emu::Ballot(__FILE__, __LINE__, mask, pred)
#define __any_sync(mask, pred) (::tfln_emu::Ballot(__FILE__, __LINE__, mask, pred) != 0u)
#define __all_sync(mask, pred) \
  ([&](unsigned m_) { return ::tfln_emu::Ballot(__FILE__, __LINE__, m_, pred) == m_; }(mask))

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
};

extern "C" {
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, int kind,
                            cudaStream_t stream);
cudaError_t tfln_emu_occupancy(int* blocks, int block_size, size_t smem);
}

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int block_size,
                                                          size_t smem) {
  return tfln_emu_occupancy(blocks, block_size, smem);
}

#endif  // TFLN_EMU_SHIM_CUDA_RUNTIME_H_
