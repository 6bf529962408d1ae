// Reference side of the half/bf16 bit-exactness check: NVIDIA's own host
// implementations from the CUDA toolkit's <cuda_fp16.h> / <cuda_bf16.h>,
// built by nvcc (so the headers take their __CUDACC__ host paths). Host code
// only; see dump_driver.h for the sweep and tests/gpu/test_emu_fp16.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dump_driver.h"

int main(int argc, char** argv) { return fp16_check::Main(argc, argv); }
