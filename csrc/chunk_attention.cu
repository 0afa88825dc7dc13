// SPDX-License-Identifier: Apache-2.0
// chunk_attention forward: FlashAttention-2 (Dao, 2023) on tensor cores (mma.sync m16n8k16, sm_80+), fp16/bf16
// inputs, fp32 accumulation and online softmax in base 2.
//
// One CTA = 64 query rows of one (batch, head): 4 warps x 16 rows; Q fragments stay in registers.  Keys are
// walked in tiles of 64 over a virtual index j in [0, n_sink + n_ring + n):
//     j <  n_sink            cache slot j              (stream token j)
//     j <  n_sink + n_ring   cache slot sink + r       (r = j - n_sink; token sink + m - ((m - r) mod ring),
//                                                        m = pos - 1 - sink: the newest token in that slot)
//     else                   current chunk row j - n_sink - n_ring (token pos + row)
// with n_sink = min(pos, sink) and n_ring = min(max(pos - sink, 0), ring): the written cache slots are prefixes of
// the sink and of the ring.  The ring holds a whole window (ring = window, RollingKVCache's layout), so its
// chunk_size oldest tokens (< lo = max(pos + chunk - window, sink)) are stale: their rows stay unresolved (nullptr)
// and their scores are masked, like the tail of the last tile.  The kernel attends before the write.  `pos` is read
// from device memory by the kernel (no host sync; CUDA-graph safe).
//
// Key tiles go through a two-stage shared-memory ring (cp.async.cg, 16 B per copy): while tile j is computed, tile
// j + 1's rows are already in flight into the other stage (commit_group / wait_group 1).  Per tile the first 64
// threads resolve each row's K/V address (and RoPE positions) into that stage's row table, all threads issue the
// copies (masked rows are zero-filled), then each warp computes S = Q K^T (mma; Q fragments loaded once and K
// fragments per tile by ldmatrix), the online softmax in registers, and O += P V with P reused from the S
// accumulators and V fragments loaded by ldmatrix.trans.  Shared memory: 2 stages x (K, V) x 64 x (D + 8) x 2 B
// (68 KB at D = 128, dynamic, opted in above 48 KB) plus 3 KB of row tables: 2 CTAs per SM on sm_80/sm_90, 1 on
// sm_86/89 (100 KB per SM; the single-stage kernel fitted 2 there).
//
// Dynamic RoPE (rope tables given): pairs (x[2i], x[2i+1]) rotate by the Wan 3-D angles; the time row is the
// window-relative frame (min(a, sink) + max(0, a - lo)) / tokens_per_frame with lo = max(pos + chunk - window,
// sink), height/width rows come from a % tokens_per_frame.  Rotation in fp32, rounded to the input dtype.  Q is
// rotated as it is loaded; cp.async cannot transform, so each K tile is rotated in place in shared memory after it
// lands (same arithmetic and rounding, one more barrier per tile).
#include "lipforcing/chunk_attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace lipforcing {
namespace {

constexpr int kBlockM = 64;   // query rows per CTA (4 warps x 16 rows)
constexpr int kBlockN = 64;   // keys per tile
constexpr int kThreads = 128;
constexpr int kPad = 8;       // smem row padding in elements: row starts differ by 16 B mod 128 B, so the
                              // 32-bit fragment loads and ldmatrix row reads hit distinct banks

template <typename T>
struct Num;

template <>
struct Num<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// D(16x8, fp32) += A(16x16, row) * B(16x8, col).  Fragment layout (g = lane / 4, t = lane % 4):
// a = {A[g][2t..2t+1], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]}, b = {B[2t..2t+1][g], B[2t+8..][g]},
// c = {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}.
template <typename T>
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices: thread 8i+r gives the address of row r of matrix i; register i receives matrix i's
// elements (row g, cols 2t and 2t+1) -- for a row-major tile, exactly an mma A fragment (matrices: rows +0/+8 x
// cols +0/+8) or two B fragments of K^T (matrices: keys +0/+8 x dims +0/+8).
__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_u32(smem)));
#endif
}

// The same, transposed: register i receives matrix i's elements (row 2t, col g) and (row 2t+1, col g).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                                  const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_u32(smem)));
#endif
}

