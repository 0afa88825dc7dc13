"""chunk_attention inference forward at the student's shapes (GPU only).

B = 1, Lq = 3072 (one 3-frame chunk at 512x512), Lk = sink 1024 + window in {4096, 7168, 12288, 21504} (7168:
the paper's 7-frame window), H in {12, 40}, D = 128, bf16; the cache is full (steady state), write=False (attention
only; the dense backends stage the post-write view first, and that pass is timed).  TFLOP/s counts
4 * Lq * Lk * D * H.  Our op's rows: ``triton``, ``cuda``, and the library backends behind the same op,
``flash_attn`` and ``cudnn`` (each also ``_rope``: dynamic RoPE rotated once per step).  The backward row
(``test_chunk_attention_backward``, Lk = 7168) times forward + backward of a write=False step (gradients for the
chunk's q, k, v) against SDPA flash forward + backward on the gathered keys.

Baselines get the keys already gathered into contiguous (B, H, Lk, D) tensors (gathering is not timed):
``sdpa_flash`` / ``sdpa_cudnn`` / ``sdpa_efficient`` (each SDPA backend that runs), ``flex`` (FlexAttention,
compiled; every key is visible to every query of the chunk so it needs no block mask) and ``flash_attn_kvcache``
(flash-attn's ``flash_attn_with_kvcache`` on a linear cache) when flash-attn is installed.  Our rows carry in
``extra`` the ratio to the best baseline measured for the same shape.

``test_chunk_attention_split_kv`` (12 heads: 24 query tiles x 12 = 288 programs, ~2.2 waves on 132 SMs) times the
Triton launcher itself with the split-KV count forced to 1 (one pass), 2, 3, 4 and left to its heuristic
(``split_auto``), all in the same run and through the same call; each row carries the chosen S and its speed-up
over S = 1, so a GPU run checks (and can retune) kernels/chunk_attention_split.py's unmeasured cost model.
"""
import pytest
import torch
import torch.nn.functional as F

from lipforcing import RollingKVCache
from lipforcing.benchmarking import time_cuda
from lipforcing.ops import chunk_attention

pytestmark = pytest.mark.gpu

B, LQ, SINK, D = 1, 3072, 1024, 128
DTYPE = torch.bfloat16
LKS = [4096, 7168, 12288, 21504]
HEADS = [12, 40]
BASELINES = ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "flash_attn_kvcache"]
OURS = ["triton", "cuda", "flash_attn", "cudnn"]   # chunk_attention's backends
_baseline_us: dict[tuple, dict[str, float]] = {}   # (lk, h) -> {baseline: median us}, inf when it cannot run
_compiled_flex = []


def _flex():
    """One ``torch.compile(flex_attention)`` for the module (it still compiles once per shape: dynamic=False)."""
    if not _compiled_flex:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex.append(torch.compile(flex_attention, dynamic=False))
    return _compiled_flex[0]


def _flops(lk, h):
    return 4.0 * LQ * lk * D * h


def _cache(lk, h):
    window = lk - SINK
    cache = RollingKVCache(B, h, D, chunk_size=LQ, window=window, sink=SINK, dtype=DTYPE, device="cuda")
    cache.k.normal_()
    cache.v.normal_()
    cache.pos.fill_(SINK + 3 * max(window - LQ, 1) + 17)  # wrapped ring, steady state: every slot valid
    return cache


def _baseline_fn(name, lk, h):
    q, k, v = (torch.randn(B, h, n, D, device="cuda", dtype=DTYPE) for n in (LQ, lk, lk))
    if name.startswith("sdpa_"):
        backend = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                   "sdpa_efficient": "EFFICIENT_ATTENTION"}[name]
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn():
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                return F.scaled_dot_product_attention(q, k, v)
    elif name == "flex":
        compiled = _flex()

        def fn():
            return compiled(q, k, v)
    else:
        fa = pytest.importorskip("flash_attn")
        qb, kb, vb = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        seqlens = torch.full((B,), lk - LQ, dtype=torch.int32, device="cuda")
        knew, vnew = kb[:, lk - LQ:].clone(), vb[:, lk - LQ:].clone()

        def fn():
            return fa.flash_attn_with_kvcache(qb, kb, vb, k=knew, v=vnew, cache_seqlens=seqlens)
    try:
        fn()
        torch.cuda.synchronize()
    except Exception as exc:  # a backend that does not run on this GPU / build
        pytest.skip(f"{name} unavailable: {type(exc).__name__}: {exc}"[:300])
    return fn


def _best_baseline(lk, h):
    """The fastest baseline for this shape: the rows the baseline cases recorded (they run first), and only the
    baselines not measured yet timed here (e.g. when a -k filter selected our backends alone)."""
    seen = _baseline_us.setdefault((lk, h), {})
    for name in BASELINES:
        if name not in seen:
            try:
                fn = _baseline_fn(name, lk, h)
            except pytest.skip.Exception:
                seen[name] = float("inf")
                continue
            seen[name] = time_cuda(fn, warmup=3, rounds=10)["median_us"]
    return min(seen.values())


