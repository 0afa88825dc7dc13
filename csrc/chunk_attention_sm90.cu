// SPDX-License-Identifier: Apache-2.0
// chunk_attention on Hopper (sm_90a): the dense chunk step's attention, out = softmax(scale * q k^T) v over the
// first count[b] key slots of a dense K/V buffer, no other mask.  Slots from count[b] up to the end of its 128-key
// tile are read (and get probability 0), so they must hold finite values (RollingKVCache / ChunkWorkspace buffers
// start zeroed and only ever receive keys and values).  FlashAttention-3's design (Shah et al., 2024):
// warp specialisation, TMA loads into 128B-swizzled shared memory, an mbarrier producer/consumer pipeline, wgmma
// (warpgroup MMA, asynchronous, operands read from shared memory through matrix descriptors), online softmax in
// fp32 registers with base-2 exponents.
//
// One CTA = 128 query rows of one (batch, head), 3 warpgroups (384 threads):
//   warpgroup 0  producer: gives its registers away (setmaxnreg.dec), one thread issues every TMA load: the Q tile
//                once, then K and V tiles of 128 keys into a 2-stage ring, each stage guarded by a "full"
//                barrier (TMA transaction bytes) per operand and an "empty" barrier (all 256 consumer threads);
//   warpgroups 1-2 consumers: 64 query rows each (setmaxnreg.inc to 240 registers).  Per key tile:
//                S = Q K^T     wgmma m64n128k16, A = Q and B = K from shared memory (both "K-major"), fp32 acc;
//                online softmax on S in registers (mask keys >= count in the last tile), P rounded to 16 bits;
//                O += P V      wgmma m64nDk16, A = P from registers, B = V from shared memory ("MN-major":
//                              V is stored keys x head_dim, i.e. transposed for the B operand, imm-trans-b = 1);
//                then the stage is released to the producer.  Intra-warpgroup pipelining (FA3 algorithm 2): S of
//                tile i and P V of tile i - 1 are issued back to back, and the softmax of tile i runs while P V of
//                tile i - 1 is still on the tensor cores (P double-buffered in registers: pa0 / pa1).
//   Epilogue: O / l rounded to 16 bits, staged through the consumer's own (no longer read) Q rows in shared
//   memory, written to global memory with 16-byte stores (rows >= n skipped).
//   Ping-pong (FA3 section 3.1, kPingPong): the two consumers take turns issuing their wgmmas (named barriers),
//   so one warpgroup's softmax overlaps the other's matrix products.
//   Not done (yet): a persistent / split-KV schedule (the 12-head shape is 2.2 waves), TMA stores of O, FP8.
//
// Shared memory (D = head_dim, 16-bit elements; every region 1024-byte aligned, as the 128B swizzle needs):
//   Q  D/64 subtiles of 128 rows x 128 B      K[s], V[s]  D/64 subtiles of 128 keys x 128 B each
// A "subtile" is what one TMA box writes: `rows` rows of 64 columns (128 B), 16-byte chunk c of row r stored at
// r * 128 + ((c ^ (r % 8)) * 16) (sw128_offset in the header).  8 rows = one 1024-byte swizzle atom.
//
// wgmma descriptors (wgmma_desc_sw128 in the header: start >> 4 in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in
// 32-45, swizzle mode 1 = 128B in bits 62-63):
//   Q (A of S = Q K^T, 64 x 16 per k-step, K-major): start = Q subtile (kk / 4) + 64 * consumer * 128 B (its 64
//       rows) + (kk % 4) * 32 B (16 columns = 32 B inside the 128-byte row); SBO = 1024 (next 8 rows); LBO unused.
//   K (B of S, 128 keys x 16 per k-step, K-major): same with the K subtile; rows are keys.
//   V (B of O += P V, 16 keys x D per k-step, MN-major): start = V stage + kk * 16 rows * 128 B; SBO = 1024 (next
//       8 keys), LBO = 128 keys * 128 B = 16384 (the next 64 head_dim columns live in the next subtile).
//
// Fragment layout of the m64nNk16 fp32 accumulator (S and O): warp w of the warpgroup owns rows 16 w .. 16 w + 15;
// lane l holds, for each 8-column block j, d[4j + 0/1] at row 16 w + l / 4, columns 8 j + 2 (l % 4) + 0/1 and
// d[4j + 2/3] at row 16 w + l / 4 + 8, same columns.  The A fragment of a register-A wgmma (k-step of 16 keys)
// is the mma.m16n8k16 A layout: a0 (row l/4, cols 2(l%4)+0/1), a1 (row l/4+8, same), a2 (row l/4, cols
// 8+2(l%4)+0/1), a3 (row l/4+8, same); so P of key block kk is {pack(S[8kk+0,1]), pack(S[8kk+2,3]),
// pack(S[8kk+4,5]), pack(S[8kk+6,7])}, i.e. pa[4kk .. 4kk+3] below, without any data movement.
#include "lipforcing/chunk_attention_sm90.h"