// 16-byte asynchronous copy global -> shared (L2 only, .cg); with !valid nothing is read and the 16 bytes are
// zero-filled (src-size 0).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {  // until at most N committed groups are still in flight
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Rotate the 8 elements (4 adjacent pairs, first pair index c / 2) of one 16-byte vector.
template <typename T>
__device__ __forceinline__ void rope_rotate8(uint4& vec, int64_t frame, int64_t in_frame, int c,
                                             const ChunkAttnParams& p, int half, int rope_t, int rope_th) {
  T* x = reinterpret_cast<T*>(&vec);
  const int64_t hpos = in_frame / p.grid_w;
  const int64_t wpos = in_frame - hpos * p.grid_w;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int j = c / 2 + e;
    const int64_t row = j < rope_t ? frame : (j < rope_th ? hpos : wpos);
    const float cs = __ldg(p.rope_cos + row * half + j);
    const float sn = __ldg(p.rope_sin + row * half + j);
    const float a = Num<T>::to_float(x[2 * e]);
    const float b = Num<T>::to_float(x[2 * e + 1]);
    x[2 * e] = Num<T>::from_float(a * cs - b * sn);  // (a + ib)(cos + i sin)
    x[2 * e + 1] = Num<T>::from_float(a * sn + b * cs);
  }
}

__device__ __forceinline__ int64_t window_frame(int64_t a, int64_t lo, int sink, int tpf) {
  return (min(a, static_cast<int64_t>(sink)) + max(a - lo, static_cast<int64_t>(0))) / tpf;
}

// Shared memory of one CTA: the K and V tiles of two pipeline stages, rows padded by kPad.
template <int D>
constexpr size_t fwd_smem_bytes() {
  return static_cast<size_t>(2 * 2 * kBlockN * (D + kPad)) * 2;  // 2 stages x (K, V) x 64 rows x 2-byte elements
}

// Row table of one key tile, filled by the first 64 threads (warps 0 and 1, one row each).
struct TileRows {
  const void* k[kBlockN];  // row addresses (nullptr = past the end, or a stale ring slot: zero-filled, masked)
  const void* v[kBlockN];
  uint32_t valid[2];       // bit r of word r / 32: row r has a key (the score mask)
  int32_t frame[kBlockN];  // RoPE: window-relative frame and in-frame index of each key
  int32_t in_frame[kBlockN];
};

