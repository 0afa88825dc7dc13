"""Fused audio cross-attention in Triton: text cross-attention plus per-frame audio-window attention, summed.

Algorithm: FlashAttention-2 style tiling (Dao, "FlashAttention-2", 2023) with the online softmax in base 2.
One program owns a tile of BLOCK_M query rows of one (batch, head).  It reads the tile once and

1. runs the online softmax over all text keys (shared by every frame), giving ``O_t`` and ``lse_t``;
2. for every latent frame ``f`` that has a row in the tile (a tile may straddle several frames when
   ``tokens_per_frame`` is not a multiple of BLOCK_M, so the frame index is per row), runs the online softmax
   of the whole tile over frame f's audio window and keeps the result only for the rows of frame f;
3. writes ``out = O_t + audio_scale * O_a`` once, plus both log-sum-exps (natural log, float32).

Backward (three kernels, no atomics).  The gradient reaching the audio branch is ``dO_a = audio_scale * dO``;
one convention in every kernel: the dots take dO in its storage dtype and ``audio_scale`` multiplies their fp32
results (``dP_a = audio_scale * dO V_a^T``, ``dV_a = audio_scale * P_a^T dO``), never a rounded copy of dO_a.

* ``_audio_cross_attention_bwd_dq_kernel`` (per query tile): ``delta_a = rowsum(P_a * dP_a)`` (= rowsum(dO_a *
  O_a)), ``delta_t = rowsum(dO * out) - delta_a`` (= rowsum(dO * O_t)), and ``dq = scale * (dS_t K_t + dS_a K_a)``
  where ``dS = P * (dP - delta)``, ``dP = dO V^T``.  It stores the two deltas (float32 scratch).
* ``_audio_cross_attention_bwd_dkdv_text_kernel`` (per text key tile, loops over every query):
  ``dV_t = P_t^T dO``, ``dK_t = scale * dS_t^T Q``.
* ``_audio_cross_attention_bwd_dkdv_audio_kernel`` (per frame and audio key tile, loops over the frame's
  queries): ``dV_a = P_a^T dO_a``, ``dK_a = scale * dS_a^T Q``.

When one tile holds a frame's whole audio window (A <= 64, ``ONE_A_TILE``), both audio kernels normalise P_a in
registers (``exp2(s - max) / sum``) and take delta_a from the dP_a they hold, so where the true gradient is 0 the
two terms of dS_a cancel exactly (one audio token: P_a = 1, dS_a = dP_a - dP_a = 0), as PyTorch's softmax
backward does.  Longer windows use the forward's lse and the stored delta_a.

Layouts: q/out (B, Lq, H, D), text_k/v (B, T, H, D), audio_k/v (B, F, A, H, D), any strides with a contiguous
last dimension; lse (B, H, Lq) float32 contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lipforcing.kernels._attention_common import (
    _LN2,
    _LOG2E,
    LOG2E,
    _dkdv_step,
    _dq_step,
    _load_kv_scores,
    _load_tile,
    _online_softmax_step,
    _store_tile,
    block_d,
    device_guard,
    interpreting,
    torch_to_dot_precision,
)

# Largest head_dim a (BLOCK_M, BLOCK_D) fp32 accumulator pair fits comfortably in registers for.
MAX_HEAD_DIM = 256


def _block_a(audio_window: int) -> int:
    # One tile covers the whole audio window up to 64 tokens; longer windows loop.
    return min(64, max(16, triton.next_power_of_2(audio_window)))


def _fwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    # Two (BLOCK_M, D) fp32 accumulators live at once (text then audio), so 8 warps for D = 128.
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8 if head_dim > 64 else 4, num_stages=3)


def _bwd_config(head_dim: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """(dQ kernel tiles, text dK/dV kernel tiles): BLOCK_M query rows, BLOCK_N text key rows each.

    Every dot of the dQ kernel has BLOCK_M rows and every dot of the text dK/dV kernel BLOCK_N rows; on Hopper
    each warpgroup (4 warps) issues wgmma on its own 64 of them, so 8 warps get 128 (with 64 both warpgroups
    would compute the same product).  The text dK/dV kernel holds two (128, head_dim) fp32 accumulators and runs
    without load pipelining (more stages spill at head_dim 128, tests/compile compile report).  The audio dK/dV
    kernel has only BLOCK_A <= 64 rows: one warpgroup (``_AUDIO_BWD_WARPS``) with the dK/dV query step."""
    if interpreting():
        small = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
        return small, small
    if dtype == torch.float32 or head_dim > 128:
        small = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
        return small, small
    if head_dim > 64:
        return (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=1),
                dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=1))
    tiles = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return tiles, tiles


_AUDIO_BWD_WARPS = 4  # one warpgroup: the audio dK/dV tile has BLOCK_A <= 64 rows


def _block_a_bwd(audio_window: int) -> int:
    # The audio dK/dV kernel's dots have BLOCK_A rows: at least 64 on GPUs, the rows of one wgmma.
    return _block_a(audio_window) if interpreting() else max(64, _block_a(audio_window))


# ------------------------------------------------------------------------------------------------------ helpers


@triton.jit
def _query_tile(H, Lq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (query tile, batch*head): (pid_bh, b, h, m_start, rows, row_ok, offs_d, d_ok), b/h int64."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return pid_bh, b, h, m_start, rows, rows < Lq, offs_d, offs_d < D


@triton.jit
def _tile_frames(rows, m_start, Lq, tokens_per_frame, BLOCK_M: tl.constexpr):
    """Frame of every row and the first and last frame with a row in the tile (a tile may straddle frames)."""
    frame = rows // tokens_per_frame
    f_lo = m_start // tokens_per_frame
    f_hi = (tl.minimum(m_start + BLOCK_M, Lq) - 1) // tokens_per_frame
    return frame, f_lo, f_hi


@triton.jit
def _attend(q, K_base, V_base, stride_kn, stride_vn, n_keys, offs_d, d_ok, qk_scale, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of the query tile over keys [0, n_keys): returns (acc, row max m, row sum l), base 2."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n_start in range(0, n_keys, BLOCK_N):
        cols = n_start + offs_n
        k, v, s = _load_kv_scores(q, K_base, V_base, stride_kn, stride_vn, cols, n_keys, offs_d, d_ok, qk_scale,
                                  DOT_PRECISION)
        s = tl.where((cols < n_keys)[None, :], s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _probs(q, K_base, V_base, stride_kn, stride_vn, cols, n_keys, offs_d, d_ok, lse2, qk_scale,
           DOT_PRECISION: tl.constexpr):
    """(k, v, P) of key tile ``cols``: P = exp2(s - lse2), the forward's probabilities, 0 for cols >= n_keys."""
    k, v, s = _load_kv_scores(q, K_base, V_base, stride_kn, stride_vn, cols, n_keys, offs_d, d_ok, qk_scale,
                              DOT_PRECISION)
    p = tl.exp2(s - lse2[:, None])
    return k, v, tl.where((cols < n_keys)[None, :], p, 0.0)


