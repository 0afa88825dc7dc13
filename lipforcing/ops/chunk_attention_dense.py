"""Library backends of ``lipforcing.ops.chunk_attention`` on the dense chunk step: ``backend="flash_attn"`` (the
flash-attn package: FlashAttention-3 ``flash_attn_interface`` on sm_90 when installed, else FlashAttention-2) and
``backend="cudnn"`` (PyTorch SDPA restricted to its cuDNN kernel).  They are also the baselines of
bench/test_bench_chunk_attention.py.

Both attend to one dense K/V buffer of ``sink + window`` slots, of which the first ``min(pos + n, slots)`` are the
keys the chunk sees (RollingKVCache: the sink fills first, the ring holds a whole window):

* ``write=True``: the chunk is stored in the cache first and the cache itself is that buffer;
* ``write=False``: the cache slots *as they would be after the write* (the chunk overlaid on the slots it would
  overwrite) are materialised into the cache's workspace -- one copy pass, no change to the cache;
* dynamic RoPE: q and the keys are rotated once per step into the workspace (Triton passes of
  lipforcing.kernels.chunk_attention), so the libraries see plain attention;
* ``q_rotated`` / ``chunk_in_cache`` (ops.qk_norm already rotated q / stored the chunk): the q pass / the store
  pass is skipped.

The key count stays on the device (``workspace.count``, int32 per batch row; for cuDNN a boolean key mask built
from it), so a step neither syncs nor allocates besides the output.  Only full chunks: a short last chunk must not
see the oldest window slots, which a prefix length cannot express (``auto`` then falls back to Triton).  No
backward here: a ``write=False`` call that needs gradients uses the reference backward.
"""
from __future__ import annotations

import functools
import importlib

import torch


@functools.lru_cache(maxsize=None)
def _flash_modules():
    """(FA3 flash_attn_with_kvcache or None, FA2 flash_attn_with_kvcache or None)."""
    found = []
    for mod in ("flash_attn_interface", "flash_attn"):
        try:
            found.append(getattr(importlib.import_module(mod), "flash_attn_with_kvcache"))
        except Exception:  # not installed, or built for another torch/CUDA
            found.append(None)
    return tuple(found)


def _common_problem(q, chunk_size) -> str | None:
    if q.device.type != "cuda":
        return f"needs CUDA tensors, got {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"supports float16 and bfloat16, got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"needs head_dim a multiple of 8 and <= 256, got {q.shape[-1]}"
    if q.shape[1] != chunk_size:
        return (f"runs full chunks only (a short last chunk of {q.shape[1]} < {chunk_size} tokens must not see the "
                "oldest window slots, which a key count cannot express)")
    try:
        import lipforcing.kernels.chunk_attention  # noqa: F401  (the staging / RoPE passes)
    except Exception as exc:
        return f"needs triton for its staging pass ({exc})"
    return None


def _prepare(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, rope_cos, rope_sin, grid_h, grid_w,
             q_rotated=False, chunk_in_cache=False):
    """Store (write) or stage (write=False) the chunk and rotate; returns (q, keys, values, workspace) with the
    key count of every batch row in ``workspace.count``.  ``q_rotated``: q is already rotated (no q pass);
    ``chunk_in_cache`` (write): the chunk is already in its slots (no store pass)."""
    from lipforcing.kernels import chunk_attention as tk

    n = q.shape[1]
    ws = tk.workspace_for(k_cache, chunk_size)
    rope = rope_cos is not None
    if write and not chunk_in_cache:
        tk.chunk_cache_write_triton(k, v, k_cache, v_cache, pos, sink, advance=False)
    q_eff = q
    if rope and not q_rotated:
        q_eff = tk.rope_rows_triton(q, ws.q[:, :n], pos, chunk_size, window, sink, rope_cos, rope_sin, grid_h,
                                    grid_w)
    ks, vs = k_cache, v_cache
    if not write or rope:
        tk.stage_slots_triton(k, v, k_cache, v_cache, pos, chunk_size, window, sink, rope_cos, rope_sin, grid_h,
                              grid_w, ws.k, ws.v, filled_add=n, overlay=not write, stage_v=not write)
        ks = ws.k
        vs = v_cache if write else ws.v
    # count = min(pos + n, slots), in place (no allocation, no host read)
    ws.count.copy_(pos.expand_as(ws.count))
    ws.count.add_(n).clamp_(max=k_cache.shape[1])
    return q_eff, ks, vs, ws


def chunk_attention_flash_attn_unsupported(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale,
                                           rope_cos, rope_sin, grid_h, grid_w, q_rotated=False,
                                           chunk_in_cache=False) -> str | None:
    fa3, fa2 = _flash_modules()
    if fa3 is None and fa2 is None:
        return "the flash-attn package is not installed (pip install flash-attn; FA3: flash_attn_interface)"
    why = _common_problem(q, chunk_size)
    return f"flash_attn {why}" if why else None


def chunk_attention_flash_attn(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope_cos,
                               rope_sin, grid_h, grid_w, q_rotated=False, chunk_in_cache=False):
    """flash_attn_with_kvcache over the dense slots, ``cache_seqlens`` = the device-side key count."""
    from lipforcing.kernels.chunk_attention import device_guard

    fa3, fa2 = _flash_modules()
    fn = fa3 if fa3 is not None and torch.cuda.get_device_capability(q.device) >= (9, 0) else (fa2 or fa3)
    with device_guard(q):
        q_eff, ks, vs, ws = _prepare(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, rope_cos,
                                     rope_sin, grid_h, grid_w, q_rotated, chunk_in_cache)
        out = fn(q_eff, ks, vs, cache_seqlens=ws.count, softmax_scale=scale, causal=False)
        out = out[0] if isinstance(out, tuple) else out
        if write:
            pos.add_(q.shape[1])
    return out


def chunk_attention_cudnn_unsupported(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale,
                                      rope_cos, rope_sin, grid_h, grid_w, q_rotated=False,
                                      chunk_in_cache=False) -> str | None:
    if not torch.backends.cudnn.is_available():
        return "cudnn is not available in this PyTorch build"
    try:
        from torch.nn.attention import SDPBackend  # noqa: F401
        SDPBackend.CUDNN_ATTENTION  # noqa: B018
    except Exception as exc:
        return f"this PyTorch has no cuDNN SDPA backend ({exc})"
    why = _common_problem(q, chunk_size)
    return f"cudnn {why}" if why else None


def chunk_attention_cudnn(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope_cos,
                          rope_sin, grid_h, grid_w, q_rotated=False, chunk_in_cache=False):
    """SDPA with only the cuDNN kernel allowed, over all slots with a boolean key mask (slot < count)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lipforcing.kernels.chunk_attention import device_guard

    B = q.shape[0]
    with device_guard(q):
        q_eff, ks, vs, ws = _prepare(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, rope_cos,
                                     rope_sin, grid_h, grid_w, q_rotated, chunk_in_cache)
        torch.lt(ws.slot_index.view(1, 1, 1, -1), ws.count.view(B, 1, 1, 1), out=ws.mask)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(
                q_eff.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), attn_mask=ws.mask, scale=scale)
        if write:
            pos.add_(q.shape[1])
    return out.transpose(1, 2)
