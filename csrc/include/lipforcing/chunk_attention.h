// SPDX-License-Identifier: Apache-2.0
// chunk_attention: one chunk's queries against a rolling KV cache (sink + ring) plus the chunk's own keys.
// Torch-free: raw device pointers, int64 element strides, a stream; the launcher returns cudaError_t.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "lipforcing/common.h"

namespace lipforcing {

// All tensors are (batch, tokens, heads, head_dim) with a contiguous last dimension; strides are in elements,
// ordered (batch, token, head).  The kernel needs 16-byte aligned rows (base pointers 16-byte aligned and
// batch/token/head strides multiples of 8 elements).
struct ChunkAttnParams {
  const void* q = nullptr;        // (B, n, H, D) current chunk queries
  const void* k = nullptr;        // (B, n, H, D) current chunk keys (un-rotated when rope tables are given)
  const void* v = nullptr;        // (B, n, H, D)
  void* k_cache = nullptr;        // (B, sink + window, H, D) (RollingKVCache), read in place; written when `write`
  void* v_cache = nullptr;        // (B, sink + window, H, D)
  int64_t* pos = nullptr;         // (1,) device int64: tokens already written; advanced by n when `write`
  void* out = nullptr;            // (B, n, H, D)
  const float* rope_cos = nullptr;  // (P, D/2) float32 Wan 3-D RoPE tables, or nullptr for no rotation
  const float* rope_sin = nullptr;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t kc_stride[3] = {0, 0, 0};
  int64_t vc_stride[3] = {0, 0, 0};
  int64_t out_stride[3] = {0, 0, 0};
  int batch = 0, n = 0, heads = 0, head_dim = 0;
  int chunk_size = 0, window = 0, sink = 0, ring = 0;  // ring: ignored, the launcher uses ring = window
  int grid_h = 1, grid_w = 1;     // RoPE frame grid (tokens per frame = grid_h * grid_w)
  float scale = 1.0f;             // softmax scale
  DType dtype = DType::kFloat16;  // kFloat16 or kBFloat16
  bool write = false;             // store k, v into the cache after attending and advance pos
};

// True when launch_chunk_attention supports this head_dim (64 or 128).
bool chunk_attention_supports_head_dim(int head_dim);

// Enqueue the attention (and, when p.write, the cache write and the pos update) on `stream`.  No host
// synchronisation, no allocation.  Returns cudaErrorInvalidValue for an unsupported dtype/head_dim/size, else
// the launch error (cudaSuccess when all kernels were enqueued).
cudaError_t launch_chunk_attention(const ChunkAttnParams& p, cudaStream_t stream);

}  // namespace lipforcing
