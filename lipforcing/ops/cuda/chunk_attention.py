"""CUDA backend of ``lipforcing.ops.chunk_attention``: passes pointers, strides, the dtype code and the current
stream to ``lipforcing._C.chunk_attention`` (csrc/chunk_attention.cu, FlashAttention-2 style tensor-core kernel).

Supports float16/bfloat16, head_dim 64 and 128, compute capability 8.0+, rows aligned to 16 bytes; everything else
is reported by :func:`chunk_attention_cuda_unsupported` so ``backend="auto"`` falls back to Triton.
"""
from __future__ import annotations

import torch

from lipforcing.ops.cuda import DTYPE_CODES, arch_problem, extension, stream_handle, tile_load_problem

_HEAD_DIMS = (64, 128)


def chunk_attention_cuda_unsupported(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale,
                                     rope_cos, rope_sin, grid_h, grid_w) -> str | None:
    """Why the CUDA kernel cannot run these (already validated) inputs, or None."""
    if q.device.type != "cuda":
        return f"the CUDA kernel needs CUDA tensors, got {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernel supports float16 and bfloat16, got {q.dtype} (the triton backend takes float32)"
    if q.shape[-1] not in _HEAD_DIMS:
        return f"the CUDA kernel supports head_dim {_HEAD_DIMS}, got {q.shape[-1]}"
    why = arch_problem(q.device)
    if why:
        return why
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        why = tile_load_problem(name, t)
        if why:
            return why
    return None


def chunk_attention_cuda(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope_cos, rope_sin,
                         grid_h, grid_w):
    """CUDA backend: returns out (B, n, H, D); with ``write`` also stores k, v in the cache and advances ``pos``
    (enqueued on the current stream, no host sync).  Allocates only ``out``."""
    B, n, H, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    strides = [s for t in (q, k, v, k_cache, v_cache, out) for s in t.stride()[:3]]
    rope = rope_cos is not None
    with torch.cuda.device(q.device):
        extension().chunk_attention(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), pos.data_ptr(),
            out.data_ptr(), rope_cos.data_ptr() if rope else 0, rope_sin.data_ptr() if rope else 0, strides,
            B, n, H, D, chunk_size, window, sink, grid_h if rope else 1, grid_w if rope else 1, float(scale),
            DTYPE_CODES[q.dtype], bool(write), stream_handle(q))
    return out
