// SPDX-License-Identifier: Apache-2.0
// Shared, torch-free definitions for the lipforcing CUDA kernels: dtype codes and small launch helpers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace lipforcing {

// Storage dtype of a tensor, as passed from Python (lipforcing/ops/cuda/__init__.py: DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lipforcing
