// SPDX-License-Identifier: Apache-2.0
// audio_cross_attention forward on Hopper (sm_90a): out = softmax(scale q text_k^T) text_v + audio_scale *
// softmax(scale q audio_k[f]^T) audio_v[f] for the queries of latent frame f (f = row / tokens_per_frame), with
// lse_text / lse_audio (natural log) for the backward.  Same op, parameters and results as
// csrc/audio_cross_attention.cu (mma.sync, sm_80+); this one uses the Hopper instructions of FlashAttention-3
// (Shah et al., 2024): TMA loads into 128B-swizzled shared memory, an mbarrier producer/consumer pipeline, wgmma
// with operands read through shared-memory matrix descriptors, online softmax in fp32 with base-2 exponents.  The
// primitives are shared with chunk_attention_sm90.cu (lipforcing/sm90_primitives.cuh).
//
// One CTA = 128 query rows of one (batch, head), 3 warpgroups (384 threads):
//   warpgroup 0  producer (setmaxnreg.dec): one thread loads the Q tile once, then streams 64-key K/V tiles into
//                a 4-stage ring, each stage guarded by a "full" barrier (TMA transaction bytes of K and V) and an
//                "empty" barrier (all 256 consumer threads).  The tile sequence is the mma.sync kernel's:
//                  tiles [0, n_text)  text keys (4-d view of text_k / text_v), every row   -> text state
//                  then, for each frame f with rows in the CTA, ceil(A / 64) tiles of frame f's audio window
//                  (5-d view of audio_k / audio_v), the rows of other frames masked to -inf  -> audio state
//                Rows / keys past the end of a tensor are zero-filled by TMA (never read from memory), and the
//                keys past T or A are masked, so padding next to a view is never looked at.
//   warpgroups 1-2 consumers (setmaxnreg.inc): 64 query rows each, two online-softmax states in registers
//                (O_text, O_audio: 64 x D fp32 each).  Per tile: S = Q K^T (wgmma m64n64k16, A = Q and B = K from
//                shared memory, both K-major), mask, softmax update, P rounded to 16 bits in registers, O += P V
//                (wgmma m64nDk16, A = P from registers, B = V MN-major), release the stage.  A warpgroup without a
//                row in frame f (or past q_len) skips that tile's math but still waits for it and releases it.
//   Epilogue: out = O_text / l_text + audio_scale O_audio / l_audio, rounded once to 16 bits, staged in the
//   consumer's own Q rows (same swizzle), written with 16-byte stores (rows >= q_len skipped); lse per row.
// Not done (yet): intra-warpgroup pipelining / ping-pong (the chunk kernel's), TMA stores of O.  The op is
// memory-bound at the real shape (32 audio tokens, 512 text keys per 1024-token frame), so the loads matter most.
//
// Key tiles are 64 wide for both branches: the audio window is 32 tokens at the real shape, so a 128-key tile
// would be three-quarters masked for every audio tile, and two 64 x D fp32 accumulators + S + P must fit the
// consumers' 240 registers.
//
// Shared memory (D = head_dim; every region 1024-byte aligned, as the 128B swizzle needs):
//   Q  D/64 subtiles of 128 rows x 128 B        K[s], V[s]  D/64 subtiles of 64 keys x 128 B each
// Descriptors (audio_cross_attention_sm90_{q,k,v}_desc in the header): Q and K K-major (sm90_kmajor_desc,
// SBO = 1024), V MN-major (sm90_mn_major_desc, LBO = 64 keys x 128 B to the next 64 head_dim columns).  The
// fragment layouts of the fp32 accumulators and of the register-A operand are those of chunk_attention_sm90.cu.
#include "lipforcing/audio_cross_attention_sm90.h"

#include <cmath>

#include "lipforcing/sm90_primitives.cuh"  // PTX wrappers (mbarrier, TMA, wgmma, setmaxnreg), Elem<T>, TMA encoding

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "audio_cross_attention_sm90.cu uses wgmma and setmaxnreg: compile it for sm_90a only (CMakeLists.txt does)"
#endif

