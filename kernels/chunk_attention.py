"""Triton ``chunk_attention``: one chunk's queries against a rolling KV cache plus the chunk's own keys.

Algorithm: FlashAttention-2 forward (Dao, 2023) -- one program per (query tile, batch*head), online softmax in
base 2 with fp32 accumulators -- run over three key segments read *in place*, no gather copies:

    [ sink slots 0 .. min(pos, S)-1 | ring slots S .. S+min(max(pos-S, 0), R)-1 | current chunk 0 .. n-1 ]

``pos`` (tokens written so far) is loaded from device memory inside the kernel, so there is no host sync and a
chunk step can be captured in a CUDA graph.  The valid slots of each cache segment form a prefix (the cache fills
the sink first, then the ring in slot order), so each segment is one loop with a runtime trip count.  A ring slot
``r`` holds stream token ``S + m - ((m - r) mod R)`` with ``m = pos - 1 - S`` (the newest token that maps there).

Dynamic RoPE (``ROPE``): the cache holds un-rotated keys.  q and k tiles are loaded as their even/odd halves
(x[2j], x[2j+1]), rotated in fp32 with the Wan 3-D tables -- time row = window-relative frame index
``(min(p, S) + max(0, p - max(end - W, S))) // tokens_per_frame``, height/width rows from ``p % tokens_per_frame`` --
and the score is ``q_even . k_even + q_odd . k_odd`` (two half-width dots; same FLOPs as one).

``write=True`` then runs ``_chunk_cache_write_kernel`` (each chunk token goes to its slot unless a newer token of the
same chunk maps there too, the rule of ``cache_write_ref``) and advances ``pos`` on the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lipforcing.kernels._attention_common import (LOG2E, _online_softmax_step, _rope_rotate, block_d, interpreting,
                                                  launch_config, torch_to_dot_precision)


@triton.jit
def _window_frame(p, lo, SINK, TPF):
    """Window-relative frame index of stream token p (sink first, then the window from ``lo`` in order)."""
    return (tl.minimum(p, SINK) + tl.maximum(p - lo, 0)) // TPF


@triton.jit
def _chunk_segment(acc, m_i, l_i, qa, qb, KB, VB, stride_kn, stride_vn, count, pos, lo, COS, SIN, qk_scale,
                   SINK, RING, TPF, GRID_W,
                   SEG: tl.constexpr, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE_T: tl.constexpr,
                   ROPE_TH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Attend to ``count`` keys of one segment (SEG 0 = sink slots, 1 = ring slots, 2 = current chunk)."""
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dh = tl.arange(0, BLOCK_DH)
    HALF: tl.constexpr = HEAD_DIM // 2
    for start in range(0, count, BLOCK_N):
        j = start + offs_n
        valid = j < count
        jj = tl.minimum(j, count - 1)  # keep address and position arithmetic in range for the masked tail
        if SEG == 0:  # sink slot s holds stream token s
            row = jj
            p = jj.to(tl.int64)
        elif SEG == 1:  # ring slot S + r holds the newest token p >= S with (p - S) mod R == r
            mm = pos - 1 - SINK
            p = SINK + mm - (mm - jj) % RING  # mm >= jj here, so the remainder is non-negative
            row = SINK + jj
        else:  # current chunk token j is stream token pos + j
            row = jj
            p = pos + jj
        v = tl.load(VB + row[:, None] * stride_vn + d[None, :],
                    mask=valid[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        if ROPE:
            km = valid[:, None] & (dh[None, :] < HALF)
            k_ptr = KB + row[:, None] * stride_kn + 2 * dh[None, :]
            ke = tl.load(k_ptr, mask=km, other=0.0).to(tl.float32)
            ko = tl.load(k_ptr + 1, mask=km, other=0.0).to(tl.float32)
            ke, ko = _rope_rotate(ke, ko, _window_frame(p, lo, SINK, TPF), p % TPF, valid, COS, SIN, GRID_W,
                                  HALF, ROPE_T, ROPE_TH, BLOCK_DH)
            s = tl.dot(qa, tl.trans(ke.to(qa.dtype)), input_precision=DOT_PRECISION)
            s += tl.dot(qb, tl.trans(ko.to(qb.dtype)), input_precision=DOT_PRECISION)
        else:
            k = tl.load(KB + row[:, None] * stride_kn + d[None, :],
                        mask=valid[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
            s = tl.dot(qa, tl.trans(k), input_precision=DOT_PRECISION)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _chunk_attention_fwd_kernel(
    Q, K, V, KC, VC, POS, COS, SIN, OUT,
    sqb, sqm, sqh, skb, skm, skh, svb, svm, svh,
    skcb, skcm, skch, svcb, svcm, svch, sob, som, soh,
    H, N_TOK, CHUNK, WINDOW, SINK, RING, TPF, GRID_W, qk_scale,
    HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, ROPE_T: tl.constexpr, ROPE_TH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    pos = tl.load(POS)  # int64: tokens already in the stream
    lo = tl.maximum(pos + CHUNK - WINDOW, SINK)  # first non-sink stream token visible to this chunk

    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = i < N_TOK
    q_base = Q + b * sqb + h * sqh
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        dh = tl.arange(0, BLOCK_DH)
        qm = row_ok[:, None] & (dh[None, :] < HALF)
        q_ptr = q_base + i[:, None] * sqm + 2 * dh[None, :]
        qe = tl.load(q_ptr, mask=qm, other=0.0).to(tl.float32)
        qo = tl.load(q_ptr + 1, mask=qm, other=0.0).to(tl.float32)
        p = pos + i
        qe, qo = _rope_rotate(qe, qo, _window_frame(p, lo, SINK, TPF), p % TPF, row_ok, COS, SIN, GRID_W, HALF,
                              ROPE_T, ROPE_TH, BLOCK_DH)
        qa = qe.to(Q.dtype.element_ty)
        qb = qo.to(Q.dtype.element_ty)
    else:
        d = tl.arange(0, BLOCK_D)
        qa = tl.load(q_base + i[:, None] * sqm + d[None, :], mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
                     other=0.0)
        qb = qa

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    n_sink = tl.minimum(pos, SINK)
    n_ring = tl.minimum(tl.maximum(pos - SINK, 0), RING)
    kc_base = KC + b * skcb + h * skch
    vc_base = VC + b * svcb + h * svch
    acc, m_i, l_i = _chunk_segment(acc, m_i, l_i, qa, qb, kc_base, vc_base, skcm, svcm, n_sink, pos, lo, COS, SIN,
                                   qk_scale, SINK, RING, TPF, GRID_W, 0, ROPE, HEAD_DIM, ROPE_T, ROPE_TH, BLOCK_N,
                                   BLOCK_D, BLOCK_DH, DOT_PRECISION)
    acc, m_i, l_i = _chunk_segment(acc, m_i, l_i, qa, qb, kc_base, vc_base, skcm, svcm, n_ring, pos, lo, COS, SIN,
                                   qk_scale, SINK, RING, TPF, GRID_W, 1, ROPE, HEAD_DIM, ROPE_T, ROPE_TH, BLOCK_N,
                                   BLOCK_D, BLOCK_DH, DOT_PRECISION)
    acc, m_i, l_i = _chunk_segment(acc, m_i, l_i, qa, qb, K + b * skb + h * skh, V + b * svb + h * svh, skm, svm,
                                   N_TOK, pos, lo, COS, SIN, qk_scale, SINK, RING, TPF, GRID_W, 2, ROPE, HEAD_DIM,
                                   ROPE_T, ROPE_TH, BLOCK_N, BLOCK_D, BLOCK_DH, DOT_PRECISION)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows only: every real query sees at least its own chunk
    out = acc / l_i[:, None]
    d_o = tl.arange(0, BLOCK_D)
    o_ptr = OUT + b * sob + h * soh + i[:, None] * som + d_o[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (d_o[None, :] < HEAD_DIM))


@triton.jit
def _chunk_cache_write_kernel(
    K, V, KC, VC, POS,
    skb, skm, skh, svb, svm, svh, skcb, skcm, skch, svcb, svcm, svch,
    H, N_TOK, SINK, RING,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Store chunk tokens j (stream position pos + j) into their cache slots; a token is skipped when a newer
    token of the same chunk lands in the same ring slot (chunk longer than the ring) or when R == 0."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    pos = tl.load(POS)
    j = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    p = pos + j
    in_sink = p < SINK
    slot = tl.where(in_sink, p, SINK + tl.maximum(p - SINK, 0) % tl.maximum(RING, 1))
    # no later chunk token maps to the same ring slot (never true for R == 0: p < pos + n)
    newest = p + RING >= pos + N_TOK
    keep = (j < N_TOK) & (in_sink | newest)
    jj = tl.minimum(j, N_TOK - 1)
    d = tl.arange(0, BLOCK_D)
    m = keep[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(K + b * skb + h * skh + jj[:, None] * skm + d[None, :], mask=m, other=0.0)
    v = tl.load(V + b * svb + h * svh + jj[:, None] * svm + d[None, :], mask=m, other=0.0)
    tl.store(KC + b * skcb + h * skch + slot[:, None] * skcm + d[None, :], k.to(KC.dtype.element_ty), mask=m)
    tl.store(VC + b * svcb + h * svch + slot[:, None] * svcm + d[None, :], v.to(VC.dtype.element_ty), mask=m)


def _rope_parts(head_dim: int) -> tuple[int, int]:
    half = head_dim // 2
    t = half - 2 * (half // 3)
    return t, t + half // 3


def chunk_attention_triton_unsupported(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale,
                                       rope_cos, rope_sin, grid_h, grid_w) -> str | None:
    """Why the Triton backend cannot run these (already validated) inputs, or None."""
    if interpreting() and q.dtype == torch.bfloat16:
        return "the Triton interpreter (TRITON_INTERPRET=1) does not support bfloat16"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256 is not supported by the Triton kernel"
    return None


def chunk_attention_triton(q, k, v, k_cache, v_cache, pos, chunk_size, window, sink, write, scale, rope_cos,
                           rope_sin, grid_h, grid_w):
    """Triton backend of ``lipforcing.ops.chunk_attention`` (inputs validated by the public op).

    q, k, v: (B, n, H, D); k_cache, v_cache: (B, sink + window - chunk_size, H, D); pos: int64 (1,) device tensor.
    Returns out (B, n, H, D) in q.dtype.  With ``write`` the chunk is stored in the cache and ``pos`` advances
    by n (in place, on the device).  Allocates only ``out``; no host synchronisation."""
    B, n, H, D = q.shape
    ring = window - chunk_size
    out = torch.empty_like(q)
    cfg = launch_config(D, q.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    rope = rope_cos is not None
    rope_t, rope_th = _rope_parts(D)
    tpf = grid_h * grid_w if rope else 1
    if not rope:  # unused pointers: any tensor of the right device
        rope_cos = rope_sin = pos
    grid = (triton.cdiv(n, bm), B * H)
    _chunk_attention_fwd_kernel[grid](
        q, k, v, k_cache, v_cache, pos, rope_cos, rope_sin, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, n, chunk_size, window, sink, ring, tpf, max(grid_w, 1), scale * LOG2E,
        HEAD_DIM=D, ROPE=rope, ROPE_T=rope_t, ROPE_TH=rope_th, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(D),
        BLOCK_DH=block_d(D // 2), DOT_PRECISION=torch_to_dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if write:
        chunk_cache_write_triton(k, v, k_cache, v_cache, pos, sink)
    return out


def chunk_cache_write_triton(k, v, k_cache, v_cache, pos, sink):
    """Store the chunk k, v (B, n, H, D) at stream positions pos .. pos+n-1 of the cache and advance ``pos``
    (all on the device, same result as ``reference.cache_write_ref``).  Must run after every read of the old
    cache contents (stream order guarantees it)."""
    B, n, H, D = k.shape
    ring = k_cache.shape[1] - sink
    bt = 16 if interpreting() else 32
    _chunk_cache_write_kernel[(triton.cdiv(n, bt), B * H)](
        k, v, k_cache, v_cache, pos,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        H, n, sink, ring, HEAD_DIM=D, BLOCK_T=bt, BLOCK_D=triton.next_power_of_2(D), num_warps=4,
    )
    pos.add_(n)  # in place on the device: no allocation, no sync (runs after the write kernel read pos)
