"""CUDA backend of ``lipforcing.ops.audio_cross_attention`` (forward only): passes pointers, strides, a dtype code
and the current stream to one of two kernels with the same arguments and results:

* ``lipforcing._C.audio_cross_attention_sm90`` (csrc/audio_cross_attention_sm90.cu: wgmma + TMA, built for sm_90a)
  on compute capability 9.0 when :func:`sm90_problem` finds nothing against it (head_dim 64/128, TMA-friendly
  strides; ``LIPFORCING_CUDA_SM90=0`` turns it off);
* otherwise ``lipforcing._C.audio_cross_attention`` (csrc/audio_cross_attention.cu: mma.sync, sm_80+).

One kernel launch on the current stream; allocates only the outputs; no host synchronisation.  The backward of
an op whose forward ran here is computed by the Triton backward (same ``out``/``lse`` meaning).
"""
from __future__ import annotations

import os

import torch

from lipforcing.ops.cuda import DTYPE_CODES, arch_problem, extension, stream_handle, tile_load_problem

# Must match audio_cross_attention_supports_head_dim in csrc/include/lipforcing/audio_cross_attention.h.
HEAD_DIMS = (32, 64, 96, 128)
# Must match check_audio_cross_attention_sm90 in csrc/audio_cross_attention_sm90.cu.
SM90_HEAD_DIMS = (64, 128)
_NAMES = ("q", "text_k", "text_v", "audio_k", "audio_v")


def audio_cross_attention_cuda_unsupported(q, text_k, text_v, audio_k, audio_v, tokens_per_frame, audio_scale,
                                           scale) -> str | None:
    """Why the CUDA kernel cannot run these (already validated) arguments, or None."""
    tensors = dict(zip(_NAMES, (q, text_k, text_v, audio_k, audio_v)))
    for name, x in tensors.items():
        if x.device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {name} on {x.device}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the cuda audio_cross_attention kernel supports float16/bfloat16, got {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the cuda audio_cross_attention kernel supports head_dim in {HEAD_DIMS}, got {q.shape[-1]}"
    why = arch_problem(q.device)
    if why:
        return why
    for name, x in tensors.items():
        why = tile_load_problem(name, x)  # (empty text is never read)
        if why:
            return why
    if q.shape[0] * q.shape[2] > 65535:
        return f"the cuda kernel supports batch * heads <= 65535, got {q.shape[0] * q.shape[2]}"
    return None


def sm90_problem(q, text_k, text_v, audio_k, audio_v) -> str | None:
    """Why these (CUDA-eligible) inputs do not run the sm_90 wgmma kernel, or None when they do."""
    if os.environ.get("LIPFORCING_CUDA_SM90", "1").strip() == "0":
        return "LIPFORCING_CUDA_SM90=0"
    if not hasattr(extension(), "audio_cross_attention_sm90"):
        return "lipforcing._C was built without the sm_90a kernels (no 90 in CMAKE_CUDA_ARCHITECTURES)"
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return "the wgmma kernel is built for sm_90a, which runs on compute capability 9.0 only"
    if q.shape[-1] not in SM90_HEAD_DIMS:
        return f"the sm_90 kernel supports head_dim in {SM90_HEAD_DIMS}, got {q.shape[-1]}"
    if q.shape[1] >= 2**31 - 128:
        return f"the sm_90 kernel's TMA coordinates are 32-bit, got {q.shape[1]} queries"
    for name, x in zip(_NAMES, (q, text_k, text_v, audio_k, audio_v)):
        if x.numel() == 0:
            continue  # empty text is never loaded
        # TMA views: every dimension longer than 1 needs a positive stride, ordered like the layout (outer >= inner)
        strides = [st for st, size in zip(x.stride()[:-1], x.shape[:-1]) if size > 1]
        if any(st <= 0 for st in strides) or strides != sorted(strides, reverse=True):
            return f"the TMA loads take {name} with positive, non-increasing strides, got {tuple(x.stride())}"
    return None


def _strides(x: torch.Tensor, n: int) -> list[int]:
    # Empty text tensors are never read; any multiple of 8 passes the launcher's check.
    return list(x.stride()[:n]) if x.numel() else [0] * n


def audio_cross_attention_cuda(q, text_k, text_v, audio_k, audio_v, tokens_per_frame: int, audio_scale: float,
                               scale: float):
    """Forward (backend signature): returns (out (B, Lq, H, D) in q's dtype, lse_text (B, H, Lq) fp32,
    lse_audio (B, H, Lq) fp32); lse_text is -inf where the text is empty."""
    B, Lq, H, D = q.shape
    T = text_k.shape[1]
    F, A = audio_k.shape[1], audio_k.shape[2]
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    lse_t = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    lse_a = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    ext = extension()
    launch = ext.audio_cross_attention_sm90 if sm90_problem(q, text_k, text_v, audio_k, audio_v) is None else \
        ext.audio_cross_attention
    with torch.cuda.device(q.device):
        launch(
            q.data_ptr(), text_k.data_ptr() if T else 0, text_v.data_ptr() if T else 0,
            audio_k.data_ptr(), audio_v.data_ptr(), out.data_ptr(), lse_t.data_ptr(), lse_a.data_ptr(),
            B, Lq, H, D, T, F, A, tokens_per_frame,
            _strides(q, 3), _strides(text_k, 3), _strides(text_v, 3), _strides(audio_k, 4), _strides(audio_v, 4),
            _strides(out, 3), float(scale), float(audio_scale), DTYPE_CODES[q.dtype], stream_handle(q),
        )
    return out, lse_t, lse_a
