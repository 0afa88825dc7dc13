"""Pieces shared by the Triton kernels of lipforcing (chunk_attention, block_causal_attention,
audio_cross_attention; denoise_update uses ``device_guard``).

* ``_online_softmax_step``: one key tile of the FlashAttention online softmax (Dao et al., FlashAttention 1/2),
  in base 2: the scores arrive already multiplied by ``scale * log2(e)``.
* ``_load_tile`` / ``_store_tile`` / ``_load_kv_scores``: pointer arithmetic of a (rows, BLOCK_D) tile and one key
  tile's loads plus its base-2 scores.
* ``_dq_step`` / ``_dkdv_step``: the FlashAttention-2 backward updates of one (query tile, key tile) pair.
* ``_rope_rotate``: Wan 3-D RoPE on the (even, odd) halves of a tile (adjacent-pair convention, lipforcing.ops.rope).
* ``device_guard``: the launch device of a tensor's kernels.
* ``launch_config``: tile sizes per head_dim/dtype, and the dot precision (exact IEEE fp32 for float32 inputs,
  whose error budget is plain PyTorch's fp32 error; TF32 would be ~1e-3).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# The same constants for use inside kernels (Triton only accepts constexpr globals there).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_guard(t: torch.Tensor):
    """Context that makes ``t``'s GPU the current device (and its current stream the launch stream) for a Triton
    launch: tensors on cuda:1 while cuda:0 is current would otherwise launch on the wrong device.  A no-op for
    CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def torch_to_dot_precision(dtype: torch.dtype) -> str:
    # fp16/bf16 ignore input_precision; fp32 must not silently drop to TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(head_dim: int) -> int:
    """Power-of-two tile width >= head_dim (tl.arange needs powers of two, tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def launch_config(head_dim: int, dtype: torch.dtype, *, backward: bool = False) -> dict:
    """Tile sizes, warps and pipeline stages.  Small tiles under the interpreter (CPU cost grows with tile
    area); on GPUs sized so the K/V tiles and the fp32 accumulator fit an sm_80 SM (164 KiB smem)."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    wide = dtype == torch.float32 or head_dim > 128
    if backward:
        if wide:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2) if head_dim <= 64 else \
            dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    if wide:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION: tl.constexpr):
    """Fold one tile of base-2 scores ``s`` (BLOCK_M, BLOCK_N; masked entries = -inf) and values ``v``
    (BLOCK_N, BLOCK_D) into the running (acc, row max m_i, row sum l_i).  A row whose scores are all -inf so far
    keeps acc = l = 0 (its max is replaced by 0 so no inf - inf appears)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _load_tile(base, rows, stride, offs_d, mask):
    """(len(rows), len(offs_d)) tile whose row r starts at ``base + rows[r] * stride``; 0 where ``mask`` is False."""
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, rows, stride, offs_d, x, mask):
    """Store ``x`` (cast to the pointee type) at the tile addresses of ``_load_tile``, where ``mask`` is True."""
    tl.store(base + rows[:, None] * stride + offs_d[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _load_kv_scores(q, K_base, V_base, stride_kn, stride_vn, cols, n_cols, offs_d, d_ok, qk_scale,
                    DOT_PRECISION: tl.constexpr):
    """Load key and value rows ``cols`` (zero for cols >= n_cols or padded head dims ``~d_ok``) and return
    (k, v, s) with the base-2 scores ``s = q k^T * qk_scale`` (BLOCK_M, len(cols)), not masked."""
    kv_mask = (cols < n_cols)[:, None] & d_ok[None, :]
    k = tl.load(K_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    return k, v, s


@triton.jit
def _dq_step(dq, p, k, v, do, delta, DOT_PRECISION: tl.constexpr):
    """dq += dS k with dS = P * (dO v^T - delta) (P: the forward's probabilities, masked entries 0); the
    softmax scale is applied by the caller."""
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _dkdv_step(dk, dv, p_t, q, do, v, delta, dp_scale, SCALE_DP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """On transposed scores (keys x queries): dv += P^T dO and dk += dS^T q with dS^T = P^T * (v dO^T - delta).
    With SCALE_DP, v dO^T is multiplied by ``dp_scale`` (dO reaches the branch scaled).  The softmax scale is
    applied by the caller."""
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if SCALE_DP:
        dp_t = dp_t * dp_scale
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _rope_rotate(xe, xo, t_pos, in_frame, valid, COS, SIN, GRID_W, HALF: tl.constexpr, ROPE_T: tl.constexpr,
                 ROPE_TH: tl.constexpr, BLOCK_DH: tl.constexpr):
    """Rotate rows of x given as even (x[..., 2j]) and odd (x[..., 2j+1]) halves, (ROWS, BLOCK_DH) float32.

    Row r has time position ``t_pos[r]`` and in-frame index ``in_frame[r]`` (height = idx // GRID_W, width =
    idx % GRID_W).  Pair j uses the time position for j < ROPE_T, height for j < ROPE_TH, width after; the
    cos/sin tables are (P, HALF) float32.  (a + ib)(cos + i sin) = (a cos - b sin) + i (a sin + b cos)."""
    dh = tl.arange(0, BLOCK_DH)[None, :]
    hpos = in_frame // GRID_W
    wpos = in_frame - hpos * GRID_W
    row = tl.where(dh < ROPE_T, t_pos[:, None], tl.where(dh < ROPE_TH, hpos[:, None], wpos[:, None]))
    row = tl.where(valid[:, None], row, 0)
    off = row * HALF + dh
    msk = valid[:, None] & (dh < HALF)
    c = tl.load(COS + off, mask=msk, other=1.0)
    s = tl.load(SIN + off, mask=msk, other=0.0)
    return xe * c - xo * s, xe * s + xo * c
