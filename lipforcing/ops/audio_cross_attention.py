"""``audio_cross_attention``: text cross-attention plus per-frame audio-window attention, summed."""
from __future__ import annotations

import math

import torch

from lipforcing import _checks
from lipforcing.ops import _dispatch
from lipforcing.ops._dispatch import Impl
from lipforcing.ops.reference import audio_cross_attention_backward_ref, audio_cross_attention_ref

# Backend signatures:
#   forward(q, text_k, text_v, audio_k, audio_v, tokens_per_frame, audio_scale, scale)
#       -> (out, lse_text (B, H, Lq) float32, lse_audio (B, H, Lq) float32)
#   backward(grad_out, q, text_k, text_v, audio_k, audio_v, out, lse_text, lse_audio, tokens_per_frame,
#            audio_scale, scale) -> (dq, dtext_k, dtext_v, daudio_k, daudio_v)
_FWD = {
    "reference": Impl(__name__, "_forward_reference"),
    "triton": Impl("lipforcing.kernels.audio_cross_attention", "audio_cross_attention_triton"),
    "cuda": Impl("lipforcing.ops.cuda.audio_cross_attention", "audio_cross_attention_cuda"),
}
_BWD = {
    "reference": Impl(__name__, "_backward_reference"),
    "triton": Impl("lipforcing.kernels.audio_cross_attention", "audio_cross_attention_backward_triton"),
    # the CUDA forward writes the same (out, lse_text, lse_audio), so its backward is the Triton one
    "cuda": Impl("lipforcing.kernels.audio_cross_attention", "audio_cross_attention_backward_triton"),
}


def _forward_reference(q, text_k, text_v, audio_k, audio_v, tokens_per_frame, audio_scale, scale):
    return audio_cross_attention_ref(q, text_k, text_v, audio_k, audio_v, tokens_per_frame, audio_scale, scale)


def _backward_reference(grad_out, q, text_k, text_v, audio_k, audio_v, out, lse_text, lse_audio, tokens_per_frame,
                        audio_scale, scale):
    return audio_cross_attention_backward_ref(grad_out, q, text_k, text_v, audio_k, audio_v, tokens_per_frame,
                                              audio_scale, scale)


