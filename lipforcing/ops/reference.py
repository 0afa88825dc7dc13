"""Plain PyTorch references of every op: no tiling, float32 math, run anywhere.

They are written straight from the rules in DESIGN.md section 4 and are both the test oracle of the fast
backends and the last-resort backend.  Names follow the ops: ``<op>_ref``.
"""
from __future__ import annotations

import functools
import math

import torch

from lipforcing.ops.rope import RopeSpec, rotate


def _fp32(fn):
    """Run a reference in float32 even under autocast (autocast would silently turn its math into bf16/fp16)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------- block-causal mask


def block_causal_mask(q_len: int, k_len: int, chunk_size: int, window: int | None, sink: int,
                      device=None) -> torch.Tensor:
    """(q_len, k_len) bool, True = attend.  Query i is in chunk c = i // chunk_size, end_c = (c+1)*chunk_size;
    it sees key j iff ``j < end_c and (window is None or j < sink or j >= end_c - window)``."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    end = (i // chunk_size + 1) * chunk_size
    allowed = j < end
    if window is not None:
        allowed = allowed & ((j < sink) | (j >= end - window))
    return allowed


def _zero_nonfinite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def _visible_values(p, v, mask):
    """``sum_j p[b, h, q, j] * v[b, j, h, :]`` over the keys j that ``mask`` shows to query q only: hidden keys are
    selected away, never multiplied by 0 (0 * NaN = NaN would leak a hidden NaN/inf value into every row).  An
    output element whose row sees a non-finite value is NaN."""
    finite = torch.isfinite(v)
    if bool(finite.all()):  # the common case: no select needed
        return torch.einsum("bhqk,bkhd->bqhd", p, v)
    out = torch.einsum("bhqk,bkhd->bqhd", p, torch.where(finite, v, 0.0))
    seen = torch.einsum("bhqk,bkhd->bqhd", torch.broadcast_to(mask, p.shape).float(), (~finite).float())
    return torch.where(seen > 0, float("nan"), out)


def _probabilities(q, k, mask, scale):
    """(P, lse) float32 of the scaled scores with hidden entries selected to -inf.  A row with no visible key
    has lse = -inf and P = 0; NaN/inf in q or k propagate (no row is silently zeroed)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    return p, lse


def _softmax_attention(q, k, v, mask, scale):
    """float32 attention with a boolean mask broadcastable to (B, H, Lq, Lk); returns (out fp32, lse fp32)."""
    p, lse = _probabilities(q, k, mask, scale)
    return _visible_values(p, v.float(), mask), lse


def _softmax_attention_backward(q, k, v, mask, scale, grad_out):
    """Gradients (dq, dk, dv) in float32 of ``_softmax_attention(q, k, v, mask, scale)[0]`` for ``grad_out``.

    With P = softmax(S), S = scale * q k^T:  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
    dq = scale * dS k,  dk = scale * dS^T q."""
    qf, kf, vf, g = q.float(), k.float(), v.float(), grad_out.float()
    p, _ = _probabilities(qf, kf, mask, scale)
    o = _visible_values(p, vf, mask)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, g)
    dp = torch.einsum("bqhd,bkhd->bhqk", g, vf)
    delta = (g * o).sum(-1).permute(0, 2, 1).unsqueeze(-1)  # (B, H, Lq, 1)
    ds = torch.where(mask, p * (dp - delta), 0.0)  # hidden pairs selected, not multiplied
    # A row that sees a non-finite q or k has NaN scores, hence NaN dS: zeroing non-finite entries for the
    # products below only keeps them out of rows and keys that do not see them.
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, _zero_nonfinite(kf)) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, _zero_nonfinite(qf)) * scale
    return dq, dk, dv


@_fp32
def block_causal_attention_ref(q, k, v, chunk_size: int, window: int | None, sink: int, scale: float):
    """Reference of ``lipforcing.ops.block_causal_attention``: returns (out in q.dtype, lse (B, H, L) fp32).

    Hidden keys never influence a row (whatever they hold); NaN/inf that a row sees give NaN/inf in it."""
    mask = block_causal_mask(q.shape[1], k.shape[1], chunk_size, window, sink, q.device)
    out, lse = _softmax_attention(q, k, v, mask, scale)
    return out.to(q.dtype), lse


@_fp32
def block_causal_attention_backward_ref(grad_out, q, k, v, chunk_size: int, window: int | None, sink: int,
                                        scale: float):
    """Gradients (dq, dk, dv), float32, of block_causal_attention_ref's output."""
    mask = block_causal_mask(q.shape[1], k.shape[1], chunk_size, window, sink, q.device)
    return _softmax_attention_backward(q, k, v, mask, scale, grad_out)


