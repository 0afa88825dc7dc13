"""``chunk_attention``: one chunk's queries against a RollingKVCache plus the chunk's own keys.

Three custom ops: ``lipforcing::chunk_attention`` (mutates the cache; used for ``write=True``),
``lipforcing::chunk_attention_read`` (functional, ``write=False``, returns the output and the log-sum-exp of the
scores; carries the autograd formula -- PyTorch allows one only on functional ops) and its backward
``lipforcing::chunk_attention_backward``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from lipforcing import _checks
from lipforcing.cache import RollingKVCache
from lipforcing.ops import _dispatch
from lipforcing.ops._dispatch import Impl
from lipforcing.ops.reference import (_chunk_keys, _fp32, cache_write_ref, chunk_attention_backward_ref,
                                      chunk_attention_ref)
from lipforcing.ops.rope import RopeSpec

# Backend signatures:
#   forward(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope_cos, rope_sin, grid_h,
#           grid_w, q_rotated, chunk_in_cache) -> out, or (out, lse) with lse (B, H, n) float32 base-e log-sum-exp
#           (an empty tensor when the backend has none); when write is True it also stores k, v in (k_cache,
#           v_cache) and advances pos (in place).  rope_cos/rope_sin are None for no rotation, else the RopeSpec
#           tables.  q_rotated (rope only): q is already rotated at its window-relative frame, do not rotate it.
#           chunk_in_cache (write only): k, v already sit in the chunk's slots (ops.qk_norm(v=...)): skip the
#           store, only advance pos (k, v are then not read).  A backend that cannot honour a flag declines it
#           in its ``*_unsupported`` (the CUDA kernels: ``_cuda_unsupported`` below).
#   backward(grad_out, q, k, v, out, lse, k_cache, v_cache, pos, chunk_size, window, sink, scale, rope_cos,
#            rope_sin, grid_h, grid_w) -> (dq, dk, dv) (write=False only: the cache is a constant).
_IMPLS = {
    "reference": Impl(__name__, "_reference"),
    "triton": Impl("lipforcing.kernels.chunk_attention", "chunk_attention_triton"),
    # the CUDA module (lipforcing/ops/cuda) knows nothing of q_rotated / chunk_in_cache: wrapped here, so the flags
    # are declined before its own checks run and never reach its kernels
    "cuda": Impl(__name__, "_cuda"),
    "flash_attn": Impl("lipforcing.ops.chunk_attention_dense", "chunk_attention_flash_attn"),
    "cudnn": Impl("lipforcing.ops.chunk_attention_dense", "chunk_attention_cudnn"),
}
# Forward backends that leave the log-sum-exp a flash-style backward needs (auto takes these when autograd records).
_GRAD_IMPLS = {name: _IMPLS[name] for name in ("triton", "reference")}
_BWD = {
    "reference": Impl(__name__, "_backward_reference"),
    "triton": Impl("lipforcing.kernels.chunk_attention", "chunk_attention_backward_triton"),
}


def _spec(rope_cos, rope_sin, grid_h, grid_w):
    return None if rope_cos is None else RopeSpec(rope_cos, rope_sin, (grid_h, grid_w))


def _chunk_from_slots(k_cache, v_cache, pos, sink, n):
    """The k, v rows of stream positions pos .. pos+n-1 read back from their cache slots (a device gather)."""
    p = pos + torch.arange(n, device=pos.device)
    ring = k_cache.shape[1] - sink
    slot = torch.where(p < sink, p, sink + torch.remainder(p - sink, ring))
    return k_cache[:, slot], v_cache[:, slot]


@_fp32
def _ref_rotated_q(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope):
    """chunk_attention_ref with q taken as already rotated (the keys are rotated as usual)."""
    _, keys_k, keys_v, valid, _ = _chunk_keys(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, rope)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys_k) * scale
    s = torch.where(valid[None, None, None, :], s, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), keys_v).to(q.dtype)
    if write:
        cache_write_ref(k, v, k_cache, v_cache, pos, sink=sink)
    return out, torch.logsumexp(s, dim=-1)


def _reference(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope_cos, rope_sin,
               grid_h, grid_w, q_rotated=False, chunk_in_cache=False):
    if chunk_in_cache:
        # the slots already hold the chunk: attend with those rows (k, v are not read, as in the fast backends);
        # the write below stores them again, unchanged, and advances pos
        k, v = _chunk_from_slots(k_cache, v_cache, pos, sink, q.shape[1])
    rope = _spec(rope_cos, rope_sin, grid_h, grid_w)
    if q_rotated:
        return _ref_rotated_q(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope)
    return chunk_attention_ref(q, k, v, k_cache, v_cache, pos, chunk_size=chunk_size, window=window, sink=sink,
                               write=write, scale=scale, rope=rope, return_lse=True)


def _cuda_unsupported(*args) -> str | None:
    *base, q_rotated, chunk_in_cache = args
    if q_rotated or chunk_in_cache:
        return ("the CUDA kernels take no pre-rotated q or pre-written chunk (q_rotated / chunk_in_cache; "
                "lipforcing.ops.cuda.chunk_attention rotates q and writes the cache itself)")
    try:
        from lipforcing.ops.cuda.chunk_attention import chunk_attention_cuda_unsupported
    except Exception as exc:  # pragma: no cover - depends on the build
        return f"could not import lipforcing.ops.cuda.chunk_attention: {exc}"
    return chunk_attention_cuda_unsupported(*base)


def _cuda(*args):
    from lipforcing.ops.cuda.chunk_attention import chunk_attention_cuda

    return chunk_attention_cuda(*args[:-2])  # the flags are False here (_cuda_unsupported)


def _backward_reference(grad_out, q, k, v, out, lse, k_cache, v_cache, pos, chunk_size, window, sink, scale,
                        rope_cos, rope_sin, grid_h, grid_w):
    return chunk_attention_backward_ref(grad_out, q, k, v, k_cache, v_cache, pos, chunk_size=chunk_size,
                                        window=window, sink=sink, scale=scale,
                                        rope=_spec(rope_cos, rope_sin, grid_h, grid_w))


def _run(backend, *args):
    res = _dispatch.implementation(_IMPLS, backend)(*args)
    out, lse = res if isinstance(res, tuple) else (res, None)
    if lse is None:
        lse = out.new_empty(0, dtype=torch.float32)
    return out.contiguous(), lse


@torch.library.custom_op("lipforcing::chunk_attention", mutates_args=("k_cache", "v_cache", "pos"))
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        pos: torch.Tensor, chunk_size: int, window: int, sink: int, write: bool, scale: float,
        rope_cos: Optional[torch.Tensor], rope_sin: Optional[torch.Tensor], grid_h: int, grid_w: int,
        backend: str, q_rotated: bool = False, chunk_in_cache: bool = False) -> torch.Tensor:
    return _run(backend, q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope_cos,
                rope_sin, grid_h, grid_w, q_rotated, chunk_in_cache)[0]


@_op.register_fake
def _(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope_cos, rope_sin, grid_h, grid_w,
      backend, q_rotated=False, chunk_in_cache=False):
    return torch.empty_like(q)


@torch.library.custom_op("lipforcing::chunk_attention_read", mutates_args=())
def _op_read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             pos: torch.Tensor, chunk_size: int, window: int, sink: int, scale: float,
             rope_cos: Optional[torch.Tensor], rope_sin: Optional[torch.Tensor], grid_h: int, grid_w: int,
             backend: str, q_rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(backend, q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, False, scale, rope_cos,
                rope_sin, grid_h, grid_w, q_rotated, False)


@_op_read.register_fake
def _(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, scale, rope_cos, rope_sin, grid_h, grid_w,
      backend, q_rotated=False):
    B, n, H, _ = q.shape
    lse_len = 0 if backend in ("cuda", "flash_attn", "cudnn") else n
    return torch.empty_like(q), q.new_empty((B, H, lse_len) if lse_len else (0,), dtype=torch.float32)


@torch.library.custom_op("lipforcing::chunk_attention_backward", mutates_args=())
def _op_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                 chunk_size: int, window: int, sink: int, scale: float, rope_cos: Optional[torch.Tensor],
                 rope_sin: Optional[torch.Tensor], grid_h: int, grid_w: int,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _dispatch.implementation(_BWD, backend)(grad_out, q, k, v, out, lse, k_cache, v_cache, pos,
                                                         chunk_size, window, sink, scale, rope_cos, rope_sin,
                                                         grid_h, grid_w)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


@_op_backward.register_fake
def _(grad_out, q, k, v, out, lse, k_cache, v_cache, pos, chunk_size, window, sink, scale, rope_cos, rope_sin,
      grid_h, grid_w, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _backward_backend(forward_backend: str, lse: torch.Tensor, device: torch.device) -> str:
    """The Triton flash-style backward when the forward left an LSE and Triton runs here, else the reference."""
    if forward_backend == "reference" or lse.numel() == 0:
        return "reference"
    try:
        return _dispatch.resolve("chunk_attention_backward", _BWD, "triton", device, (), {})
    except _dispatch.BackendUnavailable:
        return "reference"


def _setup_context(ctx, inputs, output):
    # (q_rotated, the last input, is always False here: the public op refuses it when gradients are recorded)
    q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, scale, rope_cos, rope_sin, grid_h, grid_w, \
        backend = inputs[:15]
    out, lse = output
    # No copy of the cache: the backward reads it in place with the position saved here (8 bytes).  That is
    # exact as long as at most one cache write happened in between (a write only overwrites the stale slots this
    # chunk did not see); the public op checks this before the backward runs.
    ctx.save_for_backward(q, k, v, out, lse, pos.clone(), rope_cos, rope_sin)
    ctx.cache = (k_cache, v_cache)
    ctx.args = (chunk_size, window, sink, scale, grid_h, grid_w, _backward_backend(backend, lse, q.device))


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, pos, rope_cos, rope_sin = ctx.saved_tensors
    k_cache, v_cache = ctx.cache
    chunk_size, window, sink, scale, grid_h, grid_w, backend = ctx.args
    dq, dk, dv = _op_backward(grad_out.contiguous(), q, k, v, out, lse, k_cache, v_cache, pos, chunk_size,
                              window, sink, scale, rope_cos, rope_sin, grid_h, grid_w, backend)
    return (dq, dk, dv) + (None,) * 13


_op_read.register_autograd(_backward, setup_context=_setup_context)


def _cache_unchanged_hook(cache: RollingKVCache):
    """A grad_fn pre-hook that refuses the backward when the cache was reset or written more than once since
    the forward (the keys that forward attended to may be gone: snapshot the cache instead)."""
    epoch, writes = cache.epoch, cache.writes

    def hook(grad_outputs):
        c = cache  # a strong reference: the saved tensors outlive the cache object, so its history must too
        if c.epoch != epoch or c.writes - writes > 1:
            raise RuntimeError(
                "chunk_attention backward: the RollingKVCache was " + ("reset" if c.epoch != epoch else
                f"written {c.writes - writes} times") + " after this forward, so the keys it attended to may be "
                "overwritten.  Run the backward before the next chunk's write, or give the forward a snapshot "
                "(a copy of the cache with cloned k, v, pos), as lipforcing.distill.rollout does.")
        return None

    return hook


def _check_rope(rope, q, cache: RollingKVCache) -> None:
    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope must be a lipforcing.ops.RopeSpec or None, got {type(rope).__name__}")
    if rope.head_dim != q.shape[-1]:
        raise ValueError(f"rope is built for head_dim {rope.head_dim}, but q has head_dim {q.shape[-1]}")
    for name, t in (("rope.cos", rope.cos), ("rope.sin", rope.sin)):
        if t.dtype != torch.float32 or t.device != q.device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor on {q.device}, got {t.dtype} on "
                             f"{t.device}" + ("" if t.is_contiguous() else " (non-contiguous)"))
    if rope.sin.shape != rope.cos.shape:
        raise ValueError(f"rope.sin shape {tuple(rope.sin.shape)} must equal rope.cos shape {tuple(rope.cos.shape)}")
    tpf = rope.tokens_per_frame
    for name, size in (("chunk_size", cache.chunk_size), ("window", cache.window), ("sink", cache.sink)):
        if size % tpf:
            raise ValueError(f"with rope, the cache's {name} ({size} tokens) must be a multiple of the tokens per "
                             f"frame {tpf} (grid {rope.grid})")
    frames = (cache.sink + cache.window) // tpf
    if frames > rope.max_positions or max(rope.grid) > rope.max_positions:
        raise ValueError(f"rope tables have {rope.max_positions} positions, the window needs {frames} frames and "
                         f"grid {rope.grid}")


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: RollingKVCache, *, write: bool,
                    rope: RopeSpec | None = None, scale: float | None = None, backend: str = "auto",
                    q_rotated: bool = False, chunk_in_cache: bool = False) -> torch.Tensor:
    """Attention of the chunk that comes next in a stream: its queries against the cached sink and window tokens
    and its own keys (bidirectional inside the chunk).  Differentiable in q, k, v when ``write=False``; the cache
    is a constant, read in place in the backward (no copy), which must therefore run before the cache is written
    a second time or reset (checked: RuntimeError).  The Triton backward is flash-style (recomputes the scores
    from the saved log-sum-exp); the reference backward runs for the reference backend and where Triton cannot.

    With ``cache.pos = P`` tokens already written, the chunk covers stream tokens ``P .. P+n-1`` and sees::

        [ sink: tokens 0..sink-1 | window: tokens P+chunk_size-window .. P-1 | current chunk: k, v ]

    each token once -- the rule of ``block_causal_attention`` for that chunk.  Streaming N chunks with
    ``write=True`` and ``rope=None`` equals ``block_causal_attention`` on the whole sequence.  The fast backends
    write first and then attend densely over the cache slots (see RollingKVCache); ``write=False`` reads the
    current chunk in place of the slots it would overwrite.  Masked slots are selected away, never multiplied by
    zero: a NaN in a slot the chunk does not see cannot reach the output; NaN/inf in q, k, v propagate.

    Parameters
    ----------
    q, k, v : (batch, n, heads, head_dim), ``n <= cache.chunk_size``, dtype and device of the cache, contiguous
        last dimension.  Only the last chunk of a stream may be short: once a short chunk has been written
        (``write=True``) every further call on the cache raises ValueError until ``cache.reset()`` (the host
        knows n, so this needs no device read; ``write=False`` calls with a short chunk are always allowed).
    cache : the layer's RollingKVCache.  **Mutated** when ``write=True``: k, v are stored (evicting the oldest
        non-sink tokens) and ``cache.pos`` advances by n.
    write : store this chunk's k, v.  Not differentiable: with gradient mode on and q, k or v requiring grad it
        raises ValueError (run the cache-write pass under ``torch.no_grad()``).
    rope : ``None`` -- q and k are used as given (absolute mode: already rotated).  A RopeSpec -- dynamic RoPE:
        the cache holds un-rotated keys; q and every key are rotated with *window-relative* time positions (sink
        frames first, then the window in order) and their height/width positions.  chunk_size, window and sink
        must then be whole frames.  The fast backends rotate once per step (q and the visible keys, in a small
        pass into the cache's workspace), never inside the attention loop.
    scale : softmax scale, default ``head_dim ** -0.5``; finite and > 0.
    backend : ``"auto" | "cuda" | "triton" | "reference" | "flash_attn" | "cudnn"`` (the last two: the
        flash-attn package and PyTorch SDPA's cuDNN kernel on the dense step; full chunks on CUDA only).
    q_rotated : (needs ``rope``) q is already rotated at its window-relative frame of this step -- exactly the
        rotation this op would give it, e.g. ``ops.qk_norm(..., rope=rope, rope_positions="window",
        cache=cache)`` -- so the op does not rotate it again (the keys are rotated as usual).  Not differentiable
        (ValueError when gradients would be recorded).
    chunk_in_cache : (needs ``write=True``) k and v are already stored in the chunk's cache slots, e.g. by
        ``ops.qk_norm(..., cache=cache, v=v)``: the op skips its store and only advances ``cache.pos``.  k and v
        are then not read (only their shapes are checked): they must be what the slots hold.  A ``write=False``
        pass must leave the cache alone, so it never takes this flag.
        Every backend honours both flags or declines them (the CUDA kernels decline: ``auto`` falls back).

    Returns
    -------
    (batch, n, heads, head_dim) in q's dtype.  No host synchronisation and no allocation besides the output and,
    for ``write=False`` on the Triton and reference backends, the (batch, heads, n) float32 log-sum-exp kept for a
    backward (CUDA-graph capturable: both come from the caching allocator).
    """
    if not isinstance(cache, RollingKVCache):
        raise TypeError(f"cache must be a lipforcing.RollingKVCache, got {type(cache).__name__}")
    layout = "(batch, chunk, heads, head_dim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, x, ndim=4, layout=layout)
    for name, x in (("k", k), ("v", v)):
        _checks.same("q", q, name, x)
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
    B, n, H, D = q.shape
    if D == 0:
        raise ValueError(f"q must have head_dim >= 1, got shape {tuple(q.shape)}")
    if q.device != cache.device:
        raise ValueError(f"q is on {q.device} but the cache is on {cache.device}")
    if q.dtype != cache.dtype:
        raise ValueError(f"q has dtype {q.dtype} but the cache stores {cache.dtype}")
    if (B, H, D) != (cache.batch, cache.heads, cache.head_dim):
        raise ValueError(f"q has (batch, heads, head_dim) = {(B, H, D)} but the cache was built for "
                         f"{(cache.batch, cache.heads, cache.head_dim)}")
    if not 1 <= n <= cache.chunk_size:
        raise ValueError(f"q has {n} tokens; a chunk must have 1..cache.chunk_size ({cache.chunk_size}) tokens")
    if cache.short_tail:
        raise ValueError(f"the cache already holds a short chunk ({cache.short_tail} of {cache.chunk_size} "
                         "tokens): only the last chunk of a stream may be short; call cache.reset() to start a new "
                         "stream")
    if not isinstance(write, bool):
        raise TypeError(f"write must be a bool, got {type(write).__name__}")
    if write and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError("chunk_attention(write=True) is not differentiable: run the cache-write pass under "
                         "torch.no_grad()")
    for name, flag in (("q_rotated", q_rotated), ("chunk_in_cache", chunk_in_cache)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if q_rotated and rope is None:
        raise ValueError("q_rotated=True needs rope= (the RopeSpec q was rotated with; without rope the op never "
                         "rotates q)")
    if q_rotated and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError("chunk_attention(q_rotated=True) has no backward: call it under torch.no_grad(), or pass "
                         "the un-rotated q without q_rotated")
    if chunk_in_cache and not write:
        raise ValueError("chunk_in_cache=True needs write=True: a write=False pass must not find its chunk in the "
                         "cache (store it with ops.qk_norm(v=...) only on the cache-write pass)")
    _checks.scale(scale)
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if rope is not None:
        _check_rope(rope, q, cache)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    cos, sin = (rope.cos, rope.sin) if rope is not None else (None, None)
    gh, gw = rope.grid if rope is not None else (0, 0)
    args = (q, k, v, cache.k, cache.v, cache.pos, cache.chunk_size, cache.window, cache.sink, write, scale, cos, sin,
            gh, gw, q_rotated, chunk_in_cache)
    recorded = not write and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if recorded and _dispatch.requested_backend(backend) == "auto":
        # the Triton forward saves the LSE for the Triton backward (the other fast backends would leave the
        # fp32 reference backward, whose score matrix does not fit at 14B)
        name = _dispatch.resolve("chunk_attention (with autograd)", _GRAD_IMPLS, backend, q.device, args, {})
    else:
        name = _dispatch.resolve("chunk_attention", _IMPLS, backend, q.device, args, {})
    if write:
        out = _op(*args[:15], name, q_rotated, chunk_in_cache)
        cache.writes += 1
        if n < cache.chunk_size:
            cache.short_tail = n
        return out
    out, _ = _op_read(*args[:9], *args[10:15], name, q_rotated)
    if out.grad_fn is not None:
        out.grad_fn.register_prehook(_cache_unchanged_hook(cache))
    return out


def takes_prepared(q: torch.Tensor, cache: RollingKVCache, *, write: bool, rope: RopeSpec | None,
                   backend: str = "auto") -> bool:
    """Whether a caller may rotate q and (``write=True``) store the chunk ahead of ``chunk_attention`` -- with
    ``ops.qk_norm(..., rope_positions="window", cache=cache, v=...)`` -- and then pass ``q_rotated=True,
    chunk_in_cache=write``: True when ``rope`` is given and the backend chosen for these inputs is the same with
    the flags as without them (so taking them never moves the step to a slower backend, e.g. off the CUDA kernels,
    which decline them).  Host-side only (q's shape, dtype and device; nothing is read from the device)."""
    if rope is None:
        return False
    args = (q, q, q, cache.k, cache.v, cache.pos, cache.chunk_size, cache.window, cache.sink, write, 1.0, rope.cos,
            rope.sin, *rope.grid)
    try:
        plain = _dispatch.resolve("chunk_attention", _IMPLS, backend, q.device, args + (False, False), {})
        # asked by name: a backend that declines the flags raises here (auto would log a fallback)
        _dispatch.resolve("chunk_attention", _IMPLS, plain, q.device, args + (True, write), {})
    except _dispatch.BackendUnavailable:
        return False
    return True