@pytest.mark.parametrize("h", HEADS)
@pytest.mark.parametrize("lk", LKS)
@pytest.mark.parametrize("backend", BASELINES + OURS + [f"{b}_rope" for b in OURS])
def test_chunk_attention_forward(bench_record, backend, lk, h):
    shape = dict(B=B, Lq=LQ, Lk=lk, H=h, D=D, sink=SINK, window=lk - SINK)
    if backend in BASELINES:
        seen = _baseline_us.setdefault((lk, h), {})
        try:
            fn = _baseline_fn(backend, lk, h)
        except pytest.skip.Exception:
            seen[backend] = float("inf")
            raise
        row = bench_record("chunk_attention", backend, shape, DTYPE, fn, flops=_flops(lk, h))
        seen[backend] = row.median_us
        return
    from lipforcing.ops import rope_spec

    cache = _cache(lk, h)
    q, k, v = (torch.randn(B, LQ, h, D, device="cuda", dtype=DTYPE) for _ in range(3))
    name = backend.replace("_rope", "")
    rope = rope_spec(D, (32, 32), device="cuda") if backend.endswith("_rope") else None
    try:
        chunk_attention(q, k, v, cache, write=False, rope=rope, backend=name)
    except Exception as exc:
        pytest.skip(f"{backend} unavailable: {exc}"[:300])
    row = bench_record("chunk_attention", backend, dict(shape, rope=rope is not None), DTYPE,
                       lambda: chunk_attention(q, k, v, cache, write=False, rope=rope, backend=name),
                       flops=_flops(lk, h))
    best = _best_baseline(lk, h)
    if best < float("inf"):
        row.extra["speedup_vs_best_baseline"] = best / row.median_us


@pytest.mark.parametrize("h", HEADS)
def test_chunk_attention_backward(bench_record, h):
    """Forward + backward of the Self-Forcing exit step (write=False, gradients for the chunk's q, k, v):
    Triton flash-style backward vs SDPA flash on gathered keys (q, k, v of all 7168 keys requiring grad)."""
    lk = 7168
    shape = dict(B=B, Lq=LQ, Lk=lk, H=h, D=D, sink=SINK, window=lk - SINK)
    qs, ks, vs = (torch.randn(B, h, n, D, device="cuda", dtype=DTYPE, requires_grad=True) for n in (LQ, lk, lk))
    go = torch.randn(B, h, LQ, D, device="cuda", dtype=DTYPE)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def baseline():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(qs, ks, vs)
        return torch.autograd.grad(out, (qs, ks, vs), go)

    # FLOPs: FlashAttention's accounting, forward + backward = 3.5 x the forward's 4 * Lq * Lk * D * H
    base = bench_record("chunk_attention_fwd_bwd", "sdpa_flash", shape, DTYPE, baseline, flops=3.5 * _flops(lk, h))
    cache = _cache(lk, h)
    q, k, v = (torch.randn(B, LQ, h, D, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))
    g = go.transpose(1, 2).contiguous()

    def ours():
        out = chunk_attention(q, k, v, cache, write=False, backend="triton")
        return torch.autograd.grad(out, (q, k, v), g)

    row = bench_record("chunk_attention_fwd_bwd", "triton", shape, DTYPE, ours, flops=3.5 * _flops(lk, h))
    row.extra["speedup_vs_sdpa_flash"] = base.median_us / row.median_us


SPLIT_ROWS = [1, 2, 3, 4, None]  # None: the launcher's own choice (choose_splits with the GPU's SM count)
_split_us: dict[tuple, float] = {}  # (lk, write) -> median us of S = 1


@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("lk", [4096, 7168])
@pytest.mark.parametrize("splits", SPLIT_ROWS, ids=lambda s: f"split{s}" if s else "split_auto")
def test_chunk_attention_split_kv(bench_record, splits, lk, write):
    """Split-KV vs the one-pass forward at 12 heads (no RoPE; write=True re-stores the same chunk each call)."""
    from lipforcing.kernels.chunk_attention import chunk_attention_triton, forward_splits

    h = 12
    cache = _cache(lk, h)
    q, k, v = (torch.randn(B, LQ, h, D, device="cuda", dtype=DTYPE) for _ in range(3))
    pos0 = cache.pos.clone()
    chosen = forward_splits(q, cache.k, LQ, write, splits=splits)

    def fn():
        if write:
            cache.pos.copy_(pos0)  # the launcher advances pos: keep the steady-state position
        return chunk_attention_triton(q, k, v, cache.k, cache.v, cache.pos, LQ, lk - SINK, SINK, write, D ** -0.5,
                                      None, None, 0, 0, splits=splits)

    shape = dict(B=B, Lq=LQ, Lk=lk, H=h, D=D, sink=SINK, window=lk - SINK, write=write)
    name = f"triton_split{splits}" if splits else "triton_split_auto"
    row = bench_record("chunk_attention_split_kv", name, shape, DTYPE, fn, flops=_flops(lk, h))
    row.extra["splits"] = chosen
    if splits == 1:
        _split_us[(lk, write)] = row.median_us
    elif (lk, write) in _split_us:
        row.extra["speedup_vs_split1"] = _split_us[(lk, write)] / row.median_us