namespace lipforcing {
namespace {

using namespace sm90;  // NOLINT: the shared Hopper primitives

constexpr int kBM = kAudioSm90BlockM, kBN = kAudioSm90BlockN, kStages = kAudioSm90Stages;
constexpr uint32_t kProducerRegs = 24, kConsumerRegs = 240;  // 128 * 24 + 256 * 240 <= 65536
constexpr uint32_t kBarEpilogue = 1;  // named barriers 1 + c: consumer c's epilogue (0 is __syncthreads)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
struct Layout {
  static constexpr int kSub = D / 64;                   // 64-column subtiles per row
  static constexpr int kQBytes = kSub * kBM * 128;
  static constexpr int kTileBytes = kSub * kBN * 128;   // one K or V tile
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQBytes;               // K stage s at kK + s * kTileBytes
  static constexpr int kV = kK + kStages * kTileBytes;
  static constexpr int kBar = kV + kStages * kTileBytes;  // q_full, full[S], empty[S] (8 B each)
  static constexpr int kBytes = kBar + 8 * (1 + 2 * kStages) + 1024;  // + 1024: aligning the dynamic base
  static_assert(kQBytes % 1024 == 0 && kTileBytes % 1024 == 0, "swizzle atoms must stay 1024-byte aligned");
};

// Online-softmax state of one branch for this thread's rows (warp rows lane / 4 and lane / 4 + 8).
template <int D>
struct Branch {
  float o[D / 2];  // 64 x D accumulator of the warpgroup, wgmma fragment layout
  float m[2];      // running max of the scaled scores (base 2)
  float l[2];      // this thread's part of the running denominators (quad-summed at the end)
};

template <int D>
__device__ __forceinline__ void branch_init(Branch<D>& br) {
#pragma unroll
  for (int i = 0; i < D / 2; ++i) br.o[i] = 0.f;
  br.m[0] = br.m[1] = -INFINITY;
  br.l[0] = br.l[1] = 0.f;
}

// Folds one landed K/V tile (shared addresses kt, vt) into `br` for this consumer's 64 rows (Q rows
// 64 cw .. 64 cw + 63 at sq): keys >= nkeys and the rows with ok[r] == false get score -inf.  kSelectRows: the P V
// product goes to a fresh accumulator that only the ok rows add, so a masked row never sees the tile's values (its
// P is 0, but 0 * inf or 0 * NaN in another frame's audio_v would still reach it through the tensor cores).
template <typename T, int D, bool kSelectRows>
__device__ __forceinline__ void attend_tile(Branch<D>& br, uint32_t sq, int cw, uint32_t kt, uint32_t vt, int nkeys,
                                            bool ok0, bool ok1, float scale_log2, int lane) {
  float s[kBN / 2];  // S = Q K^T, 64 x 64 per warpgroup
  wgmma_fence();     // br.o was last written by ordinary instructions
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    Elem<T>::ss(s, audio_cross_attention_sm90_q_desc(sq, cw, kk), audio_cross_attention_sm90_k_desc(kt, kk), kk > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  reg_fence(s);

  // Scale to base 2, then mask (masking after scaling keeps -inf whatever the sign of the scale).
  const int key0 = 2 * (lane % 4);
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < kBN / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool key_ok = key0 + 8 * j + e < nkeys;
      s[4 * j + e] = (ok0 && key_ok) ? s[4 * j + e] * scale_log2 : -INFINITY;
      s[4 * j + 2 + e] = (ok1 && key_ok) ? s[4 * j + 2 + e] * scale_log2 : -INFINITY;
      mx[0] = fmaxf(mx[0], s[4 * j + e]);
      mx[1] = fmaxf(mx[1], s[4 * j + 2 + e]);
    }
  }
  float mb[2], alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad share a row
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(br.m[r], mx[r]);
    mb[r] = m_new == -INFINITY ? 0.f : m_new;  // no finite score in the row yet: subtract 0, not -inf
    alpha[r] = ex2(br.m[r] - mb[r]);           // 0 while the row had no finite score
    br.m[r] = m_new;
  }
  // P as the A fragments of the P V wgmma: key block kk (16 keys) is pa[4 kk .. 4 kk + 3].
  uint32_t pa[kBN / 4];
  float rs[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < kBN / 8; ++j) {
    const float p0 = ex2(s[4 * j + 0] - mb[0]);
    const float p1 = ex2(s[4 * j + 1] - mb[0]);
    const float p2 = ex2(s[4 * j + 2] - mb[1]);
    const float p3 = ex2(s[4 * j + 3] - mb[1]);
    rs[0] += p0 + p1;
    rs[1] += p2 + p3;
    pa[2 * j] = Elem<T>::pack(p0, p1);
    pa[2 * j + 1] = Elem<T>::pack(p2, p3);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) br.l[r] = br.l[r] * alpha[r] + rs[r];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    br.o[4 * j + 0] *= alpha[0];
    br.o[4 * j + 1] *= alpha[0];
    br.o[4 * j + 2] *= alpha[1];
    br.o[4 * j + 3] *= alpha[1];
  }

  if constexpr (!kSelectRows) {
    wgmma_fence();  // br.o and pa were written by ordinary instructions
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t a[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
      Elem<T>::rs(br.o, a, audio_cross_attention_sm90_v_desc(vt, kk));
    }
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(br.o);
    reg_fence(pa);
  } else {
    float pv[D / 2];  // P V of this tile alone (the first k-step overwrites it)
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t a[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
      Elem<T>::rs(pv, a, audio_cross_attention_sm90_v_desc(vt, kk), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(pv);
    reg_fence(pa);
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      br.o[4 * j + 0] += ok0 ? pv[4 * j + 0] : 0.f;
      br.o[4 * j + 1] += ok0 ? pv[4 * j + 1] : 0.f;
      br.o[4 * j + 2] += ok1 ? pv[4 * j + 2] : 0.f;
      br.o[4 * j + 3] += ok1 ? pv[4 * j + 3] : 0.f;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kAudioSm90Threads, 1)
    audio_cross_attention_sm90_kernel(const AudioCrossAttentionParams p, const __grid_constant__ CUtensorMap tm_q,
                                      const __grid_constant__ CUtensorMap tm_tk,
                                      const __grid_constant__ CUtensorMap tm_tv,
                                      const __grid_constant__ CUtensorMap tm_ak,
                                      const __grid_constant__ CUtensorMap tm_av) {
  using L = Layout<D>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;  // 128B-swizzle atoms must start 1024-byte aligned
  uint8_t* const base_ptr = smem_raw + (base - raw);
  const uint32_t sq = base + L::kQ, sk = base + L::kK, sv = base + L::kV;
  const uint32_t bar_q = base + L::kBar;
  auto bar_full = [&](int s) { return bar_q + 8u * (1 + s); };
  auto bar_empty = [&](int s) { return bar_q + 8u * (1 + kStages + s); };

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(m_block) * kBM;
  const int64_t m_end = m0 + kBM < p.q_len ? m0 + kBM : p.q_len;
  const int n_text = static_cast<int>((p.text_len + kBN - 1) / kBN);
  const int n_at = static_cast<int>((p.audio_window + kBN - 1) / kBN);
  const int64_t f_lo = m0 / p.tokens_per_frame;
  const int n_tiles = n_text + static_cast<int>((m_end - 1) / p.tokens_per_frame - f_lo + 1) * n_at;
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bar_full(s), 1);
      mbar_init(bar_empty(s), 256);  // every consumer thread arrives once it is done with the stage
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the TMA (async) proxy
  }
  __syncthreads();

  if (wg == 0) {  // ---------------------------------------------------------------- producer warpgroup
    setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 0) {
      tma_prefetch_desc(&tm_q);
      if (n_text > 0) {
        tma_prefetch_desc(&tm_tk);
        tma_prefetch_desc(&tm_tv);
      }
      tma_prefetch_desc(&tm_ak);
      tma_prefetch_desc(&tm_av);
      mbar_arrive_expect_tx(bar_q, L::kQBytes);
      for (int c = 0; c < L::kSub; ++c) {
        tma_load_4d(sq + c * kBM * 128, &tm_q, bar_q, c * 64, h, static_cast<int>(m0), b);
      }
      for (int i = 0; i < n_tiles; ++i) {
        const int s = i % kStages;
        mbar_wait_watchdog(bar_empty(s), ((i / kStages) & 1) ^ 1);  // the tile that used this stage was released
        mbar_arrive_expect_tx(bar_full(s), 2 * L::kTileBytes);  // K and V, zero-filled rows included
        const uint32_t kd = sk + s * L::kTileBytes, vd = sv + s * L::kTileBytes;
        if (i < n_text) {
          for (int c = 0; c < L::kSub; ++c) {
            tma_load_4d(kd + c * kBN * 128, &tm_tk, bar_full(s), c * 64, h, i * kBN, b);
            tma_load_4d(vd + c * kBN * 128, &tm_tv, bar_full(s), c * 64, h, i * kBN, b);
          }
        } else {
          const int j = i - n_text;
          const int f = static_cast<int>(f_lo) + j / n_at, a0 = (j % n_at) * kBN;
          for (int c = 0; c < L::kSub; ++c) {
            tma_load_5d(kd + c * kBN * 128, &tm_ak, bar_full(s), c * 64, h, a0, f, b);
            tma_load_5d(vd + c * kBN * 128, &tm_av, bar_full(s), c * 64, h, a0, f, b);
          }
        }
      }
    }
    return;
  }

  // ------------------------------------------------------------------------------------ consumer warpgroups
  setmaxnreg_inc<kConsumerRegs>();
  const int cw = wg - 1;  // consumer 0/1: query rows cw * 64 .. cw * 64 + 63 of the tile
  const int tid = threadIdx.x - 128 * wg;
  const int warp = tid / 32, lane = tid % 32;
  const float scale_log2 = p.scale * kLog2e;  // e^(s x) = 2^(s log2(e) x)
  const int64_t tpf = p.tokens_per_frame;
  const int64_t wg_lo = m0 + cw * 64;
  const int64_t wg_hi = wg_lo + 64 < p.q_len ? wg_lo + 64 : p.q_len;  // empty when the rows are all past q_len
  const int64_t row[2] = {wg_lo + warp * 16 + lane / 4, wg_lo + warp * 16 + lane / 4 + 8};

  Branch<D> text, audio;
  branch_init(text);
  branch_init(audio);
  mbar_wait(bar_q, 0);
  for (int i = 0; i < n_tiles; ++i) {
    const int s = i % kStages;
    const uint32_t kt = sk + s * L::kTileBytes, vt = sv + s * L::kTileBytes;
    mbar_wait(bar_full(s), (i / kStages) & 1);
    if (i < n_text) {
      if (wg_lo < wg_hi) {
        const int nkeys = static_cast<int>(p.text_len - static_cast<int64_t>(i) * kBN);
        attend_tile<T, D, false>(text, sq, cw, kt, vt, nkeys, true, true, scale_log2, lane);
      }
    } else {
      const int j = i - n_text;
      const int64_t f = f_lo + j / n_at;
      const int nkeys = static_cast<int>(p.audio_window - static_cast<int64_t>(j % n_at) * kBN);
      const int64_t lo = wg_lo > f * tpf ? wg_lo : f * tpf, hi = wg_hi < (f + 1) * tpf ? wg_hi : (f + 1) * tpf;
      // Warpgroup-uniform: some row of this consumer is in frame f (rows past q_len have row / tpf >= frames > f,
      // so they are masked too); when other valid rows are not, they must not see frame f's values at all.
      const bool ok0 = row[0] / tpf == f, ok1 = row[1] / tpf == f;
      if (lo < hi && (lo > wg_lo || hi < wg_hi)) {
        attend_tile<T, D, true>(audio, sq, cw, kt, vt, nkeys, ok0, ok1, scale_log2, lane);
      } else if (lo < hi) {
        attend_tile<T, D, false>(audio, sq, cw, kt, vt, nkeys, ok0, ok1, scale_log2, lane);
      }
    }
    mbar_arrive(bar_empty(s));
  }

  // ---------------------------------------------------------------------------------------------- epilogue
  float inv_t[2], inv_a[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float lt = text.l[r], la = audio.l[r];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    la += __shfl_xor_sync(0xffffffffu, la, 1);
    la += __shfl_xor_sync(0xffffffffu, la, 2);
    inv_t[r] = lt > 0.f ? 1.f / lt : 0.f;
    inv_a[r] = la > 0.f ? p.audio_scale / la : 0.f;
    if (lane % 4 == 0 && row[r] < p.q_len) {
      const int64_t off = (static_cast<int64_t>(b) * p.heads + h) * p.q_len + row[r];
      p.lse_text[off] = lt > 0.f ? (text.m[r] + log2f(lt)) * kLn2 : -INFINITY;
      p.lse_audio[off] = la > 0.f ? (audio.m[r] + log2f(la)) * kLn2 : -INFINITY;
    }
  }
  // Stage O in this warpgroup's own Q rows (its last wgmma reading them has completed), same swizzle.
  const int srow = cw * 64 + warp * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const uint32_t sub = (j / 8) * kBM * 128;
    const uint32_t byte = 4 * (lane % 4);
    *reinterpret_cast<uint32_t*>(base_ptr + L::kQ + sub + sw128_offset(srow, j % 8) + byte) =
        Elem<T>::pack(text.o[4 * j] * inv_t[0] + audio.o[4 * j] * inv_a[0],
                      text.o[4 * j + 1] * inv_t[0] + audio.o[4 * j + 1] * inv_a[0]);
    *reinterpret_cast<uint32_t*>(base_ptr + L::kQ + sub + sw128_offset(srow + 8, j % 8) + byte) =
        Elem<T>::pack(text.o[4 * j + 2] * inv_t[1] + audio.o[4 * j + 2] * inv_a[1],
                      text.o[4 * j + 3] * inv_t[1] + audio.o[4 * j + 3] * inv_a[1]);
  }
  named_barrier_sync(kBarEpilogue + cw, 128);
  constexpr int kChunks = D / 8;  // 16-byte chunks per output row
  T* const out = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[2];
  for (int idx = tid; idx < 64 * kChunks; idx += 128) {
    const int r = cw * 64 + idx / kChunks, c = idx % kChunks;
    const int64_t token = m0 + r;
    if (token < p.q_len) {
      const uint8_t* src = base_ptr + L::kQ + (c / 8) * kBM * 128 + sw128_offset(r, c % 8);
      *reinterpret_cast<uint4*>(out + token * p.out_stride[1] + c * 8) = *reinterpret_cast<const uint4*>(src);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------
template <typename T, int D>
cudaError_t launch_typed(const AudioCrossAttentionParams& p, cudaStream_t stream) {
  const CUtensorMapDataType dt = Elem<T>::kTma;
  CUtensorMap tq, ttk, ttv, tak, tav;
  if (!encode_tile_map(&tq, dt, p.q,
                       audio_cross_attention_sm90_tma_spec(p.batch, p.q_len, p.heads, D, p.q_stride, kBM)) ||
      !encode_tile_map(&tak, dt, p.audio_k,
                       audio_cross_attention_sm90_audio_tma_spec(p.batch, p.frames, p.audio_window, p.heads, D,
                                                                 p.audio_k_stride, kBN)) ||
      !encode_tile_map(&tav, dt, p.audio_v,
                       audio_cross_attention_sm90_audio_tma_spec(p.batch, p.frames, p.audio_window, p.heads, D,
                                                                 p.audio_v_stride, kBN))) {
    return cudaErrorInvalidValue;
  }
  if (p.text_len > 0) {
    if (!encode_tile_map(&ttk, dt, p.text_k, audio_cross_attention_sm90_tma_spec(p.batch, p.text_len, p.heads, D,
                                                                                  p.text_k_stride, kBN)) ||
        !encode_tile_map(&ttv, dt, p.text_v, audio_cross_attention_sm90_tma_spec(p.batch, p.text_len, p.heads, D,
                                                                                  p.text_v_stride, kBN))) {
      return cudaErrorInvalidValue;
    }
  } else {
    ttk = ttv = tq;  // never loaded (no text tiles)
  }
  auto kernel = audio_cross_attention_sm90_kernel<T, D>;
  const int smem = Layout<D>::kBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.q_len, kBM)), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, kAudioSm90Threads, smem, stream>>>(p, tq, ttk, ttv, tak, tav);
  return cudaGetLastError();
}

}  // namespace

