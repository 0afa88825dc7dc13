"""An independent float64 re-statement of the Wan2.1 DiT forward (+ OmniAvatar audio), written from the
architecture description in DESIGN.md section 2 and straight from a state dict: Conv3d patch embedding, complex
RoPE (Wan's ``torch.polar`` form), explicit masks, plain softmax attention.  It shares no code with lipforcing.model
and is the oracle of the model tests.

The self-attention is supplied by the caller as ``attend(layer, q, k, v)`` with un-rotated q, k (B, L, H, D),
so the same oracle covers bidirectional, block-causal and streaming (dynamic RoPE) attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rope_freqs(head_dim: int, max_pos: int = 64, theta: float = 1e4):
    """Wan's tables: complex (max_pos, n/2) for the time / height / width parts with n = d - 4(d//6), 2(d//6),
    2(d//6) real dims."""
    d = head_dim
    parts = []
    for n in (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)):
        inv = 1.0 / theta ** (torch.arange(0, n, 2, dtype=torch.float64) / n)
        ang = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
        parts.append(torch.polar(torch.ones_like(ang), ang))
    return parts


def rotate(x: torch.Tensor, t_pos, gh: int, gw: int, freqs) -> torch.Tensor:
    """x (B, L, H, D) float64; token l has time position t_pos[l] and in-frame index l % (gh*gw)."""
    B, L, H, D = x.shape
    ft, fh, fw = freqs
    idx = torch.arange(L) % (gh * gw)
    t_pos = torch.as_tensor(t_pos).long()
    f = torch.cat([ft[t_pos], fh[idx // gw], fw[idx % gw]], dim=1)  # (L, D/2)
    xc = torch.view_as_complex(x.reshape(B, L, H, D // 2, 2).contiguous())
    return torch.view_as_real(xc * f[None, :, None, :]).reshape(B, L, H, D)


def softmax_attention(q, k, v, mask=None):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def frame_mask(frames: int, tpf: int, chunk: int | None, window: int | None, sink: int) -> torch.Tensor:
    """(L, L) bool token mask from the rule stated in latent frames: the query frame's chunk ends at e; key
    frame j is visible iff j < e and (window is None or j < sink or j >= e - window).  chunk=None: all."""
    m = torch.zeros(frames, frames, dtype=torch.bool)
    for i in range(frames):
        e = frames if chunk is None else min((i // chunk + 1) * chunk, 10**9)
        for j in range(frames):
            m[i, j] = j < e and (window is None or j < sink or j >= e - window)
    return m.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)


class WanOracle:
    def __init__(self, state_dict, *, num_heads, num_layers, patch=(1, 2, 2), freq_dim=256, eps=1e-6,
                 audio_injection="add", audio_tokens=1):
        self.W = {k: v.detach().double() for k, v in state_dict.items()}
        self.H, self.L, self.patch, self.freq_dim, self.eps = num_heads, num_layers, patch, freq_dim, eps
        self.audio_injection, self.audio_tokens = audio_injection, audio_tokens

    def lin(self, x, name):
        return F.linear(x, self.W[name + ".weight"], self.W.get(name + ".bias"))

    def rms(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.W[name + ".weight"]

    def ln(self, x, name=None):
        w = b = None
        if name is not None:
            w, b = self.W[name + ".weight"], self.W[name + ".bias"]
        return F.layer_norm(x, x.shape[-1:], w, b, self.eps)

    # ---------------------------------------------------------------------------------------------- pieces
    def embed(self, x):
        h = F.conv3d(x.double(), self.W["patch_embedding.weight"], self.W["patch_embedding.bias"],
                     stride=self.patch)
        B, D, Fr, gh, gw = h.shape
        return h.flatten(2).transpose(1, 2), (Fr, gh, gw)

    def time(self, t):  # t (B, F) on 0..1000
        half = self.freq_dim // 2
        w = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        a = t.double()[..., None] * w
        s = torch.cat([a.cos(), a.sin()], -1)
        e = self.lin(F.silu(self.lin(s, "time_embedding.0")), "time_embedding.2")
        e0 = self.lin(F.silu(e), "time_projection.1")
        return e, e0.unflatten(-1, (6, -1))

    def text(self, context):
        return self.lin(F.gelu(self.lin(context.double(), "text_embedding.0"), approximate="tanh"),
                        "text_embedding.2")

    def audio(self, audio):  # (B, F, 4, Da) -> (B, F, A, Dt)
        B, Fr = audio.shape[:2]
        a = self.lin(audio.double().reshape(B, Fr, -1), "audio_proj.proj")
        a = a.reshape(B, Fr, self.audio_tokens, -1)
        return F.layer_norm(a, a.shape[-1:], self.W["audio_proj.norm_out.weight"],
                            self.W["audio_proj.norm_out.bias"], 1e-5)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x, t, context, audio, attend, audio_scale=1.0):
        """x (B, C, F, H, W); t (B, F); attend(layer, q, k, v) -> (B, L, H, D).  Returns (B, 16, F, H, W)."""
        h, (Fr, gh, gw) = self.embed(x)
        B, Ltok, D = h.shape
        tpf = gh * gw
        e, e0 = self.time(t)
        ctx = self.text(context)
        a = None if audio is None else self.audio(audio)
        per_tok = lambda m: m.repeat_interleave(tpf, dim=1)  # (B, F, ...) -> (B, L, ...)
        hd = D // self.H
        for i in range(self.L):
            p = f"blocks.{i}."
            if a is not None and self.audio_injection == "add" and 2 <= i <= self.L // 2:
                h = h + per_tok(self.lin(a[:, :, 0], f"audio_cond_projs.{i - 2}"))
            mod = per_tok(self.W[p + "modulation"][:, None] + e0)  # (B, L, 6, D)
            x1 = self.ln(h) * (1 + mod[:, :, 1]) + mod[:, :, 0]
            q = self.rms(self.lin(x1, p + "self_attn.q"), p + "self_attn.norm_q").view(B, Ltok, self.H, hd)
            k = self.rms(self.lin(x1, p + "self_attn.k"), p + "self_attn.norm_k").view(B, Ltok, self.H, hd)
            v = self.lin(x1, p + "self_attn.v").view(B, Ltok, self.H, hd)
            y = attend(i, q, k, v).reshape(B, Ltok, D)
            h = h + self.lin(y, p + "self_attn.o") * mod[:, :, 2]
            x3 = self.ln(h, p + "norm3")
            cq = self.rms(self.lin(x3, p + "cross_attn.q"), p + "cross_attn.norm_q").view(B, Ltok, self.H, hd)
            ck = self.rms(self.lin(ctx, p + "cross_attn.k"), p + "cross_attn.norm_k").view(B, -1, self.H, hd)
            cv = self.lin(ctx, p + "cross_attn.v").view(B, -1, self.H, hd)
            out = softmax_attention(cq, ck, cv)
            if a is not None and self.audio_injection == "cross_attn":
                ak = self.rms(self.lin(a, p + "cross_attn.k_audio"), p + "cross_attn.norm_k_audio")
                av = self.lin(a, p + "cross_attn.v_audio")
                for f in range(Fr):
                    sl = slice(f * tpf, (f + 1) * tpf)
                    out[:, sl] += audio_scale * softmax_attention(
                        cq[:, sl], ak[:, f].view(B, -1, self.H, hd), av[:, f].view(B, -1, self.H, hd))
            h = h + self.lin(out.reshape(B, Ltok, D), p + "cross_attn.o")
            x2 = self.ln(h) * (1 + mod[:, :, 4]) + mod[:, :, 3]
            y = self.lin(F.gelu(self.lin(x2, p + "ffn.0"), approximate="tanh"), p + "ffn.2")
            h = h + y * mod[:, :, 5]
        hm = per_tok(self.W["head.modulation"][:, None] + e[:, :, None])  # (B, L, 2, D)
        o = self.lin(self.ln(h) * (1 + hm[:, :, 1]) + hm[:, :, 0], "head.head")
        pt, ph, pw = self.patch
        o = o.reshape(B, Fr, gh, gw, pt, ph, pw, -1)
        o = torch.einsum("bfhwpqrc->bcfphqwr", o)
        return o.reshape(B, o.shape[1], Fr * pt, gh * ph, gw * pw)


def full_attention(freqs, frames, gh, gw, mask=None):
    """attend() for a full sequence with absolute RoPE and an optional (L, L) mask."""
    t_pos = torch.arange(frames).repeat_interleave(gh * gw)

    def attend(_layer, q, k, v):
        return softmax_attention(rotate(q, t_pos, gh, gw, freqs), rotate(k, t_pos, gh, gw, freqs), v,
                                 None if mask is None else mask[None, None])
    return attend


class DynamicRopeStream:
    """Streaming with dynamic RoPE, computed directly: every written frame's un-rotated k, v is kept (unbounded
    history); a chunk starting at frame P sees the sink frames, the window frames [max(S, P+C-W), P) and itself,
    re-numbered 0, 1, 2, ... in that order for the time RoPE."""

    def __init__(self, freqs, gh, gw, chunk, window, sink):
        self.freqs, self.gh, self.gw = freqs, gh, gw
        self.C, self.Wn, self.S = chunk, window, sink
        self.hist: dict[int, list] = {}
        self.frame = 0

    def attend_for_chunk(self, frames: int, write: bool):
        tpf = self.gh * self.gw
        P = self.frame
        earlier = [j for j in range(P) if j < self.S or j >= P + self.C - self.Wn]

        def attend(layer, q, k, v):
            hist = self.hist.setdefault(layer, [])
            ks = [hist[j][0] for j in earlier] + [k]
            vs = [hist[j][1] for j in earlier] + [v]
            kk, vv = torch.cat(ks, 1), torch.cat(vs, 1)
            n_prev = len(earlier)
            key_t = torch.arange(n_prev + frames).repeat_interleave(tpf)
            q_t = (n_prev + torch.arange(frames)).repeat_interleave(tpf)
            out = softmax_attention(rotate(q, q_t, self.gh, self.gw, self.freqs),
                                    rotate(kk, key_t, self.gh, self.gw, self.freqs), vv)
            if write:
                for f in range(frames):
                    sl = slice(f * tpf, (f + 1) * tpf)
                    hist.append((k[:, sl], v[:, sl]))
            return out
        return attend

    def advance(self, frames):
        self.frame += frames
