"""Interpreter tier: the Triton audio_cross_attention (forward and backward) vs the fp32 reference.

Runs the real kernels on the CPU under TRITON_INTERPRET=1 (set by tests/conftest.py before any import), in
float32 and float16, on odd sizes: query tiles straddling two or many frames, empty text, head_dim not a power of
two, audio windows of 1 and > 64 tokens (the kernel loops over audio tiles), non-contiguous inputs.
"""
import math
import os

import pytest
import torch

from lipforcing import ops
from lipforcing.ops.reference import audio_cross_attention_ref

pytestmark = [
    pytest.mark.interp,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                       reason="interpreter tier: needs TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)"),
]

triton_kernels = pytest.importorskip("lipforcing.kernels.audio_cross_attention")

# (batch, frames, tokens_per_frame, heads, head_dim, text_len, audio_window)
CASES = [
    (1, 3, 37, 2, 32, 29, 5),   # tiles of 16 rows straddle frames; text not a multiple of the key tile
    (2, 4, 5, 1, 24, 0, 3),     # no text; several frames per tile; head_dim 24 (padded to 32)
    (1, 2, 40, 2, 16, 20, 70),  # audio window > 64: two audio tiles
    (1, 1, 16, 1, 64, 33, 1),   # one frame, one audio token, tile-aligned queries
]


def _inputs(B, F, tpf, H, D, T, A, dtype):
    return (torch.randn(B, F * tpf, H, D, dtype=dtype), torch.randn(B, T, H, D, dtype=dtype),
            torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, F, A, H, D, dtype=dtype),
            torch.randn(B, F, A, H, D, dtype=dtype))


def _plain_torch(q, tk, tv, ak, av, tpf, audio_scale, scale):
    """The unfused composition computed in the inputs' dtype: plain PyTorch's own low-precision error."""
    B, L, H, D = q.shape
    F, A = ak.shape[1], ak.shape[2]

    def attend(q, k, v):
        p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale, dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", p, v)

    out = attend(q, tk, tv) if tk.shape[1] else torch.zeros_like(q)
    qa = q.reshape(B * F, tpf, H, D)
    oa = attend(qa, ak.reshape(B * F, A, H, D), av.reshape(B * F, A, H, D)).reshape(B, L, H, D)
    return out + audio_scale * oa


def _bound(dtype, err_pt):
    # fp32: both sides are exact to rounding; fp16: at most 2x plain PyTorch's fp16 error plus a small floor.
    return 1e-5 if dtype == torch.float32 else 2 * err_pt + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,F,tpf,H,D,T,A", CASES)
def test_forward_matches_reference(B, F, tpf, H, D, T, A, dtype):
    xs = _inputs(B, F, tpf, H, D, T, A, dtype)
    audio_scale = float(torch.empty(()).uniform_(0.25, 2.0))
    scale = 1 / math.sqrt(D)
    out, lse_t, lse_a = triton_kernels.audio_cross_attention_triton(*xs, tpf, audio_scale, scale)
    ref, ref_lse_t, ref_lse_a = audio_cross_attention_ref(*(x.float() for x in xs), tpf, audio_scale, scale)
    assert out.dtype == dtype and out.shape == xs[0].shape
    err = (out.float() - ref).abs().max().item()
    err_pt = (_plain_torch(*xs, tpf, audio_scale, scale).float() - ref).abs().max().item()
    assert err <= _bound(dtype, err_pt), f"max error {err:.3g} vs plain PyTorch {err_pt:.3g} ({dtype})"
    assert lse_t.dtype == lse_a.dtype == torch.float32 and lse_t.shape == (B, H, F * tpf)
    if T == 0:
        assert torch.isneginf(lse_t).all()
    else:
        torch.testing.assert_close(lse_t, ref_lse_t, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-4)
    torch.testing.assert_close(lse_a, ref_lse_a, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-4)


