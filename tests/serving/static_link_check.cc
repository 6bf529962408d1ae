// Prints the registered kernels of our ops; main() references nothing of the
// op library, so they are there only if the static registrations were kept.
#include <cstdio>
#include <string>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"

int main() {
  int missing = 0;
  for (const char* op : {"TfLayernorm>LayerNorm", "TfLayernorm>LayerNormGrad",
                         "TfLayernorm>RMSNorm", "TfLayernorm>RMSNormGrad"}) {
    const tensorflow::OpRegistrationData* data = nullptr;
    if (!tensorflow::OpRegistry::Global()->LookUp(op, &data).ok()) {
      std::printf("op %s: NOT REGISTERED\n", op);
      ++missing;
      continue;
    }
    const std::string kernels = tensorflow::KernelsRegisteredForOp(op);
    std::printf("op %s: registered\n%s", op, kernels.c_str());
  }
  return missing;
}
