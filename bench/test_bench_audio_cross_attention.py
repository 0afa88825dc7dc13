"""audio_cross_attention forward: fused kernels vs the unfused PyTorch composition (GPU only).

Shape of one 512x512 chunk: F = 3 latent frames x 1024 tokens, text 512 tokens, audio window A = 32, D = 128,
bf16, H = 12 (1.3B) and 40 (14B).  Baselines:

* ``torch_unfused``: SDPA over the text + SDPA over the per-frame audio windows (q reshaped to (B*F, 1024, H, D))
  + add: what a model does without the fused op;
* ``xformers_blockdiag``: the audio branch as one memory-efficient attention with a ``BlockDiagonalMask`` (the
  MultiTalk path), plus SDPA over the text and the add; only when xformers is installed.

GB/s is measured against the bytes the op must move at least (read q, text K/V, audio K/V; write out).  Each
fused row's ``extra`` holds its speed-up over ``torch_unfused`` and, for a known GPU, the fraction of the HBM
bandwidth bound.
"""
import pytest
import torch
import torch.nn.functional as F

from lipforcing.ops import _dispatch
from lipforcing.ops.audio_cross_attention import _FWD

pytestmark = pytest.mark.gpu

B, FRAMES, TPF, TEXT, A, D = 1, 3, 1024, 512, 32, 128
DTYPE = torch.bfloat16
HEADS = [12, 40]
BACKENDS = ["torch_unfused", "xformers_blockdiag", "cuda", "triton"]  # the baseline first: ratios need it
# HBM bandwidth (bytes/s) of GPUs we report the bound for, matched on torch.cuda.get_device_name().
PEAK_BW = {"H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12, "H200": 4.8e12, "H100 PCIe": 2.0e12,
           "A100-SXM4-80GB": 2.04e12}

_baseline_us: dict[int, float] = {}


def _inputs(H):
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=DTYPE, generator=g)

    return (rnd(B, FRAMES * TPF, H, D), rnd(B, TEXT, H, D), rnd(B, TEXT, H, D), rnd(B, FRAMES, A, H, D),
            rnd(B, FRAMES, A, H, D))


def _torch_unfused(q, tk, tv, ak, av):
    H = q.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2)).transpose(1, 2)
    qa = q.reshape(B * FRAMES, TPF, H, D).transpose(1, 2)
    oa = F.scaled_dot_product_attention(qa, ak.reshape(B * FRAMES, A, H, D).transpose(1, 2),
                                        av.reshape(B * FRAMES, A, H, D).transpose(1, 2))
    return out + oa.transpose(1, 2).reshape(B, FRAMES * TPF, H, D)


def _xformers_fn(q, tk, tv, ak, av):
    try:
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    except Exception as exc:  # not installed, or built against another torch
        pytest.skip(f"xformers unavailable: {type(exc).__name__}: {exc}"[:300])

    H = q.shape[2]
    mask = BlockDiagonalMask.from_seqlens([TPF] * (B * FRAMES), [A] * (B * FRAMES))
    kflat, vflat = ak.reshape(1, B * FRAMES * A, H, D), av.reshape(1, B * FRAMES * A, H, D)
    qflat = q.reshape(1, B * FRAMES * TPF, H, D)

    def run():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2))
        oa = xops.memory_efficient_attention(qflat, kflat, vflat, attn_bias=mask)
        return out.transpose(1, 2) + oa.reshape(B, FRAMES * TPF, H, D)

    return run


def _min_bytes(H):
    el = torch.finfo(DTYPE).bits // 8
    q_and_out = 2 * B * FRAMES * TPF * H * D
    text = 2 * B * TEXT * H * D
    audio = 2 * B * FRAMES * A * H * D
    return el * (q_and_out + text + audio)


