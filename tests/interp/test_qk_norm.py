"""Triton qk_norm (RMSNorm of q and k, + RoPE, + cache write) vs the reference, run by the Triton interpreter on
the CPU (or compiled on a GPU when one is present and TRITON_INTERPRET is unset); and the student's chunk step with
the fused q/k norm on vs off."""
import sys

import pytest
import torch

from lipforcing import RollingKVCache
from lipforcing.config import ModelConfig
from lipforcing.model import build_model
from lipforcing.ops import qk_norm, rope_spec
from tests.kernel_helpers import triton_test_device
from tests.model.helpers import make_inputs

pytestmark = pytest.mark.interp

DEVICE = triton_test_device()
# fp32: the kernel sums the squares in another order than torch.mean (a few ulps in rstd).  fp16: outputs are
# rounded to fp16 at the same points as the reference, so a differing rstd ulp can flip the last fp16 bit.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _inputs(B, L, H, D, dtype):
    q, k, v = (torch.randn(B, L, H, D, device=DEVICE).to(dtype) for _ in range(3))
    # a Linear output: row stride H*D, and a batch stride wider than L*H*D (a slice of a longer sequence)
    q = torch.randn(B, L + 3, H, D, device=DEVICE).to(dtype)[:, 1:L + 1]
    wq = torch.randn(H * D, device=DEVICE)
    wk = (1 + 0.1 * torch.randn(H * D, device=DEVICE)).to(dtype)
    return q, k, v, wq, wk


