"""Split-KV schedule of the Triton ``chunk_attention`` forward (issue 16, item 3).

At the 1.3B shape (batch 1, 12 heads, 3072 queries of 128-row tiles) the forward has 288 programs, about one per
SM at its launch settings: 2.18 waves on 132 SMs, 73 % of the SMs' time used.  Splitting the key range into S
segments gives S times as many programs (a third grid axis); each writes its segment's *normalised* partial
output ``O_s = acc_s / l_s`` and base-2 log-sum-exp ``lse_s = m_s + log2 l_s`` to fp32 scratch, and
``_chunk_split_combine_kernel`` merges them with the log-sum-exp rule::

    lse = log2 sum_s 2^lse_s,      O = sum_s 2^(lse_s - lse) O_s

(an empty segment has lse_s = -inf and weight 0).  The segments are whole key tiles of the kernel's virtual key
list [visible cache slots | the chunk's own keys (write=False)], dealt out as evenly as the tile count allows
(segment s takes tiles [s T / S, (s+1) T / S)); T depends on the device-side ``pos``, so the bounds are computed
in the kernel.  ``choose_splits`` picks S on the host from the shapes and the SM count only (the same S for every
step of a stream: CUDA-graph safe).  The fp32 partials live with the cache's ChunkWorkspace (allocated the first
time a split launch needs them, then reused: no allocation per step).
"""
from __future__ import annotations

import functools
import math
import weakref

import torch
import triton
import triton.language as tl

from lipforcing.kernels._attention_common import _LN2, _load_tile, _store_tile, interpreting

# Cost model of choose_splits, in units of one key tile of one program (128 queries x 64 keys x 128 dims at the
# sm_90 settings).  NOT MEASURED (no GPU has run it): PARTIAL_COST ~ writing + reading back one fp32 128 x 128
# partial (2 x 64 KiB at ~25 GB/s per SM of HBM) against ~1 us per key tile at ~600 TFLOP/s.
PARTIAL_COST = 4.0
MAX_WAVES = 3.0       # at or above this many waves the tail is a small fraction: never split
MAX_SPLITS = 8
MIN_TILES_PER_SPLIT = 4  # below this a segment is mostly prologue/epilogue


def choose_splits(programs: int, key_tiles: int, num_sms: int | None, *, programs_per_sm: int = 1,
                  max_waves: float = MAX_WAVES, max_splits: int = MAX_SPLITS,
                  min_tiles: int = MIN_TILES_PER_SPLIT, partial_cost: float = PARTIAL_COST) -> int:
    """Number of key segments S for a forward of ``programs`` (query tiles x batch x heads) programs that each
    walk up to ``key_tiles`` key tiles, on ``num_sms`` SMs running ``programs_per_sm`` programs each (1 at the
    sm_90 settings for head_dim 128: 131 KB of shared memory, 8 warps at ~240 registers).  1 (no split) when
    ``num_sms`` is None (CPU / interpreter: pass it explicitly), when the launch already fills ``max_waves`` waves,
    or when segments would be shorter than ``min_tiles`` tiles.  Otherwise the S in 1..max_splits with the least
    modelled time: waves(S) * tiles per segment + the partials' write-and-combine traffic spread over the SMs.
    The model's constants are unmeasured (see PARTIAL_COST)."""
    if num_sms is None or num_sms <= 0 or programs <= 0 or key_tiles <= 0:
        return 1
    slots = num_sms * max(programs_per_sm, 1)
    if programs >= max_waves * slots:
        return 1

    def cost(s):
        waves = math.ceil(programs * s / slots)
        extra = partial_cost * programs * s / slots if s > 1 else 0.0
        return waves * math.ceil(key_tiles / s) + extra

    best = 1
    for s in range(2, max_splits + 1):
        if math.ceil(key_tiles / s) < min_tiles:
            break
        if cost(s) < cost(best):
            best = s
    return best


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count(t: torch.Tensor) -> int | None:
    """SM count of ``t``'s GPU, None on the CPU (the interpreter has no SMs: tests pass ``num_sms``)."""
    if not t.is_cuda:
        return None
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


# workspace -> (partial outputs (S, B*H, chunk, D) fp32, partial base-2 lse (S, B*H, chunk) fp32)
_PARTIALS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def split_partials(ws, splits: int, bh: int, chunk: int, head_dim: int, device) -> tuple[torch.Tensor, ...]:
    """The fp32 partial buffers of ``ws`` (a ChunkWorkspace) for ``splits`` segments: allocated the first time
    (or when a larger S is asked for) and kept with the workspace, so steady-state steps and CUDA-graph replays
    allocate nothing (run one step before capturing, as for the caching allocator's other warm-up)."""
    have = _PARTIALS.get(ws)
    if have is None or have[0].shape[0] < splits:
        have = (torch.empty((splits, bh, chunk, head_dim), dtype=torch.float32, device=device),
                torch.empty((splits, bh, chunk), dtype=torch.float32, device=device))
        _PARTIALS[ws] = have
    return have


@triton.jit
def _chunk_split_combine_kernel(PO, PL, OUT, LSE, spos, spob, spom, spls, splb, sob, som, soh,
                                H, N_TOK, N_SPLIT,
                                HEAD_DIM: tl.constexpr, STORE_LSE: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    """Merge the N_SPLIT normalised partials of rows ``i`` of one (batch, head) into OUT (B, n, H, D) and, with
    STORE_LSE, the base-e log-sum-exp into LSE (B*H, n): an online log-sum-exp over the segments."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    bh = pid_bh.to(tl.int64)
    i = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = i < N_TOK
    d = tl.arange(0, BLOCK_D)
    m = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    m_run = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((BLOCK_R,), dtype=tl.float32)
    po = PO + bh * spob
    pl = PL + bh * splb
    for _ in range(0, N_SPLIT):  # pointers advance per segment (64-bit: no index product to overflow)
        lse_s = tl.load(pl + i, mask=row_ok, other=float("-inf"))
        o_s = _load_tile(po, i, spom, d, m)
        po += spos
        pl += spls
        m_new = tl.maximum(m_run, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no segment seen yet: no inf - inf
        alpha = tl.exp2(m_run - m_safe)
        w = tl.exp2(lse_s - m_safe)  # 0 for an empty segment
        l_run = l_run * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m_run = m_new
    l_safe = tl.where(l_run == 0.0, 1.0, l_run)  # padding rows only
    _store_tile(OUT + b * sob + h * soh, i, som, d, acc / l_safe[:, None], m)
    if STORE_LSE:
        tl.store(LSE + bh * N_TOK + i, (m_run + tl.log2(l_safe)) * _LN2, mask=row_ok)


def combine_splits(po, pl, out, lse, splits: int, n: int, heads: int) -> None:
    """Launch the combine over the first ``splits`` partials of ``po``/``pl`` into ``out`` (and ``lse``)."""
    B, _, H, D = out.shape
    rows = 16 if interpreting() else 32
    _chunk_split_combine_kernel[(triton.cdiv(n, rows), B * H)](
        po, pl, out, lse if lse is not None else pl, po.stride(0), po.stride(1), po.stride(2), pl.stride(0),
        pl.stride(1), out.stride(0), out.stride(1), out.stride(2), heads, n, splits,
        HEAD_DIM=D, STORE_LSE=lse is not None, BLOCK_R=rows, BLOCK_D=max(16, triton.next_power_of_2(D)),
        num_warps=4)
