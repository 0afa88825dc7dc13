"""One student chunk at the real shapes, random weights, bf16 (GPU only).

Shapes: 512x512 video -> 64x64 latents -> 1024 tokens per latent frame; a chunk is 3 latent frames (3072 query
tokens); steady-state cache: sink 1 frame + 3 earlier frames + the chunk = 7168 keys; 512 text tokens; "add"
audio; dynamic RoPE (the paper's inference setting).

Rows
    student_pass  : one ``forward_chunk(..., write=False)`` (a denoising pass)
    student_chunk : the full chunk step, 3 passes: denoise at t=0.999, ``ops.denoise_update`` re-noise to 0.769,
                    denoise at 0.769, cache-write pass at t=0
for backend ``auto`` (the ops' fastest backend) with ``torch.compile`` off / on (``compile_blocks``: the dense
parts of each block compiled, the attention ops eager), and the PyTorch baseline ``sdpa``: the same pass with the
cached keys gathered and attended by ``F.scaled_dot_product_attention`` (``lipforcing.distill.rollout``'s
differentiable twin of the streaming pass, run under no_grad).  TFLOP/s uses ``lipforcing.model.flops.pass_flops``
(about 12.0 TFLOP per pass at 1.3B and 92.8 at 14B).  Compile time is reported in ``extra`` (excluded from timing).
"""
import gc
import time

import pytest
import torch

from lipforcing import ops
from lipforcing.config import ModelConfig
from lipforcing.model import build_model
from lipforcing.model.flops import pass_flops

pytestmark = pytest.mark.gpu

LATENT = (64, 64)
TEXT_LEN = 512
DTYPE = torch.bfloat16
TIMING = dict(warmup=3, rounds=10)
_MODELS: dict = {}


def _model(size):
    """One model per size for the whole module (14B bf16 is ~29 GB); the other size is freed first."""
    if size not in _MODELS:
        _MODELS.clear()
        gc.collect()  # compile_blocks binds methods to the blocks (reference cycles): free the old model now
        torch.cuda.empty_cache()
        cfg = ModelConfig.from_name(size)
        _MODELS[size] = {"model": build_model(cfg, causal=True, device="cuda", dtype=DTYPE).eval(), "compiled": False}
    return _MODELS[size]


