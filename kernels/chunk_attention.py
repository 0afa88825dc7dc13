"""Triton ``chunk_attention``: one chunk's queries against a rolling KV cache plus the chunk's own keys, as a
dense attention.

Cache layout (lipforcing.cache.RollingKVCache): S sink slots, then a ring of W = window slots; token p lives in
slot p (p < S) or S + (p - S) mod W.  Every key a chunk may see is seen by all of its queries and attention does
not depend on key order, so the step needs no causal mask:

* ``write=True``: the chunk's K/V are stored first (``_chunk_cache_write_kernel``), then the queries attend to
  the slots ``[0, min(pos + n, S + W))`` -- a prefix, since the sink fills before the ring.
* ``write=False``: the queries attend to the cache slots as they are (``[0, min(pos, S + W))``) and then to the
  chunk's own k, v; the slots the chunk would overwrite hold tokens it must not see and are masked.

A slot is visible when it holds a sink token or a token ``>= lo = max(pos + chunk - W, S)``: a column mask,
applied by *selection* (masked loads and ``where``), so a NaN in an invisible slot never reaches the output.  A
full chunk after its write needs no slot mask at all (only the tail of the last tile); ``write=False`` masks the
stale slots, a short last chunk the oldest window slots.

Algorithm of the attention: FlashAttention-2 forward (Dao, 2023) -- one program per (query tile, batch*head),
online softmax in base 2 with fp32 accumulators; ``pos`` is read from device memory (no host sync, CUDA-graph
capturable).  The log-sum-exp is stored for the backward.  When the launch fills few waves of the GPU's SMs
(1.3B: 288 programs on 132 SMs) the key range is split over S programs per query tile instead
(``_chunk_attention_split_fwd_kernel`` + a log-sum-exp combine, kernels/chunk_attention_split.py); the same
``_fwd_query_tile`` runs in both kernels.

Dynamic RoPE is *outside* the attention loop: ``_rope_rows_kernel`` rotates the queries and current keys once per
step and ``_rope_slots_kernel`` the cache keys (at their window-relative frame for this chunk) into the cache's
workspace (lipforcing.cache.ChunkWorkspace); the attention then reads plain K tiles.  The same slot kernel can
also materialise the whole post-write view (K and V, the chunk overlaid on its target slots) for the dense
library backends.

Backward (``write=False``): FlashAttention-2 backward from the saved log-sum-exp -- ``_chunk_bwd_dq_kernel``
walks the keys per query tile, ``_chunk_bwd_dkdv_kernel`` the queries per current-chunk key tile (the cache is a
constant, so only the chunk's keys get dk, dv).  With RoPE the gradients w.r.t. the rotated q, k are rotated back.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lipforcing.kernels._attention_common import (_LN2, _LOG2E, LOG2E, _dkdv_step, _dq_step, _load_tile,
                                                  _online_softmax_step, _rope_rotate, _store_tile, block_d,
                                                  device_guard, interpreting, launch_config, torch_to_dot_precision)
from lipforcing.kernels.chunk_attention_split import choose_splits, combine_splits, device_sm_count, split_partials


@triton.jit
def _slot_tokens(s, filled, lo, SINK, RING):
    """Stream token held by cache slot ``s`` when ``filled`` tokens have been written, and whether the chunk
    whose window starts at ``lo`` sees it (written, and a sink token or inside the window)."""
    m = filled - 1 - SINK  # newest written token, counted past the sink
    r = s - SINK
    back = ((m - r) % RING + RING) % RING  # non-negative remainder whatever the sign convention
    p = tl.where(s < SINK, s, SINK + m - back)
    written = ((s < SINK) & (s < filled)) | ((s >= SINK) & (p >= SINK))  # p >= S implies m >= 0
    visible = written & ((p < SINK) | (p >= lo))
    return p, visible


@triton.jit
def _window_frame(p, lo, SINK, TPF):
    """Window-relative frame index of stream token p (sink first, then the window from ``lo`` in order)."""
    return (tl.minimum(p, SINK) + tl.maximum(p - lo, 0)) // TPF


@triton.jit
def _rotate_tile(XP, rows_ptr_off, ok, t_frame, in_frame, COS, SIN, GRID_W, HALF: tl.constexpr,
                 ROPE_T: tl.constexpr, ROPE_TH: tl.constexpr, BLOCK_DH: tl.constexpr, INVERSE: tl.constexpr):
    """Load rows ``XP + rows_ptr_off`` as (even, odd) halves and rotate them; returns fp32 (even, odd)."""
    dh = tl.arange(0, BLOCK_DH)
    m = ok[:, None] & (dh[None, :] < HALF)
    ptr = XP + rows_ptr_off[:, None] + 2 * dh[None, :]
    xe = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    xo = tl.load(ptr + 1, mask=m, other=0.0).to(tl.float32)
    if INVERSE:  # rotate by the negative angles: (a, b) -> (a cos + b sin, -a sin + b cos)
        ye, yo = _rope_rotate(xe, -xo, t_frame, in_frame, ok, COS, SIN, GRID_W, HALF, ROPE_T, ROPE_TH, BLOCK_DH)
        return ye, -yo
    return _rope_rotate(xe, xo, t_frame, in_frame, ok, COS, SIN, GRID_W, HALF, ROPE_T, ROPE_TH, BLOCK_DH)


@triton.jit
def _store_halves(OP, rows_ptr_off, ok, ye, yo, HALF: tl.constexpr, BLOCK_DH: tl.constexpr):
    dh = tl.arange(0, BLOCK_DH)
    m = ok[:, None] & (dh[None, :] < HALF)
    ptr = OP + rows_ptr_off[:, None] + 2 * dh[None, :]
    tl.store(ptr, ye.to(OP.dtype.element_ty), mask=m)
    tl.store(ptr + 1, yo.to(OP.dtype.element_ty), mask=m)


@triton.jit
def _rope_rows_kernel(X, OUT, POS, COS, SIN, sxb, sxm, sxh, sob, som, soh,
                      H, N_TOK, CHUNK, WINDOW, SINK, TPF, GRID_W,
                      HEAD_DIM: tl.constexpr, ROPE_T: tl.constexpr, ROPE_TH: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_DH: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate the current chunk's rows j (stream token pos + j) of X (q or k, or a gradient with INVERSE) into
    OUT at their window-relative frame."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    pos = tl.load(POS)
    lo = tl.maximum(pos + CHUNK - WINDOW, SINK)
    j = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = j < N_TOK
    p = pos + j
    HALF: tl.constexpr = HEAD_DIM // 2
    ye, yo = _rotate_tile(X + b * sxb + h * sxh, j.to(tl.int64) * sxm, ok, _window_frame(p, lo, SINK, TPF), p % TPF,
                          COS, SIN, GRID_W, HALF, ROPE_T, ROPE_TH, BLOCK_DH, INVERSE)
    _store_halves(OUT + b * sob + h * soh, j.to(tl.int64) * som, ok, ye, yo, HALF, BLOCK_DH)


@triton.jit
def _stage_plain(DST, s_dst, CACHE, s_cache, NEW, s_new, s64, j, ok, from_cache, from_chunk, d, dm,
                 OVERLAY: tl.constexpr):
    """Copy cache slots s (rows ``from_cache``) to DST unrotated; with OVERLAY the slots ``from_chunk`` take the
    chunk's row j of NEW instead."""
    x = _load_tile(CACHE, s64, s_cache, d, from_cache[:, None] & dm)
    if OVERLAY:
        x = tl.where(from_chunk[:, None], _load_tile(NEW, j, s_new, d, from_chunk[:, None] & dm), x)
    tl.store(DST + s64[:, None] * s_dst + d[None, :], x, mask=ok[:, None] & dm)


