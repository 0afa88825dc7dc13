"""block_causal_attention training step (forward + backward) at the student's training shape (GPU only).

L = 21504 (21 latent frames x 1024 tokens), chunk 3072, window 6144, sink 1024, H in {12, 40}, D = 128, bf16.
FLOPs: the visible (query, key) pairs of the mask times 4 * D * H for the forward and 2.5x that for fwd + bwd
(the usual 1 + 2.5 FlashAttention accounting: 2 matmuls forward, 5 backward).  Baseline: FlexAttention
(compiled) with the same mask as a BlockMask, and SDPA (efficient backend) with a dense boolean mask.
"""
import pytest
import torch
import torch.nn.functional as F

from lipforcing.benchmarking import time_cuda
from lipforcing.ops import block_causal_attention
from lipforcing.ops.reference import block_causal_mask

pytestmark = pytest.mark.gpu

B, L, CHUNK, WINDOW, SINK, D = 1, 21504, 3072, 6144, 1024, 128
DTYPE = torch.bfloat16
_flex_us: dict[int, float] = {}


def _pairs():
    return block_causal_mask(L, L, CHUNK, WINDOW, SINK, "cuda").sum().item()


def _inputs(h):
    return [torch.randn(B, L, h, D, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3)]


def _mask_mod(b, hh, qi, kv):
    """The block-causal rule as a FlexAttention mask_mod (module level: one function object, so dynamo's guards
    on it hold across calls and the compiled kernels are reused)."""
    end = (qi // CHUNK + 1) * CHUNK
    return (kv < end) & ((kv < SINK) | (kv >= end - WINDOW))


_flex_cache: dict = {}


def _flex_step(h):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "block_mask" not in _flex_cache:  # the same for every head count (B = H = None: broadcast)
        _flex_cache["block_mask"] = create_block_mask(_mask_mod, None, None, L, L, device="cuda")
        _flex_cache["flex"] = torch.compile(flex_attention, dynamic=False)
    bm, flex = _flex_cache["block_mask"], _flex_cache["flex"]
    q, k, v = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in _inputs(h))
    g = torch.randn_like(q)

    def step():
        out = flex(q, k, v, block_mask=bm)
        torch.autograd.grad(out, (q, k, v), g)

    return step


@pytest.mark.parametrize("h", [12, 40])
@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_block_causal_train_step(bench_record, backend, h):
    flops = 3.5 * 4.0 * _pairs() * D * h
    shape = dict(B=B, L=L, H=h, D=D, chunk=CHUNK, window=WINDOW, sink=SINK, pass_="fwd+bwd")
    if backend == "flex":
        step = _flex_step(h)
        step()
        row = bench_record("block_causal_attention", "flex", shape, DTYPE, step, flops=flops, warmup=2, rounds=10)
        _flex_us[h] = row.median_us
        return
    q, k, v = _inputs(h)
    g = torch.randn_like(q)

    def step():
        out = block_causal_attention(q, k, v, chunk_size=CHUNK, window=WINDOW, sink=SINK, backend=backend)
        torch.autograd.grad(out, (q, k, v), g)

    step()
    row = bench_record("block_causal_attention", backend, shape, DTYPE, step, flops=flops, warmup=2, rounds=10)
    if h not in _flex_us:  # the flex case did not run first (e.g. -k triton)
        try:
            _flex_us[h] = time_cuda(_flex_step(h), warmup=2, rounds=10)["median_us"]
        except Exception as exc:  # the baseline failing must not fail our row (its own case reports it)
            _flex_us[h] = None
            row.extra["flex_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if _flex_us[h]:
        row.extra["speedup_vs_flex"] = _flex_us[h] / row.median_us


@pytest.mark.parametrize("h", [12, 40])
def test_block_causal_forward_sdpa_dense_mask(bench_record, h):
    """Forward only, SDPA with a dense (L x L) boolean mask: what a model without a block-sparse kernel runs."""
    mask = block_causal_mask(L, L, CHUNK, WINDOW, SINK, "cuda")
    q, k, v = (x.detach().transpose(1, 2) for x in _inputs(h))
    fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    bench_record("block_causal_attention", "sdpa_dense_mask", dict(B=B, L=L, H=h, D=D, pass_="fwd"), DTYPE, fn,
                 flops=4.0 * _pairs() * D * h, warmup=2, rounds=10)


# ---------------------------------------------------------------------------- every baseline, fwd and fwd+bwd
# SDPA's flash/cuDNN backends and flash-attn take no arbitrary mask, so they run the rule as one dense call per
# chunk over its visible keys [sink | window] (gathered by slicing + cat): exactly the block-causal result.
BASELINES = ("sdpa_flash", "sdpa_cudnn", "flash_attn", "flex")


def _dense_attention(name):
    """(B, Lq, H, D) x (B, Lk, H, D) dense attention of one baseline library; raises when it cannot run."""
    if name == "flash_attn":
        from flash_attn import flash_attn_func  # optional dependency

        return flash_attn_func
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[name]

    def attend(q, k, v):
        with sdpa_kernel([kind]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2)).transpose(1, 2)

    return attend


