// Emulator side of the half/bf16 bit-exactness check: the shim headers in
// tests/gpu/emu/shim, built by g++ with that directory first on the include
// path. Same sweep as nvidia_dump.cu (dump_driver.h); tests/gpu/test_emu_fp16.py
// compares the two.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dump_driver.h"

int main(int argc, char** argv) { return fp16_check::Main(argc, argv); }