def _flops(H):
    return 4 * B * FRAMES * TPF * (TEXT + A) * H * D


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H", HEADS)
def test_bench_audio_cross_attention(bench_record, H, backend):
    xs = _inputs(H)
    scale = D ** -0.5
    if backend == "torch_unfused":
        fn = lambda: _torch_unfused(*xs)  # noqa: E731
    elif backend == "xformers_blockdiag":
        fn = _xformers_fn(*xs)
        try:  # an xformers wheel built for another torch / GPU imports but fails at the first call
            fn()
            torch.cuda.synchronize()
        except Exception as exc:
            pytest.skip(f"xformers unavailable: {type(exc).__name__}: {exc}"[:300])
    else:
        args = (*xs, TPF, 1.0, scale)
        try:
            _dispatch.resolve("audio_cross_attention", _FWD, backend, xs[0].device, args, {})
        except _dispatch.BackendUnavailable as exc:
            pytest.skip(str(exc))
        impl = _dispatch.implementation(_FWD, backend)
        fn = lambda: impl(*args)  # noqa: E731
    shape = dict(B=B, frames=FRAMES, tokens_per_frame=TPF, text=TEXT, audio_window=A, heads=H, head_dim=D)
    row = bench_record("audio_cross_attention", backend, shape, DTYPE, fn, flops=_flops(H), nbytes=_min_bytes(H))
    if backend == "torch_unfused":
        _baseline_us[H] = row.median_us
    elif H in _baseline_us:
        row.extra["speedup_vs_torch_unfused"] = _baseline_us[H] / row.median_us
    name = torch.cuda.get_device_name()
    peak = next((bw for key, bw in PEAK_BW.items() if key in name), None)
    if peak is not None:
        row.extra["bandwidth_fraction"] = row.gbps * 1e9 / peak


# ------------------------------------------------------------------- per-library baselines, fwd and fwd+bwd
# The unfused composition (SDPA over the text + SDPA over each frame's audio window + add) run on one attention
# library at a time: SDPA flash, SDPA cuDNN, flash-attn (when installed).  FlexAttention has no advantage here
# (no mask beyond the frame split) and is not run.
LIBRARIES = ("sdpa_flash", "sdpa_cudnn", "flash_attn")


def _library_unfused(name):
    if name == "flash_attn":
        from flash_attn import flash_attn_func as attend  # optional dependency; (B, L, H, D) layout
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kind = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[name]

        def attend(q, k, v):
            with sdpa_kernel([kind]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)

    def run(q, tk, tv, ak, av):
        H = q.shape[2]
        oa = attend(q.reshape(B * FRAMES, TPF, H, D), ak.reshape(B * FRAMES, A, H, D), av.reshape(B * FRAMES, A, H, D))
        return attend(q, tk, tv) + oa.reshape(B, FRAMES * TPF, H, D)

    return run


@pytest.mark.parametrize("H", HEADS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_audio_vs_every_library(bench_record, pass_, H):
    """Rows for each library's unfused composition and the fused Triton op, measured in this test; the Triton
    row's ``extra`` holds its speed-up over each library that ran."""
    from lipforcing.ops import audio_cross_attention

    backward = pass_ == "fwd+bwd"
    xs = [x.requires_grad_(backward) for x in _inputs(H)]
    g = torch.randn_like(xs[0])
    shape = dict(B=B, F=FRAMES, tokens_per_frame=TPF, text=TEXT, audio=A, H=H, D=D, pass_=pass_)
    fused = lambda *a: audio_cross_attention(*a, tokens_per_frame=TPF, backend="triton")  # noqa: E731
    times, notes = {}, {}
    for name in LIBRARIES + ("triton",):
        try:
            fn = fused if name == "triton" else _library_unfused(name)

            def step(fn=fn):
                if backward:
                    torch.autograd.grad(fn(*xs), xs, g)
                else:
                    with torch.no_grad():
                        fn(*xs)

            step()
        except Exception as exc:
            notes[f"{name}_unavailable"] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        row = bench_record("audio_cross_attention", name, shape, DTYPE, step,
                           flops=(3.5 if backward else 1.0) * _flops(H), warmup=3, rounds=20)
        times[name] = row.median_us
    assert "triton" in times, notes
    row.extra.update(notes)
    row.extra.update({f"speedup_vs_{n}": t / times["triton"] for n, t in times.items() if n != "triton"})
