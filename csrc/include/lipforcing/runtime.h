// SPDX-License-Identifier: Apache-2.0
#pragma once
#include <cuda_runtime.h>

namespace lipforcing {
// Number of visible CUDA devices; returns the CUDA error (e.g. cudaErrorNoDevice) without throwing.
cudaError_t device_count(int* count);
// CUDA runtime version the extension was linked against (e.g. 13000).
int runtime_version();
}  // namespace lipforcing
