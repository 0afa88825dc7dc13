// SPDX-License-Identifier: Apache-2.0
// Fused flow-matching step of lipforcing.ops.denoise_update (torch-free launcher interface).
//
//   x0     = x_t - t * flow
//   x_next = (1 - t_next) * x0 + t_next * eps,   eps = noise[i]  or  Philox4x32-10 + Box-Muller (counter scheme of
//                                                 lipforcing/ops/reference.py: counter (i, offset), key seed)
//
// All tensors are contiguous with `numel` elements; the batch index of flat element i is i / per_sample.  Math is
// float32 without FMA contraction, in the reference's operation order.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "lipforcing/common.h"

namespace lipforcing {

// How a timestep reaches the kernel.
enum class TimeMode : int {
  kValue = 0,      // the float in *_value (a Python number)
  kScalar = 1,     // a 0-d device tensor
  kPerSample = 2,  // a (batch,) device tensor, element i uses entry i / per_sample
};

struct DenoiseUpdateParams {
  const void* x_t = nullptr;   // dtype x_dtype (flow has the same dtype)
  const void* flow = nullptr;
  const void* noise = nullptr;  // dtype noise_dtype; nullptr: draw eps with Philox
  void* x0_out = nullptr;       // dtype x0_dtype
  void* x_next_out = nullptr;   // dtype x_next_dtype
  DType x_dtype = DType::kFloat32;
  DType noise_dtype = DType::kFloat32;
  DType x0_dtype = DType::kFloat32;
  DType x_next_dtype = DType::kFloat32;

  TimeMode t_mode = TimeMode::kValue;
  const void* t = nullptr;  // device tensor (t_dtype) for kScalar / kPerSample
  DType t_dtype = DType::kFloat32;
  float t_value = 0.f;
  TimeMode t_next_mode = TimeMode::kValue;
  const void* t_next = nullptr;
  DType t_next_dtype = DType::kFloat32;
  float t_next_value = 0.f;
  float one_minus_t_next_value = 1.f;  // float32(1 - t_next) rounded once from the exact value (kValue mode)

  const int64_t* seed = nullptr;    // 0-d int64 device tensor, or nullptr: seed_value
  uint64_t seed_value = 0;
  const int64_t* offset = nullptr;  // 0-d int64 device tensor, or nullptr: offset_value
  uint64_t offset_value = 0;

  int64_t numel = 0;
  int64_t per_sample = 1;  // numel / batch
};

// Validates the params (returns cudaErrorInvalidValue on bad ones) and enqueues one kernel on `stream`.
// No allocation, no synchronisation: safe inside CUDA-graph capture.
cudaError_t launch_denoise_update(const DenoiseUpdateParams& p, cudaStream_t stream);

}  // namespace lipforcing