def _chunked(attend, q, k, v):
    outs = []
    for c0 in range(0, L, CHUNK):
        end = c0 + CHUNK  # nominal end (the window is measured from it)
        lo = max(end - WINDOW, 0)
        keys = [slice(0, min(SINK, lo)), slice(lo, min(end, L))]
        kk = torch.cat([k[:, s] for s in keys], 1)
        vv = torch.cat([v[:, s] for s in keys], 1)
        outs.append(attend(q[:, c0:min(end, L)], kk, vv))
    return torch.cat(outs, 1)


def _step(name, h, backward):
    q, k, v = _inputs(h)
    g = torch.randn_like(q)
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if "block_mask" not in _flex_cache:
            _flex_cache["block_mask"] = create_block_mask(_mask_mod, None, None, L, L, device="cuda")
            _flex_cache["flex"] = torch.compile(flex_attention, dynamic=False)
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        q, k, v, g = qt, kt, vt, g.transpose(1, 2).contiguous()
        run = lambda: _flex_cache["flex"](q, k, v, block_mask=_flex_cache["block_mask"])  # noqa: E731
    elif name == "triton":
        run = lambda: block_causal_attention(q, k, v, chunk_size=CHUNK, window=WINDOW, sink=SINK,  # noqa: E731
                                             backend="triton")
    else:
        attend = _dense_attention(name)
        run = lambda: _chunked(attend, q, k, v)  # noqa: E731

    def step():
        if backward:
            torch.autograd.grad(run(), (q, k, v), g)
        else:
            with torch.no_grad():
                run()

    step()  # compile / autotune / fail here, not inside the timing
    return step


@pytest.mark.parametrize("h", [12, 40])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_block_causal_vs_every_baseline(bench_record, pass_, h):
    """One row per backend, all measured in this test; the Triton row's ``extra`` holds its speed-up over each
    baseline that ran (a missing library is noted, not fatal)."""
    backward = pass_ == "fwd+bwd"
    flops = (3.5 if backward else 1.0) * 4.0 * _pairs() * D * h
    shape = dict(B=B, L=L, H=h, D=D, chunk=CHUNK, window=WINDOW, sink=SINK, pass_=pass_)
    times, notes = {}, {}
    for name in BASELINES + ("triton",):
        try:
            step = _step(name, h, backward)
        except Exception as exc:
            notes[f"{name}_unavailable"] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        row = bench_record("block_causal_attention", name, shape, DTYPE, step, flops=flops, warmup=2, rounds=10)
        times[name] = row.median_us
    assert "triton" in times, notes
    row.extra.update(notes)
    row.extra.update({f"speedup_vs_{n}": t / times["triton"] for n, t in times.items() if n != "triton"})