template <typename T, int D, bool ROPE>
__global__ void __launch_bounds__(kThreads) chunk_attention_fwd_kernel(const ChunkAttnParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  constexpr int kStride = D + kPad;
  constexpr int kVecPerRow = D / 8;
  constexpr int kTileElems = kBlockN * kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sK = reinterpret_cast<T*>(smem_raw);  // stage s: sK + s * kTileElems
  T* const sV = sK + 2 * kTileElems;
  __shared__ TileRows rows[2];                   // row table of each stage

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t4 = lane & 3;
  const int m0 = blockIdx.x * kBlockM;
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;

  const int64_t pos = *p.pos;
  const int64_t lo = max(pos + p.chunk_size - p.window, static_cast<int64_t>(p.sink));
  const int64_t n_sink = min(pos, static_cast<int64_t>(p.sink));
  const int64_t n_ring = min(max(pos - p.sink, static_cast<int64_t>(0)), static_cast<int64_t>(p.ring));
  const int64_t total = n_sink + n_ring + p.n;
  const int tpf = p.grid_h * p.grid_w;
  const int half = D / 2;
  const int rope_t = half - 2 * (half / 3);
  const int rope_th = rope_t + half / 3;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* kc = static_cast<const T*>(p.k_cache) + b * p.kc_stride[0] + h * p.kc_stride[2];
  const T* vc = static_cast<const T*>(p.v_cache) + b * p.vc_stride[0] + h * p.vc_stride[2];
  const T* kn = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[2];
  const T* vn = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[2];

  // Row table of key tile `tile` into rows[st] (threads 0..63; whole warps, so the ballot is warp-uniform).
  auto resolve = [&](int64_t tile, int st) {
    if (tid >= kBlockN) return;
    const int64_t j = tile * kBlockN + tid;
    const T* kp = nullptr;
    const T* vp = nullptr;
    int64_t a = 0;
    if (j < n_sink) {
      kp = kc + j * p.kc_stride[1];
      vp = vc + j * p.vc_stride[1];
      a = j;
    } else if (j < n_sink + n_ring) {
      const int64_t r = j - n_sink;
      const int64_t mm = pos - 1 - p.sink;  // >= r here
      a = p.sink + mm - (mm - r) % p.ring;
      if (a >= lo) {  // the ring holds a whole window: its chunk_size oldest tokens are stale (left masked)
        kp = kc + (p.sink + r) * p.kc_stride[1];
        vp = vc + (p.sink + r) * p.vc_stride[1];
      }
    } else if (j < total) {
      const int64_t c = j - n_sink - n_ring;
      kp = kn + c * p.k_stride[1];
      vp = vn + c * p.v_stride[1];
      a = pos + c;
    }
    rows[st].k[tid] = kp;
    rows[st].v[tid] = vp;
    const uint32_t bits = __ballot_sync(0xffffffffu, kp != nullptr);
    if (lane == 0) rows[st].valid[warp] = bits;
    if (ROPE) {
      rows[st].frame[tid] = static_cast<int32_t>(window_frame(a, lo, p.sink, tpf));
      rows[st].in_frame[tid] = static_cast<int32_t>(a % tpf);
    }
  };
  // Asynchronous copies of the K and V rows of rows[st] into stage st (one commit group; rows[st] must be visible
  // to every thread, i.e. a barrier after resolve).
  auto issue = [&](int st) {
    T* dk = sK + st * kTileElems;
    T* dv = sV + st * kTileElems;
    for (int vi = tid; vi < kBlockN * kVecPerRow; vi += kThreads) {
      const int r = vi / kVecPerRow;
      const int c = (vi % kVecPerRow) * 8;
      const T* kp = static_cast<const T*>(rows[st].k[r]);
      const T* vp = static_cast<const T*>(rows[st].v[r]);
      const bool ok = kp != nullptr;
      cp_async16(dk + r * kStride + c, ok ? kp + c : kn, ok);  // zero-filled when masked (kn: any valid address)
      cp_async16(dv + r * kStride + c, ok ? vp + c : vn, ok);
    }
    cp_async_commit();
  };

  const int64_t n_tiles = (total + kBlockN - 1) / kBlockN;  // >= 1 (p.n >= 1)
  // ---- start the copy of key tile 0, then stage the Q tile (rotated) through sK's stage 1 while it flies
  resolve(0, 0);
  __syncthreads();
  issue(0);
  {
    T* sQ = sK + kTileElems;
    for (int vi = tid; vi < kBlockM * kVecPerRow; vi += kThreads) {
      const int r = vi / kVecPerRow;
      const int c = (vi % kVecPerRow) * 8;
      const int i = m0 + r;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (i < p.n) {
        val = *reinterpret_cast<const uint4*>(q + i * p.q_stride[1] + c);
        if (ROPE) {
          const int64_t a = pos + i;
          rope_rotate8<T>(val, window_frame(a, lo, p.sink, tpf), a % tpf, c, p, half, rope_t, rope_th);
        }
      }
      *reinterpret_cast<uint4*>(&sQ[r * kStride + c]) = val;
    }
  }
  __syncthreads();
  // Q fragments by ldmatrix: lane 8i+r addresses row r of matrix i = (rows +8 if i odd, cols +8 if i >= 2)
  uint32_t qf[D / 16][4];
  const int qr = warp * 16 + g;
  {
    const T* sQ = sK + kTileElems;
    const T* qrow = &sQ[(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], qrow + kk * 16);
  }
  __syncthreads();  // stage 1 is refilled by tile 1's copies below

  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};  // this thread's partial row sums (reduced over the 4-thread group at the end)
  const float scale_log2 = p.scale * 1.4426950408889634f;
  // K fragments by ldmatrix: matrix i = (keys +8 if i >= 2, dims +8 if i odd) gives b0, b1 of key block 2np and
  // b0, b1 of key block 2np + 1
  const int k_off = ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
  // V fragments by ldmatrix.trans: matrix i = (keys +8 if i odd, dims +8 if i >= 2)
  const int v_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;

  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    const int st = static_cast<int>(tile & 1);
    // ---- two-stage pipeline: start tile + 1's copies into the other stage, wait for this tile's
    if (tile + 1 < n_tiles) {
      resolve(tile + 1, st ^ 1);  // rows[st ^ 1] was last read by tile - 1, before its closing barrier
      __syncthreads();
      issue(st ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this tile's rows are in stage st for every thread
    const T* tK = sK + st * kTileElems;
    const T* tV = sV + st * kTileElems;
    if (ROPE) {
      // cp.async cannot transform: rotate the landed K rows in place (fp32, rounded to T, as before)
      T* wK = sK + st * kTileElems;
      for (int vi = tid; vi < kBlockN * kVecPerRow; vi += kThreads) {
        const int r = vi / kVecPerRow;
        const int c = (vi % kVecPerRow) * 8;
        if ((rows[st].valid[r >> 5] >> (r & 31)) & 1u) {
          uint4* ptr = reinterpret_cast<uint4*>(&wK[r * kStride + c]);
          uint4 kv = *ptr;
          rope_rotate8<T>(kv, rows[st].frame[r], rows[st].in_frame[r], c, p, half, rope_t, rope_th);
          *ptr = kv;
        }
      }
      __syncthreads();
    }
    const uint32_t valid0 = rows[st].valid[0];
    const uint32_t valid1 = rows[st].valid[1];

    // ---- S = Q K^T (16 rows x 64 keys per warp)
    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int np = 0; np < kBlockN / 16; ++np) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4(b0, b1, b2, b3, tK + np * 16 * kStride + kk * 16 + k_off);
        mma_16816<T>(s[2 * np], qf[kk], b0, b1);
        mma_16816<T>(s[2 * np + 1], qf[kk], b2, b3);
      }
    }
    // ---- scale to base 2, mask keys past the end, online softmax
    float mx0 = m_run[0];
    float mx1 = m_run[1];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      const uint32_t word = nt < 4 ? valid0 : valid1;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = (nt * 8 + 2 * t4 + (e & 1)) & 31;
        // masked keys (past the end, or stale ring slots) are selected away: their K/V rows were zero-filled
        s[nt][e] = (word >> col) & 1u ? s[nt][e] * scale_log2 : -INFINITY;
      }
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // a tile can be fully masked (stale ring slots): keep -inf - -inf from giving NaN
    const float ms0 = mx0 == -INFINITY ? 0.f : mx0;
    const float ms1 = mx1 == -INFINITY ? 0.f : mx1;
    const float alpha0 = exp2f(m_run[0] - ms0);  // 0 on the first tile (m_run = -inf, mx finite)
    const float alpha1 = exp2f(m_run[1] - ms1);
    m_run[0] = mx0;
    m_run[1] = mx1;
    float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - ms0);
      s[nt][1] = exp2f(s[nt][1] - ms0);
      s[nt][2] = exp2f(s[nt][2] - ms1);
      s[nt][3] = exp2f(s[nt][3] - ms1);
      rs0 += s[nt][0] + s[nt][1];
      rs1 += s[nt][2] + s[nt][3];
    }
    l_run[0] = l_run[0] * alpha0 + rs0;
    l_run[1] = l_run[1] * alpha1 + rs1;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o[dn][0] *= alpha0;
      o[dn][1] *= alpha0;
      o[dn][2] *= alpha1;
      o[dn][3] *= alpha1;
    }
    // ---- O += P V: the S accumulators of key tiles 2kk, 2kk+1 are exactly the A fragment of P[:, 16kk..]
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = Num<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = Num<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = Num<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = Num<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dn2 = 0; dn2 < D / 16; ++dn2) {
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4_trans(b0, b1, b2, b3, tV + kk * 16 * kStride + dn2 * 16 + v_off);
        mma_16816<T>(o[2 * dn2], pa, b0, b1);
        mma_16816<T>(o[2 * dn2 + 1], pa, b2, b3);
      }
    }
    __syncthreads();  // stage st and rows[st] are refilled by the next iteration (tile + 2)
  }

  // ---- normalise and store
  float l0 = l_run[0], l1 = l_run[1];
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = 1.f / l0;
  const float inv1 = 1.f / l1;
  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[2];
  const int row0 = m0 + qr;
  const int row1 = row0 + 8;
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    const int col = dn * 8 + 2 * t4;
    if (row0 < p.n) {
      *reinterpret_cast<uint32_t*>(out + row0 * p.out_stride[1] + col) =
          Num<T>::pack(o[dn][0] * inv0, o[dn][1] * inv0);
    }
    if (row1 < p.n) {
      *reinterpret_cast<uint32_t*>(out + row1 * p.out_stride[1] + col) =
          Num<T>::pack(o[dn][2] * inv1, o[dn][3] * inv1);
    }
  }
