// SPDX-License-Identifier: Apache-2.0
// CUDA kernel of lipforcing.ops.denoise_update: the fused flow-matching step between two student passes.
//
//   x0     = x_t - t * flow
//   x_next = (1 - t_next) * x0 + t_next * eps
//
// eps is read from a tensor or drawn in the kernel with Philox4x32-10 (Salmon et al., SC'11) and Box-Muller, in
// the counter scheme documented in lipforcing/ops/reference.py (element i: counter (i_lo, i_hi, offset_lo,
// offset_hi), key (seed_lo, seed_hi); u1 = ((r0 >> 8) + 1) 2^-24, u2 = (r1 >> 8) 2^-24; eps = sqrt(-2 ln u1)
// cos(2 pi u2)).  t, t_next, seed and offset may be device scalars read by the kernel, so the launch needs no host
// sync and a captured CUDA graph can change them between replays.
//
// Float math uses the __f*_rn intrinsics (no FMA contraction) in the reference's order: with an explicit noise
// tensor the result is bitwise the reference's; drawn noise differs only by the ulp-level rounding of logf/cosf.
//
// Two kernels: a vectorised one (16-byte loads/stores) when x_t, flow, noise and both outputs share one dtype and
// are 16-byte aligned, and a scalar one with per-element dtype switches for every other combination.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "lipforcing/denoise_update.h"

