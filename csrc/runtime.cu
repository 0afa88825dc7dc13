// SPDX-License-Identifier: Apache-2.0
// CUDA runtime queries used by the Python side to report why the CUDA backend can or cannot run.
#include "lipforcing/runtime.h"

namespace lipforcing {

cudaError_t device_count(int* count) {
  *count = 0;
  return cudaGetDeviceCount(count);
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace lipforcing