#else
  __trap();  // built for an architecture without mma.sync m16n8k16 (needs sm_80+)
#endif
}

// One block per (chunk token, batch): copy the token's K and V rows (all heads) into its cache slot, unless a
// newer token of the same chunk maps to the same ring slot (chunk longer than the ring) -- the rule of
// reference.cache_write_ref.  Dtype-agnostic 16-byte copies (cache and chunk share the dtype).
__global__ void chunk_cache_write_kernel(const ChunkAttnParams p) {
  const int64_t j = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t pos = *p.pos;
  const int64_t a = pos + j;
  int64_t slot;
  if (a < p.sink) {
    slot = a;
  } else {
    if (p.ring == 0 || a + p.ring < pos + p.n) return;  // no ring, or overwritten later in this chunk
    slot = p.sink + (a - p.sink) % p.ring;
  }
  const int esize = p.dtype == DType::kFloat32 ? 4 : 2;
  const int vec_per_head = p.head_dim * esize / 16;
  const char* k = static_cast<const char*>(p.k);
  const char* v = static_cast<const char*>(p.v);
  char* kc = static_cast<char*>(p.k_cache);
  char* vc = static_cast<char*>(p.v_cache);
  for (int vi = threadIdx.x; vi < p.heads * vec_per_head; vi += blockDim.x) {
    const int64_t h = vi / vec_per_head;
    const int64_t byte = (vi % vec_per_head) * 16;
    const int64_t src_k = (b * p.k_stride[0] + j * p.k_stride[1] + h * p.k_stride[2]) * esize + byte;
    const int64_t src_v = (b * p.v_stride[0] + j * p.v_stride[1] + h * p.v_stride[2]) * esize + byte;
    const int64_t dst_k = (b * p.kc_stride[0] + slot * p.kc_stride[1] + h * p.kc_stride[2]) * esize + byte;
    const int64_t dst_v = (b * p.vc_stride[0] + slot * p.vc_stride[1] + h * p.vc_stride[2]) * esize + byte;
    *reinterpret_cast<uint4*>(kc + dst_k) = *reinterpret_cast<const uint4*>(k + src_k);
    *reinterpret_cast<uint4*>(vc + dst_v) = *reinterpret_cast<const uint4*>(v + src_v);
  }
}