# ----------------------------------------------------------------------------------------------- rolling cache
# The cache of one layer holds S = sink slots and R = window ring slots.  A stream token at absolute position p
# lives in slot p when p < S, else in slot S + (p - S) mod R.  ``pos`` (int64, shape (1,), on the device) counts
# the tokens written so far.  Everything below is arithmetic on ``pos``: no host syncs.  The reference reads the
# cache as it is *before* the chunk is written (the slots the chunk will overwrite hold tokens it must not see)
# and appends the current chunk's keys: straight from the rule, independent of the kernels' write-first order.


def cache_slot_positions(pos: torch.Tensor, sink: int, ring: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute stream position held by each cache slot and whether the slot has been written.
    Returns (positions (S+R,) int64, filled (S+R,) bool)."""
    dev = pos.device
    s = torch.arange(sink, device=dev)
    sink_valid = s < pos
    r = torch.arange(ring, device=dev)
    m = pos - 1 - sink  # offset past the sink of the newest written token
    if ring > 0:
        ring_pos = sink + m - torch.remainder(m - r, ring)  # newest token with (p - S) mod R == r
    else:
        ring_pos = r
    ring_valid = (m >= 0) & (ring_pos >= sink)
    return torch.cat([s, ring_pos]), torch.cat([sink_valid, ring_valid])


def window_relative_positions(p: torch.Tensor, end: torch.Tensor, window: int, sink: int) -> torch.Tensor:
    """Index of token ``p`` among the tokens visible to the chunk ending at ``end`` (sink first, then the window
    in stream order): ``min(p, S) + max(0, p - max(S, end - W))``.  Used by dynamic RoPE."""
    lo = torch.clamp(end - window, min=sink)
    return torch.clamp(p, max=sink) + torch.clamp(p - lo, min=0)


def cache_write_ref(k, v, k_cache, v_cache, pos, *, sink: int) -> None:
    """Store the chunk k, v (B, n, H, D) at stream positions pos .. pos+n-1 (in place) and advance ``pos``.

    Every slot takes the newest token of the chunk that maps to it, computed as a gather so the result does not
    depend on write order (with the ring of a whole window a chunk never wraps onto itself)."""
    n = k.shape[1]
    ring = k_cache.shape[1] - sink
    dev = k.device
    # sink slots: slot s takes chunk token s - pos when pos <= s < pos + n
    s = torch.arange(sink, device=dev)
    src_sink = s - pos
    take_sink = (src_sink >= 0) & (src_sink < n)
    # ring slots: the newest chunk token p >= max(pos, S) with (p - S) mod R == r
    r = torch.arange(ring, device=dev)
    m = pos + n - 1 - sink
    p = sink + m - torch.remainder(m - r, ring) if ring > 0 else r
    take_ring = (m >= 0) & (p >= torch.clamp(pos, min=sink))
    src = torch.cat([src_sink, p - pos]).clamp(0, n - 1)
    take = torch.cat([take_sink, take_ring])[None, :, None, None]
    for new, buf in ((k, k_cache), (v, v_cache)):
        buf.copy_(torch.where(take, new[:, src].to(buf.dtype), buf))
    pos.add_(n)


def _chunk_keys(q, k, v, k_cache, v_cache, pos, chunk_size: int, window: int, sink: int, rope: RopeSpec | None):
    """What chunk_attention_ref and its backward attend with: float32 (q, keys_k, keys_v) -- q and keys rotated
    when ``rope`` is given, keys = [cache slots | current chunk] -- the (Lk,) visibility of the keys (a slot is
    visible when written and a sink token or inside the window), and for the inverse rotation
    ``(q_t, key_t, token_in_frame)`` of the current chunk (None without rope).  Invisible keys and values are
    replaced by zeros (selected, not multiplied), so whatever they hold -- a NaN included -- cannot leak."""
    n = q.shape[1]
    ring = k_cache.shape[1] - sink
    slot_pos, slot_filled = cache_slot_positions(pos, sink, ring)
    end = pos + chunk_size
    lo = torch.clamp(end - window, min=sink)
    slot_valid = slot_filled & ((slot_pos < sink) | (slot_pos >= lo))
    cur_pos = pos + torch.arange(n, device=q.device)
    valid = torch.cat([slot_valid, torch.ones(n, dtype=torch.bool, device=q.device)])
    keep = valid[None, :, None, None]
    keys_k = torch.where(keep, torch.cat([k_cache.to(k.dtype), k], dim=1).float(), 0.0)
    keys_v = torch.where(keep, torch.cat([v_cache.to(v.dtype), v], dim=1).float(), 0.0)
    qf = q.float()
    rot = None
    if rope is not None:
        key_abs = torch.cat([slot_pos, cur_pos])
        tpf = rope.tokens_per_frame
        key_t = window_relative_positions(key_abs, end, window, sink) // tpf
        q_t = window_relative_positions(cur_pos, end, window, sink) // tpf
        qf = rotate(qf, q_t, cur_pos % tpf, rope)
        keys_k = rotate(keys_k, key_t.clamp(min=0), key_abs.clamp(min=0) % tpf, rope)
        rot = (q_t, key_t[-n:], cur_pos % tpf)
    return qf, keys_k, keys_v, valid, rot


@_fp32
def chunk_attention_ref(q, k, v, k_cache, v_cache, pos, *, chunk_size: int, window: int, sink: int,
                        write: bool, scale: float, rope: RopeSpec | None = None, return_lse: bool = False):
    """Reference of ``lipforcing.ops.chunk_attention`` (one layer, one chunk).  Returns out in q.dtype (and,
    with ``return_lse``, the base-e log-sum-exp of the scores, (B, H, n) float32).

    Keys = [cache slots that are visible | current k].  With ``rope`` the cache holds un-rotated keys and q and
    every key are rotated with window-relative time positions (``window_relative_positions`` // tokens per
    frame) and their in-frame height/width positions.  NaN/inf in q or k propagate as IEEE arithmetic makes them
    (every query sees at least its own chunk, so no row is empty and nothing is replaced by zeros)."""
    qf, keys_k, keys_v, valid, _ = _chunk_keys(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, rope)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, keys_k) * scale
    s = torch.where(valid[None, None, None, :], s, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", p, keys_v).to(q.dtype)
    if write:
        cache_write_ref(k, v, k_cache, v_cache, pos, sink=sink)
    return (out, lse) if return_lse else out


@_fp32
def chunk_attention_backward_ref(grad_out, q, k, v, k_cache, v_cache, pos, *, chunk_size: int, window: int,
                                 sink: int, scale: float, rope: RopeSpec | None = None):
    """Gradients (dq, dk, dv), float32, of chunk_attention_ref's output (``write=False``) w.r.t. the current
    chunk's q, k, v; the cache is a constant.  With ``rope`` the gradients w.r.t. the rotated q and keys are
    rotated back (by the negative angles: the rotation is orthogonal)."""
    n = q.shape[1]
    qf, keys_k, keys_v, valid, rot = _chunk_keys(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, rope)
    dq, dkeys, dvals = _softmax_attention_backward(qf, keys_k, keys_v, valid[None, None, None, :], scale,
                                                   grad_out)
    dk, dv = dkeys[:, -n:], dvals[:, -n:]
    if rot is not None:
        q_t, k_t, in_frame = rot
        dq = rotate(dq, q_t, in_frame, rope, inverse=True)
        dk = rotate(dk, k_t, in_frame, rope, inverse=True)
    return dq, dk.contiguous(), dv.contiguous()


# ------------------------------------------------------------------------------------------ audio cross-attention


@_fp32
def audio_cross_attention_ref(q, text_k, text_v, audio_k, audio_v, tokens_per_frame: int, audio_scale: float,
                              scale: float):
    """Reference of ``lipforcing.ops.audio_cross_attention``.

    Returns (out in q.dtype, lse_text (B, H, Lq) fp32, lse_audio (B, H, Lq) fp32); lse_text is -inf when the
    text is empty (its contribution is then zero)."""
    B, Lq, H, D = q.shape
    F, A = audio_k.shape[1], audio_k.shape[2]
    qf = q.float()
    if text_k.shape[1] > 0:
        out_t, lse_t = _softmax_attention(qf, text_k, text_v, torch.ones((), dtype=torch.bool, device=q.device),
                                          scale)
    else:
        out_t = torch.zeros(B, Lq, H, D, device=q.device)
        lse_t = torch.full((B, H, Lq), float("-inf"), device=q.device)
    qa = qf.reshape(B * F, tokens_per_frame, H, D)
    ak = audio_k.reshape(B * F, A, H, D)
    av = audio_v.reshape(B * F, A, H, D)
    out_a, lse_a = _softmax_attention(qa, ak, av, torch.ones((), dtype=torch.bool, device=q.device), scale)
    out_a = out_a.reshape(B, Lq, H, D)
    lse_a = lse_a.reshape(B, F, H, tokens_per_frame).permute(0, 2, 1, 3).reshape(B, H, Lq)
    return (out_t + audio_scale * out_a).to(q.dtype), lse_t, lse_a


@_fp32
def audio_cross_attention_backward_ref(grad_out, q, text_k, text_v, audio_k, audio_v, tokens_per_frame: int,
                                       audio_scale: float, scale: float):
    """Gradients (dq, dtext_k, dtext_v, daudio_k, daudio_v), float32, of audio_cross_attention_ref's output."""
    B, Lq, H, D = q.shape
    F, A = audio_k.shape[1], audio_k.shape[2]
    everything = torch.ones((), dtype=torch.bool, device=q.device)
    if text_k.shape[1] > 0:
        dq, dtk, dtv = _softmax_attention_backward(q, text_k, text_v, everything, scale, grad_out)
    else:
        dq = torch.zeros(q.shape, device=q.device)
        dtk, dtv = torch.zeros(text_k.shape, device=q.device), torch.zeros(text_v.shape, device=q.device)
    ga = (audio_scale * grad_out.float()).reshape(B * F, tokens_per_frame, H, D)
    dqa, dak, dav = _softmax_attention_backward(q.reshape(B * F, tokens_per_frame, H, D),
                                                audio_k.reshape(B * F, A, H, D), audio_v.reshape(B * F, A, H, D),
                                                everything, scale, ga)
    return (dq + dqa.reshape(q.shape), dtk, dtv, dak.reshape(audio_k.shape), dav.reshape(audio_v.shape))


# --------------------------------------------------------------------------------------------------- philox noise
# Counter-based Gaussian noise shared by every backend of denoise_update:
#   key     = (seed mod 2^32, (seed >> 32) mod 2^32)
#   counter = (i mod 2^32, i >> 32, offset mod 2^32, offset >> 32) for the element at flat (C-order) index i
#   (r0, r1, r2, r3) = Philox4x32-10(counter, key)
#   u1 = ((r0 >> 8) + 1) * 2^-24 in (0, 1],  u2 = (r1 >> 8) * 2^-24 in [0, 1)
#   eps_i = sqrt(-2 ln u1) * cos(2 pi u2)          (Box-Muller, float32)
# The same (seed, offset) gives the same noise on every backend (up to the last-ulp rounding of log/cos).

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for 32-bit a (int64 tensor) and constant b, without int64 overflow."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p1 = a * b_lo  # < 2^48
    p2 = a * b_hi  # < 2^48
    hi = ((p1 >> 16) + p2) >> 16
    lo = (p1 + ((p2 & 0xFFFF) << 16)) & _MASK32
    return hi & _MASK32, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values (broadcasting); returns the four output words."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = (hi1 ^ c1 ^ k0) & _MASK32, lo1, (hi0 ^ c3 ^ k1) & _MASK32, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def philox_normal(numel: int, seed, offset, device) -> torch.Tensor:
    """(numel,) float32 standard normal samples of the counter scheme above.  ``seed`` and ``offset`` are ints or
    int64 tensors (0-d, on ``device``), so no host sync is needed."""
    i = torch.arange(numel, dtype=torch.int64, device=device)
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device)
    offset = torch.as_tensor(offset, dtype=torch.int64, device=device)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c2, c3 = offset & _MASK32, (offset >> 32) & _MASK32
    r0, r1, _, _ = philox4x32(i & _MASK32, (i >> 32) & _MASK32, c2.expand_as(i), c3.expand_as(i), k0, k1)
    u1 = ((r0 >> 8) + 1).float() * 2.0 ** -24
    u2 = (r1 >> 8).float() * 2.0 ** -24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def _per_sample(t, value: float, x: torch.Tensor) -> torch.Tensor | float:
    """A timestep as float32 broadcastable over x (B, ...): a Python float, or a 0-d / (B,) tensor."""
    if t is None:
        return value
    t = t.float()
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() == 1 else t


