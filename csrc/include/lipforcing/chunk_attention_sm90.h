// SPDX-License-Identifier: Apache-2.0
// chunk_attention on sm_90 (Hopper): the dense chunk step's attention, q against the first count[b] key slots of
// a dense K/V buffer (lipforcing/ops/chunk_attention_dense.py `_prepare` writes or stages the chunk and rotates
// q/keys first), no mask besides the count.  wgmma + TMA + mbarrier pipeline (csrc/chunk_attention_sm90.cu,
// built for sm_90a only).  Torch-free: raw device pointers, int64 element strides, a stream -> cudaError_t.
//
// The host-side helpers below (shared-memory matrix descriptors, TMA box parameters) are plain constexpr / host
// functions so they can be checked on a machine without a GPU (tests/compile/test_chunk_attention_sm90.py).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "lipforcing/common.h"

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
constexpr int kSm90SwizzleCols = 64;  // 128-byte swizzle: a TMA box / smem subtile is 64 16-bit columns wide

// wgmma shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format", 64 bits):
//   bits  0-13  start address  >> 4  (shared-window byte address of the first 16-byte chunk)
//   bits 16-29  leading  dimension byte offset >> 4 (LBO)
//   bits 32-45  stride   dimension byte offset >> 4 (SBO)
//   bits 49-51  base offset (0: every 1024-byte swizzle atom we use starts 1024-byte aligned)
//   bits 62-63  swizzle mode: 0 none, 1 = 128B, 2 = 64B, 3 = 32B
// With the 128-byte swizzle, a "K-major" operand (rows of 64 contiguous 16-bit elements along K, 8-row atoms of
// 1024 B) uses SBO = 1024 (next 8 rows) and ignores LBO (conventionally 16 B, encoded 1); an "MN-major" operand
// (64 contiguous elements along M/N per row, rows along K) uses SBO = 1024 (next 8 K-rows) and LBO = the byte
// distance to the next 64-element block along M/N.
constexpr uint64_t wgmma_desc_sw128(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return (static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4)) |
         (static_cast<uint64_t>((lbo_bytes & 0x3FFFFu) >> 4) << 16) |
         (static_cast<uint64_t>((sbo_bytes & 0x3FFFFu) >> 4) << 32) |
         (static_cast<uint64_t>(1) << 62);
}

// Descriptor of one k-step (16 columns of head_dim) of a K-major operand (Q as the A of S = Q K^T, K as its B):
// the subtiles of `subtile_rows` rows x 128 B follow each other from `tile_base`; the operand starts at row
// `row0` (a multiple of 8); k-step kk reads columns 16 kk .. 16 kk + 15, i.e. subtile kk / 4 at byte
// (kk % 4) * 32 of each row (the hardware applies the swizzle to the resulting addresses).
constexpr uint64_t sm90_kmajor_desc(uint32_t tile_base, uint32_t subtile_rows, uint32_t row0, uint32_t kk) {
  return wgmma_desc_sw128(tile_base + (kk / 4) * subtile_rows * 128 + row0 * 128 + (kk % 4) * 32, 16, 1024);
}

// Descriptor of one k-step (16 keys) of V as the MN-major B operand of O += P V: keys 16 kk .. 16 kk + 15 start
// at row 16 kk of the first subtile; SBO = 1024 B to the next 8 keys, LBO = one subtile (kSm90BlockN rows of
// 128 B) to the next 64 columns of head_dim.
constexpr uint64_t sm90_v_desc(uint32_t tile_base, uint32_t kk) {
  return wgmma_desc_sw128(tile_base + kk * 16 * 128, kSm90BlockN * 128, 1024);
}

// Physical byte offset of logical (row, 16-byte chunk) inside a 128B-swizzled subtile whose base is 1024-byte
// aligned: TMA's CU_TENSOR_MAP_SWIZZLE_128B and wgmma's 128B mode both XOR address bits [4,7) with bits [7,10),
// i.e. chunk c of row r lands at r * 128 + ((c ^ (r % 8)) * 16).
constexpr uint32_t sw128_offset(uint32_t row, uint32_t chunk16) {
  return row * 128u + ((chunk16 ^ (row & 7u)) << 4);
}

// The 4-d TMA view of one (batch, tokens, heads, head_dim) tensor: dims innermost first
// (head_dim, heads, tokens, batch); byte strides of dims 1..3; the box = 64 columns x 1 head x `rows` tokens x
// 1 batch row, i.e. one 128-byte-wide swizzled subtile of `rows` rows.  Strides of size-1 dimensions (which any
// value satisfies) are replaced by the packed value so TMA's "multiple of 16 bytes" rule holds for them.
struct TmaTileSpec {
  uint64_t dims[4];
  uint64_t strides_bytes[3];
  uint32_t box[4];
};

inline TmaTileSpec chunk_attention_sm90_tma_spec(int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim,
                                                 const int64_t stride[3], int rows, int elem_bytes = 2) {
  TmaTileSpec s{};
  s.dims[0] = static_cast<uint64_t>(head_dim);
  s.dims[1] = static_cast<uint64_t>(heads);
  s.dims[2] = static_cast<uint64_t>(tokens);
  s.dims[3] = static_cast<uint64_t>(batch);
  const int64_t head_s = heads > 1 ? stride[2] : head_dim;
  const int64_t token_s = tokens > 1 ? stride[1] : heads * head_s;
  const int64_t batch_s = batch > 1 ? stride[0] : tokens * token_s;
  s.strides_bytes[0] = static_cast<uint64_t>(head_s * elem_bytes);
  s.strides_bytes[1] = static_cast<uint64_t>(token_s * elem_bytes);
  s.strides_bytes[2] = static_cast<uint64_t>(batch_s * elem_bytes);
  s.box[0] = static_cast<uint32_t>(kSm90SwizzleCols);
  s.box[1] = 1;
  s.box[2] = static_cast<uint32_t>(rows);
  s.box[3] = 1;
  return s;
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