#include <cmath>

#include "lipforcing/sm90_primitives.cuh"  // PTX wrappers (mbarrier, TMA, wgmma, setmaxnreg), Elem<T>, TMA encoding

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "chunk_attention_sm90.cu uses wgmma and setmaxnreg: compile it for sm_90a only (CMakeLists.txt does)"
#endif

namespace lipforcing {
namespace {

using namespace sm90;  // NOLINT: the shared Hopper primitives

constexpr int kBM = kSm90BlockM, kBN = kSm90BlockN, kStages = kSm90Stages;
constexpr uint32_t kProducerRegs = 24, kConsumerRegs = 240;  // 128 * 24 + 256 * 240 <= 65536
// Named barriers: 0 = __syncthreads, 1 + c = consumer c's epilogue, 3 + c = consumer c's turn to issue wgmmas.
constexpr uint32_t kBarEpilogue = 1, kBarTurn = 3;
// Ping-pong (FA3 section 3.1): the consumers take turns issuing their wgmmas (S of tile i, P V of tile i - 1),
// so one warpgroup's softmax runs while the other's matrix products occupy the tensor cores.
constexpr bool kPingPong = true;

template <int D>
struct Layout {
  static constexpr int kSub = D / 64;                        // 64-column subtiles per row
  static constexpr int kQBytes = kSub * kBM * 128;
  static constexpr int kTileBytes = kSub * kBN * 128;         // one K or V tile
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQBytes;                     // K stage s at kK + s * kTileBytes
  static constexpr int kV = kK + kStages * kTileBytes;
  static constexpr int kBar = kV + kStages * kTileBytes;      // q_full, k_full[S], v_full[S], empty[S] (8 B each)
  static constexpr int kBytes = kBar + 8 * (1 + 3 * kStages) + 1024;  // + 1024: aligning the dynamic base
  static_assert(kQBytes % 1024 == 0 && kTileBytes % 1024 == 0, "swizzle atoms must stay 1024-byte aligned");
};

// ---------------------------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kSm90Threads, 1)
    chunk_attention_sm90_kernel(const ChunkAttnSm90Params p, const __grid_constant__ CUtensorMap tm_q,
                                const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v) {
  using L = Layout<D>;
  static_assert(kBN == 128, "the S = Q K^T wgmma is m64n128k16");
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;  // 128B-swizzle atoms must start 1024-byte aligned
  uint8_t* const base_ptr = smem_raw + (base - raw);
  const uint32_t sq = base + L::kQ, sk = base + L::kK, sv = base + L::kV;
  const uint32_t bar_q = base + L::kBar;
  auto bar_k_full = [&](int s) { return bar_q + 8u * (1 + s); };
  auto bar_v_full = [&](int s) { return bar_q + 8u * (1 + kStages + s); };
  auto bar_empty = [&](int s) { return bar_q + 8u * (1 + 2 * kStages + s); };

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int count = min(max(p.count[b], 0), p.slots);  // keys this batch row attends to
  const int n_tiles = (count + kBN - 1) / kBN;
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bar_k_full(s), 1);
      mbar_init(bar_v_full(s), 1);
      mbar_init(bar_empty(s), 256);  // every consumer thread arrives once it has read the stage
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the TMA (async) proxy
  }
  __syncthreads();

