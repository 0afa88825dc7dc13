"""CUDA backend of ``lipforcing.ops.audio_cross_attention`` (forward only): passes pointers, strides, a dtype code
and the current stream to ``lipforcing._C.audio_cross_attention`` (csrc/audio_cross_attention.cu).

One kernel launch on the current stream; allocates only the outputs; no host synchronisation.  The backward of
an op whose forward ran here is computed by the Triton backward (same ``out``/``lse`` meaning).
"""
from __future__ import annotations

import torch

from lipforcing.ops.cuda import DTYPE_CODES, arch_problem, extension, stream_handle, tile_load_problem

# Must match audio_cross_attention_supports_head_dim in csrc/include/lipforcing/audio_cross_attention.h.
HEAD_DIMS = (32, 64, 96, 128)
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
    with torch.cuda.device(q.device):
        extension().audio_cross_attention(
            q.data_ptr(), text_k.data_ptr() if T else 0, text_v.data_ptr() if T else 0,
            audio_k.data_ptr(), audio_v.data_ptr(), out.data_ptr(), lse_t.data_ptr(), lse_a.data_ptr(),
            B, Lq, H, D, T, F, A, tokens_per_frame,
            _strides(q, 3), _strides(text_k, 3), _strides(text_v, 3), _strides(audio_k, 4), _strides(audio_v, 4),
            _strides(out, 3), float(scale), float(audio_scale), DTYPE_CODES[q.dtype], stream_handle(q),
        )
    return out, lse_t, lse_a