def _close(got, want, dtype):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norm_and_absolute_rope_match_reference(dtype):
    # odd head_dim and heads for the norm alone; rows not a multiple of the kernel's row tile
    B, L, H, D = 2, 7, 3, 5
    q, k, _, wq, wk = _inputs(B, L, H, D, dtype)
    eps = float(torch.rand(()) * 1e-3)
    _close(qk_norm(q, k, wq, wk, eps=eps, backend="triton"), qk_norm(q, k, wq, wk, eps=eps, backend="reference"),
           dtype)
    # the reference is the model's RMSNorm, op for op
    from lipforcing.model.layers import RMSNorm

    norm = RMSNorm(H * D, eps).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(wq)
        want = norm(q.reshape(B, L, H * D)).view(B, L, H, D)
    torch.testing.assert_close(qk_norm(q, k, wq, wk, eps=eps, backend="reference")[0], want, rtol=0, atol=0)
    # + absolute RoPE of q and k (2 x 3 grid: 6 tokens per frame, 3 frames from frame 4)
    B, L, H, D = 1, 18, 2, 12
    q, k, _, wq, wk = _inputs(B, L, H, D, dtype)
    rope = rope_spec(D, (2, 3), max_frames=8, device=DEVICE)
    got = qk_norm(q, k, wq, wk, eps=1e-6, rope=rope, frame_offset=4, backend="triton")
    _close(got, qk_norm(q, k, wq, wk, eps=1e-6, rope=rope, frame_offset=4, backend="reference"), dtype)
    # rotation changes the result (the test can fail)
    assert not torch.allclose(got[1].float(), qk_norm(q, k, wq, wk, eps=1e-6, backend="triton")[1].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_window_rope_and_cache_write_match_reference(dtype):
    # grid 1 x 2 (2 tokens per frame), chunk 2 frames, window 5 frames (ring wraps), sink 1 frame; q rotated at its
    # window-relative frame, k and v stored in the chunk's slots (sink slots first, then the ring); the last chunk
    # is short
    B, H, D, tpf = 2, 2, 8, 2
    chunk, window, sink = 2 * tpf, 5 * tpf, tpf
    rope = rope_spec(D, (1, 2), max_frames=6, device=DEVICE)
    kw = dict(chunk_size=chunk, window=window, sink=sink, dtype=dtype, device=DEVICE)
    c_tri, c_ref = RollingKVCache(B, H, D, **kw), RollingKVCache(B, H, D, **kw)
    for n in [chunk] * 5 + [tpf]:
        q, k, v, wq, wk = _inputs(B, n, H, D, dtype)
        args = dict(eps=1e-6, rope=rope, rope_positions="window", v=v)
        got = qk_norm(q, k, wq, wk, cache=c_tri, backend="triton", **args)
        want = qk_norm(q, k, wq, wk, cache=c_ref, backend="reference", **args)
        _close(got, want, dtype)
        torch.testing.assert_close(c_tri.k.float(), c_ref.k.float(), rtol=0, atol=ATOL[dtype])
        assert torch.equal(c_tri.v, c_ref.v)           # v is copied as is
        assert int(c_tri.pos) == int(c_ref.pos)          # pos is not advanced by qk_norm ...
        for c in (c_tri, c_ref):
            c.pos.add_(n)                                # ... but by the attention that follows
    assert int(c_tri.pos) > sink + window                # the ring wrapped


def _stream(model, x, t, audio, state, chunk):
    outs = []
    for s in range(0, x.shape[2], chunk):
        sl = slice(s, s + chunk)
        outs.append(model.forward_chunk(x[:, :, sl], t[:, sl], state, audio[:, sl], write=False))
        model.forward_chunk(x[:, :, sl], t[:, sl], state, audio[:, sl], write=True)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("rope_mode", ["dynamic", "absolute"])
def test_chunk_step_fused_equals_unfused(rope_mode, monkeypatch):
    # one head of 16 dims, chunk 1 frame of 2 tokens, window 2 frames, sink 1 frame: the ring wraps over 4 frames
    cfg = ModelConfig.from_name("tiny", rope_mode=rope_mode, dim=16, num_heads=1, num_layers=1, ffn_dim=16,
                                chunk_frames=1, window_frames=2, sink_frames=1)
    model = build_model(cfg, causal=True).eval().to(DEVICE)
    model.attn_backend = "triton"
    x, t, ctx, audio = make_inputs(cfg, batch=1, frames=4, height=2, width=2)
    x, t, ctx, audio = (a.to(DEVICE) for a in (x, t, ctx, audio))
    calls = []
    mod = sys.modules["lipforcing.ops.qk_norm"]  # (lipforcing.ops.qk_norm is the function)
    real = mod.qk_norm
    monkeypatch.setattr(mod, "qk_norm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    flags, passes = _spy_chunk_step(monkeypatch)
    with torch.no_grad():
        s_fused, s_plain = model.init_stream(ctx), model.init_stream(ctx)
        fused = _stream(model, x, t, audio, s_fused, cfg.chunk_frames)
        assert calls, "the fused path did not run"
        _check_prepared(rope_mode, flags, passes)
        monkeypatch.setenv("LIPFORCING_FUSED_QK_NORM", "0")
        n = len(calls)
        flags.clear()
        plain = _stream(model, x, t, audio, s_plain, cfg.chunk_frames)
        assert len(calls) == n
        assert flags == [(False, False)] * len(flags) and passes["cache_write"] > 0
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    for a, b in zip(s_fused.caches, s_plain.caches):
        torch.testing.assert_close(a.k, b.k, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.v, b.v) and torch.equal(a.pos, b.pos)


def _spy_chunk_step(monkeypatch):
    """Record chunk_attention's (q_rotated, chunk_in_cache) per call and count the Triton q-rotation and
    cache-store passes."""
    import lipforcing.kernels.chunk_attention as kmod
    from lipforcing import ops

    flags, passes = [], {"rope_rows": 0, "cache_write": 0, "reads": 0}
    real_ca = ops.chunk_attention

    def spy(*a, **kw):
        flags.append((kw.get("q_rotated", False), kw.get("chunk_in_cache", False)))
        passes["reads"] += not kw["write"]
        return real_ca(*a, **kw)

    monkeypatch.setattr(ops, "chunk_attention", spy)
    for name in ("rope_rows", "cache_write"):
        fn = {"rope_rows": "rope_rows_triton", "cache_write": "chunk_cache_write_triton"}[name]
        real = getattr(kmod, fn)
        monkeypatch.setattr(kmod, fn, lambda *a, _n=name, _r=real, **kw: passes.__setitem__(_n, passes[_n] + 1)
                            or _r(*a, **kw))
    return flags, passes


def _check_prepared(rope_mode, flags, passes):
    """Dynamic mode on the fused path: every call takes q rotated and (write passes) the chunk stored by
    qk_norm, so the only rotation pass left is the current keys' on write=False, and no store pass runs."""
    if rope_mode != "dynamic":
        assert set(flags) == {(False, False)}
        return
    assert flags and all(q_rot for q_rot, _ in flags)
    assert sum(in_cache for _, in_cache in flags) == len(flags) - passes["reads"] > 0
    assert passes["cache_write"] == 0 and passes["rope_rows"] == passes["reads"]
    flags.clear()
    passes.update(rope_rows=0, cache_write=0, reads=0)


@pytest.mark.parametrize("rope_mode", ["dynamic", "absolute"])
def test_batched_chunk_step_fused_equals_unfused(rope_mode, monkeypatch):
    # engine.chunk_step.forward_chunks: two streams at batch 2, the second one a chunk ahead (other RoPE frames)
    from lipforcing.engine.chunk_step import forward_chunks

    cfg = ModelConfig.from_name("tiny", rope_mode=rope_mode, dim=16, num_heads=1, num_layers=1, ffn_dim=16,
                                chunk_frames=1, window_frames=2, sink_frames=1)
    model = build_model(cfg, causal=True).eval().to(DEVICE)
    model.attn_backend = "triton"
    x, _, ctx, audio = make_inputs(cfg, batch=2, frames=3, height=2, width=2)
    x, ctx, audio = x.to(DEVICE), ctx[:1].to(DEVICE), audio.to(DEVICE)

    def run():
        with torch.no_grad():
            states = [model.init_stream(ctx) for _ in range(2)]
            model.forward_chunk(x[1:, :, :1], 0, states[1], audio[1:, :1], write=True)
            outs = []
            for f in range(2):
                sl = slice(f, f + 1)
                outs.append(forward_chunks(model, x[:, :, sl], 500.0, states, audio[:, sl], write=False))
                forward_chunks(model, x[:, :, sl], 0, states, audio[:, sl], write=True)
            return torch.cat(outs, dim=2)

    flags, passes = _spy_chunk_step(monkeypatch)
    fused = run()
    _check_prepared(rope_mode, flags, passes)
    monkeypatch.setenv("LIPFORCING_FUSED_QK_NORM", "0")
    torch.testing.assert_close(fused, run(), rtol=1e-4, atol=1e-4)
    assert set(flags) == {(False, False)}
