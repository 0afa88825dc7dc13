"""Triton kernel of ``lipforcing.ops.qk_norm``: the q and k RMSNorm of a self-attention layer in one launch,
optionally followed by the RoPE rotation and the store of k (and v) into a RollingKVCache.

Grid ``(row tiles, 2)``: axis 1 picks the tensor (0: q, 1: k).  A program owns ``BLOCK_R`` rows (tokens) of the
full model dim ``H * HEAD_DIM`` and walks it head by head twice:

1. sum of squares of the row (float32), then ``rstd = rsqrt(mean + eps)``;
2. ``y = (x * rstd) * w`` in float32, rounded to the input dtype (the model's RMSNorm: ``layers.RMSNorm``), then
   -- when this tensor is rotated -- upcast again and rotated in float32 (Wan 3-D RoPE, adjacent pairs) and
   rounded once more, exactly like ``apply_rope(norm(x)).to(dtype)``; stored to the output and, for k with
   WRITE, to the cache slot of its stream position (``p`` for sink slots, ``S + (p - S) mod R`` in the ring).

Columns are read as (even, odd) halves of each head, the layout the rotation needs; the second walk re-reads the
rows the first one just pulled into L1/L2.  ``pos`` is read from device memory (no host sync) and never advanced.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lipforcing.kernels._attention_common import _rope_rotate, device_guard, interpreting

# RoPE modes (constexpr ROPE): no rotation; q and k at absolute frames FRAME0 + tok // TPF; q only, at its
# window-relative frame in the chunk step of a cache whose ``pos`` is read on the device.
NO_ROPE, ROPE_ABSOLUTE, ROPE_WINDOW = 0, 1, 2


@triton.jit
def _norm_rows(X, W, OUT, KC, V, VC, sxb, sxl, sob, sol, svb, svl, skcb, skcl, svcb, svcl,
               b, tok, ok, t_frame, in_frame, slot, COS, SIN, eps, GRID_W,
               H: tl.constexpr, HEAD_DIM: tl.constexpr, ROTATE: tl.constexpr, WRITE: tl.constexpr,
               ROPE_T: tl.constexpr, ROPE_TH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DH: tl.constexpr):
    dh = tl.arange(0, BLOCK_DH)
    me = ok[:, None] & (2 * dh[None, :] < HEAD_DIM)       # even columns 2j
    mo = ok[:, None] & (2 * dh[None, :] + 1 < HEAD_DIM)   # odd columns 2j+1 (one fewer for an odd head_dim)
    x_row = X + b * sxb + tok.to(tl.int64) * sxl
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for h in range(H):
        ptr = x_row[:, None] + h * HEAD_DIM + 2 * dh[None, :]
        xe = tl.load(ptr, mask=me, other=0.0).to(tl.float32)
        xo = tl.load(ptr + 1, mask=mo, other=0.0).to(tl.float32)
        ss += tl.sum(xe * xe + xo * xo, axis=1)
    rstd = tl.math.rsqrt(ss / (H * HEAD_DIM) + eps)[:, None]
    o_row = OUT + b * sob + tok.to(tl.int64) * sol
    for h in range(H):
        col = h * HEAD_DIM + 2 * dh[None, :]
        ptr = x_row[:, None] + col
        xe = tl.load(ptr, mask=me, other=0.0).to(tl.float32)
        xo = tl.load(ptr + 1, mask=mo, other=0.0).to(tl.float32)
        we = tl.load(W + col, mask=2 * dh[None, :] < HEAD_DIM, other=0.0).to(tl.float32)
        wo = tl.load(W + col + 1, mask=2 * dh[None, :] + 1 < HEAD_DIM, other=0.0).to(tl.float32)
        # the model's rounding points: norm in fp32 -> input dtype (-> fp32, rotate -> input dtype)
        ye = ((xe * rstd) * we).to(OUT.dtype.element_ty)
        yo = ((xo * rstd) * wo).to(OUT.dtype.element_ty)
        if ROTATE:
            ye, yo = _rope_rotate(ye.to(tl.float32), yo.to(tl.float32), t_frame, in_frame, ok, COS, SIN, GRID_W,
                                  HEAD_DIM // 2, ROPE_T, ROPE_TH, BLOCK_DH)
            ye = ye.to(OUT.dtype.element_ty)
            yo = yo.to(OUT.dtype.element_ty)
        tl.store(o_row[:, None] + col, ye, mask=me)
        tl.store(o_row[:, None] + col + 1, yo, mask=mo)
        if WRITE:
            c_row = KC + b * skcb + slot * skcl
            tl.store(c_row[:, None] + col, ye.to(KC.dtype.element_ty), mask=me)
            tl.store(c_row[:, None] + col + 1, yo.to(KC.dtype.element_ty), mask=mo)
            v_ptr = (V + b * svb + tok.to(tl.int64) * svl)[:, None] + col
            vc_ptr = (VC + b * svcb + slot * svcl)[:, None] + col
            tl.store(vc_ptr, tl.load(v_ptr, mask=me, other=0.0).to(VC.dtype.element_ty), mask=me)
            tl.store(vc_ptr + 1, tl.load(v_ptr + 1, mask=mo, other=0.0).to(VC.dtype.element_ty), mask=mo)


@triton.jit
def _qk_norm_kernel(Q, K, V, WQ, WK, QO, KO, KC, VC, POS, COS, SIN,
                    sqb, sql, skb, skl, svb, svl, sqob, sqol, skob, skol, skcb, skcl, svcb, svcl,
                    L, N_ROWS, eps, FRAME0, CHUNK, WINDOW, SINK, TPF, GRID_W,
                    H: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, WRITE: tl.constexpr,
                    ROPE_T: tl.constexpr, ROPE_TH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DH: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < N_ROWS
    r = tl.where(ok, r, 0)
    b = (r // L).to(tl.int64)
    tok = r % L
    # stream position of token tok in the chunk step (window mode and the cache write); 0 otherwise
    if ROPE == 2 or WRITE:
        p = tl.load(POS) + tok
    else:
        p = tok.to(tl.int64)
    if ROPE == 1:
        t_frame = FRAME0 + tok // TPF
        in_frame = tok % TPF
    else:
        # window-relative frame (sink first, then the window from lo = max(pos + CHUNK - WINDOW, SINK))
        lo = tl.maximum(p - tok + CHUNK - WINDOW, SINK)
        t_frame = (tl.minimum(p, SINK) + tl.maximum(p - lo, 0)) // TPF
        in_frame = p % TPF
    slot = tl.where(p < SINK, p, SINK + tl.maximum(p - SINK, 0) % WINDOW)
    if tl.program_id(1) == 0:
        _norm_rows(Q, WQ, QO, KC, V, VC, sqb, sql, sqob, sqol, svb, svl, skcb, skcl, svcb, svcl,
                   b, tok, ok, t_frame, in_frame, slot, COS, SIN, eps, GRID_W,
                   H, HEAD_DIM, ROPE != 0, False, ROPE_T, ROPE_TH, BLOCK_R, BLOCK_DH)
    else:
        _norm_rows(K, WK, KO, KC, V, VC, skb, skl, skob, skol, svb, svl, skcb, skcl, svcb, svcl,
                   b, tok, ok, t_frame, in_frame, slot, COS, SIN, eps, GRID_W,
                   H, HEAD_DIM, ROPE == 1, WRITE, ROPE_T, ROPE_TH, BLOCK_R, BLOCK_DH)


def _rope_parts(head_dim: int) -> tuple[int, int]:
    half = head_dim // 2
    t = half - 2 * (half // 3)
    return t, t + half // 3


def qk_norm_triton_unsupported(q, *args) -> str | None:
    """Why the Triton backend cannot run these (already validated) inputs, or None (only q's dtype and head_dim
    matter, so ``ops.qk_norm.fused_backend`` asks with q alone)."""
    if interpreting() and q.dtype == torch.bfloat16:
        return "the Triton interpreter (TRITON_INTERPRET=1) does not support bfloat16"
    if q.shape[-1] > 512:
        return f"head_dim {q.shape[-1]} > 512 is not supported by the Triton kernel"
    return None


def qk_norm_triton(q, k, v, weight_q, weight_k, eps, rope_mode, rope_cos, rope_sin, grid_h, grid_w, frame0,
                   k_cache, v_cache, pos, chunk_size, window, sink, q_out, k_out) -> None:
    """Triton backend of ``lipforcing.ops.qk_norm`` (inputs validated by the public op; signature in
    lipforcing/ops/qk_norm.py).  Fills q_out, k_out and, when k_cache is given, the chunk's cache slots."""
    B, L, H, D = q.shape
    write = k_cache is not None
    # 16 rows x (head_dim/2) fp32 halves per walk step: at head_dim 128 (16, 64) x 2 tiles, 16 values per thread
    # at 4 warps; 1.3B shape (3072 tokens): 192 x 2 programs.  4 rows under the interpreter (CPU time ~ tile area).
    br = 4 if interpreting() else 16
    t, th = _rope_parts(D)
    dummy = pos if pos is not None else q_out
    kc, vc = (k_cache, v_cache) if write else (q_out, k_out)
    vv = v if write else k
    cos, sin = (rope_cos, rope_sin) if rope_mode else (dummy, dummy)
    with device_guard(q):
        _qk_norm_kernel[(triton.cdiv(B * L, br), 2)](
            q, k, vv, weight_q, weight_k, q_out, k_out, kc, vc, dummy, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), vv.stride(0), vv.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), kc.stride(0), kc.stride(1),
            vc.stride(0), vc.stride(1),
            L, B * L, float(eps), frame0, chunk_size, max(window, 1), sink, max(grid_h * grid_w, 1), max(grid_w, 1),
            H=H, HEAD_DIM=D, ROPE=rope_mode, WRITE=write, ROPE_T=t, ROPE_TH=th, BLOCK_R=br,
            BLOCK_DH=max(16, triton.next_power_of_2((D + 1) // 2)), num_warps=4)
