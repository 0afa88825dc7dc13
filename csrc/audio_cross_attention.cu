// SPDX-License-Identifier: Apache-2.0
// Fused audio cross-attention forward: FlashAttention-2 style tiling (Dao 2023) on mma.sync m16n8k16 tensor cores
// (fp16/bf16 inputs, fp32 accumulation), online softmax in base 2.
//
// One CTA = 4 warps = 64 query rows of one (batch, head); each warp owns 16 rows and keeps its accumulators in
// registers.  The CTA streams a sequence of 32-key tiles through double-buffered shared memory (cp.async):
//   tiles [0, n_text)            text keys, all rows          -> state (o_t, m_t, l_t)
//   tiles [n_text, n_text + ...) for each frame f present in the CTA's rows, frame f's audio window, with the rows
//                                of other frames masked to -inf -> state (o_a, m_a, l_a)
// Masking whole rows keeps one online softmax for the audio branch even when the CTA's rows straddle frames: a row
// only ever sees finite scores from its own frame.  At the end out = o_t / l_t + audio_scale * o_a / l_a.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, groupID g = lane / 4, t = lane % 4):
//   A (16x16, row):  {a0,a1}=(g, 2t..2t+1) {a2,a3}=(g+8, 2t..) {a4,a5}=(g, 2t+8..) {a6,a7}=(g+8, 2t+8..)
//   B (16x8, col):   {b0,b1}=(k=2t..2t+1, n=g) {b2,b3}=(k=2t+8.., n=g)
//   C (16x8, f32):   c0,c1=(g, 2t..2t+1) c2,c3=(g+8, 2t..2t+1)
// So the C fragments of two adjacent 8-key score tiles are exactly the A fragment of P for the P.V product.
// Q and K fragments are read from shared memory with ldmatrix (x4: a whole A fragment, or the B fragments of two
// 8-key score tiles), V fragments with ldmatrix.trans.
//
// Shared memory is dynamic ((64 + 4 x 32) x (D + 8) x 2 B = 52 KB at D = 128, opted in with cudaFuncSetAttribute),
// so `ptxas -v` and the compile report (static smem only) show 0 bytes for this kernel.  Key tiles stay 32 wide:
// the audio window is 32 tokens at the real shape (a 64-key tile would be half masked for every audio tile), and
// with two branch states in registers the D = 128 kernel uses 237 registers at 32 keys and hits the 255 cap at 64
// (ptxas -v, sm_80), with 87 KB of shared memory.  The 512 text keys are 16 double-buffered tiles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "lipforcing/audio_cross_attention.h"