@triton.jit
def _key_tile(tile, n_keys, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of key tile number ``tile``: (cols, col_ok, offs_d, d_ok, kv_mask)."""
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_keys
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    return cols, col_ok, offs_d, d_ok, col_ok[:, None] & d_ok[None, :]


@triton.jit
def _dkdv_over_queries(k, v, col_ok, q_base, do_base, stride_ql, stride_dol, Lse, Delta, row0, n_rows, offs_d, d_ok,
                       qk_scale, dp_scale, SCALE_DP: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dk, dv (fp32, without the softmax scale) of one key tile over the query rows [row0, row0 + n_rows) (Lse,
    Delta: this (b, h)'s rows of the per-query float32 arrays).  Works on transposed scores (keys x queries) so
    dk/dv accumulate without transposing the result.  With SCALE_DP, dO V^T is multiplied by ``dp_scale``.

    ONE_TILE (the tile holds every key the rows see, SCALE_DP assumed): P is normalised here over the tile and
    delta = rowsum(P * dP) taken from this tile, so Lse and Delta are not read."""
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    for i_start in range(0, n_rows, BLOCK_M):
        i = i_start + offs_m
        row_ok = i < n_rows
        rows = row0 + i
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q = _load_tile(q_base, rows, stride_ql, offs_d, qd_mask)
        do = _load_tile(do_base, rows, stride_dol, offs_d, qd_mask)
        if ONE_TILE:
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION) * dp_scale  # dP^T
            pt = tl.where(col_ok[:, None], st, float("-inf"))
            pt = tl.exp2(pt - tl.max(pt, 0)[None, :])
            pt = pt / tl.sum(pt, 0)[None, :]
            delta = tl.sum(pt * dpt, 0)
            pt = tl.where(row_ok[None, :], pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
            dk += tl.dot((pt * (dpt - delta[None, :])).to(q.dtype), q, input_precision=DOT_PRECISION)
        else:
            lse2 = tl.load(Lse + rows, mask=row_ok, other=0.0) * _LOG2E
            delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            pt = tl.exp2(st - lse2[None, :])
            pt = tl.where(col_ok[:, None] & row_ok[None, :], pt, 0.0)
            dk, dv = _dkdv_step(dk, dv, pt, q, do, v, delta, dp_scale, SCALE_DP, DOT_PRECISION)
    return dk, dv


# ------------------------------------------------------------------------------------------------------ forward


@triton.jit
def _audio_cross_attention_fwd_kernel(
    Q, TK, TV, AK, AV, Out, LseT, LseA,
    stride_qb, stride_ql, stride_qh,
    stride_tkb, stride_tkt, stride_tkh,
    stride_tvb, stride_tvt, stride_tvh,
    stride_akb, stride_akf, stride_aka, stride_akh,
    stride_avb, stride_avf, stride_ava, stride_avh,
    stride_ob, stride_ol, stride_oh,
    H, Lq, T, A, tokens_per_frame, D,
    qk_scale, audio_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh, b, h, m_start, rows, row_ok, offs_d, d_ok = _query_tile(H, Lq, D, BLOCK_M, BLOCK_D)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_ql, offs_d, q_mask)

    # 1. text: online softmax over all T keys (scores in base 2: s * scale * log2(e)).
    acc_t, m_t, l_t = _attend(q, TK + b * stride_tkb + h * stride_tkh, TV + b * stride_tvb + h * stride_tvh,
                              stride_tkt, stride_tvt, T, offs_d, d_ok, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D,
                              DOT_PRECISION)
    # l_t == 0 only for an empty text: its contribution is zero and lse_t = -inf.
    has_text = l_t > 0.0
    out = acc_t / tl.where(has_text, l_t, 1.0)[:, None]
    lse_t = tl.where(has_text, (m_t + tl.log2(tl.where(has_text, l_t, 1.0))) * _LN2, float("-inf"))

    # 2. audio: each row sees only its own frame's window.  Loop over the frames present in this tile; the
    # whole tile is attended to frame f's keys and only the rows of frame f keep the result.
    frame, f_lo, f_hi = _tile_frames(rows, m_start, Lq, tokens_per_frame, BLOCK_M)
    lse_a = tl.zeros([BLOCK_M], tl.float32)
    for f in range(f_lo, f_hi + 1):
        acc_f, m_f, l_f = _attend(q, AK + b * stride_akb + f * stride_akf + h * stride_akh,
                                  AV + b * stride_avb + f * stride_avf + h * stride_avh, stride_aka, stride_ava, A,
                                  offs_d, d_ok, qk_scale, BLOCK_M, BLOCK_A, BLOCK_D, DOT_PRECISION)
        in_f = frame == f  # A >= 1, so l_f > 0 on every row; each row is in exactly one frame
        out = tl.where(in_f[:, None], out + acc_f * (audio_scale / l_f)[:, None], out)
        lse_a = tl.where(in_f, (m_f + tl.log2(l_f)) * _LN2, lse_a)

    _store_tile(Out + b * stride_ob + h * stride_oh, rows, stride_ol, offs_d, out, q_mask)
    lse_off = pid_bh.to(tl.int64) * Lq + rows
    tl.store(LseT + lse_off, lse_t, mask=row_ok)
    tl.store(LseA + lse_off, lse_a, mask=row_ok)


def audio_cross_attention_triton_unsupported(q, text_k, text_v, audio_k, audio_v, tokens_per_frame, audio_scale,
                                             scale, **_):
    """Why the Triton backend cannot run these inputs, or None."""
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        return f"the Triton audio_cross_attention supports head_dim <= {MAX_HEAD_DIM}, got {D}"
    if interpreting() and q.dtype == torch.bfloat16:
        return "the Triton interpreter (TRITON_INTERPRET=1) does not support bfloat16; use float16 or float32"
    return None


def audio_cross_attention_triton(q, text_k, text_v, audio_k, audio_v, tokens_per_frame: int, audio_scale: float,
                                 scale: float, *, block_m: int | None = None, block_n: int | None = None):
    """Forward launcher (backend signature of ``lipforcing.ops.audio_cross_attention``).

    q (B, F*tokens_per_frame, H, D); text_k/v (B, T, H, D) with T >= 0; audio_k/v (B, F, A, H, D) with A >= 1;
    all the same dtype (fp32/fp16/bf16) and device, last dimension contiguous.  ``block_m``/``block_n`` override
    the tile sizes (tests use them to make tiles straddle frames).

    Returns (out (B, Lq, H, D) in q's dtype, lse_text (B, H, Lq) fp32, lse_audio (B, H, Lq) fp32); lse_text is
    -inf when T == 0.  Allocates only these outputs; no host synchronisation.
    """
    B, Lq, H, D = q.shape
    T = text_k.shape[1]
    A = audio_k.shape[2]
    cfg = _fwd_config(D, q.dtype)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    lse_t = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    lse_a = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
    with device_guard(q):
        _audio_cross_attention_fwd_kernel[grid](
            q, text_k, text_v, audio_k, audio_v, out, lse_t, lse_a,
            q.stride(0), q.stride(1), q.stride(2),
            text_k.stride(0), text_k.stride(1), text_k.stride(2),
            text_v.stride(0), text_v.stride(1), text_v.stride(2),
            audio_k.stride(0), audio_k.stride(1), audio_k.stride(2), audio_k.stride(3),
            audio_v.stride(0), audio_v.stride(1), audio_v.stride(2), audio_v.stride(3),
            out.stride(0), out.stride(1), out.stride(2),
            H, Lq, T, A, tokens_per_frame, D,
            scale * LOG2E, audio_scale,
            BLOCK_A=_block_a(A), BLOCK_D=block_d(D), DOT_PRECISION=torch_to_dot_precision(q.dtype), **cfg,
        )
    return out, lse_t, lse_a


# ----------------------------------------------------------------------------------------------------- backward


@triton.jit
def _audio_cross_attention_bwd_dq_kernel(
    Q, TK, TV, AK, AV, Out, DO, LseT, LseA, DQ, DeltaT, DeltaA,
    stride_qb, stride_ql, stride_qh,
    stride_tkb, stride_tkt, stride_tkh,
    stride_tvb, stride_tvt, stride_tvh,
    stride_akb, stride_akf, stride_aka, stride_akh,
    stride_avb, stride_avf, stride_ava, stride_avh,
    stride_ob, stride_ol, stride_oh,
    stride_dob, stride_dol, stride_doh,
    stride_dqb, stride_dql, stride_dqh,
    H, Lq, T, A, tokens_per_frame, D,
    scale, audio_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_A_TILE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh, b, h, m_start, rows, row_ok, offs_d, d_ok = _query_tile(H, Lq, D, BLOCK_M, BLOCK_D)
    qd_mask = row_ok[:, None] & d_ok[None, :]
    qk_scale = scale * _LOG2E

    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_ql, offs_d, qd_mask)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, rows, stride_dol, offs_d, qd_mask)
    o = _load_tile(Out + b * stride_ob + h * stride_oh, rows, stride_ol, offs_d, qd_mask)
    lse_off = pid_bh.to(tl.int64) * Lq + rows
    lse_t2 = tl.load(LseT + lse_off, mask=row_ok, other=0.0) * _LOG2E
    lse_a2 = tl.load(LseA + lse_off, mask=row_ok, other=0.0) * _LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Audio branch, frame by frame (a tile may straddle frames).  Rows of other frames take no part: their dS is
    # selected to 0 and the frame's dq term is kept only for the frame's rows (never 0 * a hidden NaN).
    frame, f_lo, f_hi = _tile_frames(rows, m_start, Lq, tokens_per_frame, BLOCK_M)
    offs_a = tl.arange(0, BLOCK_A)
    delta_a = tl.zeros([BLOCK_M], tl.float32)
    for f in range(f_lo, f_hi + 1):
        in_f = frame == f
        ak_base = AK + b * stride_akb + f * stride_akf + h * stride_akh
        av_base = AV + b * stride_avb + f * stride_avf + h * stride_avh
        dq_f = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if ONE_A_TILE:
            k, v, s = _load_kv_scores(q, ak_base, av_base, stride_aka, stride_ava, offs_a, A, offs_d, d_ok, qk_scale,
                                      DOT_PRECISION)
            p = tl.where((offs_a < A)[None, :], s, float("-inf"))
            p = tl.exp2(p - tl.max(p, 1)[:, None])
            p = p / tl.sum(p, 1)[:, None]
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) * audio_scale
            delta_f = tl.sum(p * dp, 1)
            ds = tl.where(in_f[:, None], p * (dp - delta_f[:, None]), 0.0)
            dq_f += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        else:
            # pass 1: delta_a = rowsum(P dP) over the whole window; pass 2: dS K
            delta_f = tl.zeros([BLOCK_M], tl.float32)
            for a_start in range(0, A, BLOCK_A):
                k, v, p = _probs(q, ak_base, av_base, stride_aka, stride_ava, a_start + offs_a, A, offs_d, d_ok,
                                 lse_a2, qk_scale, DOT_PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) * audio_scale
                delta_f += tl.sum(p * dp, 1)
            for a_start in range(0, A, BLOCK_A):
                k, v, p = _probs(q, ak_base, av_base, stride_aka, stride_ava, a_start + offs_a, A, offs_d, d_ok,
                                 lse_a2, qk_scale, DOT_PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) * audio_scale
                ds = tl.where(in_f[:, None], p * (dp - delta_f[:, None]), 0.0)
                dq_f += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        dq = tl.where(in_f[:, None], dq + dq_f, dq)
        delta_a = tl.where(in_f, delta_f, delta_a)

    # Text branch: rowsum(dO * O_t) = rowsum(dO * out) - rowsum(dO_a * O_a).
    delta_t = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1) - delta_a
    offs_n = tl.arange(0, BLOCK_N)
    tk_base = TK + b * stride_tkb + h * stride_tkh
    tv_base = TV + b * stride_tvb + h * stride_tvh
    for n_start in range(0, T, BLOCK_N):
        cols = n_start + offs_n
        k, v, p = _probs(q, tk_base, tv_base, stride_tkt, stride_tvt, cols, T, offs_d, d_ok, lse_t2, qk_scale,
                         DOT_PRECISION)
        dq = _dq_step(dq, p, k, v, do, delta_t, DOT_PRECISION)

    dq = dq * scale  # d(s)/d(q) = scale * k
    _store_tile(DQ + b * stride_dqb + h * stride_dqh, rows, stride_dql, offs_d, dq, qd_mask)
    tl.store(DeltaT + lse_off, delta_t, mask=row_ok)
    tl.store(DeltaA + lse_off, delta_a, mask=row_ok)


