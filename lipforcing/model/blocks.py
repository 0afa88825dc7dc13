"""The Wan2.1 transformer block and output head (key names as in Wan's checkpoints).

A block does not know how its self-attention is masked or where its keys come from: the network passes an
``attend(q, k, v) -> out`` function (full-sequence block-causal, bidirectional, or one streaming chunk against a
KV cache), so one block serves the teacher, the student's training forward and the student's streaming step.
All attention goes through ``lipforcing.ops``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from lipforcing import ops
from lipforcing.config import ModelConfig
from lipforcing.model.layers import LayerNorm, RMSNorm, xavier_linear_

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` per latent frame, float32."""
    B, L, D = x.shape
    Fr = shift.shape[1]
    xv = x.view(B, Fr, L // Fr, D)
    return (xv * (1 + scale[:, :, None]) + shift[:, :, None]).view(B, L, D)


def gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Residual update ``x + y * gate`` per latent frame (x float32)."""
    B, L, D = x.shape
    Fr = gate.shape[1]
    return x + (y.float().view(B, Fr, L // Fr, D) * gate[:, :, None]).view(B, L, D)


class SelfAttention(nn.Module):
    """q, k, v, o projections and RMSNorm on q and k over the full dim (``norm_q``, ``norm_k``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.dim
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, config.eps)
        self.norm_k = RMSNorm(dim, config.eps)

    def qkv(self, x: torch.Tensor, norm: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, dim) in the parameter dtype -> q, k, v (B, L, heads, head_dim), un-rotated (``norm=False``:
        q and k before ``norm_q``/``norm_k``, for a fused ``ops.qk_norm``)."""
        B, L, _ = x.shape
        shape = (B, L, self.num_heads, self.head_dim)
        q = (self.norm_q(self.q(x)) if norm else self.q(x)).view(shape)
        k = (self.norm_k(self.k(x)) if norm else self.k(x)).view(shape)
        v = self.v(x).view(shape)
        return q, k, v

    def reset_parameters(self) -> None:
        for lin in (self.q, self.k, self.v, self.o):
            xavier_linear_(lin)
        self.norm_q.reset_parameters()
        self.norm_k.reset_parameters()


class CrossAttention(SelfAttention):
    """Text cross-attention (Wan T2V: the same q, k, v, o, norm_q, norm_k as self-attention) and, in ``"cross_attn"`` audio mode, the per-frame audio branch that shares
    the query: ``k_audio``, ``v_audio`` (Linear(audio_token_dim -> dim)) and ``norm_k_audio`` (RMSNorm).

    Both branches are computed by one ``ops.audio_cross_attention`` call::

        out = o( softmax(q text_k^T) text_v + audio_scale * softmax(q_f audio_k[f]^T) audio_v[f] )

    Without audio the audio branch is a single zero token with ``audio_scale = 0`` (text attention only)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        dim = config.dim
        self.has_audio = config.audio_injection == "cross_attn"
        if self.has_audio:
            self.k_audio = nn.Linear(config.audio_token_dim, dim)
            self.v_audio = nn.Linear(config.audio_token_dim, dim)
            self.norm_k_audio = RMSNorm(dim, config.eps)

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded text (B, Lt, dim) -> k, v (B, Lt, heads, head_dim).  Computed once per stream."""
        B, Lt, _ = context.shape
        shape = (B, Lt, self.num_heads, self.head_dim)
        return self.norm_k(self.k(context)).view(shape), self.v(context).view(shape)

    def audio_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio tokens (B, F, A, audio_token_dim) -> k, v (B, F, A, heads, head_dim)."""
        B, Fr, A, _ = tokens.shape
        shape = (B, Fr, A, self.num_heads, self.head_dim)
        tokens = tokens.to(self.k_audio.weight.dtype)
        return self.norm_k_audio(self.k_audio(tokens)).view(shape), self.v_audio(tokens).view(shape)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim) in the parameter dtype -> q (B, L, heads, head_dim)."""
        B, L, _ = x.shape
        return self.norm_q(self.q(x)).view(B, L, self.num_heads, self.head_dim)

    def attend(self, q: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor],
               audio_kv: tuple[torch.Tensor, torch.Tensor] | None, *, tokens_per_frame: int, audio_scale: float,
               backend: str) -> torch.Tensor:
        """The fused text (+ audio) attention of q (B, F*tpf, heads, head_dim); returns the same shape."""
        B, L, H, D = q.shape
        tk, tv = text_kv
        if audio_kv is None:
            # text only: a single zero audio token per frame weighted by 0
            zero = q.new_zeros(B, L // tokens_per_frame, 1, H, D)
            ak, av, audio_scale = zero, zero, 0.0
        else:
            ak, av = audio_kv
        return ops.audio_cross_attention(q, tk, tv, ak, av, tokens_per_frame=tokens_per_frame,
                                         audio_scale=float(audio_scale), backend=backend)

    def forward(self, x: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor],
                audio_kv: tuple[torch.Tensor, torch.Tensor] | None, *, tokens_per_frame: int,
                audio_scale: float, backend: str) -> torch.Tensor:
        """x (B, F*tpf, dim) in the parameter dtype; returns (B, F*tpf, dim)."""
        out = self.attend(self.query(x), text_kv, audio_kv, tokens_per_frame=tokens_per_frame,
                          audio_scale=audio_scale, backend=backend)
        return self.o(out.flatten(2))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.has_audio:
            xavier_linear_(self.k_audio)
            xavier_linear_(self.v_audio)
            self.norm_k_audio.reset_parameters()


class WanBlock(nn.Module):
    """One Wan2.1 block: adaLN-modulated self-attention, affine-LayerNorm text (+audio) cross-attention,
    adaLN-modulated tanh-GELU FFN.  Keys: ``norm1`` (no params), ``self_attn.*``, ``norm3.{weight,bias}``,
    ``cross_attn.*``, ``norm2`` (no params), ``ffn.{0,2}``, ``modulation`` (1, 6, dim)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.dim
        self.dim = dim
        self.norm1 = LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(config)
        self.norm3 = LayerNorm(dim, eps=config.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(config)
        self.norm2 = LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's text K/V (computed once per clip; a block method so FSDP gathers its weights)."""
        return self.cross_attn.text_kv(context)

    def audio_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's audio K/V in ``"cross_attn"`` mode."""
        return self.cross_attn.audio_kv(tokens)

    def forward(self, x: torch.Tensor, e: torch.Tensor, attend: AttendFn, text_kv, audio_kv, *,
                tokens_per_frame: int, audio_scale: float, backend: str) -> torch.Tensor:
        """
        x : (B, F*tpf, dim) float32 residual stream.
        e : (B, F, 6, dim) float32 time projection per latent frame.
        attend : (q, k, v) (B, L, heads, head_dim) un-rotated -> (B, L, heads, head_dim); applies RoPE and the
            mask (and may write a KV cache).  An attend with a ``prepare_qk`` attribute (the streaming chunk step
            on the Triton path) gets q, k from ``attend.prepare_qk(q_raw, k_raw, norm_q, norm_k)`` instead: the
            projections before the RMSNorms, normalised (and, as that attend expects, rotated) in one launch.
        text_kv : text (k, v) of this block; audio_kv : audio (k, v) (B, F, A, heads, head_dim) or None.
        Returns the new float32 residual stream.
        """
        prepare = getattr(attend, "prepare_qk", None)
        if prepare is None:
            mod, q, k, v = self.pre_attention(x, e)
        else:
            mod, q, k, v = self.pre_attention(x, e, norm_qk=False)
            q, k = prepare(q, k, self.self_attn.norm_q, self.self_attn.norm_k)
        x, cq = self.mid(x, attend(q, k, v), mod)
        c = self.cross_attn.attend(cq, text_kv, audio_kv, tokens_per_frame=tokens_per_frame,
                                   audio_scale=audio_scale, backend=backend)
        return self.post(x, c, mod)

    # The dense parts between the two attention calls.  They are plain tensor functions (no caches, no Python
    # state), so ``torch.compile`` can compile them once and reuse the graph for every block
    # (see LipSyncDiT.compile_blocks).
    def pre_attention(self, x: torch.Tensor, e: torch.Tensor, norm_qk: bool = True):
        """-> (mod (B, F, 6, dim) float32, q, k, v (B, L, heads, head_dim) un-rotated; q, k un-normalised with
        ``norm_qk=False``)."""
        mod = self.modulation.float()[:, None] + e
        h = modulate(self.norm1(x), mod[:, :, 0], mod[:, :, 1]).to(self.ffn[0].weight.dtype)
        q, k, v = self.self_attn.qkv(h, norm=norm_qk)
        return mod, q, k, v

    def mid(self, x: torch.Tensor, y: torch.Tensor, mod: torch.Tensor):
        """Self-attention output y (B, L, heads, head_dim) -> (new residual, cross-attention query)."""
        x = gated(x, self.self_attn.o(y.flatten(2)), mod[:, :, 2])
        return x, self.cross_attn.query(self.norm3(x).to(self.ffn[0].weight.dtype))

    def post(self, x: torch.Tensor, c: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """Cross-attention output c (B, L, heads, head_dim) -> residual after the cross-attention and the FFN."""
        x = x + self.cross_attn.o(c.flatten(2)).float()
        y = self.ffn(modulate(self.norm2(x), mod[:, :, 3], mod[:, :, 4]).to(self.ffn[0].weight.dtype))
        return gated(x, y, mod[:, :, 5])

    def reset_parameters(self) -> None:
        self.self_attn.reset_parameters()
        self.cross_attn.reset_parameters()
        self.norm3.reset_parameters()
        xavier_linear_(self.ffn[0])
        xavier_linear_(self.ffn[2])
        with torch.no_grad():
            self.modulation.normal_(0.0, 1.0 / math.sqrt(self.dim))


class Head(nn.Module):
    """Output head: LayerNorm (no params), 2-vector modulation from the time embedding, ``Linear(dim ->
    prod(patch) * out_dim)``.  Keys ``head.head.{weight,bias}``, ``head.modulation`` (1, 2, dim)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim = config.dim
        self.norm = LayerNorm(config.dim, eps=config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, config.patch_numel * config.out_dim)
        self.modulation = nn.Parameter(torch.empty(1, 2, config.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x (B, F*tpf, dim) float32; e (B, F, dim) float32 time embedding.  Returns (B, F*tpf, patch*out_dim)
        float32."""
        mod = self.modulation.float()[:, None] + e[:, :, None]  # (B, F, 2, dim)
        shift, scale = mod.unbind(2)
        h = modulate(self.norm(x), shift, scale)
        w = self.head.weight.float()
        b = None if self.head.bias is None else self.head.bias.float()
        return torch.nn.functional.linear(h, w, b)

    def reset_parameters(self) -> None:
        xavier_linear_(self.head)
        with torch.no_grad():
            self.modulation.normal_(0.0, 1.0 / math.sqrt(self.dim))
