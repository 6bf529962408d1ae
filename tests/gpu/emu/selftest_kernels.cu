// Purpose-written kernels that test the SIMT emulator itself
// (tests/gpu/test_emu_selftest.py, tests/gpu/test_emu_sanitized.py). Each is
// correct or carries ONE planted bug, marked `BUG:`, that the emulator (or,
// for the out-of-bounds write, AddressSanitizer on the sanitized emulated
// build) must catch. Compiled only through tests/gpu/emu/build.py.
//
// Every host function launches one kernel and returns that launch's
// cudaGetLastError(): cudaErrorLaunchFailure when the emulator faulted (the
// message is then in tfln_emu_take_fault()), cudaErrorInvalidConfiguration
// for a launch it refused. Lines the tests quote in the
// expected fault messages carry a `// line:NAME` tag.
#include <cuda_runtime.h>

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kMaxWarps = 8;  // the reduction kernels take blocks of up to 256 threads

__device__ float WarpSum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFull, v, offset);
  }
  return v;
}

// Sum over the block, valid in thread 0 (blockDim.x a multiple of 32): each
// warp reduces with xor shuffles, then warp 0 reduces the per-warp partials
// it reads from shared memory after a barrier.
__device__ float BlockSum(float v, float* partials) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = WarpSum(v);
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  if (warp == 0) v = WarpSum(lane < static_cast<int>(blockDim.x / kWarp) ? partials[lane] : 0.0f);
  return v;
}

// --- reductions: correct, and three shared-memory bugs ------------------------

__global__ void BlockSumKernel(const float* in, float* out) {
  __shared__ float partials[kMaxWarps];
  const float s = BlockSum(in[blockIdx.x * blockDim.x + threadIdx.x], partials);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// Two block sums through one partials buffer. Correct with `barrier`. Without
// it, BUG: the second sum's warps overwrite partials that warp 0 may still be
// about to read for the first (write-after-read race across warps).
__global__ void TwoSumsKernel(const float* in, float* out, bool barrier) {
  __shared__ float partials[kMaxWarps];
  const int i = 2 * blockIdx.x * blockDim.x + threadIdx.x;
  const float a = BlockSum(in[i], partials);
  if (barrier) __syncthreads();
  const float b = BlockSum(in[i + blockDim.x], partials);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = a;
    out[2 * blockIdx.x + 1] = b;
  }
}

// BlockSum without its barrier: BUG: warp 0 reads partials the other warps
// may not have written yet (read-after-write race across warps).
__global__ void MissingBarrierKernel(const float* in, float* out) {
  __shared__ float partials[kMaxWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float v = WarpSum(in[blockIdx.x * blockDim.x + threadIdx.x]);
  if (lane == 0) partials[warp] = v;
  if (warp == 0) v = WarpSum(lane < static_cast<int>(blockDim.x / kWarp) ? partials[lane] : 0.0f);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// BlockSum that assumes full blocks: BUG: warp 0 reads kMaxWarps partials,
// but a block of fewer warps writes only blockDim.x / 32 of them.
__global__ void UnwrittenSlotKernel(const float* in, float* out) {
  __shared__ float partials[kMaxWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float v = WarpSum(in[blockIdx.x * blockDim.x + threadIdx.x]);
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  if (warp == 0) v = WarpSum(lane < kMaxWarps ? partials[lane] : 0.0f);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// --- warp-level contract violations (one warp unless noted) ---------------------

__global__ void MaskExcludesCallerKernel(float* out) {
  // BUG: lane 0 calls with a mask that leaves it out (every lane reads lane 1).
  out[threadIdx.x] = __shfl_sync(0xfffffffeu, static_cast<float>(threadIdx.x), 1);
}

__global__ void MaskNamesExitedLaneKernel(float* out) {
  if (threadIdx.x >= 16) return;  // BUG: these lanes are named by the full mask below
  out[threadIdx.x] = WarpSum(static_cast<float>(threadIdx.x));
}

__global__ void DivergentShufflesKernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  // BUG: the two halves of the warp meet at two different shuffles.
  if (threadIdx.x < 16) {
    v += __shfl_xor_sync(kFull, v, 1);  // line:shfl_low
  } else {
    v += __shfl_xor_sync(kFull, v, 2);  // line:shfl_high
  }
  out[threadIdx.x] = v;
}

__global__ void ReadOutsideMaskKernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  // BUG: lane ^ 16 is not in the mask of the lower half.
  if (threadIdx.x < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16);  // line:outside_mask
  out[threadIdx.x] = v;
}

// A block of 48 threads: BUG: its second warp has 16 lanes, but reduces with
// the full mask.
__global__ void MaskNamesAbsentLanesKernel(float* out) {
  out[threadIdx.x] = WarpSum(static_cast<float>(threadIdx.x));
}

__global__ void BarrierInsideLaneBranchKernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  // BUG: lane 0 waits at a barrier the rest of its warp reaches only after
  // a shuffle that names lane 0.
  if (threadIdx.x == 0) __syncthreads();  // line:lane0_barrier
  v = WarpSum(v);
  if (threadIdx.x != 0) __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void OverlappingMasksKernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  // BUG: the lower half shuffles among itself while the upper half waits
  // for the whole warp at __syncwarp.
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(0x0000ffffu, v, 1);  // line:half_shfl
  } else {
    __syncwarp(kFull);  // line:full_syncwarp
  }
  out[threadIdx.x] = v;
}

__global__ void BadWidthKernel(float* out) {
  // BUG: a shuffle width must be a power of two.
  out[threadIdx.x] = __shfl_xor_sync(kFull, static_cast<float>(threadIdx.x), 1, 12);
}