namespace lipforcing {
namespace {

constexpr int kThreads = 256;  // with __launch_bounds__(kThreads, 4): at most 64 registers, 4 blocks per SM
// Grid-stride loops keep the grid at most this many blocks (plenty to fill any GPU, far below the 2^31 limit).
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

enum NoiseMode : int { kNoNoise = 0, kNoiseTensor = 1, kNoisePhilox = 2 };

// ----------------------------------------------------------------------------------------------- Philox + Box-Muller
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key increments
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Key {
  uint32_t k0, k1;  // seed lo, hi
  uint32_t c2, c3;  // offset lo, hi
};

// Standard normal sample of flat element i (only r0, r1 of the Philox block are used).
__device__ __forceinline__ float philox_normal(uint64_t i, const Key& key) {
  uint32_t c0 = static_cast<uint32_t>(i), c1 = static_cast<uint32_t>(i >> 32), c2 = key.c2, c3 = key.c3;
  uint32_t k0 = key.k0, k1 = key.k1;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(c0) * kPhiloxM0;  // one wide multiply gives hi and lo words
    const uint64_t p1 = static_cast<uint64_t>(c2) * kPhiloxM1;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // Top 24 bits of each word, exactly representable in float32: u1 in (0, 1] keeps log finite, u2 in [0, 1).
  const float u1 = __fmul_rn(static_cast<float>((c0 >> 8) + 1u), 5.9604644775390625e-08f);
  const float u2 = __fmul_rn(static_cast<float>(c1 >> 8), 5.9604644775390625e-08f);
  const float radius = sqrtf(__fmul_rn(-2.0f, logf(u1)));  // IEEE sqrt (no fast-math in this build)
  return __fmul_rn(radius, cosf(__fmul_rn(u2, 6.28318548f)));  // 6.28318548f = float32(2 pi), as the reference
}

// ----------------------------------------------------------------------------------------------- dtype helpers
template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float load_f32(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_f32(void* p, DType d, int64_t i, float v) {
  switch (d) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// ----------------------------------------------------------------------------------------------- per-launch scalars
// Values every thread needs, read once per thread from the params (and device memory where they live there).
struct Scalars {
  float t, t_next, one_minus_t_next;  // for kValue / kScalar modes
  Key key;
};

__device__ __forceinline__ uint64_t load_u64(const int64_t* ptr, uint64_t value) {
  return ptr != nullptr ? static_cast<uint64_t>(*ptr) : value;
}

__device__ __forceinline__ Scalars load_scalars(const DenoiseUpdateParams& p, int noise_mode) {
  Scalars s;
  s.t = p.t_mode == TimeMode::kScalar ? load_f32(p.t, p.t_dtype, 0) : p.t_value;
  if (p.t_next_mode == TimeMode::kScalar) {
    s.t_next = load_f32(p.t_next, p.t_next_dtype, 0);
    s.one_minus_t_next = __fsub_rn(1.0f, s.t_next);
  } else {
    s.t_next = p.t_next_value;
    s.one_minus_t_next = p.one_minus_t_next_value;
  }
  s.key = Key{0u, 0u, 0u, 0u};
  if (noise_mode == kNoisePhilox) {
    const uint64_t seed = load_u64(p.seed, p.seed_value);
    const uint64_t offset = load_u64(p.offset, p.offset_value);
    s.key = Key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(offset),
                static_cast<uint32_t>(offset >> 32)};
  }
  return s;
}

// x0 and x_next of element i from its float32 inputs.  `sample` is i's batch index (per-sample modes only).
template <int kNoise>
__device__ __forceinline__ void step(const DenoiseUpdateParams& p, const Scalars& s, int64_t i, int64_t sample,
                                     float x, float f, float n, float& x0, float& xn) {
  const float t = p.t_mode == TimeMode::kPerSample ? load_f32(p.t, p.t_dtype, sample) : s.t;
  x0 = __fsub_rn(x, __fmul_rn(t, f));
  if (kNoise == kNoNoise) {
    xn = x0;  // t_next == 0: 1 * x0 + 0 * eps == x0 for finite eps
    return;
  }
  float tn = s.t_next, omtn = s.one_minus_t_next;
  if (p.t_next_mode == TimeMode::kPerSample) {
    tn = load_f32(p.t_next, p.t_next_dtype, sample);
    omtn = __fsub_rn(1.0f, tn);
  }
  const float eps = kNoise == kNoiseTensor ? n : philox_normal(static_cast<uint64_t>(i), s.key);
  xn = __fadd_rn(__fmul_rn(omtn, x0), __fmul_rn(tn, eps));
}

// ----------------------------------------------------------------------------------------------- kernels
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// All of x_t, flow, noise (if any), x0_out, x_next_out have dtype T and 16-byte alignment.
template <typename T, int kNoise>
__global__ void __launch_bounds__(kThreads, 4) denoise_update_vec_kernel(const DenoiseUpdateParams p) {
  constexpr int kVec = 16 / sizeof(T);
  using P = Pack<T, kVec>;
  const Scalars s = load_scalars(p, kNoise);
  const bool per_sample = p.t_mode == TimeMode::kPerSample || p.t_next_mode == TimeMode::kPerSample;
  const int64_t nvec = p.numel / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const int64_t i0 = v * kVec;
    const P xv = reinterpret_cast<const P*>(p.x_t)[v];
    const P fv = reinterpret_cast<const P*>(p.flow)[v];
    P nv;
    if (kNoise == kNoiseTensor) nv = reinterpret_cast<const P*>(p.noise)[v];
    int64_t sample = 0, next_boundary = INT64_MAX;
    if (per_sample) {
      sample = i0 / p.per_sample;
      next_boundary = (sample + 1) * p.per_sample;
    }
    P x0v, xnv;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t i = i0 + j;
      while (i >= next_boundary) {  // a vector can straddle samples when per_sample is not a multiple of kVec
        ++sample;
        next_boundary += p.per_sample;
      }
      float x0, xn;
      step<kNoise>(p, s, i, sample, to_f32(xv.v[j]), to_f32(fv.v[j]),
                   kNoise == kNoiseTensor ? to_f32(nv.v[j]) : 0.f, x0, xn);
      x0v.v[j] = from_f32<T>(x0);
      xnv.v[j] = from_f32<T>(xn);
    }
    reinterpret_cast<P*>(p.x0_out)[v] = x0v;
    reinterpret_cast<P*>(p.x_next_out)[v] = xnv;
  }
  // Tail (numel % kVec elements): the first threads of block 0 take one element each.
  const int64_t tail = nvec * kVec;
  if (blockIdx.x == 0 && tail + threadIdx.x < p.numel) {
    const int64_t i = tail + threadIdx.x;
    const T* x = static_cast<const T*>(p.x_t);
    const T* f = static_cast<const T*>(p.flow);
    const float n = kNoise == kNoiseTensor ? to_f32(static_cast<const T*>(p.noise)[i]) : 0.f;
    float x0, xn;
    step<kNoise>(p, s, i, per_sample ? i / p.per_sample : 0, to_f32(x[i]), to_f32(f[i]), n, x0, xn);
    static_cast<T*>(p.x0_out)[i] = from_f32<T>(x0);
    static_cast<T*>(p.x_next_out)[i] = from_f32<T>(xn);
  }
}

// Any dtype combination and alignment: one element per thread per iteration, dtypes switched at run time.
template <int kNoise>
__global__ void __launch_bounds__(kThreads, 4) denoise_update_generic_kernel(const DenoiseUpdateParams p) {
  const Scalars s = load_scalars(p, kNoise);
  const bool per_sample = p.t_mode == TimeMode::kPerSample || p.t_next_mode == TimeMode::kPerSample;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel; i += stride) {
    const float x = load_f32(p.x_t, p.x_dtype, i);
    const float f = load_f32(p.flow, p.x_dtype, i);
    const float n = kNoise == kNoiseTensor ? load_f32(p.noise, p.noise_dtype, i) : 0.f;
    float x0, xn;
    step<kNoise>(p, s, i, per_sample ? i / p.per_sample : 0, x, f, n, x0, xn);
    store_f32(p.x0_out, p.x0_dtype, i, x0);
    store_f32(p.x_next_out, p.x_next_dtype, i, xn);
  }
}