@pytest.mark.parametrize("tpf,block_m", [(7, 32), (16, 16), (33, 16)])
def test_tile_straddles_frames(tpf, block_m):
    """Rows of one query tile belong to several frames (per-row frame index), or exactly one (aligned)."""
    xs = _inputs(1, 5, tpf, 2, 16, 11, 6, torch.float32)
    out, _, lse_a = triton_kernels.audio_cross_attention_triton(*xs, tpf, 1.5, 0.3, block_m=block_m, block_n=16)
    ref, _, ref_lse_a = audio_cross_attention_ref(*xs, tpf, 1.5, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_a, ref_lse_a, atol=1e-5, rtol=1e-5)


def test_public_op_non_contiguous_inputs():
    """Strided views (q from a packed projection, text K/V from one packed tensor) through the public op."""
    B, F, tpf, H, D, T, A = 1, 3, 11, 2, 16, 9, 4
    qx = torch.randn(B, F * tpf, H, 3 * D)
    kv = torch.randn(B, T, 2, H, D)
    akv = torch.randn(B, F, A, H, 2, D)
    q, tk, tv, ak, av = qx[..., D:2 * D], kv[:, :, 0], kv[:, :, 1], akv[..., 0, :], akv[..., 1, :]
    out = ops.audio_cross_attention(q, tk, tv, ak, av, tokens_per_frame=tpf, audio_scale=0.8, backend="triton")
    ref = ops.audio_cross_attention(q, tk, tv, ak, av, tokens_per_frame=tpf, audio_scale=0.8, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,F,tpf,H,D,T,A", CASES[:3])
def test_backward_matches_reference_autograd(B, F, tpf, H, D, T, A, dtype):
    xs = tuple(x.requires_grad_(True) for x in _inputs(B, F, tpf, H, D, T, A, dtype))
    audio_scale = float(torch.empty(()).uniform_(0.25, 2.0))
    out = ops.audio_cross_attention(*xs, tokens_per_frame=tpf, audio_scale=audio_scale, backend="triton")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, xs, g)

    xs32 = tuple(x.detach().float().requires_grad_(True) for x in xs)
    ref = audio_cross_attention_ref(*xs32, tpf, audio_scale, 1 / math.sqrt(D))[0]
    exp = torch.autograd.grad(ref, xs32, g.float(), allow_unused=True)
    if dtype != torch.float32:
        xs_lp = tuple(x.detach().requires_grad_(True) for x in xs)
        pt = _plain_torch(*xs_lp, tpf, audio_scale, 1 / math.sqrt(D))
        pt_grads = torch.autograd.grad(pt, xs_lp, g, allow_unused=True)
    names = ("dq", "dtext_k", "dtext_v", "daudio_k", "daudio_v")
    for i, (name, a, e, x) in enumerate(zip(names, got, exp, xs)):
        assert a.dtype == dtype and a.shape == x.shape, name
        if e is None:  # empty text
            assert a.numel() == 0, name
            continue
        err = (a.float() - e).abs().max().item()
        if dtype == torch.float32:
            bound = 1e-4 * max(1.0, e.abs().max().item())
            err_pt = 0.0
        else:
            err_pt = (pt_grads[i].float() - e).abs().max().item()
            bound = 2 * err_pt + 2e-3 * max(1.0, e.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (plain PyTorch {err_pt:.3g}, {dtype})"


def test_backward_tile_straddles_frames():
    B, F, tpf, H, D, T, A = 1, 4, 7, 1, 16, 5, 3
    xs = _inputs(B, F, tpf, H, D, T, A, torch.float32)
    out, lse_t, lse_a = triton_kernels.audio_cross_attention_triton(*xs, tpf, 0.6, 0.25, block_m=32)
    g = torch.randn_like(out)
    got = triton_kernels.audio_cross_attention_backward_triton(g, *xs, out, lse_t, lse_a, tpf, 0.6, 0.25,
                                                               block_m=32, block_n=16)
    xs32 = tuple(x.clone().requires_grad_(True) for x in xs)
    exp = torch.autograd.grad(audio_cross_attention_ref(*xs32, tpf, 0.6, 0.25)[0], xs32, g)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_bfloat16_is_refused_by_the_interpreter():
    xs = _inputs(1, 2, 4, 1, 16, 3, 2, torch.bfloat16)
    with pytest.raises(ops.BackendUnavailable, match="bfloat16"):
        ops.audio_cross_attention(*xs, tokens_per_frame=4, backend="triton")


def test_cuda_backend_refuses_cpu_tensors_with_a_reason():
    from lipforcing.ops.cuda.audio_cross_attention import audio_cross_attention_cuda_unsupported as why

    xs = _inputs(1, 2, 8, 1, 64, 4, 2, torch.float16)
    assert "needs CUDA tensors" in why(*xs, 8, 1.0, 0.125)
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        ops.audio_cross_attention(*xs, tokens_per_frame=8, backend="cuda")


@pytest.mark.parametrize("audio_scale", [0.7, 1.3])
def test_backward_one_audio_token_cancels_exactly_fp16(audio_scale):
    """With one audio token per frame the audio softmax is constant (P = 1), so the true d audio_k is exactly 0.
    Both backward kernels must scale dO the same way and take delta from their own dP for the two terms of
    dS = P (dP - delta) to cancel bit for bit (plain PyTorch's softmax backward gives 0 too)."""
    B, F, tpf, H, D, T, A = 1, 3, 24, 2, 32, 9, 1
    xs = tuple(x.requires_grad_(True) for x in _inputs(B, F, tpf, H, D, T, A, torch.float16))
    out = ops.audio_cross_attention(*xs, tokens_per_frame=tpf, audio_scale=audio_scale, backend="triton")
    dq, _, _, dak, dav = torch.autograd.grad(out, xs, torch.randn_like(out))
    assert torch.count_nonzero(dak) == 0, f"|d audio_k| max {dak.abs().max().item():.3g}, expected exactly 0"
    assert torch.isfinite(dq).all() and dav.abs().max() > 0


def test_nonfinite_audio_of_one_frame_stays_in_that_frame():
    """NaN audio keys/values of frame 1 poison only frame 1's rows (forward and dq), with 16-row tiles that
    straddle frames (tokens_per_frame 7), and the reference agrees."""
    B, F, tpf, H, D, T, A = 1, 4, 7, 1, 16, 5, 3
    xs = list(_inputs(B, F, tpf, H, D, T, A, torch.float32))
    xs[3][0, 1, 1, 0, 2] = float("nan")
    xs[4][0, 1, 0, 0, 5] = float("nan")
    in_f1 = (torch.arange(F * tpf) // tpf) == 1
    q = xs[0].requires_grad_()
    outs = {}
    for backend in ("triton", "reference"):
        out = ops.audio_cross_attention(q, *xs[1:], tokens_per_frame=tpf, audio_scale=0.9, backend=backend)
        outs[backend] = (out.detach(), torch.autograd.grad(out, q, torch.ones_like(out))[0])
    for backend, (out, dq) in outs.items():
        assert torch.isnan(out[0, in_f1]).any(-1).all() and torch.isfinite(out[0, ~in_f1]).all(), backend
        assert torch.isfinite(dq[0, ~in_f1]).all(), backend
    torch.testing.assert_close(outs["triton"][0][0, ~in_f1], outs["reference"][0][0, ~in_f1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["triton"][1][0, ~in_f1], outs["reference"][1][0, ~in_f1], atol=1e-4, rtol=1e-4)


def test_launchers_enter_the_device_guard(monkeypatch):
    """Forward and backward launch inside the shared device_guard(q) (torch.cuda.device on a GPU)."""
    from tests.kernel_helpers import record_device_guard

    seen = record_device_guard(monkeypatch, triton_kernels)
    xs = tuple(x.requires_grad_(True) for x in _inputs(1, 2, 5, 1, 16, 3, 2, torch.float32))
    out = ops.audio_cross_attention(*xs, tokens_per_frame=5, backend="triton")
    assert seen == [xs[0].device]
    out.sum().backward()
    assert seen == [xs[0].device] * 2