namespace lipforcing {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;  // query rows per CTA
constexpr int kBlockN = 32;           // keys per tile
constexpr int kPad = 8;               // smem row padding (elements): rows start 16 bytes apart mod 128 -> no conflicts
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
struct Pack;
template <>
struct Pack<__half> {
  static __device__ __forceinline__ uint32_t two(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <>
struct Pack<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t two(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// d (16x8 fp32) += a (16x16) * b (16x8)
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; zero-fills the destination when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices (lane 8i + r addresses row r of matrix i): thread lane gets (M[g][2t], M[g][2t+1]) of
// matrix i in register i -- from a row-major tile, an A fragment or two B fragments of K^T.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

// The same, transposed: thread lane gets (M[2t][g], M[2t+1][g]) of matrix i in register i.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Copies rows [0, nrows) of a (kBlockN, D) tile into smem (row stride D + kPad); rows >= nrows become zeros.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int nrows) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < kBlockN * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool valid = r < nrows;
    cp_async16(dst + r * (D + kPad) + c, valid ? src + r * row_stride + c : src, valid);
  }
}

// Online-softmax state of one branch for this thread's two rows (g and g + 8 of the warp's 16).
template <int D>
struct Branch {
  float o[D / 8][4];
  float m[2];
  float l[2];  // partial row sums over this thread's columns; reduced over the quad at the end
};

template <int D>
__device__ __forceinline__ void branch_init(Branch<D>& br) {
#pragma unroll
  for (int i = 0; i < D / 8; ++i) br.o[i][0] = br.o[i][1] = br.o[i][2] = br.o[i][3] = 0.f;
  br.m[0] = br.m[1] = -INFINITY;
  br.l[0] = br.l[1] = 0.f;
}

// Folds one smem key tile into `br`: S = Q K^T (scaled to base 2), masking keys >= nkeys and the rows with
// row_ok[r] == false, then the online softmax update and O += P V.
template <typename T, int D>
__device__ __forceinline__ void attend_tile(Branch<D>& br, const T* qs, const T* ks, const T* vs, int nkeys,
                                            const bool (&row_ok)[2], float scale_log2) {
  const int lane = threadIdx.x % 32, t = lane % 4;
  constexpr int kStride = D + kPad;
  constexpr int kNT = kBlockN / 8;  // 8-key score tiles

  float s[kNT][4];
#pragma unroll
  for (int j = 0; j < kNT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
  // ldmatrix lane addresses: Q matrix i = (rows +8 if i odd, cols +8 if i >= 2) is the A fragment; K matrix i =
  // (keys +8 if i >= 2, dims +8 if i odd) gives b0, b1 of two adjacent 8-key score tiles
  const T* qa = qs + ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
  const T* kb = ks + ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) {
    uint32_t a[4];
    ldmatrix_x4(a, qa + kc * 16);
#pragma unroll
    for (int jp = 0; jp < kNT / 2; ++jp) {
      uint32_t b[4];
      ldmatrix_x4(b, kb + jp * 16 * kStride + kc * 16);
      mma16816<T>(s[2 * jp], a, b[0], b[1]);
      mma16816<T>(s[2 * jp + 1], a, b[2], b[3]);
    }
  }

  float p_scale[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = j * 8 + 2 * t + e;
        float v = s[j][2 * r + e] * scale_log2;
        v = (row_ok[r] && col < nkeys) ? v : -INFINITY;
        s[j][2 * r + e] = v;
        mx = fmaxf(mx, v);
      }
    }
    const float m_new = fmaxf(br.m[r], quad_max(mx));
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no finite score yet stays at zero
    const float alpha = exp2f(br.m[r] - m_use);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p = exp2f(s[j][2 * r + e] - m_use);
        s[j][2 * r + e] = p;
        sum += p;
      }
    }
    br.l[r] = br.l[r] * alpha + sum;
    br.m[r] = m_new;
    p_scale[r] = alpha;
  }
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    br.o[i][0] *= p_scale[0];
    br.o[i][1] *= p_scale[0];
    br.o[i][2] *= p_scale[1];
    br.o[i][3] *= p_scale[1];
  }

  // O += P V: P's A fragment for keys [16kk, 16kk+16) is the C fragments of score tiles 2kk and 2kk+1.
  const int mi = lane / 8, rr = lane % 8;  // ldmatrix: lane supplies row rr of matrix mi
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
    const uint32_t a[4] = {Pack<T>::two(s[2 * kk][0], s[2 * kk][1]), Pack<T>::two(s[2 * kk][2], s[2 * kk][3]),
                           Pack<T>::two(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                           Pack<T>::two(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
    for (int dn = 0; dn < D / 8; dn += 2) {
      // matrices: 0 = keys +0..7 / dims dn*8.., 1 = keys +8..15 / same dims, 2 and 3 = the next 8 dims
      uint32_t b[4];
      ldmatrix_x4_trans(b, vs + (kk * 16 + (mi & 1) * 8 + rr) * kStride + (dn + (mi >> 1)) * 8);
      mma16816<T>(br.o[dn], a, b[0], b[1]);
      mma16816<T>(br.o[dn + 1], a, b[2], b[3]);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) audio_cross_attention_fwd_kernel(const AudioCrossAttentionParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kStride = D + kPad;
  T* qs = reinterpret_cast<T*>(smem_raw);           // (kBlockM, kStride)
  T* ks = qs + kBlockM * kStride;                   // 2 stages x (kBlockN, kStride)
  T* vs = ks + 2 * kBlockN * kStride;               // 2 stages x (kBlockN, kStride)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t m_end = m0 + kBlockM < p.q_len ? m0 + kBlockM : p.q_len;
  const float scale_log2 = p.scale * kLog2e;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* tk = static_cast<const T*>(p.text_k) + b * p.text_k_stride[0] + h * p.text_k_stride[2];
  const T* tv = static_cast<const T*>(p.text_v) + b * p.text_v_stride[0] + h * p.text_v_stride[2];
  const T* ak = static_cast<const T*>(p.audio_k) + b * p.audio_k_stride[0] + h * p.audio_k_stride[3];
  const T* av = static_cast<const T*>(p.audio_v) + b * p.audio_v_stride[0] + h * p.audio_v_stride[3];

  // Tile schedule: text tiles, then (frame, audio tile) pairs for the frames of rows [m0, m_end).
  const int n_text = static_cast<int>(cdiv(p.text_len, kBlockN));
  const int n_atile = static_cast<int>(cdiv(p.audio_window, kBlockN));
  const int64_t f_lo = m0 / p.tokens_per_frame;
  const int64_t f_hi = (m_end - 1) / p.tokens_per_frame;
  const int n_tiles = n_text + static_cast<int>(f_hi - f_lo + 1) * n_atile;

  auto issue_tile = [&](int i, int stage) {
    T* kd = ks + stage * kBlockN * kStride;
    T* vd = vs + stage * kBlockN * kStride;
    if (i < n_text) {
      const int64_t n0 = static_cast<int64_t>(i) * kBlockN;
      const int n = static_cast<int>(p.text_len - n0 < kBlockN ? p.text_len - n0 : kBlockN);
      load_tile<T, D>(kd, tk + n0 * p.text_k_stride[1], p.text_k_stride[1], n);
      load_tile<T, D>(vd, tv + n0 * p.text_v_stride[1], p.text_v_stride[1], n);
    } else {
      const int j = i - n_text;
      const int64_t f = f_lo + j / n_atile;
      const int64_t a0 = static_cast<int64_t>(j % n_atile) * kBlockN;
      const int n = static_cast<int>(p.audio_window - a0 < kBlockN ? p.audio_window - a0 : kBlockN);
      load_tile<T, D>(kd, ak + f * p.audio_k_stride[1] + a0 * p.audio_k_stride[2], p.audio_k_stride[2], n);
      load_tile<T, D>(vd, av + f * p.audio_v_stride[1] + a0 * p.audio_v_stride[2], p.audio_v_stride[2], n);
    }
  };

  // Q tile (rows past q_len are zeros), then the first key tile.
  {
    constexpr int kChunks = D / 8;
    for (int idx = threadIdx.x; idx < kBlockM * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = (idx % kChunks) * 8;
      const bool valid = m0 + r < p.q_len;
      cp_async16(qs + r * kStride + c, valid ? q + (m0 + r) * p.q_stride[1] + c : q, valid);
    }
    cp_async_commit();
  }
  issue_tile(0, 0);
  cp_async_commit();

  Branch<D> text, audio;
  branch_init(text);
  branch_init(audio);
  const int64_t row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  const T* qw = qs + warp * 16 * kStride;

  for (int i = 0; i < n_tiles; ++i) {
    if (i + 1 < n_tiles) {
      issue_tile(i + 1, (i + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* kt = ks + (i & 1) * kBlockN * kStride;
    const T* vt = vs + (i & 1) * kBlockN * kStride;
    if (i < n_text) {
      const int n = static_cast<int>(p.text_len - static_cast<int64_t>(i) * kBlockN);
      const bool all_rows[2] = {true, true};
      attend_tile<T, D>(text, qw, kt, vt, n, all_rows, scale_log2);
    } else {
      const int j = i - n_text;
      const int64_t f = f_lo + j / n_atile;
      const int n = static_cast<int>(p.audio_window - static_cast<int64_t>(j % n_atile) * kBlockN);
      // Rows past q_len have row / tokens_per_frame >= frames > f, so they are masked too.
      const bool in_frame[2] = {row[0] / p.tokens_per_frame == f, row[1] / p.tokens_per_frame == f};
      attend_tile<T, D>(audio, qw, kt, vt, n, in_frame, scale_log2);
    }
    __syncthreads();  // the stage just read is refilled by the next iteration's issue
  }

  // Normalise, combine, write: the warp stages its 16 output rows in its own (no longer needed) Q rows of smem,
  // then stores them with 16-byte writes.
  float inv_t[2], inv_a[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lt = quad_sum(text.l[r]);
    const float la = quad_sum(audio.l[r]);
    inv_t[r] = lt > 0.f ? 1.f / lt : 0.f;
    inv_a[r] = la > 0.f ? p.audio_scale / la : 0.f;
    if (t == 0 && row[r] < p.q_len) {
      const int64_t off = bh * p.q_len + row[r];
      p.lse_text[off] = lt > 0.f ? (text.m[r] + log2f(lt)) * kLn2 : -INFINITY;
      p.lse_audio[off] = la > 0.f ? (audio.m[r] + log2f(la)) * kLn2 : -INFINITY;
    }
  }
  T* ow = const_cast<T*>(qw);
  __syncwarp();
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    const int c = dn * 8 + 2 * t;
    *reinterpret_cast<uint32_t*>(ow + g * kStride + c) =
        Pack<T>::two(text.o[dn][0] * inv_t[0] + audio.o[dn][0] * inv_a[0],
                     text.o[dn][1] * inv_t[0] + audio.o[dn][1] * inv_a[0]);
    *reinterpret_cast<uint32_t*>(ow + (g + 8) * kStride + c) =
        Pack<T>::two(text.o[dn][2] * inv_t[1] + audio.o[dn][2] * inv_a[1],
                     text.o[dn][3] * inv_t[1] + audio.o[dn][3] * inv_a[1]);
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[2];
  constexpr int kChunks = D / 8;
  for (int idx = lane; idx < 16 * kChunks; idx += 32) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const int64_t gr = m0 + warp * 16 + r;
    if (gr < p.q_len) {
      *reinterpret_cast<uint4*>(out + gr * p.out_stride[1] + c) = *reinterpret_cast<const uint4*>(ow + r * kStride + c);
    }
  }
}

template <typename T, int D>
cudaError_t launch_typed(const AudioCrossAttentionParams& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(kBlockM + 4 * kBlockN) * (D + kPad) * sizeof(T);
  auto kernel = audio_cross_attention_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.q_len, kBlockM)), static_cast<unsigned>(p.batch * p.heads));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dim(const AudioCrossAttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch_typed<T, 32>(p, stream);
    case 64: return launch_typed<T, 64>(p, stream);
    case 96: return launch_typed<T, 96>(p, stream);
    case 128: return launch_typed<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace

const char* check_audio_cross_attention(const AudioCrossAttentionParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return "dtype must be float16 or bfloat16";
  if (!audio_cross_attention_supports_head_dim(p.head_dim)) return "head_dim must be 32, 64, 96 or 128";
  if (p.batch < 1 || p.heads < 1 || p.frames < 1 || p.tokens_per_frame < 1 || p.text_len < 0 || p.audio_window < 1)
    return "sizes must satisfy batch, heads, frames, tokens_per_frame, audio_window >= 1 and text_len >= 0";
  if (p.q_len != p.frames * p.tokens_per_frame) return "q_len must equal frames * tokens_per_frame";
  if (p.batch * p.heads > 65535) return "batch * heads must be <= 65535 (grid y)";
  if (ceil_div(p.q_len, kBlockM) > 0x7fffffff) return "q_len is too large";
  if (p.text_len > 0x3fffffff || p.audio_window > 0x3fffffff) return "text_len / audio_window is too large";
  if (!p.q || !p.audio_k || !p.audio_v || !p.out || (p.text_len > 0 && (!p.text_k || !p.text_v)))
    return "q, audio_k, audio_v, out (and text_k, text_v when text_len > 0) must be device pointers";
  const void* ptrs[] = {p.q, p.text_k, p.text_v, p.audio_k, p.audio_v, p.out};
  for (const void* ptr : ptrs)
    if (!aligned16(ptr)) return "every tensor must start at a 16-byte aligned address";
  const int64_t* strides[] = {p.q_stride, p.text_k_stride, p.text_v_stride, p.out_stride};
  for (const int64_t* s : strides)
    for (int i = 0; i < 3; ++i)
      if (s[i] % 8) return "every stride except the last dimension's must be a multiple of 8 elements";
  for (const int64_t* s : {p.audio_k_stride, p.audio_v_stride})
    for (int i = 0; i < 4; ++i)
      if (s[i] % 8) return "every stride except the last dimension's must be a multiple of 8 elements";
  if (p.lse_text == nullptr || p.lse_audio == nullptr) return "lse_text and lse_audio must be given";
  return nullptr;
}

cudaError_t launch_audio_cross_attention(const AudioCrossAttentionParams& p, cudaStream_t stream, const char** why) {
  if (const char* reason = check_audio_cross_attention(p)) {
    if (why) *why = reason;
    return cudaErrorInvalidValue;
  }
  if (p.dtype == DType::kFloat16) return launch_dim<__half>(p, stream);
  return launch_dim<__nv_bfloat16>(p, stream);
}

}  // namespace lipforcing