  if (wg == 0) {  // ---------------------------------------------------------------- producer warpgroup
    setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 0) {
      tma_prefetch_desc(&tm_q);
      tma_prefetch_desc(&tm_k);
      tma_prefetch_desc(&tm_v);
      mbar_arrive_expect_tx(bar_q, L::kQBytes);
      for (int c = 0; c < L::kSub; ++c) {
        tma_load_4d(sq + c * kBM * 128, &tm_q, bar_q, c * 64, h, m_block * kBM, b);
      }
      for (int i = 0; i < n_tiles; ++i) {
        const int s = i % kStages;
        const uint32_t phase = (i / kStages) & 1;
        mbar_wait_watchdog(bar_empty(s), phase ^ 1);  // the consumers released the tile that used this stage before
        mbar_arrive_expect_tx(bar_k_full(s), L::kTileBytes);
        for (int c = 0; c < L::kSub; ++c) {
          tma_load_4d(sk + s * L::kTileBytes + c * kBN * 128, &tm_k, bar_k_full(s), c * 64, h, i * kBN, b);
        }
        mbar_arrive_expect_tx(bar_v_full(s), L::kTileBytes);
        for (int c = 0; c < L::kSub; ++c) {
          tma_load_4d(sv + s * L::kTileBytes + c * kBN * 128, &tm_v, bar_v_full(s), c * 64, h, i * kBN, b);
        }
      }
    }
    return;
  }

  // ------------------------------------------------------------------------------------ consumer warpgroups
  setmaxnreg_inc<kConsumerRegs>();
  const int cw = wg - 1;            // consumer 0/1: query rows cw * 64 .. cw * 64 + 63 of the tile
  const int tid = threadIdx.x - 128 * wg;
  const int warp = tid / 32, lane = tid % 32;
  const float scale_log2 = p.scale * 1.4426950408889634f;  // softmax in base 2: e^(s x) = 2^(s log2(e) x)

  float o[D / 2];  // O accumulator (64 x D per warpgroup), fragment layout above
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max (times scale_log2) of rows l/4 and l/4 + 8
  float l_run[2] = {0.f, 0.f};  // this thread's part of the running denominators (quad-summed at the end)
  float sacc[64];               // S = Q K^T, 64 x 128 per warpgroup
  // P as the A fragments of the P V wgmma, double-buffered: the P V of tile i - 1 reads one buffer while the
  // softmax of tile i writes the other (no register copies between them: ptxas would serialize the wgmmas).
  uint32_t pa0[32], pa1[32];
  float alpha[2];

  // S = Q K^T of tile i (issued, not waited for)
  auto issue_qk = [&](int i) {
    const int s = i % kStages;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t da = sm90_kmajor_desc(sq, kBM, cw * 64, kk);  // this warpgroup's 64 Q rows
      const uint64_t db = sm90_kmajor_desc(sk + s * L::kTileBytes, kBN, 0, kk);
      Elem<T>::ss(sacc, da, db, kk > 0);
    }
    wgmma_commit();
  };
  // O += P V of tile i with P in pa (issued, not waited for)
  auto issue_pv = [&](int i, uint32_t(&pa)[32]) {
    const int s = i % kStages;
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t a[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
      Elem<T>::rs(o, a, sm90_v_desc(sv + s * L::kTileBytes, kk));
    }
    wgmma_commit();
  };
  // Online softmax of tile i's scores (sacc): mask keys >= count, new running max, alpha = rescale factor of the
  // old O and l, P = 2^(S * scale_log2 - m) rounded to 16 bits into pa, l updated.
  auto softmax = [&](int i, uint32_t(&pa)[32]) {
    if ((i + 1) * kBN > count) {  // only the last tile has keys >= count
      const int key0 = i * kBN + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < 16; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (key0 + 8 * j + e >= count) {
            sacc[4 * j + e] = -INFINITY;
            sacc[4 * j + 2 + e] = -INFINITY;
          }
        }
      }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(sacc[4 * j], sacc[4 * j + 1]));
      mx[1] = fmaxf(mx[1], fmaxf(sacc[4 * j + 2], sacc[4 * j + 3]));
    }
    float mb[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad share a row
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m_run[r], mx[r] * scale_log2);
      mb[r] = m_new == -INFINITY ? 0.f : m_new;  // no finite score in the row yet: subtract 0, not -inf
      alpha[r] = ex2(m_run[r] - mb[r]);           // 0 on the first tile (m_run = -inf)
      m_run[r] = m_new;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float p0 = ex2(fmaf(sacc[4 * j + 0], scale_log2, -mb[0]));
      const float p1 = ex2(fmaf(sacc[4 * j + 1], scale_log2, -mb[0]));
      const float p2 = ex2(fmaf(sacc[4 * j + 2], scale_log2, -mb[1]));
      const float p3 = ex2(fmaf(sacc[4 * j + 3], scale_log2, -mb[1]));
      rs[0] += p0 + p1;
      rs[1] += p2 + p3;
      pa[2 * j] = Elem<T>::pack(p0, p1);  // key block kk = j / 2 uses pa[4 kk .. 4 kk + 3]
      pa[2 * j + 1] = Elem<T>::pack(p2, p3);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rs[r];
  };

  // Ping-pong turns: consumer c waits on barrier kBarTurn + c (256 threads: its own 128 + the other consumer's
  // arrival), issues, then lets the other one go.  Both consumers take the same number of turns (n_tiles + 1);
  // consumer 0 goes first (consumer 1 arrives once up front), so consumer 1's last arrival stays unmatched,
  // which is harmless at exit.
  auto turn_begin = [&]() {
    if (kPingPong) named_barrier_sync(kBarTurn + cw, 256);
  };
  auto turn_end = [&]() {
    if (kPingPong) named_barrier_arrive(kBarTurn + (1 - cw), 256);
  };

  // One step of the main loop, tile i >= 1: P of tile i - 1 is in `cur`, P of tile i goes to `nxt`.
  auto step = [&](int i, uint32_t(&cur)[32], uint32_t(&nxt)[32]) {
    const int prev = (i - 1) % kStages;
    mbar_wait(bar_k_full(i % kStages), (i / kStages) & 1);
    reg_fence(sacc);
    reg_fence(o);
    reg_fence(cur);
    turn_begin();
    wgmma_fence();  // o and cur were last written by ordinary instructions
    issue_qk(i);
    mbar_wait(bar_v_full(prev), ((i - 1) / kStages) & 1);
    wgmma_fence();  // (ptxas would insert it: cur's registers are read by this second group)
    issue_pv(i - 1, cur);
    turn_end();
    wgmma_wait<1>();  // S of tile i is done (groups complete in order); P V of tile i - 1 may still run
    reg_fence(sacc);
    softmax(i, nxt);  // writes sacc, nxt, m, l, alpha: nothing the P V in flight reads or writes
    wgmma_wait<0>();
    reg_fence(o);
    reg_fence(cur);
    mbar_arrive(bar_empty(prev));  // this thread is done with tile i - 1's stage (K and V)
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[4 * j + 0] *= alpha[0];
      o[4 * j + 1] *= alpha[0];
      o[4 * j + 2] *= alpha[1];
      o[4 * j + 3] *= alpha[1];
    }
  };
  // The last P V (tile `last`, P in pa).
  auto finish = [&](int last, uint32_t(&pa)[32]) {
    mbar_wait(bar_v_full(last % kStages), (last / kStages) & 1);
    reg_fence(o);
    reg_fence(pa);
    turn_begin();
    wgmma_fence();
    issue_pv(last, pa);
    turn_end();
    wgmma_wait<0>();
    reg_fence(o);
    reg_fence(pa);
    mbar_arrive(bar_empty(last % kStages));
  };

  if (kPingPong && cw == 1) named_barrier_arrive(kBarTurn + 0, 256);  // consumer 0 takes the first turn
  mbar_wait(bar_q, 0);
  if (n_tiles > 0) {
    // Intra-warpgroup pipelining (FlashAttention-3, algorithm 2): S of tile i and P V of tile i - 1 are issued
    // together; the softmax of tile i runs as soon as S is done, overlapping P V of tile i - 1.
    mbar_wait(bar_k_full(0), 0);
    reg_fence(sacc);
    turn_begin();
    wgmma_fence();
    issue_qk(0);
    turn_end();
    wgmma_wait<0>();
    reg_fence(sacc);
    softmax(0, pa0);
    int i = 1;
    for (; i + 1 < n_tiles; i += 2) {  // unrolled by two: the P buffers swap roles without copies
      step(i, pa0, pa1);
      step(i + 1, pa1, pa0);
    }
    if (i < n_tiles) {
      step(i, pa0, pa1);
      finish(i, pa1);
    } else {
      finish(i - 1, pa0);
    }
  }

  // ---------------------------------------------------------------------------------------------- epilogue
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
  }
  // Stage O in this warpgroup's own Q rows (its last wgmma reading them has completed), same swizzle.
  const int row0 = cw * 64 + warp * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const uint32_t sub = (j / 8) * kBM * 128;
    const uint32_t byte = 4 * (lane % 4);
    *reinterpret_cast<uint32_t*>(base_ptr + L::kQ + sub + sw128_offset(row0, j % 8) + byte) =
        Elem<T>::pack(o[4 * j] * inv[0], o[4 * j + 1] * inv[0]);
    *reinterpret_cast<uint32_t*>(base_ptr + L::kQ + sub + sw128_offset(row0 + 8, j % 8) + byte) =
        Elem<T>::pack(o[4 * j + 2] * inv[1], o[4 * j + 3] * inv[1]);
  }
  named_barrier_sync(kBarEpilogue + cw, 128);
  constexpr int kChunks = D / 8;    // 16-byte chunks per output row
  char* const out = static_cast<char*>(p.out);
  for (int idx = tid; idx < 64 * kChunks; idx += 128) {
    const int r = cw * 64 + idx / kChunks, c = idx % kChunks;
    const int token = m_block * kBM + r;
    if (token < p.n) {
      const uint8_t* src = base_ptr + L::kQ + (c / 8) * kBM * 128 + sw128_offset(r, c % 8);
      const uint4 val = *reinterpret_cast<const uint4*>(src);
      const int64_t off = (b * p.out_stride[0] + token * p.out_stride[1] + h * p.out_stride[2]) + c * 8;
      *reinterpret_cast<uint4*>(out + off * static_cast<int64_t>(sizeof(T))) = val;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------
template <typename T, int D>
cudaError_t launch_typed(const ChunkAttnSm90Params& p, cudaStream_t stream) {
  const CUtensorMapDataType dt = Elem<T>::kTma;
  CUtensorMap tq, tk, tv;
  if (!encode_tile_map(&tq, dt, p.q, chunk_attention_sm90_tma_spec(p.batch, p.n, p.heads, D, p.q_stride, kBM)) ||
      !encode_tile_map(&tk, dt, p.k, chunk_attention_sm90_tma_spec(p.batch, p.slots, p.heads, D, p.k_stride, kBN)) ||
      !encode_tile_map(&tv, dt, p.v, chunk_attention_sm90_tma_spec(p.batch, p.slots, p.heads, D, p.v_stride, kBN))) {
    return cudaErrorInvalidValue;
  }
  auto kernel = chunk_attention_sm90_kernel<T, D>;
  const int smem = Layout<D>::kBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, kBM)), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, kSm90Threads, smem, stream>>>(p, tq, tk, tv);
  return cudaGetLastError();
}

}  // namespace

