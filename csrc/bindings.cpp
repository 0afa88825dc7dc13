// SPDX-License-Identifier: Apache-2.0
// The only pybind11 file.  Python passes raw device pointers as integers, int64 sizes/strides, a dtype code
// (lipforcing::DType) and the CUDA stream handle; every launcher returns cudaError_t, turned here into a
// RuntimeError carrying cudaGetErrorString.  Bad arguments raise ValueError (std::invalid_argument).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "lipforcing/common.h"
#include "lipforcing/runtime.h"
#include "lipforcing/chunk_attention.h"
#include "lipforcing/chunk_attention_sm90.h"
#include "lipforcing/audio_cross_attention.h"
#include "lipforcing/audio_cross_attention_sm90.h"
#include "lipforcing/denoise_update.h"

namespace py = pybind11;

namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lipforcing._C.") + what + ": CUDA error " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

// Raises RuntimeError unless a CUDA device can be used; called before every launch.
void require_device(const char* what) {
  int n = 0;
  cudaError_t err = lipforcing::device_count(&n);
  check_cuda(err, what);
  if (n == 0) {
    throw std::runtime_error(std::string("lipforcing._C.") + what + ": no CUDA device is visible");
  }
}

// A dtype code that may be any lipforcing::DType (0 float32, 1 float16, 2 bfloat16); otherwise ValueError
// "<op>: [<name> ]dtype code must be 0, 1 or 2, got <code>".
lipforcing::DType dtype_arg(int code, const char* op, const char* name = nullptr) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument(std::string(op) + ": " + (name ? std::string(name) + " " : std::string()) +
                                "dtype code must be 0, 1 or 2, got " + std::to_string(code));
  }
  return static_cast<lipforcing::DType>(code);
}