@_fp32
def denoise_update_ref(x_t, flow, t, t_value: float, t_next, t_next_value: float, noise, seed, offset):
    """Reference of ``lipforcing.ops.denoise_update``: returns float32 (x0, x_next).

    x0 = x_t - t * flow;  x_next = (1 - t_next) * x0 + t_next * eps, eps = ``noise`` or philox_normal(seed)."""
    tt = _per_sample(t, t_value, x_t)
    tn = _per_sample(t_next, t_next_value, x_t)
    x0 = x_t.float() - tt * flow.float()
    if noise is not None:
        eps = noise.float()
    else:
        eps = philox_normal(x_t.numel(), seed, offset, x_t.device).reshape(x_t.shape)
    return x0, (1.0 - tn) * x0 + tn * eps


# ------------------------------------------------------------------------------------------------------- qk_norm


@_fp32
def qk_norm_ref(q, k, v, weight_q, weight_k, eps: float, rope: RopeSpec | None, rope_positions: str,
                frame_offset: int, k_cache, v_cache, pos, chunk_size: int, window: int, sink: int):
    """Reference of ``lipforcing.ops.qk_norm``: returns (q, k) normalised (and rotated) in the inputs' dtype and,
    with ``k_cache``, stores k and v in the cache slots of stream positions pos .. pos+L-1 (``pos`` unchanged).

    The norm is ``lipforcing.model.layers.RMSNorm`` over the full dim H*D, op for op; the rotation is the model's
    ``apply_rope(x).to(dtype)`` (absolute: frame ``frame_offset + l // tpf``) or the q rotation of
    ``chunk_attention_ref`` (window: q's window-relative frame in the chunk step at ``pos``)."""
    def norm(x, w):
        B, L, H, D = x.shape
        xf = x.reshape(B, L, H * D).float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
        return (y * w.float()).to(x.dtype).view(B, L, H, D)

    qn, kn = norm(q, weight_q), norm(k, weight_k)
    L = q.shape[1]
    if rope is not None:
        tpf = rope.tokens_per_frame
        tok = torch.arange(L, device=q.device)
        if rope_positions == "absolute":
            t_pos = tok // tpf + frame_offset
            qn = rotate(qn, t_pos, tok % tpf, rope).to(q.dtype)
            kn = rotate(kn, t_pos, tok % tpf, rope).to(k.dtype)
        else:
            cur = pos + tok
            q_t = window_relative_positions(cur, pos + chunk_size, window, sink) // tpf
            qn = rotate(qn, q_t, cur % tpf, rope).to(q.dtype)
    if k_cache is not None:
        cache_write_ref(kn, v, k_cache, v_cache, pos.clone(), sink=sink)
    return qn, kn