@triton.jit
def _rope_slots_kernel(K, V, KC, VC, POS, COS, SIN, KS, VS,
                       skb, skm, skh, svb, svm, svh, skcb, skcm, skch, svcb, svcm, svch,
                       sksb, sksm, sksh, svsb, svsm, svsh,
                       H, N_TOK, FILLED_ADD, CHUNK, WINDOW, SINK, TPF, GRID_W,
                       HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, OVERLAY: tl.constexpr, STAGE_V: tl.constexpr,
                       ROPE_T: tl.constexpr, ROPE_TH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DH: tl.constexpr):
    """Write every cache slot s as this chunk sees it into KS (rotated at its window-relative frame with ROPE)
    and, with STAGE_V, its value into VS.  ``filled = pos + FILLED_ADD`` tokens are taken as written; with
    OVERLAY the slots of tokens >= pos come from the current chunk's k, v (the post-write view without writing)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    pos = tl.load(POS)
    lo = tl.maximum(pos + CHUNK - WINDOW, SINK)
    s = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = s < SINK + WINDOW
    p, _ = _slot_tokens(s, pos + FILLED_ADD, lo, SINK, WINDOW)
    pc = tl.maximum(p, 0)
    s64 = s.to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    if OVERLAY:
        from_chunk = ok & (p >= pos) & (p < pos + N_TOK)
        j = tl.where(from_chunk, p - pos, 0)
        from_cache = ok & ((p < pos) | (p >= pos + N_TOK))
    else:
        from_cache = ok
        from_chunk, j = ok, s  # not read without OVERLAY
    if ROPE:
        frame = _window_frame(pc, lo, SINK, TPF)
        ye, yo = _rotate_tile(KC + b * skcb + h * skch, s64 * skcm, from_cache, frame, pc % TPF, COS, SIN, GRID_W,
                              HALF, ROPE_T, ROPE_TH, BLOCK_DH, False)
        if OVERLAY:
            ce, co = _rotate_tile(K + b * skb + h * skh, j * skm, from_chunk, frame, pc % TPF, COS, SIN, GRID_W,
                                  HALF, ROPE_T, ROPE_TH, BLOCK_DH, False)
            ye = tl.where(from_chunk[:, None], ce, ye)
            yo = tl.where(from_chunk[:, None], co, yo)
        _store_halves(KS + b * sksb + h * sksh, s64 * sksm, ok, ye, yo, HALF, BLOCK_DH)
    d = tl.arange(0, BLOCK_D)
    dm = d[None, :] < HEAD_DIM
    if not ROPE:
        _stage_plain(KS + b * sksb + h * sksh, sksm, KC + b * skcb + h * skch, skcm, K + b * skb + h * skh, skm,
                     s64, j, ok, from_cache, from_chunk, d, dm, OVERLAY)
    if STAGE_V:
        _stage_plain(VS + b * svsb + h * svsh, svsm, VC + b * svcb + h * svch, svcm, V + b * svb + h * svh, svm,
                     s64, j, ok, from_cache, from_chunk, d, dm, OVERLAY)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, K_base, V_base, skm, svm, cols, vis, d, d_ok, qk_scale,
                 DOT_PRECISION: tl.constexpr):
    """Fold key rows ``cols`` of (K_base, V_base) into the online softmax; rows with ``vis`` False are neither
    loaded nor scored (selected to -inf, so a NaN there never reaches the output)."""
    m = vis[:, None] & d_ok[None, :]
    k = _load_tile(K_base, cols, skm, d, m)
    v = _load_tile(V_base, cols, svm, d, m)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = tl.where(vis[None, :], s * qk_scale, float("-inf"))
    return _online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, K_base, V_base, skm, svm, cols, vis, d, d_ok, qk_scale,
             DOT_PRECISION: tl.constexpr):
    """dq += dS k over key rows ``cols`` (P recomputed from the base-2 lse; rows with ``vis`` False: P = 0,
    not loaded)."""
    m = vis[:, None] & d_ok[None, :]
    k = _load_tile(K_base, cols, skm, d, m)
    v = _load_tile(V_base, cols, svm, d, m)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.where(vis[None, :], tl.exp2(s - lse2[:, None]), 0.0)
    return _dq_step(dq, p, k, v, do, delta, DOT_PRECISION)


@triton.jit
def _fwd_query_tile(
    Q, KS, VS, KN, VN, POS,
    sqb, sqm, sqh, sksb, sksm, sksh, svsb, svsm, svsh, sknb, sknm, sknh, svnb, svnm, svnh,
    H, N_TOK, FILLED_ADD, CHUNK, WINDOW, SINK, N_SPLIT, qk_scale,
    HEAD_DIM: tl.constexpr, WRITTEN: tl.constexpr, MASK_SLOTS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax of query tile ``program_id(0)`` of (batch, head) ``program_id(1)`` over the visible slots of
    (KS, VS) and -- unless WRITTEN (the chunk is already in the cache) -- the chunk's own keys (KN, VN); with
    SPLIT only over segment ``program_id(2)`` of N_SPLIT: key tiles [t0, t1) of [slot tiles | chunk-key tiles],
    t0 = s T / N_SPLIT (whole tiles, dealt out evenly; T from the device-side pos, so computed here).  Without
    MASK_SLOTS (a full chunk already written) every slot below the written count is visible: only the tail of
    the last tile is masked.  Returns (acc, m_i, l_i, i, row_ok, d, d_ok)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    pos = tl.load(POS)  # int64: tokens written before this chunk
    lo = tl.maximum(pos + CHUNK - WINDOW, SINK)
    filled = pos + FILLED_ADD
    n_slots = tl.minimum(filled, SINK + WINDOW)

    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = i < N_TOK
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = _load_tile(Q + b * sqb + h * sqh, i, sqm, d, row_ok[:, None] & d_ok[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    if SPLIT:
        slot_tiles = tl.cdiv(n_slots, BLOCK_N)
        if WRITTEN:
            n_tiles = slot_tiles
        else:
            n_tiles = slot_tiles + tl.cdiv(N_TOK, BLOCK_N)
        sid = tl.program_id(2)
        t0 = sid * n_tiles // N_SPLIT
        t1 = (sid + 1) * n_tiles // N_SPLIT
        slot_lo = tl.minimum(t0, slot_tiles) * BLOCK_N
        slot_hi = tl.minimum(t1, slot_tiles) * BLOCK_N
        own_lo = tl.maximum(t0 - slot_tiles, 0) * BLOCK_N
        own_hi = tl.maximum(t1 - slot_tiles, 0) * BLOCK_N
    else:
        slot_lo = 0
        slot_hi = n_slots
        own_lo = 0
        own_hi = N_TOK
    k_base = KS + b * sksb + h * sksh
    v_base = VS + b * svsb + h * svsh
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(slot_lo, slot_hi, BLOCK_N):
        s_idx = start + offs_n
        if MASK_SLOTS:
            _, vis = _slot_tokens(s_idx, filled, lo, SINK, WINDOW)
            vis = vis & (s_idx < n_slots)
        else:
            vis = s_idx < n_slots
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, sksm, svsm, s_idx, vis, d, d_ok, qk_scale,
                                     DOT_PRECISION)
    if not WRITTEN:
        kn_base = KN + b * sknb + h * sknh
        vn_base = VN + b * svnb + h * svnh
        for start in range(own_lo, own_hi, BLOCK_N):
            j = start + offs_n
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kn_base, vn_base, sknm, svnm, j, j < N_TOK, d, d_ok,
                                         qk_scale, DOT_PRECISION)
    return acc, m_i, l_i, i, row_ok, d, d_ok


@triton.jit
def _chunk_attention_fwd_kernel(
    Q, KS, VS, KN, VN, POS, OUT, LSE,
    sqb, sqm, sqh, sksb, sksm, sksh, svsb, svsm, svsh, sknb, sknm, sknh, svnb, svnm, svnh, sob, som, soh,
    H, N_TOK, FILLED_ADD, CHUNK, WINDOW, SINK, qk_scale,
    HEAD_DIM: tl.constexpr, WRITTEN: tl.constexpr, MASK_SLOTS: tl.constexpr, STORE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One query tile of the chunk against all its keys (``_fwd_query_tile``): the output in q's dtype and, with
    STORE_LSE, the log-sum-exp."""
    acc, m_i, l_i, i, row_ok, d, d_ok = _fwd_query_tile(
        Q, KS, VS, KN, VN, POS, sqb, sqm, sqh, sksb, sksm, sksh, svsb, svsm, svsh, sknb, sknm, sknh, svnb, svnm,
        svnh, H, N_TOK, FILLED_ADD, CHUNK, WINDOW, SINK, 1, qk_scale, HEAD_DIM, WRITTEN, MASK_SLOTS, False,
        BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows only: every real query sees at least its own chunk
    out = acc / l_safe[:, None]
    _store_tile(OUT + b * sob + h * soh, i, som, d, out, row_ok[:, None] & d_ok[None, :])
    if STORE_LSE:  # base-e log-sum-exp of the scaled scores: (m + log2 l) * ln 2
        tl.store(LSE + pid_bh.to(tl.int64) * N_TOK + i, (m_i + tl.log2(l_safe)) * _LN2, mask=row_ok)


@triton.jit
def _chunk_attention_split_fwd_kernel(
    Q, KS, VS, KN, VN, POS, PO, PL,
    sqb, sqm, sqh, sksb, sksm, sksh, svsb, svsm, svsh, sknb, sknm, sknh, svnb, svnm, svnh,
    spos, spob, spom, spls, splb,
    H, N_TOK, FILLED_ADD, CHUNK, WINDOW, SINK, N_SPLIT, qk_scale,
    HEAD_DIM: tl.constexpr, WRITTEN: tl.constexpr, MASK_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Split-KV (kernels/chunk_attention_split.py): program (m, bh, s) attends to key segment s of N_SPLIT and
    stores its normalised partial output to PO (S, B*H, chunk, D) and its base-2 log-sum-exp to PL (S, B*H,
    chunk), fp32.  An empty segment stores 0 and -inf (l = 0 and m = -inf), so the combine gives it weight 0."""
    acc, m_i, l_i, i, row_ok, d, d_ok = _fwd_query_tile(
        Q, KS, VS, KN, VN, POS, sqb, sqm, sqh, sksb, sksm, sksh, svsb, svsm, svsh, sknb, sknm, sknh, svnb, svnm,
        svnh, H, N_TOK, FILLED_ADD, CHUNK, WINDOW, SINK, N_SPLIT, qk_scale, HEAD_DIM, WRITTEN, MASK_SLOTS, True,
        BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
    bh = tl.program_id(1).to(tl.int64)
    part = tl.program_id(2).to(tl.int64)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_tile(PO + part * spos + bh * spob, i, spom, d, acc / l_safe[:, None], row_ok[:, None] & d_ok[None, :])
    tl.store(PL + part * spls + bh * splb + i, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _chunk_cache_write_kernel(
    K, V, KC, VC, POS,
    skb, skm, skh, svb, svm, svh, skcb, skcm, skch, svcb, svcm, svch,
    H, N_TOK, SINK, RING,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Store chunk token j (stream position pos + j) in its slot: p (sink) or S + (p - S) mod R.  The ring holds
    a whole window (R >= chunk >= n), so no two tokens of a chunk share a slot.  ``pos`` is not advanced here."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    pos = tl.load(POS)
    j = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    p = pos + j
    slot = tl.where(p < SINK, p, SINK + tl.maximum(p - SINK, 0) % RING)
    keep = j < N_TOK
    jj = tl.minimum(j, N_TOK - 1)
    d = tl.arange(0, BLOCK_D)
    m = keep[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(K + b * skb + h * skh + jj[:, None] * skm + d[None, :], mask=m, other=0.0)
    v = tl.load(V + b * svb + h * svh + jj[:, None] * svm + d[None, :], mask=m, other=0.0)
    tl.store(KC + b * skcb + h * skch + slot[:, None] * skcm + d[None, :], k.to(KC.dtype.element_ty), mask=m)
    tl.store(VC + b * svcb + h * svch + slot[:, None] * svcm + d[None, :], v.to(VC.dtype.element_ty), mask=m)


@triton.jit
def _chunk_bwd_dq_kernel(
    Q, KS, VS, KN, VN, POS, DO, LSE, DELTA, DQ,
    sqb, sqm, sqh, sksb, sksm, sksh, svsb, svsm, svsh, sknb, sknm, sknh, svnb, svnm, svnh,
    sdob, sdom, sdoh, sdqb, sdqm, sdqh,
    H, N_TOK, CHUNK, WINDOW, SINK, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq of one query tile: dS = P * (dO V^T - delta) over the visible cache slots and the chunk's keys,
    dq = scale * dS K (P recomputed from the saved log-sum-exp)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    pos = tl.load(POS)
    lo = tl.maximum(pos + CHUNK - WINDOW, SINK)
    n_slots = tl.minimum(pos, SINK + WINDOW)
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = i < N_TOK
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    qm = row_ok[:, None] & d_ok[None, :]
    q = _load_tile(Q + b * sqb + h * sqh, i, sqm, d, qm)
    do = _load_tile(DO + b * sdob + h * sdoh, i, sdom, d, qm)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * N_TOK + i, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N_TOK + i, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = KS + b * sksb + h * sksh
    v_base = VS + b * svsb + h * svsh
    for start in range(0, n_slots, BLOCK_N):
        s_idx = start + offs_n
        _, vis = _slot_tokens(s_idx, pos, lo, SINK, WINDOW)
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, sksm, svsm, s_idx, vis & (s_idx < n_slots), d, d_ok,
                      qk_scale, DOT_PRECISION)
    kn_base = KN + b * sknb + h * sknh
    vn_base = VN + b * svnb + h * svnh
    for start in range(0, N_TOK, BLOCK_N):
        j = start + offs_n
        dq = _dq_tile(dq, q, do, lse2, delta, kn_base, vn_base, sknm, svnm, j, j < N_TOK, d, d_ok, qk_scale,
                      DOT_PRECISION)
    _store_tile(DQ + b * sdqb + h * sdqh, i, sdqm, d, dq * sm_scale, qm)


@triton.jit
def _chunk_bwd_dkdv_kernel(
    Q, KN, VN, DO, LSE, DELTA, DK, DV,
    sqb, sqm, sqh, sknb, sknm, sknh, svnb, svnm, svnh, sdob, sdom, sdoh, sdkb, sdkm, sdkh, sdvb, sdvm, sdvh,
    H, N_TOK, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk, dv of one tile of the chunk's keys (every query of the chunk sees every one of them):
    dv = P^T dO, dk = scale * dS^T q, on transposed scores (keys x queries)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = j < N_TOK
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    km = col_ok[:, None] & d_ok[None, :]
    k = _load_tile(KN + b * sknb + h * sknh, j, sknm, d, km)
    v = _load_tile(VN + b * svnb + h * svnh, j, svnm, d, km)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    for start in range(0, N_TOK, BLOCK_M):
        i = start + offs_m
        ok = i < N_TOK
        qm = ok[:, None] & d_ok[None, :]
        q = _load_tile(Q + b * sqb + h * sqh, i, sqm, d, qm)
        do = _load_tile(DO + b * sdob + h * sdoh, i, sdom, d, qm)
        lse2 = tl.load(LSE + pid_bh.to(tl.int64) * N_TOK + i, mask=ok, other=0.0) * _LOG2E
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * N_TOK + i, mask=ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.where(ok[None, :] & col_ok[:, None], tl.exp2(s_t - lse2[None, :]), 0.0)
        dk, dv = _dkdv_step(dk, dv, p_t, q, do, v, delta, 1.0, False, DOT_PRECISION)
    _store_tile(DK + b * sdkb + h * sdkh, j, sdkm, d, dk * sm_scale, km)
    _store_tile(DV + b * sdvb + h * sdvh, j, sdvm, d, dv, km)


# ------------------------------------------------------------------------------------------------- launchers


def _rope_parts(head_dim: int) -> tuple[int, int]:
    half = head_dim // 2
    t = half - 2 * (half // 3)
    return t, t + half // 3


def _s3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def workspace_for(k_cache: torch.Tensor, chunk_size: int):
    """The ChunkWorkspace of the RollingKVCache that owns ``k_cache`` (lipforcing.cache.workspace_of)."""
    from lipforcing.cache import workspace_of

    return workspace_of(k_cache, chunk_size)


def rope_rows_triton(x, out, pos, chunk_size, window, sink, rope_cos, rope_sin, grid_h, grid_w, *,
                     inverse=False):
    """Rotate the chunk rows x (B, n, H, D) into out (same shape) at their window-relative frames."""
    B, n, H, D = x.shape
    bt = 16  # rows per program: (16, D/2) fp32 halves, tables and positions stay in registers at 4 warps
    t, th = _rope_parts(D)
    _rope_rows_kernel[(triton.cdiv(n, bt), B * H)](
        x, out, pos, rope_cos, rope_sin, *_s3(x), *_s3(out), H, n, chunk_size, window, sink, grid_h * grid_w,
        grid_w, HEAD_DIM=D, ROPE_T=t, ROPE_TH=th, BLOCK_T=bt, BLOCK_DH=block_d(D // 2), INVERSE=inverse,
        num_warps=4)
    return out


def stage_slots_triton(k, v, k_cache, v_cache, pos, chunk_size, window, sink, rope_cos, rope_sin, grid_h, grid_w,
                       ks, vs, *, filled_add, overlay, stage_v):
    """Write the slots as this chunk sees them into ks (rotated when rope_cos is given) and, with stage_v, vs."""
    B, n, H, D = k.shape
    slots = k_cache.shape[1]
    bt = 16
    t, th = _rope_parts(D)
    rope = rope_cos is not None
    cos, sin = (rope_cos, rope_sin) if rope else (pos, pos)
    _rope_slots_kernel[(triton.cdiv(slots, bt), B * H)](
        k, v, k_cache, v_cache, pos, cos, sin, ks, vs, *_s3(k), *_s3(v), *_s3(k_cache), *_s3(v_cache), *_s3(ks),
        *_s3(vs), H, n, filled_add, chunk_size, window, sink, max(grid_h * grid_w, 1), max(grid_w, 1),
        HEAD_DIM=D, ROPE=rope, OVERLAY=overlay, STAGE_V=stage_v, ROPE_T=t, ROPE_TH=th, BLOCK_T=bt,
        BLOCK_D=block_d(D), BLOCK_DH=block_d(D // 2), num_warps=4)


def backward_config(head_dim: int, dtype: torch.dtype, kernel: str) -> dict:
    """Tiles of the backward kernels.  On GPUs the tile that owns the accumulators is 128 rows on 8 warps (two
    warpgroups, 64 rows each: no warpgroup repeats the other's wgmma work): 128 query rows for dq, 128 key rows
    for dk/dv, walking tiles of the other side (64 keys for dq; 32 queries for dk/dv, where 64 spill at sm_90)."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if kernel == "dq":
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2)


def chunk_attention_triton_unsupported(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale,
                                       rope_cos, rope_sin, grid_h, grid_w, q_rotated=False,
                                       chunk_in_cache=False) -> str | None:
    """Why the Triton backend cannot run these (already validated) inputs, or None."""
    if interpreting() and q.dtype == torch.bfloat16:
        return "the Triton interpreter (TRITON_INTERPRET=1) does not support bfloat16"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256 is not supported by the Triton kernel"
    return None


def forward_splits(q, k_cache, chunk_size, write, *, splits=None, num_sms=None) -> int:
    """Key segments of the forward (split-KV, kernels/chunk_attention_split.py): ``splits`` when given, else
    ``choose_splits`` from the launch's program count, its most key tiles (every slot, plus the chunk's keys for
    write=False) and the SM count -- ``num_sms``, else the GPU's (None on the CPU: no split)."""
    B, n, H, D = q.shape
    if splits is not None:
        if not isinstance(splits, int) or splits < 1:
            raise ValueError(f"splits must be an int >= 1, got {splits!r}")
        return splits
    cfg = launch_config(D, q.dtype)
    tiles = triton.cdiv(k_cache.shape[1], cfg["BLOCK_N"]) + (0 if write else triton.cdiv(n, cfg["BLOCK_N"]))
    sms = num_sms if num_sms is not None else device_sm_count(q)
    return choose_splits(triton.cdiv(n, cfg["BLOCK_M"]) * B * H, tiles, sms)


def _attend(q_eff, ks, vs, kn, vn, pos, out, lse, n, chunk_size, window, sink, scale, *, written, splits=1,
            ws=None):
    B, _, H, D = q_eff.shape
    cfg = launch_config(D, q_eff.dtype)
    tiles = dict(HEAD_DIM=D, WRITTEN=written, MASK_SLOTS=not (written and n == chunk_size),
                 BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d(D),
                 DOT_PRECISION=torch_to_dot_precision(q_eff.dtype), num_warps=cfg["num_warps"],
                 num_stages=cfg["num_stages"])
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), B * H)
    inputs = (q_eff, ks, vs, kn, vn, pos)
    strides = (*_s3(q_eff), *_s3(ks), *_s3(vs), *_s3(kn), *_s3(vn))
    if splits == 1:
        _chunk_attention_fwd_kernel[grid](
            *inputs, out, lse if lse is not None else pos, *strides, *_s3(out),
            H, n, n if written else 0, chunk_size, window, sink, scale * LOG2E, STORE_LSE=lse is not None, **tiles)
        return
    po, pl = split_partials(ws, splits, B * H, chunk_size, D, q_eff.device)
    _chunk_attention_split_fwd_kernel[grid + (splits,)](
        *inputs, po, pl, *strides, po.stride(0), po.stride(1), po.stride(2), pl.stride(0), pl.stride(1),
        H, n, n if written else 0, chunk_size, window, sink, splits, scale * LOG2E, **tiles)
    combine_splits(po, pl, out, lse, splits, n, H)