@triton.jit
def _audio_cross_attention_bwd_dkdv_text_kernel(
    Q, TK, TV, DO, LseT, DeltaT, DTK, DTV,
    stride_qb, stride_ql, stride_qh,
    stride_tkb, stride_tkt, stride_tkh,
    stride_tvb, stride_tvt, stride_tvh,
    stride_dob, stride_dol, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    H, Lq, T, D,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    cols, col_ok, offs_d, d_ok, kv_mask = _key_tile(pid_n, T, D, BLOCK_N, BLOCK_D)
    qk_scale = scale * _LOG2E

    k = _load_tile(TK + b * stride_tkb + h * stride_tkh, cols, stride_tkt, offs_d, kv_mask)
    v = _load_tile(TV + b * stride_tvb + h * stride_tvh, cols, stride_tvt, offs_d, kv_mask)
    lse_base = pid_bh.to(tl.int64) * Lq
    dk, dv = _dkdv_over_queries(k, v, col_ok, Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                                stride_ql, stride_dol, LseT + lse_base, DeltaT + lse_base, 0, Lq, offs_d, d_ok,
                                qk_scale, 1.0, False, False, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
    dk = dk * scale
    _store_tile(DTK + b * stride_dkb + h * stride_dkh, cols, stride_dkt, offs_d, dk, kv_mask)
    _store_tile(DTV + b * stride_dvb + h * stride_dvh, cols, stride_dvt, offs_d, dv, kv_mask)


@triton.jit
def _audio_cross_attention_bwd_dkdv_audio_kernel(
    Q, AK, AV, DO, LseA, DeltaA, DAK, DAV,
    stride_qb, stride_ql, stride_qh,
    stride_akb, stride_akf, stride_aka, stride_akh,
    stride_avb, stride_avf, stride_ava, stride_avh,
    stride_dob, stride_dol, stride_doh,
    stride_dkb, stride_dkf, stride_dka, stride_dkh,
    stride_dvb, stride_dvf, stride_dva, stride_dvh,
    H, Lq, A, tokens_per_frame, D, n_a_tiles,
    scale, audio_scale,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr, ONE_A_TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_fa = tl.program_id(0)
    pid_bh = tl.program_id(1)
    f = (pid_fa // n_a_tiles).to(tl.int64)
    a_tile = pid_fa % n_a_tiles
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    cols, col_ok, offs_d, d_ok, kv_mask = _key_tile(a_tile, A, D, BLOCK_A, BLOCK_D)
    qk_scale = scale * _LOG2E

    k = _load_tile(AK + b * stride_akb + f * stride_akf + h * stride_akh, cols, stride_aka, offs_d, kv_mask)
    v = _load_tile(AV + b * stride_avb + f * stride_avf + h * stride_avh, cols, stride_ava, offs_d, kv_mask)
    lse_base = pid_bh.to(tl.int64) * Lq
    # Only the frame's own query rows: no hidden pairs.  dP_a = audio_scale * dO V_a^T; a tile holding the whole
    # window normalises P_a over it and takes delta_a from this dP_a (ONE_A_TILE).
    dk, dv = _dkdv_over_queries(k, v, col_ok, Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                                stride_ql, stride_dol, LseA + lse_base, DeltaA + lse_base, f * tokens_per_frame,
                                tokens_per_frame, offs_d, d_ok, qk_scale, audio_scale, True, ONE_A_TILE, BLOCK_M,
                                BLOCK_A, BLOCK_D, DOT_PRECISION)
    dk = dk * scale
    dv = dv * audio_scale
    _store_tile(DAK + b * stride_dkb + f * stride_dkf + h * stride_dkh, cols, stride_dka, offs_d, dk, kv_mask)
    _store_tile(DAV + b * stride_dvb + f * stride_dvf + h * stride_dvh, cols, stride_dva, offs_d, dv, kv_mask)


def audio_cross_attention_backward_triton_unsupported(grad_out, q, *args, **_):
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        return f"the Triton audio_cross_attention backward supports head_dim <= {MAX_HEAD_DIM}, got {D}"
    if interpreting() and q.dtype == torch.bfloat16:
        return "the Triton interpreter (TRITON_INTERPRET=1) does not support bfloat16; use float16 or float32"
    return None


def audio_cross_attention_backward_triton(grad_out, q, text_k, text_v, audio_k, audio_v, out, lse_text, lse_audio,
                                          tokens_per_frame: int, audio_scale: float, scale: float, *,
                                          block_m: int | None = None, block_n: int | None = None):
    """Backward launcher: returns (dq, dtext_k, dtext_v, daudio_k, daudio_v), contiguous, in the inputs' dtypes.

    ``out``, ``lse_text`` and ``lse_audio`` are the forward's outputs (any backend's: they share one meaning).
    Besides the gradients it allocates two (B, H, Lq) float32 scratch rows (the per-branch ``delta``).
    """
    B, Lq, H, D = q.shape
    T = text_k.shape[1]
    F, A = audio_k.shape[1], audio_k.shape[2]
    q_cfg, kv_cfg = (dict(c) for c in _bwd_config(D, q.dtype))
    for c in (q_cfg, kv_cfg):
        if block_m is not None:
            c["BLOCK_M"] = block_m
        if block_n is not None:
            c["BLOCK_N"] = block_n
    BA, BD = _block_a(A), block_d(D)
    prec = torch_to_dot_precision(q.dtype)
    dev = q.device

    def new(x):
        return torch.empty(tuple(x.shape), dtype=x.dtype, device=dev)

    dq, dtk, dtv, dak, dav = new(q), new(text_k), new(text_v), new(audio_k), new(audio_v)
    delta_t = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    delta_a = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    do = grad_out
    with device_guard(q):
        _audio_cross_attention_bwd_dq_kernel[(triton.cdiv(Lq, q_cfg["BLOCK_M"]), B * H)](
            q, text_k, text_v, audio_k, audio_v, out, do, lse_text, lse_audio, dq, delta_t, delta_a,
            q.stride(0), q.stride(1), q.stride(2),
            text_k.stride(0), text_k.stride(1), text_k.stride(2),
            text_v.stride(0), text_v.stride(1), text_v.stride(2),
            audio_k.stride(0), audio_k.stride(1), audio_k.stride(2), audio_k.stride(3),
            audio_v.stride(0), audio_v.stride(1), audio_v.stride(2), audio_v.stride(3),
            out.stride(0), out.stride(1), out.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            H, Lq, T, A, tokens_per_frame, D,
            scale, audio_scale,
            BLOCK_A=BA, BLOCK_D=BD, ONE_A_TILE=A <= BA, DOT_PRECISION=prec, **q_cfg,
        )
        if T > 0:
            _audio_cross_attention_bwd_dkdv_text_kernel[(triton.cdiv(T, kv_cfg["BLOCK_N"]), B * H)](
                q, text_k, text_v, do, lse_text, delta_t, dtk, dtv,
                q.stride(0), q.stride(1), q.stride(2),
                text_k.stride(0), text_k.stride(1), text_k.stride(2),
                text_v.stride(0), text_v.stride(1), text_v.stride(2),
                do.stride(0), do.stride(1), do.stride(2),
                dtk.stride(0), dtk.stride(1), dtk.stride(2),
                dtv.stride(0), dtv.stride(1), dtv.stride(2),
                H, Lq, T, D,
                scale,
                BLOCK_D=BD, DOT_PRECISION=prec, **kv_cfg,
            )
        BA = _block_a_bwd(A)
        n_a_tiles = triton.cdiv(A, BA)
        _audio_cross_attention_bwd_dkdv_audio_kernel[(F * n_a_tiles, B * H)](
            q, audio_k, audio_v, do, lse_audio, delta_a, dak, dav,
            q.stride(0), q.stride(1), q.stride(2),
            audio_k.stride(0), audio_k.stride(1), audio_k.stride(2), audio_k.stride(3),
            audio_v.stride(0), audio_v.stride(1), audio_v.stride(2), audio_v.stride(3),
            do.stride(0), do.stride(1), do.stride(2),
            dak.stride(0), dak.stride(1), dak.stride(2), dak.stride(3),
            dav.stride(0), dav.stride(1), dav.stride(2), dav.stride(3),
            H, Lq, A, tokens_per_frame, D, n_a_tiles,
            scale, audio_scale,
            BLOCK_M=kv_cfg["BLOCK_M"], BLOCK_A=BA, BLOCK_D=BD, ONE_A_TILE=n_a_tiles == 1, DOT_PRECISION=prec,
            num_warps=min(kv_cfg["num_warps"], _AUDIO_BWD_WARPS), num_stages=kv_cfg["num_stages"],
        )
    return dq, dtk, dtv, dak, dav
