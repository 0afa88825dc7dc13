// SPDX-License-Identifier: Apache-2.0
// audio_cross_attention forward on sm_90 (Hopper): the same op and parameters as audio_cross_attention.h
// (text cross-attention + audio_scale x per-frame audio-window attention, lse_text / lse_audio), on wgmma + TMA
// (csrc/audio_cross_attention_sm90.cu, built for sm_90a only).  Torch-free: raw device pointers, int64 element
// strides, a stream -> cudaError_t.  Host-side helpers are constexpr / host functions (checked without a GPU in
// tests/compile/test_audio_cross_attention_sm90.py); the generic ones live in sm90_primitives.cuh.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "lipforcing/audio_cross_attention.h"
#include "lipforcing/sm90_primitives.cuh"

namespace lipforcing {

// Tile sizes of the kernel (also the TMA box rows).
constexpr int kAudioSm90BlockM = 128;  // query rows per CTA: 2 consumer warpgroups x 64 rows
constexpr int kAudioSm90BlockN = 64;   // keys per K/V tile (text and audio; the real audio window is 32 tokens)
constexpr int kAudioSm90Stages = 4;    // K/V tiles in flight
constexpr int kAudioSm90Threads = 384; // warpgroup 0: producer (TMA), warpgroups 1-2: consumers

// wgmma descriptors of k-step kk the kernel builds (128B swizzle, tiles as TMA writes them: D/64 subtiles of
// BlockM (Q) or BlockN (K, V) rows x 128 B): Q rows 64 c .. 64 c + 63 of consumer c (K-major A of S = Q K^T), the
// K tile (K-major B of S), the V tile (MN-major B of O += P V; kk = 16 keys).
constexpr uint64_t audio_cross_attention_sm90_q_desc(uint32_t tile_base, uint32_t consumer, uint32_t kk) {
  return sm90_kmajor_desc(tile_base, kAudioSm90BlockM, 64 * consumer, kk);
}
constexpr uint64_t audio_cross_attention_sm90_k_desc(uint32_t tile_base, uint32_t kk) {
  return sm90_kmajor_desc(tile_base, kAudioSm90BlockN, 0, kk);
}
constexpr uint64_t audio_cross_attention_sm90_v_desc(uint32_t tile_base, uint32_t kk) {
  return sm90_mn_major_desc(tile_base, kAudioSm90BlockN, kk);
}

// The 4-d TMA view of q / text_k / text_v (batch, tokens, heads, head_dim) and the 5-d view of audio_k / audio_v
// (batch, frames, audio tokens, heads, head_dim): dims innermost first, box = 64 columns x `rows` tokens.
inline TmaTileSpec audio_cross_attention_sm90_tma_spec(int64_t batch, int64_t tokens, int64_t heads,
                                                       int64_t head_dim, const int64_t stride[3], int rows) {
  const int64_t sizes[3] = {batch, tokens, heads};
  return sm90_tma_spec(3, sizes, stride, 1, head_dim, rows);
}
inline TmaTileSpec audio_cross_attention_sm90_audio_tma_spec(int64_t batch, int64_t frames, int64_t window,
                                                             int64_t heads, int64_t head_dim,
                                                             const int64_t stride[4], int rows) {
  const int64_t sizes[4] = {batch, frames, window, heads};
  return sm90_tma_spec(4, sizes, stride, 2, head_dim, rows);
}

// Key tiles CTA `m_block` walks: ceil(T / BlockN) text tiles, then ceil(A / BlockN) audio tiles for every frame
// that has a row in [m_block * BlockM, min((m_block + 1) * BlockM, q_len)).
constexpr int64_t audio_cross_attention_sm90_tiles(int64_t m_block, int64_t q_len, int64_t tokens_per_frame,
                                                   int64_t text_len, int64_t audio_window) {
  const int64_t m0 = m_block * kAudioSm90BlockM;
  const int64_t m_end = m0 + kAudioSm90BlockM < q_len ? m0 + kAudioSm90BlockM : q_len;
  const int64_t frames = (m_end - 1) / tokens_per_frame - m0 / tokens_per_frame + 1;
  return (text_len + kAudioSm90BlockN - 1) / kAudioSm90BlockN +
         frames * ((audio_window + kAudioSm90BlockN - 1) / kAudioSm90BlockN);
}

// Why the sm_90 kernel cannot run `p` (a static message), or nullptr: everything check_audio_cross_attention
// requires, plus head_dim 64 or 128, q_len < 2^31 and TMA strides (positive multiples of 16 bytes below 2^40 for
// every dimension longer than 1).
const char* check_audio_cross_attention_sm90(const AudioCrossAttentionParams& p);

// Dynamic shared memory (bytes) the kernel is launched with for this head_dim (0 when unsupported).
int audio_cross_attention_sm90_smem_bytes(int head_dim);

// Checks `p` (cudaErrorInvalidValue with `*why` set when unusable), encodes the TMA descriptors on the host
// (cudaErrorNotSupported when the driver has no cuTensorMapEncodeTiled), then launches on `stream`.  No
// allocation, no host synchronisation.
cudaError_t launch_audio_cross_attention_sm90(const AudioCrossAttentionParams& p, cudaStream_t stream,
                                              const char** why = nullptr);

}  // namespace lipforcing