def chunk_attention_triton(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope_cos,
                           rope_sin, grid_h, grid_w, q_rotated=False, chunk_in_cache=False, *, splits=None,
                           num_sms=None):
    """Triton backend of ``lipforcing.ops.chunk_attention`` (inputs validated by the public op).

    q, k, v: (B, n, H, D); k_cache, v_cache: (B, sink + window, H, D); pos: int64 (1,) device tensor.  Returns
    (out (B, n, H, D) in q.dtype, lse (B, H, n) float32; lse only for write=False).  With ``write`` the chunk is
    stored first and ``pos`` advances by n (in place, on the device).  Allocates only the outputs; the rotated
    q/k and the split-KV partials live in the cache's workspace; no host synchronisation.

    ``q_rotated`` (with rope): q is already rotated (ops.qk_norm, window positions): no ``_rope_rows_kernel`` on q.
    ``chunk_in_cache`` (with write): k, v are already in their slots (ops.qk_norm(v=...)): no
    ``_chunk_cache_write_kernel``; k, v are not read (the write=True attention reads the chunk from the slots).

    ``splits``: key segments of the split-KV forward (1 = one pass, no combine); default: ``forward_splits``
    decides from the shapes and ``num_sms`` (default: the GPU's SM count; on the CPU no split)."""
    B, n, H, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = None if write else torch.empty((B, H, n), dtype=torch.float32, device=q.device)
    rope = rope_cos is not None
    splits = forward_splits(q, k_cache, chunk_size, write, splits=splits, num_sms=num_sms)
    with device_guard(q):
        ws = workspace_for(k_cache, chunk_size) if rope or splits > 1 else None
        if write and not chunk_in_cache:
            chunk_cache_write_triton(k, v, k_cache, v_cache, pos, sink, advance=False)
        q_eff, ks, kn = q, k_cache, k
        if rope:
            if not q_rotated:
                q_eff = rope_rows_triton(q, ws.q[:, :n], pos, chunk_size, window, sink, rope_cos, rope_sin, grid_h,
                                         grid_w)
            stage_slots_triton(k, v, k_cache, v_cache, pos, chunk_size, window, sink, rope_cos, rope_sin, grid_h,
                               grid_w, ws.k, ws.v, filled_add=n if write else 0, overlay=False, stage_v=False)
            ks = ws.k
            if not write:
                kn = rope_rows_triton(k, ws.kc[:, :n], pos, chunk_size, window, sink, rope_cos, rope_sin, grid_h,
                                      grid_w)
        _attend(q_eff, ks, v_cache, kn, v, pos, out, lse, n, chunk_size, window, sink, scale, written=write,
                splits=splits, ws=ws)
        if write:
            pos.add_(n)  # in place on the device: no allocation, no sync (after every kernel that read pos)
    return (out, lse) if lse is not None else out


