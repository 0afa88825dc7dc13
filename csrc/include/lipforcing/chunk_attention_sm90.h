// SPDX-License-Identifier: Apache-2.0
// chunk_attention on sm_90 (Hopper): the dense chunk step's attention, q against the first count[b] key slots of
// a dense K/V buffer (lipforcing/ops/chunk_attention_dense.py `_prepare` writes or stages the chunk and rotates
// q/keys first), no mask besides the count.  wgmma + TMA + mbarrier pipeline (csrc/chunk_attention_sm90.cu,
// built for sm_90a only).  Torch-free: raw device pointers, int64 element strides, a stream -> cudaError_t.
//
// The host-side helpers (shared-memory matrix descriptors, TMA box parameters; the generic ones live in
// sm90_primitives.cuh) are plain constexpr / host functions so they can be checked on a machine without a GPU
// (tests/compile/test_chunk_attention_sm90.py).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "lipforcing/common.h"
#include "lipforcing/sm90_primitives.cuh"  // descriptors, swizzle rule, TMA view (host-side parts)

namespace lipforcing {

// All tensors (batch, tokens, heads, head_dim), last dimension contiguous, strides in elements ordered
// (batch, token, head).  TMA needs 16-byte aligned base pointers and strides that are multiples of 16 bytes.
struct ChunkAttnSm90Params {
  const void* q = nullptr;        // (B, n, H, D), already rotated when the step uses dynamic RoPE
  const void* k = nullptr;        // (B, slots, H, D) dense keys (slots [0, count[b]) are valid)
  const void* v = nullptr;        // (B, slots, H, D)
  void* out = nullptr;            // (B, n, H, D)
  const int32_t* count = nullptr; // (B,) device int32: valid key slots of each batch row (read by the kernel)
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t out_stride[3] = {0, 0, 0};
  int batch = 0, n = 0, slots = 0, heads = 0, head_dim = 0;
  float scale = 1.0f;             // softmax scale
  DType dtype = DType::kBFloat16; // kFloat16 or kBFloat16
};

// Tile sizes of the kernel (also used by the host to size the TMA boxes).
constexpr int kSm90BlockM = 128;  // query rows per CTA: 2 consumer warpgroups x 64 rows
constexpr int kSm90BlockN = 128;  // keys per K/V tile
constexpr int kSm90Stages = 2;    // K/V tiles in flight
constexpr int kSm90Threads = 384; // warpgroup 0: producer (TMA), warpgroups 1-2: consumers (wgmma + softmax)

// Descriptor of one k-step (16 keys) of V as the MN-major B operand of O += P V (sm90_mn_major_desc with
// kSm90BlockN-row subtiles: LBO = 128 keys * 128 B to the next 64 columns of head_dim).
constexpr uint64_t sm90_v_desc(uint32_t tile_base, uint32_t kk) {
  return sm90_mn_major_desc(tile_base, kSm90BlockN, kk);
}

// The 4-d TMA view of one (batch, tokens, heads, head_dim) tensor (sm90_tma_spec): dims innermost first
// (head_dim, heads, tokens, batch), box = 64 columns x 1 head x `rows` tokens x 1 batch row.
inline TmaTileSpec chunk_attention_sm90_tma_spec(int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim,
                                                 const int64_t stride[3], int rows, int elem_bytes = 2) {
  const int64_t sizes[3] = {batch, tokens, heads};
  return sm90_tma_spec(3, sizes, stride, 1, head_dim, rows, elem_bytes);
}

// Why the sm_90 kernel cannot run `p` (a static message), or nullptr.  Checks sizes, dtype, head_dim (64/128),
// pointer alignment and strides (TMA: 16-byte multiples, < 2^40 bytes).
const char* check_chunk_attention_sm90(const ChunkAttnSm90Params& p);

// Dynamic shared memory (bytes) the kernel needs for this head_dim (0 when unsupported).
int chunk_attention_sm90_smem_bytes(int head_dim);

// Enqueue the attention on `stream`: out = softmax(scale * q k[:count]^T) v[:count] per (batch, head).  Encodes
// the TMA descriptors on the host (driver entry point cuTensorMapEncodeTiled, found at run time), no host sync,
// no allocation.  cudaErrorInvalidValue when check_chunk_attention_sm90 fails, cudaErrorNotSupported when the
// driver has no cuTensorMapEncodeTiled, else the launch error.
cudaError_t launch_chunk_attention_sm90(const ChunkAttnSm90Params& p, cudaStream_t stream);

}  // namespace lipforcing
