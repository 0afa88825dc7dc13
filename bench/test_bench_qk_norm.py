"""qk_norm: the fused q/k RMSNorm (+ RoPE, + cache write) of one layer's chunk step vs the PyTorch composition the
student runs without it, measured in the same run.

Shape: the 1.3B chunk step (B 1, L 3072 tokens = 3 frames of a 32 x 32 grid, 12 heads x 128 = dim 1536, bf16).
Rows per dtype:

* ``norm``: ``layers.RMSNorm`` on q and on k (eager: ~8 kernels each) vs ``qk_norm`` (one launch) -- what the
  dynamic-RoPE chunk step fuses;
* ``norm_rope_abs``: the two norms + ``apply_rope(...).to(dtype)`` of q and k at absolute frames (the student's
  ``rope_mode="absolute"`` path) vs ``qk_norm(rope=...)``;
* ``norm_rope_window_write``: the two norms, then the q rotation and the chunk's cache write as
  ``chunk_attention`` runs them (``rope_rows_triton`` on q + ``chunk_cache_write_triton``) vs one ``qk_norm``
  with ``rope_positions="window"`` and ``v=`` -- the fusion chunk_attention could use once it accepts a rotated
  q and a written chunk.

Bytes of the fused op: read q, k (and v), write q, k (and the cache's k, v): 4 (6, 8) x numel x itemsize.  Targets:
fused >= 3x the eager composition on ``norm`` and >= 70% of copy bandwidth.  GPU only (bench/conftest.py skips
without one).
"""
import pytest
import torch

from lipforcing import RollingKVCache
from lipforcing.model.layers import RMSNorm
from lipforcing.ops import qk_norm, rope_spec
from lipforcing.ops.rope import apply_rope

pytestmark = pytest.mark.gpu

B, L, H, D = 1, 3072, 12, 128
TPF, GRID = 1024, (32, 32)
CHUNK, WINDOW, SINK = 3 * TPF, 6 * TPF, TPF
EPS = 1e-6
DEV = "cuda"
_results: dict = {}


def _setup(dtype):
    dev = DEV
    q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dtype) for _ in range(3))
    nq, nk = RMSNorm(H * D, EPS).to(dev, dtype), RMSNorm(H * D, EPS).to(dev, dtype)
    with torch.no_grad():
        nq.weight.normal_(1.0, 0.1)
        nk.weight.normal_(1.0, 0.1)
    nq.requires_grad_(False)  # inference: no autograd graph in the eager rows, and qk_norm has no backward
    nk.requires_grad_(False)
    rope = rope_spec(D, GRID, device=dev)
    cache = RollingKVCache(B, H, D, chunk_size=CHUNK, window=WINDOW, sink=SINK, dtype=dtype, device=dev)
    cache.pos.fill_(5 * TPF)  # the ring has wrapped
    return q, k, v, nq, nk, rope, cache


def _norms(q, k, nq, nk):
    return nq(q.flatten(2)).view(q.shape), nk(k.flatten(2)).view(k.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["norm", "norm_rope_abs", "norm_rope_window_write"])
@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_bench_qk_norm(bench_record, impl, case, dtype):
    q, k, v, nq, nk, rope, cache = _setup(dtype)
    t_pos = (torch.arange(L // TPF, device=DEV) + 2).repeat_interleave(TPF)
    numel = q.numel()
    nbytes = {"norm": 4, "norm_rope_abs": 4, "norm_rope_window_write": 8}[case] * numel * q.element_size()
    if impl == "fused":
        kw = {"norm": {}, "norm_rope_abs": dict(rope=rope, frame_offset=2),
              "norm_rope_window_write": dict(rope=rope, rope_positions="window", cache=cache, v=v)}[case]

        def fn():
            return qk_norm(q, k, nq.weight, nk.weight, eps=EPS, backend="triton", **kw)
    elif case == "norm":
        def fn():
            return _norms(q, k, nq, nk)
    elif case == "norm_rope_abs":
        def fn():
            qn, kn = _norms(q, k, nq, nk)
            return apply_rope(qn, t_pos, rope).to(dtype), apply_rope(kn, t_pos, rope).to(dtype)
    else:
        from lipforcing.kernels.chunk_attention import chunk_cache_write_triton, rope_rows_triton

        qr = torch.empty_like(q)

        def fn():
            qn, kn = _norms(q, k, nq, nk)
            chunk_cache_write_triton(kn, v, cache.k, cache.v, cache.pos, SINK, advance=False)
            return rope_rows_triton(qn, qr, cache.pos, CHUNK, WINDOW, SINK, rope.cos, rope.sin, *GRID)

    row = bench_record("qk_norm", impl, {"case": case, "B": B, "L": L, "H": H, "D": D}, dtype, fn, nbytes=nbytes)
    _results[(impl, case, str(dtype))] = row.median_us
    fused, eager = _results.get(("fused", case, str(dtype))), _results.get(("torch", case, str(dtype)))
    if fused and eager:
        row.extra["speedup_vs_torch"] = eager / fused
        print(f"\nqk_norm {case} {dtype}: fused {fused:.1f} us, torch {eager:.1f} us, {eager / fused:.2f}x")