def chunk_cache_write_triton(k, v, k_cache, v_cache, pos, sink, *, advance=True):
    """Store the chunk k, v (B, n, H, D) at stream positions pos .. pos+n-1 of the cache (same result as
    ``reference.cache_write_ref``) and, with ``advance``, advance ``pos`` on the device."""
    B, n, H, D = k.shape
    ring = k_cache.shape[1] - sink
    bt = 16 if interpreting() else 32
    with device_guard(k):
        _chunk_cache_write_kernel[(triton.cdiv(n, bt), B * H)](
            k, v, k_cache, v_cache, pos, *_s3(k), *_s3(v), *_s3(k_cache), *_s3(v_cache),
            H, n, sink, ring, HEAD_DIM=D, BLOCK_T=bt, BLOCK_D=triton.next_power_of_2(D), num_warps=4,
        )
        if advance:
            pos.add_(n)


def chunk_attention_backward_triton(grad_out, q, k, v, out, lse, k_cache, v_cache, pos, chunk_size, window, sink,
                                    scale, rope_cos, rope_sin, grid_h, grid_w):
    """Flash-style backward of the ``write=False`` step: (dq, dk, dv) in the inputs' dtypes.  ``pos`` is the
    position saved at forward time; the cache is read in place (slots written since are not visible to it)."""
    B, n, H, D = q.shape
    rope = rope_cos is not None
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    with device_guard(q):
        # delta_i = rowsum(dO_i * O_i), (B, H, n) float32
        delta = (grad_out.float() * out.float()).sum(-1).permute(0, 2, 1).contiguous()
        q_eff, kn, ks = q, k, k_cache
        if rope:
            ws = workspace_for(k_cache, chunk_size)
            q_eff = rope_rows_triton(q, torch.empty_like(q), pos, chunk_size, window, sink, rope_cos, rope_sin,
                                     grid_h, grid_w)
            kn = rope_rows_triton(k, torch.empty_like(k), pos, chunk_size, window, sink, rope_cos, rope_sin,
                                  grid_h, grid_w)
            stage_slots_triton(k, v, k_cache, v_cache, pos, chunk_size, window, sink, rope_cos, rope_sin, grid_h,
                               grid_w, ws.k, ws.v, filled_add=0, overlay=False, stage_v=False)
            ks = ws.k
        prec = dict(HEAD_DIM=D, BLOCK_D=block_d(D), DOT_PRECISION=torch_to_dot_precision(q.dtype))
        cfg = backward_config(D, q.dtype, "dq")
        _chunk_bwd_dq_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), B * H)](
            q_eff, ks, v_cache, kn, v, pos, grad_out, lse, delta, dq,
            *_s3(q_eff), *_s3(ks), *_s3(v_cache), *_s3(kn), *_s3(v), *_s3(grad_out), *_s3(dq),
            H, n, chunk_size, window, sink, scale * LOG2E, scale, **prec, **cfg)
        cfg = backward_config(D, q.dtype, "dkdv")
        _chunk_bwd_dkdv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), B * H)](
            q_eff, kn, v, grad_out, lse, delta, dk, dv,
            *_s3(q_eff), *_s3(kn), *_s3(v), *_s3(grad_out), *_s3(dk), *_s3(dv),
            H, n, scale * LOG2E, scale, **prec, **cfg)
        if rope:  # gradients w.r.t. the rotated q, k -> w.r.t. q, k (inverse rotation, in place)
            rope_rows_triton(dq, dq, pos, chunk_size, window, sink, rope_cos, rope_sin, grid_h, grid_w, inverse=True)
            rope_rows_triton(dk, dk, pos, chunk_size, window, sink, rope_cos, rope_sin, grid_h, grid_w, inverse=True)
    return dq, dk, dv
