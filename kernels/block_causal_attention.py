"""Triton ``block_causal_attention``: full-sequence attention with the chunk (block-causal) mask, window and sinks,
forward and backward, for training.

Algorithm: FlashAttention-2 (Dao, 2023).  Forward: one program per (query tile, batch*head), online softmax in base
2, fp32 accumulators; it writes the natural-log ``lse`` that the backward needs.  Backward: ``delta = rowsum(dO*O)``,
then one kernel per key tile accumulates dK, dV over the query tiles that see it and one kernel per query tile
accumulates dQ (no atomics).

Mask (query i in chunk c, ``end = (c + 1) * chunk``): key j is visible iff ``j < end`` and (no window, or
``j < sink``, or ``j >= end - window``).  Each program visits only the key (or query) ranges that can be visible to
its tile and splits them, like the Triton fused-attention tutorial splits the causal diagonal, into tiles that are
fully visible to every row (no mask arithmetic) and boundary tiles that apply the mask element-wise.  For the
forward of query rows [m0, m1) with chunk ends ``end_lo <= end_i <= end_hi``::

    [0, min(sink, w_lo))  masked      sink keys that lie before the window of the first row
    [w_lo, u_lo)          masked      window start band (w_lo = end_lo - window, u_lo ~ end_hi - window)
    [u_lo, u_hi)          unmasked    visible to every row (u_hi ~ end_lo)
    [u_hi, end_hi)        masked      the chunk band
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lipforcing.kernels._attention_common import (_LN2, _LOG2E, LOG2E, _dkdv_step, _dq_step, _load_kv_scores,
                                                  _load_tile, _online_softmax_step, _store_tile, block_d,
                                                  device_guard, interpreting, launch_config,
                                                  torch_to_dot_precision)

_NO_WINDOW = 1 << 30  # window used when there is none (every earlier key visible); keeps the arithmetic int32


@triton.jit
def _visible(i, j, end_i, L, SINK, WINDOW, HAS_WINDOW: tl.constexpr):
    """(len(i), len(j)) bool: query i (chunk end ``end_i``) sees key j."""
    ok = (j[None, :] < end_i[:, None]) & (j[None, :] < L)
    if HAS_WINDOW:
        ok = ok & ((j[None, :] < SINK) | (j[None, :] >= end_i[:, None] - WINDOW))
    return ok


@triton.jit
def _split_range(lo, u_lo, u_hi, hi, BLOCK: tl.constexpr):
    """Align the fully visible part [u_lo, u_hi) of [lo, hi) to whole tiles counted from ``lo``: returns
    (a, b) so that [lo, a) and [b, hi) are masked and [a, b) is a whole number of unmasked tiles."""
    a = tl.minimum(lo + tl.cdiv(tl.maximum(u_lo - lo, 0), BLOCK) * BLOCK, hi)
    b = a + (tl.maximum(tl.minimum(u_hi, hi) - a, 0) // BLOCK) * BLOCK
    return a, b


@triton.jit
def _query_tile(H, CHUNK, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (query tile, batch*head): (pid_bh, b, h, m0, i, end_i, d) -- b int64, rows i, their chunk
    ends end_i, head-dim offsets d."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    m0 = pid_m * BLOCK_M
    i = m0 + tl.arange(0, BLOCK_M)
    end_i = (i // CHUNK + 1) * CHUNK
    return pid_bh, b, h, m0, i, end_i, tl.arange(0, BLOCK_D)


@triton.jit
def _fwd_range(acc, m_i, l_i, q, K_base, V_base, skn, svn, lo, hi, i, end_i, L, SINK, WINDOW, qk_scale,
               MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        j = start + offs_n
        k, v, s = _load_kv_scores(q, K_base, V_base, skn, svn, j, hi, d, d < HEAD_DIM, qk_scale, DOT_PRECISION)
        if MASKED:
            ok = _visible(i, j, end_i, L, SINK, WINDOW, HAS_WINDOW) & (j[None, :] < hi)
            s = tl.where(ok, s, float("-inf"))  # a NaN score of a hidden key is selected away
            # P V would multiply a hidden key's value by P = 0 (0 * NaN = NaN): value rows holding a non-finite
            # entry are replaced by 0 for the product, and the rows that *see* such a key are set to NaN.
            bad = (v != v) | (tl.abs(v.to(tl.float32)) == float("inf"))
            bad_key = tl.max(bad.to(tl.int32), 1) > 0
            v = tl.where(bad_key[:, None], 0.0, v).to(v.dtype)
            sees_bad = tl.max((ok & bad_key[None, :]).to(tl.int32), 1) > 0
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)
        if MASKED:
            acc = tl.where(sees_bad[:, None], float("nan"), acc)
    return acc, m_i, l_i


@triton.jit
def _query_tile_key_ranges(m0, L, CHUNK, SINK, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges of the query tile starting at m0: (s_full, n_sink, w_lo, a, b, end_hi) -- see the module
    docstring.  Sink keys before the window, [0, n_sink), are visible to every row of the tile (j < sink and
    j < w_lo <= each row's chunk end), so their whole tiles [0, s_full) need no mask."""
    m_last = tl.minimum(m0 + BLOCK_M, L) - 1
    end_lo = (m0 // CHUNK + 1) * CHUNK  # nominal chunk ends of the first and last row (a short last chunk
    end_hi = (m_last // CHUNK + 1) * CHUNK  # keeps its nominal end for the window rule)
    w_lo = tl.maximum(end_lo - WINDOW, 0)
    n_sink = tl.minimum(SINK, w_lo)
    s_full = (n_sink // BLOCK_N) * BLOCK_N
    k_hi = tl.minimum(end_hi, L)
    a, b = _split_range(w_lo, end_hi - WINDOW, end_lo, k_hi, BLOCK_N)
    return s_full, n_sink, w_lo, a, b, k_hi


@triton.jit
def _block_causal_fwd_kernel(
    Q, K, V, OUT, LSE,
    sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, sob, som, soh, slb, slh,
    H, L, CHUNK, WINDOW, SINK, qk_scale,
    HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh, b, h, m0, i, end_i, d = _query_tile(H, CHUNK, BLOCK_M, BLOCK_D)
    row_ok = i < L
    ld = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q = _load_tile(Q + b * sqb + h * sqh, i, sqm, d, ld)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    K_base = K + b * skb + h * skh
    V_base = V + b * svb + h * svh

    s_full, n_sink, w_lo, a, b_, end_hi = _query_tile_key_ranges(m0, L, CHUNK, SINK, WINDOW, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:
        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, K_base, V_base, skn, svn, 0, s_full, i, end_i, L, SINK, WINDOW,
                                   qk_scale, False, HAS_WINDOW, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION)
        acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, K_base, V_base, skn, svn, s_full, n_sink, i, end_i, L, SINK,
                                   WINDOW, qk_scale, True, HAS_WINDOW, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION)
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, K_base, V_base, skn, svn, w_lo, a, i, end_i, L, SINK, WINDOW,
                               qk_scale, True, HAS_WINDOW, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION)
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, K_base, V_base, skn, svn, a, b_, i, end_i, L, SINK, WINDOW,
                               qk_scale, False, HAS_WINDOW, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION)
    acc, m_i, l_i = _fwd_range(acc, m_i, l_i, q, K_base, V_base, skn, svn, b_, end_hi, i, end_i, L, SINK, WINDOW,
                               qk_scale, True, HAS_WINDOW, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only rows >= L (never stored); every real query sees its own chunk
    out = acc / l_i[:, None]
    _store_tile(OUT + b * sob + h * soh, i, som, d, out, ld)
    # natural-log logsumexp of the scaled scores: m and log2(l) are in base 2
    tl.store(LSE + b * slb + h * slh + i, (m_i + tl.log2(l_i)) * _LN2, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, som, soh, sdb, sdm, sdh, H, L,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] (float32, contiguous (B, H, L))."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m = (i[:, None] < L) & (d[None, :] < HEAD_DIM)
    o = _load_tile(O + b * sob + h * soh, i, som, d, m).to(tl.float32)
    do = _load_tile(DO + b * sdb + h * sdh, i, sdm, d, m).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * L + i, tl.sum(o * do, 1), mask=i < L)


@triton.jit
def _bwd_dkdv_range(dk, dv, k, v, j, Q_base, DO_base, LSE_base, DELTA_base, sqm, sdm, lo, hi, L, CHUNK, SINK,
                    WINDOW, qk_scale, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of key tile j over the query rows [lo, hi).  Works on transposed scores (keys x rows)."""
    offs_m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_M):
        i = start + offs_m
        rows = i < hi
        ld = rows[:, None] & (d[None, :] < HEAD_DIM)
        q = _load_tile(Q_base, i, sqm, d, ld)
        do = _load_tile(DO_base, i, sdm, d, ld)
        lse2 = tl.load(LSE_base + i, mask=rows, other=0.0) * _LOG2E  # base-2 logsumexp
        delta = tl.load(DELTA_base + i, mask=rows, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse2[None, :])  # P^T, the forward's probabilities
        # dV = P^T dO, dK = dS^T Q with dS = P * (dP - delta) (times scale, later)
        if MASKED:
            # hidden (key, row) pairs: P = dS = 0 selected (a NaN delta of a row that does not see the key stays out)
            end_i = (i // CHUNK + 1) * CHUNK
            ok = tl.trans(_visible(i, j, end_i, L, SINK, WINDOW, HAS_WINDOW)) & rows[None, :]
            p_t = tl.where(ok, p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = tl.where(ok, p_t * (dp_t - delta[None, :]), 0.0)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        else:
            dk, dv = _dkdv_step(dk, dv, p_t, q, do, v, delta, 1.0, False, DOT_PRECISION)
    return dk, dv


@triton.jit
def _block_causal_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, sdb, sdm, sdh, slb, slh,
    sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
    H, L, CHUNK, WINDOW, SINK, qk_scale, sm_scale,
    HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    n0 = pid_n * BLOCK_N
    j = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    ld = (j[:, None] < L) & (d[None, :] < HEAD_DIM)
    k = _load_tile(K + b * skb + h * skh, j, skn, d, ld)
    v = _load_tile(V + b * svb + h * svh, j, svn, d, ld)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    # Query rows that see some key of this tile: chunk end > n0, and (a sink key in the tile, or end <= j + W).
    n_last = tl.minimum(n0 + BLOCK_N, L) - 1
    q_lo = (n0 // CHUNK) * CHUNK
    if HAS_WINDOW:
        q_hi = tl.where(n0 < SINK, L, tl.minimum(((n_last + WINDOW) // CHUNK) * CHUNK, L))
        u_hi = tl.where(n_last < SINK, L, tl.minimum(((n0 + WINDOW) // CHUNK) * CHUNK, L))
    else:
        q_hi = L
        u_hi = L
    # rows from the chunk holding the tile's last key on see all of it (when the tile is inside the sequence)
    u_lo = tl.where(n0 + BLOCK_N <= L, (n_last // CHUNK) * CHUNK, L)
    a, b_ = _split_range(q_lo, u_lo, u_hi, q_hi, BLOCK_M)

    Q_base = Q + b * sqb + h * sqh
    DO_base = DO + b * sdb + h * sdh
    LSE_base = LSE + b * slb + h * slh
    DELTA_base = DELTA + pid_bh.to(tl.int64) * L
    dk, dv = _bwd_dkdv_range(dk, dv, k, v, j, Q_base, DO_base, LSE_base, DELTA_base, sqm, sdm, q_lo, a, L, CHUNK,
                             SINK, WINDOW, qk_scale, True, HAS_WINDOW, HEAD_DIM, BLOCK_M, BLOCK_D, DOT_PRECISION)
    dk, dv = _bwd_dkdv_range(dk, dv, k, v, j, Q_base, DO_base, LSE_base, DELTA_base, sqm, sdm, a, b_, L, CHUNK,
                             SINK, WINDOW, qk_scale, False, HAS_WINDOW, HEAD_DIM, BLOCK_M, BLOCK_D, DOT_PRECISION)
    dk, dv = _bwd_dkdv_range(dk, dv, k, v, j, Q_base, DO_base, LSE_base, DELTA_base, sqm, sdm, b_, q_hi, L, CHUNK,
                             SINK, WINDOW, qk_scale, True, HAS_WINDOW, HEAD_DIM, BLOCK_M, BLOCK_D, DOT_PRECISION)
    _store_tile(DK + b * sdkb + h * sdkh, j, sdkn, d, dk * sm_scale, ld)
    _store_tile(DV + b * sdvb + h * sdvh, j, sdvn, d, dv, ld)


@triton.jit
def _bwd_dq_range(dq, q, do, lse2, delta, i, end_i, K_base, V_base, skn, svn, lo, hi, L, SINK, WINDOW, qk_scale,
                  MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        j = start + offs_n
        k, v, s = _load_kv_scores(q, K_base, V_base, skn, svn, j, hi, d, d < HEAD_DIM, qk_scale, DOT_PRECISION)
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            # select, never multiply, what hidden keys hold: dS = 0 there and their non-finite k are zeroed (a row
            # that sees a non-finite k has a NaN lse, hence NaN dS, anyway)
            ok = _visible(i, j, end_i, L, SINK, WINDOW, HAS_WINDOW) & (j[None, :] < hi)
            p = tl.where(ok, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = tl.where(ok, p * (dp - delta[:, None]), 0.0)
            k = tl.where((k == k) & (tl.abs(k.to(tl.float32)) != float("inf")), k, 0.0).to(v.dtype)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        else:
            dq = _dq_step(dq, p, k, v, do, delta, DOT_PRECISION)  # dQ = dS K (times scale, later)
    return dq


@triton.jit
def _block_causal_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, sdb, sdm, sdh, slb, slh, sdqb, sdqm, sdqh,
    H, L, CHUNK, WINDOW, SINK, qk_scale, sm_scale,
    HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh, b, h, m0, i, end_i, d = _query_tile(H, CHUNK, BLOCK_M, BLOCK_D)
    row_ok = i < L
    ld = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q = _load_tile(Q + b * sqb + h * sqh, i, sqm, d, ld)
    do = _load_tile(DO + b * sdb + h * sdh, i, sdm, d, ld)
    lse2 = tl.load(LSE + b * slb + h * slh + i, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * L + i, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    K_base = K + b * skb + h * skh
    V_base = V + b * svb + h * svh

    s_full, n_sink, w_lo, a, b_, end_hi = _query_tile_key_ranges(m0, L, CHUNK, SINK, WINDOW, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:
        dq = _bwd_dq_range(dq, q, do, lse2, delta, i, end_i, K_base, V_base, skn, svn, 0, s_full, L, SINK, WINDOW,
                           qk_scale, False, HAS_WINDOW, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION)
        dq = _bwd_dq_range(dq, q, do, lse2, delta, i, end_i, K_base, V_base, skn, svn, s_full, n_sink, L, SINK,
                           WINDOW, qk_scale, True, HAS_WINDOW, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION)
    dq = _bwd_dq_range(dq, q, do, lse2, delta, i, end_i, K_base, V_base, skn, svn, w_lo, a, L, SINK, WINDOW,
                       qk_scale, True, HAS_WINDOW, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION)
    dq = _bwd_dq_range(dq, q, do, lse2, delta, i, end_i, K_base, V_base, skn, svn, a, b_, L, SINK, WINDOW,
                       qk_scale, False, HAS_WINDOW, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION)
    dq = _bwd_dq_range(dq, q, do, lse2, delta, i, end_i, K_base, V_base, skn, svn, b_, end_hi, L, SINK, WINDOW,
                       qk_scale, True, HAS_WINDOW, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION)
    _store_tile(DQ + b * sdqb + h * sdqh, i, sdqm, d, dq * sm_scale, ld)


def _mask_args(window, sink):
    has_window = window is not None
    return has_window, (window if has_window else _NO_WINDOW), (sink if has_window else 0)


def block_causal_attention_triton_unsupported(q, k, v, chunk_size, window, sink, scale) -> str | None:
    """Why the Triton backend cannot run these (already validated) inputs, or None."""
    if interpreting() and q.dtype == torch.bfloat16:
        return "the Triton interpreter (TRITON_INTERPRET=1) does not support bfloat16"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256 is not supported by the Triton kernel"
    if q.shape[1] >= _NO_WINDOW:
        return f"seqlen {q.shape[1]} is too long for the Triton kernel (int32 positions)"
    return None


def block_causal_attention_triton(q, k, v, chunk_size, window, sink, scale):
    """Triton forward of ``lipforcing.ops.block_causal_attention``.

    q, k, v: (B, L, H, D).  Returns (out (B, L, H, D) in q.dtype, lse (B, H, L) float32, natural log).
    Allocates only the outputs; no host synchronisation."""
    B, L, H, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    cfg = _fwd_config(D, q.dtype)
    has_window, w, s = _mask_args(window, sink)
    with device_guard(q):
        _block_causal_fwd_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B * H)](
            q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            H, L, chunk_size, w, s, scale * LOG2E,
            HAS_WINDOW=has_window, HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d(D),
            DOT_PRECISION=torch_to_dot_precision(q.dtype), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return out, lse


def _fwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    """The shared forward tiles, with 2 pipeline stages for the 8-warp (head_dim 128, 16-bit) tiles: with 3 the
    sm_90 kernel needs more than 255 registers and spills (tests/compile compile report)."""
    cfg = launch_config(head_dim, dtype)
    return dict(cfg, num_stages=2) if cfg["num_warps"] == 8 else cfg


def _bwd_configs(head_dim: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """(dK/dV config, dQ config).  Every dot of the dK/dV kernel has BLOCK_N (key) rows and every dot of the dQ
    kernel BLOCK_M (query) rows; on Hopper each warpgroup (4 warps) issues wgmma on its own 64 of those rows, so
    8 warps get 128 rows -- with 64 both warpgroups would compute the same product.  The dK/dV kernel holds two
    (128, head_dim) fp32 accumulators, so it runs without load pipelining (2 stages spill at head_dim 128)."""
    base = launch_config(head_dim, dtype, backward=True)
    if interpreting() or base["num_warps"] <= 4:
        return base, base
    rows = 64 * (base["num_warps"] // 4)
    return dict(base, BLOCK_N=rows, num_stages=1), dict(base, BLOCK_M=rows)


def block_causal_attention_backward_triton(grad_out, q, k, v, out, lse, chunk_size, window, sink, scale):
    """Triton backward of ``lipforcing.ops.block_causal_attention``: returns (dq, dk, dv) in q.dtype.

    Allocates the gradients and one (B, H, L) float32 workspace (``delta = rowsum(dO * O)``)."""
    B, L, H, D = q.shape
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    kv_cfg, q_cfg = _bwd_configs(D, q.dtype)
    bd = block_d(D)
    has_window, w, s = _mask_args(window, sink)
    prec = torch_to_dot_precision(q.dtype)
    g = grad_out
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), g.stride(0), g.stride(1), g.stride(2),
              lse.stride(0), lse.stride(1))

    def meta(cfg):
        return dict(HAS_WINDOW=has_window, HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd,
                    DOT_PRECISION=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    with device_guard(q):
        _bwd_delta_kernel[(triton.cdiv(L, q_cfg["BLOCK_M"]), B * H)](
            out, g, delta, out.stride(0), out.stride(1), out.stride(2), g.stride(0), g.stride(1), g.stride(2), H, L,
            HEAD_DIM=D, BLOCK_M=q_cfg["BLOCK_M"], BLOCK_D=bd, num_warps=4,
        )
        _block_causal_bwd_dkdv_kernel[(triton.cdiv(L, kv_cfg["BLOCK_N"]), B * H)](
            q, k, v, g, lse, delta, dk, dv, *common,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            H, L, chunk_size, w, s, scale * LOG2E, scale, **meta(kv_cfg),
        )
        _block_causal_bwd_dq_kernel[(triton.cdiv(L, q_cfg["BLOCK_M"]), B * H)](
            q, k, v, g, lse, delta, dq, *common, dq.stride(0), dq.stride(1), dq.stride(2),
            H, L, chunk_size, w, s, scale * LOG2E, scale, **meta(q_cfg),
        )
    return dq, dk, dv
