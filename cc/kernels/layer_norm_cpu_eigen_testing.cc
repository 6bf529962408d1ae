// Eigen's own float16/bfloat16 conversions, compiled like the TF binding
// (baseline x86-64), as a C symbol of the op library: the oracle the tests
// hold the kernels' conversions to, bit for bit.
#include <cstdint>
#include <cstring>

#include "Eigen/Core"

extern "C" {

// op: 0 f16->f32, 1 f32->f16, 2 bf16->f32, 3 f32->bf16 (16-bit types as raw
// uint16 bits). Returns 0 on success, 1 for an unknown op.
int tf_layernorm_eigen_convert(int op, const void* in, void* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    switch (op) {
      case 0: {
        const Eigen::half h = Eigen::numext::bit_cast<Eigen::half>(static_cast<const uint16_t*>(in)[i]);
        static_cast<float*>(out)[i] = static_cast<float>(h);
        break;
      }
      case 1:
        static_cast<uint16_t*>(out)[i] =
            Eigen::numext::bit_cast<uint16_t>(static_cast<Eigen::half>(static_cast<const float*>(in)[i]));
        break;
      case 2: {
        const Eigen::bfloat16 b =
            Eigen::numext::bit_cast<Eigen::bfloat16>(static_cast<const uint16_t*>(in)[i]);
        static_cast<float*>(out)[i] = static_cast<float>(b);
        break;
      }
      case 3:
        static_cast<uint16_t*>(out)[i] = Eigen::numext::bit_cast<uint16_t>(
            static_cast<Eigen::bfloat16>(static_cast<const float*>(in)[i]));
        break;
      default:
        return 1;
    }
  }
  return 0;
}

}  // extern "C"