// --- block-level barrier violations (two warps) -----------------------------------

__global__ void DivergentBarrierKernel(float* out) {
  // BUG: the second warp never arrives.
  if (threadIdx.x < 32) __syncthreads();  // line:divergent
  out[threadIdx.x] = 1.0f;
}

__global__ void BarrierAfterExitKernel(const float* in, float* out, int n) {
  __shared__ float tile[2 * kWarp];
  if (static_cast<int>(threadIdx.x) >= n) return;  // BUG: the tail leaves before the barrier
  tile[threadIdx.x] = in[threadIdx.x];
  __syncthreads();  // line:after_exit
  out[threadIdx.x] = tile[n - 1 - threadIdx.x];
}

__global__ void BarriersOnTwoLinesKernel(float* out) {
  // BUG: the warps wait at two different barriers (undefined on a GPU).
  if (threadIdx.x < 32) {
    __syncthreads();  // line:barrier_low
  } else {
    __syncthreads();  // line:barrier_high
  }
  out[threadIdx.x] = 1.0f;
}

// --- launch configuration and memory bugs ------------------------------------------

__global__ void MarkKernel(int* ran) { *ran = 1; }

__global__ void TailOffByOneKernel(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  // BUG: `<=` lets thread n write out[n], one past the end.
  if (i <= n) out[i] = static_cast<float>(i);  // line:tail_oob
}

__global__ void SignedOverflowKernel(int* out, int base) {
  out[threadIdx.x] = base + static_cast<int>(threadIdx.x);  // BUG: overflows for base near INT_MAX
}

}  // namespace

extern "C" {

// `blocks` blocks of `threads` (a multiple of 32, <= 256); in[blocks * threads].
cudaError_t st_block_sum(const float* in, float* out, int blocks, int threads) {
  BlockSumKernel<<<blocks, threads>>>(in, out);
  return cudaGetLastError();
}

// in[2 * blocks * threads], out[2 * blocks].
cudaError_t st_two_sums(const float* in, float* out, int blocks, int threads) {
  TwoSumsKernel<<<blocks, threads>>>(in, out, true);
  return cudaGetLastError();
}

cudaError_t st_two_sums_reuse_race(const float* in, float* out, int blocks, int threads) {
  TwoSumsKernel<<<blocks, threads>>>(in, out, false);
  return cudaGetLastError();
}

cudaError_t st_missing_barrier(const float* in, float* out, int blocks, int threads) {
  MissingBarrierKernel<<<blocks, threads>>>(in, out);
  return cudaGetLastError();
}

cudaError_t st_unwritten_slot(const float* in, float* out, int blocks, int threads) {
  UnwrittenSlotKernel<<<blocks, threads>>>(in, out);
  return cudaGetLastError();
}

// out[32] unless noted.
cudaError_t st_mask_excludes_caller(float* out) {
  MaskExcludesCallerKernel<<<1, kWarp>>>(out);
  return cudaGetLastError();
}

cudaError_t st_mask_names_exited_lane(float* out) {
  MaskNamesExitedLaneKernel<<<1, kWarp>>>(out);
  return cudaGetLastError();
}

cudaError_t st_divergent_shuffles(float* out) {
  DivergentShufflesKernel<<<1, kWarp>>>(out);
  return cudaGetLastError();
}

cudaError_t st_read_outside_mask(float* out) {
  ReadOutsideMaskKernel<<<1, kWarp>>>(out);
  return cudaGetLastError();
}

cudaError_t st_mask_names_absent_lanes(float* out /* [48] */) {
  MaskNamesAbsentLanesKernel<<<1, 48>>>(out);
  return cudaGetLastError();
}

cudaError_t st_barrier_inside_lane_branch(float* out) {
  BarrierInsideLaneBranchKernel<<<1, kWarp>>>(out);
  return cudaGetLastError();
}

cudaError_t st_overlapping_masks(float* out) {
  OverlappingMasksKernel<<<1, kWarp>>>(out);
  return cudaGetLastError();
}

cudaError_t st_bad_width(float* out) {
  BadWidthKernel<<<1, kWarp>>>(out);
  return cudaGetLastError();
}

// out[64] for the three below.
cudaError_t st_divergent_barrier(float* out) {
  DivergentBarrierKernel<<<1, 2 * kWarp>>>(out);
  return cudaGetLastError();
}

cudaError_t st_barrier_after_exit(const float* in, float* out, int n) {
  BarrierAfterExitKernel<<<1, 2 * kWarp>>>(in, out, n);
  return cudaGetLastError();
}

cudaError_t st_barriers_on_two_lines(float* out) {
  BarriersOnTwoLinesKernel<<<1, 2 * kWarp>>>(out);
  return cudaGetLastError();
}

// Any configuration; every thread stores 1 to *ran.
cudaError_t st_launch(unsigned grid, unsigned block, unsigned long dynamic_smem, int* ran) {
  MarkKernel<<<grid, block, dynamic_smem>>>(ran);
  return cudaGetLastError();
}

// out[n] (one element short of what the kernel writes), blocks of 128.
cudaError_t st_tail_off_by_one(float* out, int n) {
  TailOffByOneKernel<<<(n + 127) / 128, 128>>>(out, n);
  return cudaGetLastError();
}

cudaError_t st_signed_overflow(int* out /* [32] */, int base) {
  SignedOverflowKernel<<<1, kWarp>>>(out, base);
  return cudaGetLastError();
}

}  // extern "C"