int device_count_or_zero() {
  int n = 0;
  if (lipforcing::device_count(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

// audio_cross_attention and audio_cross_attention_sm90 take the same arguments (AudioCrossAttentionParams): one
// binding body, the op's check and launcher.  Pointers as integers, strides in elements: q/text/out (batch, token,
// head), audio (batch, frame, token, head).
using AudioCheck = const char* (*)(const lipforcing::AudioCrossAttentionParams&);
using AudioLaunch = cudaError_t (*)(const lipforcing::AudioCrossAttentionParams&, cudaStream_t, const char**);

void def_audio_cross_attention(py::module_& m, const std::string& name, AudioCheck check, AudioLaunch launch,
                               const char* doc) {
  m.def(
      name.c_str(),
      [name, check, launch](uintptr_t q, uintptr_t text_k, uintptr_t text_v, uintptr_t audio_k, uintptr_t audio_v,
         uintptr_t out, uintptr_t lse_text, uintptr_t lse_audio, int64_t batch, int64_t q_len, int64_t heads,
         int64_t head_dim, int64_t text_len, int64_t frames, int64_t audio_window, int64_t tokens_per_frame,
         const py::sequence& q_strides, const py::sequence& text_k_strides, const py::sequence& text_v_strides,
         const py::sequence& audio_k_strides, const py::sequence& audio_v_strides, const py::sequence& out_strides,
         double scale, double audio_scale, int dtype, uintptr_t stream) {
        auto copy_strides = [&name](const py::sequence& src, int64_t* dst, size_t n, const char* what) {
          if (src.size() != n) {
            throw std::invalid_argument(name + ": " + what + " must have " + std::to_string(n) + " entries, got " +
                                        std::to_string(src.size()));
          }
          for (size_t i = 0; i < n; ++i) dst[i] = src[i].cast<int64_t>();
        };
        const lipforcing::DType dt = dtype_arg(dtype, name.c_str());
        lipforcing::AudioCrossAttentionParams p;
        p.q = reinterpret_cast<const void*>(q);
        p.text_k = reinterpret_cast<const void*>(text_k);
        p.text_v = reinterpret_cast<const void*>(text_v);
        p.audio_k = reinterpret_cast<const void*>(audio_k);
        p.audio_v = reinterpret_cast<const void*>(audio_v);
        p.out = reinterpret_cast<void*>(out);
        p.lse_text = reinterpret_cast<float*>(lse_text);
        p.lse_audio = reinterpret_cast<float*>(lse_audio);
        p.batch = batch;
        p.q_len = q_len;
        p.heads = heads;
        p.head_dim = head_dim;
        p.text_len = text_len;
        p.frames = frames;
        p.audio_window = audio_window;
        p.tokens_per_frame = tokens_per_frame;
        copy_strides(q_strides, p.q_stride, 3, "q_strides");
        copy_strides(text_k_strides, p.text_k_stride, 3, "text_k_strides");
        copy_strides(text_v_strides, p.text_v_stride, 3, "text_v_strides");
        copy_strides(audio_k_strides, p.audio_k_stride, 4, "audio_k_strides");
        copy_strides(audio_v_strides, p.audio_v_stride, 4, "audio_v_strides");
        copy_strides(out_strides, p.out_stride, 3, "out_strides");
        p.scale = static_cast<float>(scale);
        p.audio_scale = static_cast<float>(audio_scale);
        p.dtype = dt;
        if (const char* why = check(p)) throw std::invalid_argument(name + ": " + why);
        require_device(name.c_str());
        check_cuda(launch(p, reinterpret_cast<cudaStream_t>(stream), nullptr), name.c_str());
      },
      py::arg("q"), py::arg("text_k"), py::arg("text_v"), py::arg("audio_k"), py::arg("audio_v"), py::arg("out"),
      py::arg("lse_text"), py::arg("lse_audio"), py::arg("batch"), py::arg("q_len"), py::arg("heads"),
      py::arg("head_dim"), py::arg("text_len"), py::arg("frames"), py::arg("audio_window"),
      py::arg("tokens_per_frame"), py::arg("q_strides"), py::arg("text_k_strides"), py::arg("text_v_strides"),
      py::arg("audio_k_strides"), py::arg("audio_v_strides"), py::arg("out_strides"), py::arg("scale"),
      py::arg("audio_scale"), py::arg("dtype"), py::arg("stream"),
      doc);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lipforcing CUDA kernels (torch-free; raw pointers + stream handles)";
  m.def("device_count", &device_count_or_zero, "Number of visible CUDA devices (0 when none or no driver).");
  m.def("runtime_version", &lipforcing::runtime_version, "CUDA runtime version the extension was built with.");
  m.def(
      "require_device", [](const std::string& what) { require_device(what.c_str()); }, py::arg("what"),
      "Raise RuntimeError with the CUDA error string unless a CUDA device is usable.");

  // --- op bindings: each op adds its own block below (chunk_attention, audio_cross_attention, denoise_update) ---

  // --- chunk_attention (csrc/chunk_attention.cu) ---
  m.def(
      "chunk_attention",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t k_cache, uintptr_t v_cache, uintptr_t pos, uintptr_t out,
         uintptr_t rope_cos, uintptr_t rope_sin, const py::sequence& strides, int batch, int n, int heads,
         int head_dim, int chunk_size, int window, int sink, int grid_h, int grid_w, double scale, int dtype,
         bool write, uintptr_t stream) {
        if (py::len(strides) != 18) {
          throw std::invalid_argument("chunk_attention: strides must hold 18 ints (batch, token, head strides of "
                                      "q, k, v, k_cache, v_cache, out), got " + std::to_string(py::len(strides)));
        }
        if (dtype != static_cast<int>(lipforcing::DType::kFloat16) &&
            dtype != static_cast<int>(lipforcing::DType::kBFloat16)) {
          throw std::invalid_argument("chunk_attention: dtype code must be 1 (float16) or 2 (bfloat16), got " +
                                      std::to_string(dtype));
        }
        if (!lipforcing::chunk_attention_supports_head_dim(head_dim)) {
          throw std::invalid_argument("chunk_attention: head_dim must be 64 or 128, got " + std::to_string(head_dim));
        }
        if ((rope_cos == 0) != (rope_sin == 0)) {
          throw std::invalid_argument("chunk_attention: rope_cos and rope_sin must both be given or both be 0");
        }
        if (window < chunk_size || n < 1 || n > chunk_size || sink < 0) {
          throw std::invalid_argument("chunk_attention: need 1 <= n <= chunk_size <= window and sink >= 0, got n=" +
                                      std::to_string(n) + " chunk_size=" + std::to_string(chunk_size) + " window=" +
                                      std::to_string(window) + " sink=" + std::to_string(sink));
        }
        lipforcing::ChunkAttnParams p;
        p.q = reinterpret_cast<const void*>(q);
        p.k = reinterpret_cast<const void*>(k);
        p.v = reinterpret_cast<const void*>(v);
        p.k_cache = reinterpret_cast<void*>(k_cache);
        p.v_cache = reinterpret_cast<void*>(v_cache);
        p.pos = reinterpret_cast<int64_t*>(pos);
        p.out = reinterpret_cast<void*>(out);
        p.rope_cos = reinterpret_cast<const float*>(rope_cos);
        p.rope_sin = reinterpret_cast<const float*>(rope_sin);
        int64_t* dst[6] = {p.q_stride, p.k_stride, p.v_stride, p.kc_stride, p.vc_stride, p.out_stride};
        for (int i = 0; i < 18; ++i) dst[i / 3][i % 3] = strides[i].cast<int64_t>();
        p.batch = batch;
        p.n = n;
        p.heads = heads;
        p.head_dim = head_dim;
        p.chunk_size = chunk_size;
        p.window = window;
        p.sink = sink;
        p.ring = window - chunk_size;
        p.grid_h = grid_h;
        p.grid_w = grid_w;
        p.scale = static_cast<float>(scale);
        p.dtype = static_cast<lipforcing::DType>(dtype);
        p.write = write;
        require_device("chunk_attention");
        check_cuda(lipforcing::launch_chunk_attention(p, reinterpret_cast<cudaStream_t>(stream)), "chunk_attention");
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("pos"),
      py::arg("out"), py::arg("rope_cos"), py::arg("rope_sin"), py::arg("strides"), py::arg("batch"), py::arg("n"),
      py::arg("heads"), py::arg("head_dim"), py::arg("chunk_size"), py::arg("window"), py::arg("sink"),
      py::arg("grid_h"), py::arg("grid_w"), py::arg("scale"), py::arg("dtype"), py::arg("write"), py::arg("stream"),
      "chunk_attention forward on raw device pointers (FlashAttention-2 style, fp16/bf16, head_dim 64/128); "
      "optionally writes k, v into the cache and advances pos.  Enqueued on `stream`; no host sync.");
  // --- end chunk_attention ---
#ifdef LIPFORCING_SM90
  // --- chunk_attention_sm90 (csrc/chunk_attention_sm90.cu, built for sm_90a only) ---
  // The dense chunk step's attention on Hopper: q (B, n, H, D) against the first count[b] slots of the dense
  // k/v buffers (B, slots, H, D); strides (batch, token, head) in elements for q, k, v, out (12 ints).
  m.def(
      "chunk_attention_sm90",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t count, const py::sequence& strides,
         int batch, int n, int slots, int heads, int head_dim, double scale, int dtype, uintptr_t stream) {
        if (py::len(strides) != 12) {
          throw std::invalid_argument("chunk_attention_sm90: strides must hold 12 ints (batch, token, head strides "
                                      "of q, k, v, out), got " + std::to_string(py::len(strides)));
        }
        lipforcing::ChunkAttnSm90Params p;
        p.q = reinterpret_cast<const void*>(q);
        p.k = reinterpret_cast<const void*>(k);
        p.v = reinterpret_cast<const void*>(v);
        p.out = reinterpret_cast<void*>(out);
        p.count = reinterpret_cast<const int32_t*>(count);
        int64_t* dst[4] = {p.q_stride, p.k_stride, p.v_stride, p.out_stride};
        for (int i = 0; i < 12; ++i) dst[i / 3][i % 3] = strides[i].cast<int64_t>();
        p.batch = batch;
        p.n = n;
        p.slots = slots;
        p.heads = heads;
        p.head_dim = head_dim;
        p.scale = static_cast<float>(scale);
        p.dtype = dtype_arg(dtype, "chunk_attention_sm90");
        if (const char* why = lipforcing::check_chunk_attention_sm90(p)) {
          throw std::invalid_argument(std::string("chunk_attention_sm90: ") + why);
        }
        require_device("chunk_attention_sm90");
        check_cuda(lipforcing::launch_chunk_attention_sm90(p, reinterpret_cast<cudaStream_t>(stream)),
                   "chunk_attention_sm90");
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("count"), py::arg("strides"),
      py::arg("batch"), py::arg("n"), py::arg("slots"), py::arg("heads"), py::arg("head_dim"), py::arg("scale"),
      py::arg("dtype"), py::arg("stream"),
      "Dense chunk attention on sm_90 (wgmma + TMA, fp16/bf16, head_dim 64/128): fills out with softmax(scale q "
      "k[:count]^T) v[:count] per batch row and head.  Enqueued on `stream`; no host sync.");
  // Host-side helpers of the sm_90 kernel, exposed so tests can check them without a GPU.
  m.def(
      "chunk_attention_sm90_desc",
      [](uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
        return lipforcing::wgmma_desc_sw128(smem_addr, lbo_bytes, sbo_bytes);
      },
      py::arg("smem_addr"), py::arg("lbo_bytes"), py::arg("sbo_bytes"),
      "The 64-bit wgmma shared-memory descriptor (128-byte swizzle) the sm_90 kernel builds.");
  m.def("chunk_attention_sm90_kmajor_desc", &lipforcing::sm90_kmajor_desc, py::arg("tile_base"),
        py::arg("subtile_rows"), py::arg("row0"), py::arg("kk"),
        "Descriptor of k-step kk of a K-major operand (Q or K) as the sm_90 kernel computes it.");
  m.def("chunk_attention_sm90_v_desc", &lipforcing::sm90_v_desc, py::arg("tile_base"), py::arg("kk"),
        "Descriptor of k-step kk of the MN-major V operand as the sm_90 kernel computes it.");
  m.def(
      "chunk_attention_sm90_tma_spec",
      [](int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim, const py::sequence& strides, int rows) {
        if (py::len(strides) != 3) throw std::invalid_argument("chunk_attention_sm90_tma_spec: 3 strides expected");
        const int64_t st[3] = {strides[0].cast<int64_t>(), strides[1].cast<int64_t>(), strides[2].cast<int64_t>()};
        const lipforcing::TmaTileSpec s = lipforcing::chunk_attention_sm90_tma_spec(batch, tokens, heads, head_dim,
                                                                                      st, rows);
        py::dict d;
        d["dims"] = py::make_tuple(s.dims[0], s.dims[1], s.dims[2], s.dims[3]);
        d["strides_bytes"] = py::make_tuple(s.strides_bytes[0], s.strides_bytes[1], s.strides_bytes[2]);
        d["box"] = py::make_tuple(s.box[0], s.box[1], s.box[2], s.box[3]);
        return d;
      },
      py::arg("batch"), py::arg("tokens"), py::arg("heads"), py::arg("head_dim"), py::arg("strides"),
      py::arg("rows"), "The 4-d TMA view (dims, byte strides, box) the sm_90 kernel encodes for one tensor.");
  m.def("chunk_attention_sm90_swizzle_offset", &lipforcing::sw128_offset, py::arg("row"), py::arg("chunk16"),
        "Byte offset of 16-byte chunk `chunk16` of row `row` in a 128B-swizzled subtile.");
  m.def("chunk_attention_sm90_smem_bytes", &lipforcing::chunk_attention_sm90_smem_bytes, py::arg("head_dim"),
        "Dynamic shared memory of the sm_90 kernel for head_dim (0 when unsupported).");
  m.attr("chunk_attention_sm90_tile") = py::make_tuple(lipforcing::kSm90BlockM, lipforcing::kSm90BlockN);
  // --- end chunk_attention_sm90 ---
  // --- audio_cross_attention_sm90 (csrc/audio_cross_attention_sm90.cu, built for sm_90a only) ---
  // The same arguments and results as audio_cross_attention (below), on wgmma + TMA; fp16/bf16, head_dim 64/128.
  def_audio_cross_attention(m, "audio_cross_attention_sm90", &lipforcing::check_audio_cross_attention_sm90,
                            &lipforcing::launch_audio_cross_attention_sm90,
                            "Fused audio cross-attention forward on sm_90 (wgmma + TMA, fp16/bf16, head_dim 64/128): "
                            "fills out, lse_text, lse_audio like audio_cross_attention.  Enqueued on `stream`; no "
                            "host sync.");
  m.def("audio_cross_attention_sm90_smem_bytes", &lipforcing::audio_cross_attention_sm90_smem_bytes,
        py::arg("head_dim"), "Dynamic shared memory of the sm_90 audio kernel for head_dim (0 when unsupported).");
  m.def("audio_cross_attention_sm90_tiles", &lipforcing::audio_cross_attention_sm90_tiles, py::arg("m_block"),
        py::arg("q_len"), py::arg("tokens_per_frame"), py::arg("text_len"), py::arg("audio_window"),
        "Key tiles (text, then audio per frame) CTA m_block of the sm_90 audio kernel walks.");
  m.def(
      "audio_cross_attention_sm90_audio_tma_spec",
      [](int64_t batch, int64_t frames, int64_t window, int64_t heads, int64_t head_dim, const py::sequence& strides,
         int rows) {
        if (py::len(strides) != 4) {
          throw std::invalid_argument("audio_cross_attention_sm90_audio_tma_spec: 4 strides expected");
        }
        int64_t st[4];
        for (int i = 0; i < 4; ++i) st[i] = strides[i].cast<int64_t>();
        const lipforcing::TmaTileSpec s =
            lipforcing::audio_cross_attention_sm90_audio_tma_spec(batch, frames, window, heads, head_dim, st, rows);
        py::dict d;
        d["dims"] = py::make_tuple(s.dims[0], s.dims[1], s.dims[2], s.dims[3], s.dims[4]);
        d["strides_bytes"] = py::make_tuple(s.strides_bytes[0], s.strides_bytes[1], s.strides_bytes[2],
                                            s.strides_bytes[3]);
        d["box"] = py::make_tuple(s.box[0], s.box[1], s.box[2], s.box[3], s.box[4]);
        return d;
      },
      py::arg("batch"), py::arg("frames"), py::arg("window"), py::arg("heads"), py::arg("head_dim"),
      py::arg("strides"), py::arg("rows"),
      "The 5-d TMA view (dims, byte strides, box) the sm_90 audio kernel encodes for audio_k / audio_v.");
  m.def("audio_cross_attention_sm90_q_desc", &lipforcing::audio_cross_attention_sm90_q_desc, py::arg("tile_base"),
        py::arg("consumer"), py::arg("kk"), "Descriptor of k-step kk of consumer's 64 Q rows (sm_90 audio kernel).");
  m.def("audio_cross_attention_sm90_k_desc", &lipforcing::audio_cross_attention_sm90_k_desc, py::arg("tile_base"),
        py::arg("kk"), "Descriptor of k-step kk of a K tile (sm_90 audio kernel).");
  m.def("audio_cross_attention_sm90_v_desc", &lipforcing::audio_cross_attention_sm90_v_desc, py::arg("tile_base"),
        py::arg("kk"), "Descriptor of k-step kk (16 keys) of a V tile (sm_90 audio kernel).");
  m.attr("audio_cross_attention_sm90_tile") =
      py::make_tuple(lipforcing::kAudioSm90BlockM, lipforcing::kAudioSm90BlockN);
  // --- end audio_cross_attention_sm90 ---
#endif
  // denoise_update: x0 = x_t - t * flow; x_next = (1 - t_next) * x0 + t_next * eps (csrc/denoise_update.cu).
  // t_mode / t_next_mode: 0 = the *_value number, 1 = 0-d device tensor, 2 = (batch,) device tensor.
  // noise = 0: eps from Philox with seed / offset (0-d int64 device tensors, or 0 and the *_value).
  m.def(
      "denoise_update",
      [](uintptr_t x_t, uintptr_t flow, uintptr_t noise, uintptr_t x0_out, uintptr_t x_next_out, int x_dtype,
         int noise_dtype, int x0_dtype, int x_next_dtype, int t_mode, uintptr_t t, int t_dtype, double t_value,
         int t_next_mode, uintptr_t t_next, int t_next_dtype, double t_next_value, uintptr_t seed,
         int64_t seed_value, uintptr_t offset, int64_t offset_value, int64_t numel, int64_t per_sample,
         uintptr_t stream) {
        auto dtype = [](int code, const char* name) { return dtype_arg(code, "denoise_update", name); };
        auto mode = [](int m, uintptr_t ptr, const char* name) {
          if (m < 0 || m > 2 || (m != 0 && ptr == 0)) {
            throw std::invalid_argument(std::string("denoise_update: ") + name +
                                        "_mode must be 0 (value), 1 or 2 (with a device pointer), got " +
                                        std::to_string(m));
          }
          return static_cast<lipforcing::TimeMode>(m);
        };
        if (!x_t || !flow || !x0_out || !x_next_out) {
          throw std::invalid_argument("denoise_update: x_t, flow, x0_out and x_next_out must be device pointers");
        }
        if (numel < 0 || per_sample < 1) {
          throw std::invalid_argument("denoise_update: need numel >= 0 and per_sample >= 1, got numel=" +
                                      std::to_string(numel) + ", per_sample=" + std::to_string(per_sample));
        }
        lipforcing::DenoiseUpdateParams p;
        p.x_t = reinterpret_cast<const void*>(x_t);
        p.flow = reinterpret_cast<const void*>(flow);
        p.noise = reinterpret_cast<const void*>(noise);
        p.x0_out = reinterpret_cast<void*>(x0_out);
        p.x_next_out = reinterpret_cast<void*>(x_next_out);
        p.x_dtype = dtype(x_dtype, "x_t");
        p.noise_dtype = dtype(noise_dtype, "noise");
        p.x0_dtype = dtype(x0_dtype, "x0_out");
        p.x_next_dtype = dtype(x_next_dtype, "x_next_out");
        p.t_mode = mode(t_mode, t, "t");
        p.t = reinterpret_cast<const void*>(t);
        p.t_dtype = dtype(t_dtype, "t");
        p.t_value = static_cast<float>(t_value);
        p.t_next_mode = mode(t_next_mode, t_next, "t_next");
        p.t_next = reinterpret_cast<const void*>(t_next);
        p.t_next_dtype = dtype(t_next_dtype, "t_next");
        p.t_next_value = static_cast<float>(t_next_value);
        p.one_minus_t_next_value = static_cast<float>(1.0 - t_next_value);  // rounded once, like the reference
        p.seed = reinterpret_cast<const int64_t*>(seed);
        p.seed_value = static_cast<uint64_t>(seed_value);
        p.offset = reinterpret_cast<const int64_t*>(offset);
        p.offset_value = static_cast<uint64_t>(offset_value);
        p.numel = numel;
        p.per_sample = per_sample;
        if (numel == 0) return;
        require_device("denoise_update");
        check_cuda(lipforcing::launch_denoise_update(p, reinterpret_cast<cudaStream_t>(stream)), "denoise_update");
      },
      py::arg("x_t"), py::arg("flow"), py::arg("noise"), py::arg("x0_out"), py::arg("x_next_out"),
      py::arg("x_dtype"), py::arg("noise_dtype"), py::arg("x0_dtype"), py::arg("x_next_dtype"), py::arg("t_mode"),
      py::arg("t"), py::arg("t_dtype"), py::arg("t_value"), py::arg("t_next_mode"), py::arg("t_next"),
      py::arg("t_next_dtype"), py::arg("t_next_value"), py::arg("seed"), py::arg("seed_value"), py::arg("offset"),
      py::arg("offset_value"), py::arg("numel"), py::arg("per_sample"), py::arg("stream"),
      "Fused denoise step: fills x0_out and x_next_out (see csrc/include/lipforcing/denoise_update.h).");
  // --- end denoise_update ---
  // audio_cross_attention: fused text + per-frame audio cross-attention forward (csrc/audio_cross_attention.cu).
  def_audio_cross_attention(m, "audio_cross_attention", &lipforcing::check_audio_cross_attention,
                            &lipforcing::launch_audio_cross_attention,
                            "Fused audio cross-attention forward: fills out, lse_text, lse_audio "
                            "(see csrc/include/lipforcing/audio_cross_attention.h).");
  // --- end audio_cross_attention ---
}
