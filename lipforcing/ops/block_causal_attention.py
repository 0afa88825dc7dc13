"""``block_causal_attention``: full-sequence attention with the block-causal (chunk) mask, window and sink."""
from __future__ import annotations

import math
from typing import Optional

import torch

from lipforcing import _checks
from lipforcing.ops import _dispatch
from lipforcing.ops._dispatch import Impl
from lipforcing.ops.reference import block_causal_attention_backward_ref, block_causal_attention_ref

# Backend signatures:
#   forward(q, k, v, chunk_size, window, sink, scale) -> (out, lse (B, H, L) float32)
#   backward(grad_out, q, k, v, out, lse, chunk_size, window, sink, scale) -> (dq, dk, dv)
_FWD = {
    "reference": Impl(__name__, "_forward_reference"),
    "triton": Impl("lipforcing.kernels.block_causal_attention", "block_causal_attention_triton"),
}
_BWD = {
    "reference": Impl(__name__, "_backward_reference"),
    "triton": Impl("lipforcing.kernels.block_causal_attention", "block_causal_attention_backward_triton"),
}


def _forward_reference(q, k, v, chunk_size, window, sink, scale):
    return block_causal_attention_ref(q, k, v, chunk_size, window, sink, scale)


def _backward_reference(grad_out, q, k, v, out, lse, chunk_size, window, sink, scale):
    return block_causal_attention_backward_ref(grad_out, q, k, v, chunk_size, window, sink, scale)


@torch.library.custom_op("lipforcing::block_causal_attention", mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, window: Optional[int], sink: int,
        scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _dispatch.implementation(_FWD, backend)(q, k, v, chunk_size, window, sink, scale)
    return out.contiguous(), lse.contiguous()


@_op.register_fake
def _(q, k, v, chunk_size, window, sink, scale, backend):
    B, L, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("lipforcing::block_causal_attention_backward", mutates_args=())
def _op_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, chunk_size: int, window: Optional[int], sink: int, scale: float,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _dispatch.implementation(_BWD, backend)(grad_out, q, k, v, out, lse, chunk_size, window, sink,
                                                         scale)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


@_op_backward.register_fake
def _(grad_out, q, k, v, out, lse, chunk_size, window, sink, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, chunk_size, window, sink, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (chunk_size, window, sink, scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    chunk_size, window, sink, scale, backend = ctx.args
    dq, dk, dv = _op_backward(grad_out.contiguous(), q, k, v, out, lse, chunk_size, window, sink, scale, backend)
    return dq, dk, dv, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int,
                           window: int | None = None, sink: int = 0, scale: float | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """Full-sequence attention, bidirectional inside a chunk and causal across chunks, with a window and sinks.

    Query ``i`` is in chunk ``c = i // chunk_size``; with ``end_c = (c + 1) * chunk_size`` it attends to key ``j``
    iff ``j < end_c`` and (``window is None`` or ``j < sink`` or ``j >= end_c - window``).  Sizes in tokens.
    Example, chunk_size=2, window=4, sink=1, L=8 (``x`` = attend)::

              keys 0 1 2 3 4 5 6 7
        q 0,1        x x . . . . . .
        q 2,3        x x x x . . . .
        q 4,5        x . x x x x . .
        q 6,7        x . . . x x x x

    ``L % chunk_size != 0`` is allowed: the last chunk is short (its window is measured from its nominal end).

    Parameters
    ----------
    q, k, v : (batch, seqlen, heads, head_dim) tensors of one dtype (float32, float16, bfloat16), one device,
        contiguous last dimension.
    chunk_size : tokens per chunk (>= 1).
    window : tokens each chunk may look back, counted from its end and including itself (``>= chunk_size``);
        ``None`` = all earlier tokens.
    sink : leading tokens that stay visible to every chunk (ignored when ``window is None``).
    scale : softmax scale, default ``head_dim ** -0.5``.
    backend : ``"auto" | "cuda" | "triton" | "reference"`` (``LIPFORCING_BACKEND`` replaces ``"auto"``).

    Returns
    -------
    (batch, seqlen, heads, head_dim) in q's dtype.  Differentiable in q, k, v.
    """
    _checks.tensor("q", q, ndim=4, layout="(batch, seqlen, heads, head_dim)")
    _checks.tensor("k", k, ndim=4, layout="(batch, seqlen, heads, head_dim)")
    _checks.tensor("v", v, ndim=4, layout="(batch, seqlen, heads, head_dim)")
    for name, x in (("k", k), ("v", v)):
        _checks.same("q", q, name, x)
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q (batch, seqlen, heads, head_dim) = {tuple(q.shape)}, "
                             f"got {tuple(x.shape)}")
    if q.shape[1] == 0:
        raise ValueError("q must have seqlen >= 1, got 0")
    if q.shape[-1] == 0:
        raise ValueError("q must have head_dim >= 1, got 0")
    _checks.block_mask_args(chunk_size, window, sink)
    _checks.scale(scale)
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number > 0 (or None for head_dim ** -0.5), got {scale}")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    args = (q, k, v, chunk_size, window, sink, scale)
    name = _dispatch.resolve("block_causal_attention", _FWD, backend, q.device, args, {})
    out, _ = _op(q, k, v, chunk_size, window, sink, scale, name)
    return out