int chunk_attention_sm90_smem_bytes(int head_dim) {
  return head_dim == 64 ? Layout<64>::kBytes : head_dim == 128 ? Layout<128>::kBytes : 0;
}

const char* check_chunk_attention_sm90(const ChunkAttnSm90Params& p) {
  if (!p.q || !p.k || !p.v || !p.out || !p.count) return "q, k, v, out and count must be device pointers";
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return "dtype must be float16 or bfloat16";
  if (p.head_dim != 64 && p.head_dim != 128) return "head_dim must be 64 or 128";
  if (p.batch < 1 || p.n < 1 || p.slots < 1 || p.heads < 1) return "batch, n, slots and heads must be >= 1";
  if (p.heads > 65535 || p.batch > 65535) return "heads and batch must be <= 65535 (grid dimensions)";
  for (const void* ptr : {p.q, p.k, p.v, static_cast<const void*>(p.out)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16) return "q, k, v and out must be 16-byte aligned";
  }
  const int64_t ext[3] = {p.batch, 0, p.heads};
  for (int i = 0; i < 3; ++i) {
    const int64_t e_q = i == 1 ? p.n : ext[i], e_kv = i == 1 ? p.slots : ext[i];
    if (!sm90_tma_stride_ok(e_q, p.q_stride[i]) || !sm90_tma_stride_ok(e_kv, p.k_stride[i]) ||
        !sm90_tma_stride_ok(e_kv, p.v_stride[i]) || !sm90_tma_stride_ok(e_q, p.out_stride[i])) {
      return "strides (batch, token, head) must be positive multiples of 8 elements (16 bytes) below 2^39";
    }
  }
  return nullptr;
}

cudaError_t launch_chunk_attention_sm90(const ChunkAttnSm90Params& p, cudaStream_t stream) {
  if (check_chunk_attention_sm90(p) != nullptr) return cudaErrorInvalidValue;
  if (tensor_map_encoder() == nullptr) return cudaErrorNotSupported;
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 128) {
    return bf16 ? launch_typed<__nv_bfloat16, 128>(p, stream) : launch_typed<__half, 128>(p, stream);
  }
  return bf16 ? launch_typed<__nv_bfloat16, 64>(p, stream) : launch_typed<__half, 64>(p, stream);
}

}  // namespace lipforcing