int audio_cross_attention_sm90_smem_bytes(int head_dim) {
  return head_dim == 64 ? Layout<64>::kBytes : head_dim == 128 ? Layout<128>::kBytes : 0;
}

const char* check_audio_cross_attention_sm90(const AudioCrossAttentionParams& p) {
  if (const char* why = check_audio_cross_attention(p)) return why;
  if (p.head_dim != 64 && p.head_dim != 128) return "head_dim must be 64 or 128 for the sm_90 kernel";
  if (p.q_len > 0x7fffffff - kBM) return "q_len must be below 2^31 - 128 for the sm_90 kernel (TMA coordinates)";
  if (p.heads > 65535 || p.batch > 65535) return "heads and batch must be <= 65535 (grid dimensions)";
  const int64_t q_ext[3] = {p.batch, p.q_len, p.heads}, t_ext[3] = {p.batch, p.text_len, p.heads};
  const int64_t a_ext[4] = {p.batch, p.frames, p.audio_window, p.heads};
  for (int i = 0; i < 3; ++i) {
    if (!sm90_tma_stride_ok(q_ext[i], p.q_stride[i]) ||
        (p.text_len > 0 &&
         (!sm90_tma_stride_ok(t_ext[i], p.text_k_stride[i]) || !sm90_tma_stride_ok(t_ext[i], p.text_v_stride[i])))) {
      return "strides (batch, token, head) must be positive multiples of 8 elements (16 bytes) below 2^39";
    }
  }
  for (int i = 0; i < 4; ++i) {
    if (!sm90_tma_stride_ok(a_ext[i], p.audio_k_stride[i]) || !sm90_tma_stride_ok(a_ext[i], p.audio_v_stride[i])) {
      return "audio strides (batch, frame, token, head) must be positive multiples of 8 elements below 2^39";
    }
  }
  return nullptr;
}

cudaError_t launch_audio_cross_attention_sm90(const AudioCrossAttentionParams& p, cudaStream_t stream,
                                              const char** why) {
  if (const char* reason = check_audio_cross_attention_sm90(p)) {
    if (why) *why = reason;
    return cudaErrorInvalidValue;
  }
  if (tensor_map_encoder() == nullptr) return cudaErrorNotSupported;
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 128) {
    return bf16 ? launch_typed<__nv_bfloat16, 128>(p, stream) : launch_typed<__half, 128>(p, stream);
  }
  return bf16 ? launch_typed<__nv_bfloat16, 64>(p, stream) : launch_typed<__half, 64>(p, stream);
}

}  // namespace lipforcing