__global__ void advance_pos_kernel(int64_t* pos, int n) { *pos += n; }

template <typename T, int D>
cudaError_t launch_fwd(const ChunkAttnParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, kBlockM)), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  auto kernel = p.rope_cos != nullptr ? chunk_attention_fwd_kernel<T, D, true>
                                       : chunk_attention_fwd_kernel<T, D, false>;
  constexpr size_t smem = fwd_smem_bytes<D>();  // 69632 B at D = 128: above the 48 KB default, opt in
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd_dim(const ChunkAttnParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_fwd<T, 64>(p, stream);
    case 128: return launch_fwd<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool chunk_attention_supports_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

cudaError_t launch_chunk_attention(const ChunkAttnParams& params, cudaStream_t stream) {
  // RollingKVCache holds sink + window slots: the ring is a whole window (its oldest chunk_size tokens are stale
  // between chunks and masked above), whatever ring value the caller passed.
  ChunkAttnParams p = params;
  p.ring = p.window;
  if (p.n <= 0 || p.batch <= 0 || p.heads <= 0 || p.batch > 65535 || p.heads > 65535 || p.grid_w <= 0 ||
      p.grid_h <= 0 || p.ring < 0 || p.sink < 0 || p.window < p.chunk_size || p.n > p.chunk_size) {
    return cudaErrorInvalidValue;
  }
  if (p.rope_cos != nullptr && p.rope_sin == nullptr) return cudaErrorInvalidValue;
  cudaError_t err;
  switch (p.dtype) {
    case DType::kFloat16: err = launch_fwd_dim<__half>(p, stream); break;
    case DType::kBFloat16: err = launch_fwd_dim<__nv_bfloat16>(p, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || !p.write) return err;
  chunk_cache_write_kernel<<<dim3(static_cast<unsigned>(p.n), static_cast<unsigned>(p.batch)), 128, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  advance_pos_kernel<<<1, 1, 0, stream>>>(p.pos, p.n);  // after the write kernel has read pos (stream order)
  return cudaGetLastError();
}

}  // namespace lipforcing
