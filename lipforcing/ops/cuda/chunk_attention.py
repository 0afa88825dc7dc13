"""CUDA backend of ``lipforcing.ops.chunk_attention``: passes pointers, strides, the dtype code and the current
stream to the extension.  Two kernels:

* sm_90 (compute capability 9.0, extension built with 90 in its architectures), full chunks: the dense chunk step
  of lipforcing/ops/chunk_attention_dense.py (``_prepare`` writes or stages the chunk and rotates q/keys once,
  with Triton passes) followed by ``lipforcing._C.chunk_attention_sm90`` (csrc/chunk_attention_sm90.cu: wgmma +
  TMA, FlashAttention-3 style) over the ``workspace.count`` valid slots of every batch row;
* otherwise (sm_80-89, a short last chunk, no Triton, or ``LIPFORCING_CUDA_SM90=0``):
  ``lipforcing._C.chunk_attention`` (csrc/chunk_attention.cu, FlashAttention-2 style mma.sync kernel that reads
  the ring and rotates keys in the kernel).

Supports float16/bfloat16, head_dim 64 and 128, compute capability 8.0+, rows aligned to 16 bytes; everything else
is reported by :func:`chunk_attention_cuda_unsupported` so ``backend="auto"`` falls back to Triton.
"""
from __future__ import annotations

import os

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


def sm90_problem(q, chunk_size) -> str | None:
    """Why this (already CUDA-eligible) step does not run the sm_90 wgmma kernel, or None when it does."""
    if os.environ.get("LIPFORCING_CUDA_SM90", "1").strip() == "0":
        return "LIPFORCING_CUDA_SM90=0"
    if not hasattr(extension(), "chunk_attention_sm90"):
        return "lipforcing._C was built without the sm_90a kernels (no 90 in CMAKE_CUDA_ARCHITECTURES)"
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return "the wgmma kernel is built for sm_90a, which runs on compute capability 9.0 only"
    if q.shape[1] != chunk_size:
        return (f"a short last chunk ({q.shape[1]} < {chunk_size} tokens) must not see the oldest window slots, "
                "which the dense step's key count cannot express")
    strides = [st for st, size in zip(q.stride(), q.shape) if size > 1]
    if strides != sorted(strides, reverse=True):
        return f"the TMA loads take q with batch >= token >= head strides, got strides {tuple(q.stride())}"
    try:
        import lipforcing.kernels.chunk_attention  # noqa: F401  (the dense step's staging / RoPE passes)
    except Exception as exc:
        return f"the dense step's staging passes need triton ({exc})"
    return None


def _chunk_attention_sm90(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope_cos,
                          rope_sin, grid_h, grid_w):
    """The dense chunk step: stage / write and rotate (Triton), then the wgmma kernel over the valid slots."""
    from lipforcing.kernels.chunk_attention import device_guard
    from lipforcing.ops.chunk_attention_dense import _prepare

    B, n, H, D = q.shape
    with device_guard(q):
        q_eff, ks, vs, ws = _prepare(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, rope_cos,
                                     rope_sin, grid_h, grid_w)
        out = torch.empty((B, n, H, D), dtype=q.dtype, device=q.device)
        strides = [s for t in (q_eff, ks, vs, out) for s in t.stride()[:3]]
        extension().chunk_attention_sm90(
            q_eff.data_ptr(), ks.data_ptr(), vs.data_ptr(), out.data_ptr(), ws.count.data_ptr(), strides, B, n,
            ks.shape[1], H, D, float(scale), DTYPE_CODES[q.dtype], stream_handle(q))
        if write:
            pos.add_(n)
    return out


def chunk_attention_cuda(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope_cos, rope_sin,
                         grid_h, grid_w):
    """CUDA backend: returns out (B, n, H, D); with ``write`` also stores k, v in the cache and advances ``pos``
    (enqueued on the current stream, no host sync).  Allocates only ``out`` (the sm_90 path also uses the
    cache's preallocated ChunkWorkspace)."""
    if sm90_problem(q, chunk_size) is None:
        return _chunk_attention_sm90(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale,
                                     rope_cos, rope_sin, grid_h, grid_w)
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