bool valid_dtype(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
}

bool valid_mode(TimeMode m) {
  return m == TimeMode::kValue || m == TimeMode::kScalar || m == TimeMode::kPerSample;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

int64_t blocks_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b);
}

template <typename T, int kNoise>
void launch_vec(const DenoiseUpdateParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t work = p.numel / kVec > 0 ? p.numel / kVec : 1;  // at least one block for the tail
  denoise_update_vec_kernel<T, kNoise><<<static_cast<unsigned>(blocks_for(work)), kThreads, 0, stream>>>(p);
}

template <int kNoise>
void launch_for_noise(const DenoiseUpdateParams& p, bool uniform, cudaStream_t stream) {
  if (uniform) {
    switch (p.x_dtype) {
      case DType::kFloat16: return launch_vec<__half, kNoise>(p, stream);
      case DType::kBFloat16: return launch_vec<__nv_bfloat16, kNoise>(p, stream);
      default: return launch_vec<float, kNoise>(p, stream);
    }
  }
  denoise_update_generic_kernel<kNoise><<<static_cast<unsigned>(blocks_for(p.numel)), kThreads, 0, stream>>>(p);
}

}  // namespace

cudaError_t launch_denoise_update(const DenoiseUpdateParams& p, cudaStream_t stream) {
  if (p.numel < 0 || p.per_sample < 1) return cudaErrorInvalidValue;
  if (p.numel == 0) return cudaSuccess;
  if (!p.x_t || !p.flow || !p.x0_out || !p.x_next_out) return cudaErrorInvalidValue;
  if (!valid_dtype(p.x_dtype) || !valid_dtype(p.x0_dtype) || !valid_dtype(p.x_next_dtype) ||
      !valid_dtype(p.noise_dtype) || !valid_dtype(p.t_dtype) || !valid_dtype(p.t_next_dtype)) {
    return cudaErrorInvalidValue;
  }
  if (!valid_mode(p.t_mode) || !valid_mode(p.t_next_mode)) return cudaErrorInvalidValue;
  if ((p.t_mode != TimeMode::kValue && !p.t) || (p.t_next_mode != TimeMode::kValue && !p.t_next)) {
    return cudaErrorInvalidValue;
  }

  int noise_mode;
  if (p.noise != nullptr) {
    noise_mode = kNoiseTensor;
  } else if (p.t_next_mode == TimeMode::kValue && p.t_next_value == 0.0f) {
    noise_mode = kNoNoise;
  } else {
    noise_mode = kNoisePhilox;
  }
  const bool uniform = p.x0_dtype == p.x_dtype && p.x_next_dtype == p.x_dtype &&
                       (noise_mode != kNoiseTensor || p.noise_dtype == p.x_dtype) && aligned16(p.x_t) &&
                       aligned16(p.flow) && aligned16(p.x0_out) && aligned16(p.x_next_out) &&
                       (noise_mode != kNoiseTensor || aligned16(p.noise));
  switch (noise_mode) {
    case kNoNoise: launch_for_noise<kNoNoise>(p, uniform, stream); break;
    case kNoiseTensor: launch_for_noise<kNoiseTensor>(p, uniform, stream); break;
    default: launch_for_noise<kNoisePhilox>(p, uniform, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace lipforcing