@torch.library.custom_op("lipforcing::audio_cross_attention", mutates_args=())
def _op(q: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor, audio_k: torch.Tensor, audio_v: torch.Tensor,
        tokens_per_frame: int, audio_scale: float, scale: float,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse_t, lse_a = _dispatch.implementation(_FWD, backend)(q, text_k, text_v, audio_k, audio_v,
                                                                tokens_per_frame, audio_scale, scale)
    return out.contiguous(), lse_t.contiguous(), lse_a.contiguous()


@_op.register_fake
def _(q, text_k, text_v, audio_k, audio_v, tokens_per_frame, audio_scale, scale, backend):
    B, L, H, _ = q.shape
    lse = q.new_empty((B, H, L), dtype=torch.float32)
    return torch.empty_like(q), lse, torch.empty_like(lse)


@torch.library.custom_op("lipforcing::audio_cross_attention_backward", mutates_args=())
def _op_backward(grad_out: torch.Tensor, q: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor,
                 audio_k: torch.Tensor, audio_v: torch.Tensor, out: torch.Tensor, lse_text: torch.Tensor,
                 lse_audio: torch.Tensor, tokens_per_frame: int, audio_scale: float, scale: float,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _dispatch.implementation(_BWD, backend)(grad_out, q, text_k, text_v, audio_k, audio_v, out, lse_text,
                                                    lse_audio, tokens_per_frame, audio_scale, scale)
    refs = (q, text_k, text_v, audio_k, audio_v)
    return tuple((torch.zeros_like(r) if g is None else g.to(r.dtype).contiguous()) for g, r in zip(grads, refs))


@_op_backward.register_fake
def _(grad_out, q, text_k, text_v, audio_k, audio_v, out, lse_text, lse_audio, tokens_per_frame, audio_scale,
      scale, backend):
    return tuple(torch.empty_like(x) for x in (q, text_k, text_v, audio_k, audio_v))


def _setup_context(ctx, inputs, output):
    q, text_k, text_v, audio_k, audio_v, tokens_per_frame, audio_scale, scale, backend = inputs
    out, lse_t, lse_a = output
    ctx.save_for_backward(q, text_k, text_v, audio_k, audio_v, out, lse_t, lse_a)
    ctx.args = (tokens_per_frame, audio_scale, scale, backend)
    ctx.mark_non_differentiable(lse_t, lse_a)


def _backward(ctx, grad_out, _g1, _g2):
    grads = _op_backward(grad_out.contiguous(), *ctx.saved_tensors, *ctx.args)
    return (*grads, None, None, None, None)


_op.register_autograd(_backward, setup_context=_setup_context)


def audio_cross_attention(q: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor, audio_k: torch.Tensor,
                          audio_v: torch.Tensor, *, tokens_per_frame: int, audio_scale: float = 1.0,
                          scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Text cross-attention plus per-frame audio attention in one op (the ``"cross_attn"`` audio mode)::

        out[:, f*T:(f+1)*T] = softmax(q_f text_k^T * scale) text_v
                              + audio_scale * softmax(q_f audio_k[:, f]^T * scale) audio_v[:, f]

    where ``q_f`` are the ``T = tokens_per_frame`` queries of latent frame ``f``.  Every frame sees all text
    tokens and only its own audio window.

    Parameters
    ----------
    q : (batch, frames * tokens_per_frame, heads, head_dim).
    text_k, text_v : (batch, text_len, heads, head_dim), shared by all frames; ``text_len = 0`` gives audio only.
    audio_k, audio_v : (batch, frames, audio_window, heads, head_dim), frame f's audio tokens (1..64 of them).
    tokens_per_frame : query tokens per latent frame.
    audio_scale : weight of the audio branch.
    scale : softmax scale, default ``head_dim ** -0.5``.
    backend : ``"auto" | "cuda" | "triton" | "reference"``.

    All tensors share q's dtype (float32, float16, bfloat16) and device and have a contiguous last dimension.

    Returns
    -------
    (batch, frames * tokens_per_frame, heads, head_dim) in q's dtype.  Differentiable in every tensor input.
    """
    _checks.tensor("q", q, ndim=4, layout="(batch, frames * tokens_per_frame, heads, head_dim)")
    _checks.tensor("text_k", text_k, ndim=4, layout="(batch, text_len, heads, head_dim)")
    _checks.tensor("text_v", text_v, ndim=4, layout="(batch, text_len, heads, head_dim)")
    _checks.tensor("audio_k", audio_k, ndim=5, layout="(batch, frames, audio_window, heads, head_dim)")
    _checks.tensor("audio_v", audio_v, ndim=5, layout="(batch, frames, audio_window, heads, head_dim)")
    for name, x in (("text_k", text_k), ("text_v", text_v), ("audio_k", audio_k), ("audio_v", audio_v)):
        _checks.same("q", q, name, x)
    _checks.positive_int("tokens_per_frame", tokens_per_frame)
    B, L, H, D = q.shape
    if D == 0:
        raise ValueError("q must have head_dim >= 1, got 0")
    if L == 0 or L % tokens_per_frame:
        raise ValueError(f"q has {L} tokens, which is not a whole number of frames of tokens_per_frame="
                         f"{tokens_per_frame} tokens")
    F = L // tokens_per_frame
    if text_v.shape != text_k.shape:
        raise ValueError(f"text_v must have the shape of text_k {tuple(text_k.shape)}, got {tuple(text_v.shape)}")
    if audio_v.shape != audio_k.shape:
        raise ValueError(f"audio_v must have the shape of audio_k {tuple(audio_k.shape)}, got {tuple(audio_v.shape)}")
    if text_k.shape[0] != B or text_k.shape[2:] != (H, D):
        raise ValueError(f"text_k must be (batch={B}, text_len, heads={H}, head_dim={D}), got {tuple(text_k.shape)}")
    if audio_k.shape[0] != B or audio_k.shape[3:] != (H, D):
        raise ValueError(f"audio_k must be (batch={B}, frames, audio_window, heads={H}, head_dim={D}), got "
                         f"{tuple(audio_k.shape)}")
    if audio_k.shape[1] != F:
        raise ValueError(f"audio_k has {audio_k.shape[1]} frames but q has {F} frames ({L} tokens / "
                         f"tokens_per_frame {tokens_per_frame})")
    if audio_k.shape[2] < 1:
        raise ValueError("audio_k must have an audio window of at least 1 token, got 0")
    if isinstance(audio_scale, bool) or not isinstance(audio_scale, (int, float)):
        raise TypeError(f"audio_scale must be a float, got {type(audio_scale).__name__}")
    if not math.isfinite(audio_scale):
        raise ValueError(f"audio_scale must be a finite number, got {audio_scale}")
    _checks.scale(scale)
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number > 0 (or None for head_dim ** -0.5), got {scale}")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    args = (q, text_k, text_v, audio_k, audio_v, tokens_per_frame, float(audio_scale), scale)
    name = _dispatch.resolve("audio_cross_attention", _FWD, backend, q.device, args, {})
    out, _, _ = _op(*args, name)
    return out
