// SPDX-License-Identifier: Apache-2.0
// Fused audio cross-attention forward (torch-free): text cross-attention plus per-frame audio-window attention.
//
//   out[b, i, h] = softmax(q_i . text_k^T * scale) text_v  +  audio_scale * softmax(q_i . audio_k[b, f(i)]^T * scale)
//                  audio_v[b, f(i)],                        with f(i) = i / tokens_per_frame
//
// q/out (B, Lq, H, D); text_k/v (B, T, H, D), T >= 0; audio_k/v (B, F, A, H, D), A >= 1; Lq = F * tokens_per_frame.
// Storage fp16 or bf16, fp32 accumulation.  Strides are in elements; the last dimension must be contiguous,
// every pointer 16-byte aligned and every stride a multiple of 8 (16-byte vector loads).
// lse_text / lse_audio are (B, H, Lq) float32 contiguous, natural log; lse_text = -inf when T == 0.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "lipforcing/common.h"

namespace lipforcing {

struct AudioCrossAttentionParams {
  const void* q;
  const void* text_k;
  const void* text_v;
  const void* audio_k;
  const void* audio_v;
  void* out;
  float* lse_text;
  float* lse_audio;

  int64_t batch, q_len, heads, head_dim;
  int64_t text_len, frames, audio_window, tokens_per_frame;

  // Strides in elements: (batch, token, head) for q/text/out, (batch, frame, token, head) for audio.
  int64_t q_stride[3];
  int64_t text_k_stride[3];
  int64_t text_v_stride[3];
  int64_t audio_k_stride[4];
  int64_t audio_v_stride[4];
  int64_t out_stride[3];

  float scale;        // softmax scale
  float audio_scale;  // weight of the audio branch
  DType dtype;        // kFloat16 or kBFloat16
};

// Head dims the kernel is instantiated for.
inline bool audio_cross_attention_supports_head_dim(int64_t d) { return d == 32 || d == 64 || d == 96 || d == 128; }

// Why the parameters cannot be launched (a static message), or nullptr.  Touches no device.
const char* check_audio_cross_attention(const AudioCrossAttentionParams& p);

// Checks the parameters (returns cudaErrorInvalidValue with `*why` set when they are unusable), then launches on
// `stream`.  No allocation, no host synchronisation.
cudaError_t launch_audio_cross_attention(const AudioCrossAttentionParams& p, cudaStream_t stream,
                                         const char** why = nullptr);

}  // namespace lipforcing