def _stream(model):
    cfg = model.config
    ctx = torch.randn(1, TEXT_LEN, cfg.text_dim, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        state = model.init_stream(ctx, latent_size=LATENT)
    tpf = state.tokens_per_frame
    for cache in state.caches:  # steady state: 3 chunks already written, the ring is full
        cache.k.normal_()
        cache.v.normal_()
        cache.pos.fill_(3 * cfg.chunk_frames * tpf)
    state.frame = 3 * cfg.chunk_frames
    return state


def _inputs(cfg):
    x = torch.randn(1, cfg.in_dim, cfg.chunk_frames, *LATENT, device="cuda", dtype=DTYPE)
    audio = torch.randn(1, cfg.chunk_frames, 4, cfg.audio_dim, device="cuda", dtype=DTYPE)
    return x, audio


def _chunk_step(pass_fn, x, y, steady_pos, state):
    """2 denoising passes + the cache write, with the fused re-noise in between (the Engine's inner loop)."""
    noisy = x[:, :16].float()  # the model returns float32 velocities; keep the latent state in float32

    def step():
        v = pass_fn(torch.cat([noisy.to(DTYPE), y], 1), 999.0, write=False)
        _, x_next = ops.denoise_update(noisy, v, 0.999, 0.769, seed=0)
        v = pass_fn(torch.cat([x_next.to(DTYPE), y], 1), 769.0, write=False)
        x0, _ = ops.denoise_update(x_next, v, 0.769, 0.0, seed=1)
        pass_fn(torch.cat([x0.to(DTYPE), y], 1), 0.0, write=True)
        for cache in state.caches:  # stay at the same steady state (the write advanced pos)
            cache.pos.copy_(steady_pos)
        state.frame -= x.shape[2]
    return step


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("size", ["1.3b", "14b"])
def test_student_chunk(size, compiled, bench_record):
    entry = _model(size)
    model = entry["model"]
    cfg = model.config
    compile_s = None
    if compiled and not entry["compiled"]:
        model.compile_blocks(dynamic=False)
        entry["compiled"] = True
    elif not compiled and entry["compiled"]:
        pytest.skip("eager rows run before compile rows for a size")
    state = _stream(model)
    x, audio = _inputs(cfg)
    y = x[:, 16:]
    steady_pos = state.caches[0].pos.clone()

    def one_pass(inp, t, *, write):
        return model.forward_chunk(inp, t, state, audio, write=write)

    with torch.no_grad():
        if compiled:
            t0 = time.perf_counter()
            one_pass(x, 500.0, write=False)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
        flops = pass_flops(cfg, tokens_per_frame=LATENT[0] * LATENT[1] // 4, text_len=TEXT_LEN)
        backend = "auto+compile" if compiled else "auto"
        shape = {"preset": size, "query_tokens": 3 * 1024, "key_tokens": 7 * 1024, "text": TEXT_LEN}
        row = bench_record("student_pass", backend, shape, DTYPE, lambda: one_pass(x, 500.0, write=False),
                           flops=flops, **TIMING)
        row.extra.update(compile_s=compile_s, pass_tflop=flops / 1e12)
        chunk = bench_record("student_chunk", backend, shape, DTYPE,
                             _chunk_step(one_pass, x, y, steady_pos, state), flops=3 * flops, **TIMING)
        chunk.extra.update(compile_s=compile_s, dit_fps_bound=12 / (chunk.median_us * 1e-6))
        # PyTorch baseline in the same state (compiled blocks or not): SDPA over the gathered cache keys
        base = _sdpa_baseline(model, x, audio, state, backend.replace("auto", "sdpa"), shape, flops, bench_record)
        if base is not None:
            row.extra["speedup_vs_sdpa"] = base.median_us / row.median_us
    print(f"\n{size} {backend}: pass {row.median_us / 1e3:.1f} ms ({row.tflops:.0f} TFLOP/s), chunk "
          f"{chunk.median_us / 1e3:.1f} ms = {12 / (chunk.median_us * 1e-6):.1f} video frames/s (DiT only)"
          + ("" if base is None else f"; sdpa baseline pass {base.median_us / 1e3:.1f} ms"))


def _sdpa_chunk_attention(q, k, v, cache, *, write, rope=None, scale=None, backend=None):
    """PyTorch baseline of ops.chunk_attention: the visible keys built as in the reference (RoPE applied by
    PyTorch ops), attention by SDPA with a key mask in the input dtype."""
    from lipforcing.ops.reference import _chunk_keys, cache_write_ref

    qf, kk, vv, valid, _ = _chunk_keys(q, k, v, cache.k, cache.v, cache.pos, cache.chunk_size, cache.window,
                                       cache.sink, rope)
    out = torch.nn.functional.scaled_dot_product_attention(
        qf.to(q.dtype).transpose(1, 2), kk.to(q.dtype).transpose(1, 2), vv.to(q.dtype).transpose(1, 2),
        attn_mask=valid[None, None, None, :], scale=scale)
    if write:
        cache_write_ref(k, v, cache.k, cache.v, cache.pos, sink=cache.sink)
    return out.transpose(1, 2)


def _sdpa_baseline(model, x, audio, state, label, shape, flops, bench_record):
    from lipforcing import ops

    fast = ops.chunk_attention
    ops.chunk_attention = _sdpa_chunk_attention  # the student calls ops.chunk_attention through the module
    try:
        return bench_record("student_pass", label, shape, DTYPE,
                            lambda: model.forward_chunk(x, 500.0, state, audio, write=False), flops=flops, **TIMING)
    finally:
        ops.chunk_attention = fast
