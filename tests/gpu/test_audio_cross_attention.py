"""GPU tier: every backend of audio_cross_attention in float32/float16/bfloat16 vs the fp32 reference.

Pass rule (DESIGN.md convention 9): max |kernel - fp32 reference| <= 2 * max |plain PyTorch in the same dtype -
fp32 reference| + a small floor, where plain PyTorch is the unfused composition (SDPA over the text, SDPA over the
per-frame audio windows, add).  The same rule is applied to the gradients (Triton backward).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from lipforcing import ops
from lipforcing.ops import _dispatch
from lipforcing.ops.audio_cross_attention import _FWD
from lipforcing.ops.reference import audio_cross_attention_ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Absolute floor added to 2x PyTorch's error: about one ulp of an O(1) output in each dtype.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (batch, frames, tokens_per_frame, heads, head_dim, text_len, audio_window)
CASES = [
    (2, 3, 97, 3, 64, 77, 7),      # query tiles straddle frames, odd text length
    (1, 3, 1024, 4, 128, 512, 32),  # the 512x512 chunk shape (fewer heads)
    (1, 2, 130, 2, 128, 0, 64),     # no text, widest audio window
    (1, 5, 33, 2, 96, 19, 1),       # head_dim 96, single audio token, many frames per tile
    (1, 2, 40, 1, 32, 9, 70),       # audio window > 64 (Triton loops; CUDA tiles of 32)
]


def _inputs(B, F_, tpf, H, D, T, A, dtype, requires_grad=False):
    dev = "cuda"
    xs = (torch.randn(B, F_ * tpf, H, D, device=dev), torch.randn(B, T, H, D, device=dev),
          torch.randn(B, T, H, D, device=dev), torch.randn(B, F_, A, H, D, device=dev),
          torch.randn(B, F_, A, H, D, device=dev))
    return tuple(x.to(dtype).requires_grad_(requires_grad) for x in xs)


def _plain_torch(q, tk, tv, ak, av, tpf, audio_scale):
    """Unfused PyTorch in the inputs' dtype (the baseline whose error sets the bound)."""
    B, L, H, D = q.shape
    F_, A = ak.shape[1], ak.shape[2]
    out = torch.zeros_like(q)
    if tk.shape[1]:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2)).transpose(1, 2)
    qa = q.reshape(B * F_, tpf, H, D).transpose(1, 2)
    oa = F.scaled_dot_product_attention(qa, ak.reshape(B * F_, A, H, D).transpose(1, 2),
                                        av.reshape(B * F_, A, H, D).transpose(1, 2))
    return out + audio_scale * oa.transpose(1, 2).reshape(B, L, H, D)


def _skip_unless_runnable(backend, args):
    try:
        _dispatch.resolve("audio_cross_attention", _FWD, backend, args[0].device, args, {})
    except _dispatch.BackendUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("B,F_,tpf,H,D,T,A", CASES)
def test_forward(B, F_, tpf, H, D, T, A, backend, dtype):
    xs = _inputs(B, F_, tpf, H, D, T, A, dtype)
    audio_scale = 0.75
    scale = 1 / math.sqrt(D)
    _skip_unless_runnable(backend, (*xs, tpf, audio_scale, scale))
    out, lse_t, lse_a = _dispatch.implementation(_FWD, backend)(*xs, tpf, audio_scale, scale)
    ref, ref_lse_t, ref_lse_a = audio_cross_attention_ref(*(x.float() for x in xs), tpf, audio_scale, scale)
    assert out.dtype == dtype and out.shape == xs[0].shape
    err = (out.float() - ref).abs().max().item()
    err_pt = (_plain_torch(*xs, tpf, audio_scale).float() - ref).abs().max().item()
    assert err <= 2 * err_pt + FLOOR[dtype], f"{backend} {dtype}: error {err:.3g}, plain PyTorch {err_pt:.3g}"
    if T == 0:
        assert torch.isneginf(lse_t).all()
    else:
        torch.testing.assert_close(lse_t, ref_lse_t, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(lse_a, ref_lse_a, atol=1e-2, rtol=1e-3)
    # The public op (auto and explicit) gives the same output.
    pub = ops.audio_cross_attention(*xs, tokens_per_frame=tpf, audio_scale=audio_scale, backend=backend)
    torch.testing.assert_close(pub, out, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,F_,tpf,H,D,T,A", CASES[:3] + CASES[4:])
def test_backward_triton(B, F_, tpf, H, D, T, A, dtype):
    xs = _inputs(B, F_, tpf, H, D, T, A, dtype, requires_grad=True)
    out = ops.audio_cross_attention(*xs, tokens_per_frame=tpf, audio_scale=1.25, backend="triton")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, xs, g)
    xs32 = tuple(x.detach().float().requires_grad_(True) for x in xs)
    exp = torch.autograd.grad(audio_cross_attention_ref(*xs32, tpf, 1.25, 1 / math.sqrt(D))[0], xs32, g.float(),
                              allow_unused=True)
    xs_pt = tuple(x.detach().requires_grad_(True) for x in xs)
    pt = torch.autograd.grad(_plain_torch(*xs_pt, tpf, 1.25), xs_pt, g, allow_unused=True)
    for name, a, e, p in zip(("dq", "dtext_k", "dtext_v", "daudio_k", "daudio_v"), got, exp, pt):
        if e is None:
            assert a.numel() == 0, name
            continue
        err = (a.float() - e).abs().max().item()
        err_pt = (p.float() - e).abs().max().item()
        floor = FLOOR[dtype] * max(1.0, e.abs().max().item())
        assert err <= 2 * err_pt + floor, f"{name} {dtype}: error {err:.3g}, plain PyTorch {err_pt:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_forward_feeds_triton_backward(dtype):
    """The CUDA forward's (out, lse_text, lse_audio) have the meaning the Triton backward expects."""
    B, F_, tpf, H, D, T, A = 1, 3, 97, 2, 128, 45, 16
    xs = _inputs(B, F_, tpf, H, D, T, A, dtype)
    args = (*xs, tpf, 0.5, 1 / math.sqrt(D))
    _skip_unless_runnable("cuda", args)
    from lipforcing.kernels.audio_cross_attention import audio_cross_attention_backward_triton, \
        audio_cross_attention_triton
    from lipforcing.ops.cuda.audio_cross_attention import audio_cross_attention_cuda

    o_c, lt_c, la_c = audio_cross_attention_cuda(*args)
    o_t, lt_t, la_t = audio_cross_attention_triton(*args)
    torch.testing.assert_close(lt_c, lt_t, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(la_c, la_t, atol=1e-2, rtol=1e-3)
    g = torch.randn_like(o_c)
    from_cuda = audio_cross_attention_backward_triton(g, *xs, o_c, lt_c, la_c, tpf, 0.5, 1 / math.sqrt(D))
    from_triton = audio_cross_attention_backward_triton(g, *xs, o_t, lt_t, la_t, tpf, 0.5, 1 / math.sqrt(D))
    for a, b in zip(from_cuda, from_triton):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_forward_is_graph_capturable(backend):
    """No host sync and no allocation beyond the outputs: the launcher can be captured in a CUDA graph."""
    B, F_, tpf, H, D, T, A = 1, 3, 64, 2, 128, 32, 8
    xs = _inputs(B, F_, tpf, H, D, T, A, torch.bfloat16)
    args = (*xs, tpf, 1.0, 1 / math.sqrt(D))
    _skip_unless_runnable(backend, args)
    fn = _dispatch.implementation(_FWD, backend)
    expected = fn(*args)[0]  # also compiles the Triton kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(*args)[0]
    for x in xs:
        x.normal_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, fn(*args)[0], atol=0, rtol=0)
    assert not torch.equal(captured, expected)


def test_cuda_unsupported_reasons():
    pytest.importorskip("lipforcing.ops.cuda.audio_cross_attention")
    from lipforcing.ops.cuda.audio_cross_attention import audio_cross_attention_cuda_unsupported as why

    xs = _inputs(1, 2, 8, 1, 64, 4, 2, torch.float32)
    assert "float16/bfloat16" in why(*xs, 8, 1.0, 0.125)
    xs = _inputs(1, 2, 8, 1, 48, 4, 2, torch.bfloat16)
    assert "head_dim" in why(*xs, 8, 1.0, 0.125)
    cpu = tuple(x.cpu() for x in _inputs(1, 2, 8, 1, 64, 4, 2, torch.bfloat16))
    assert "CUDA tensors" in why(*cpu, 8, 1.0, 0.125)


def _cuda_tiles_per_cta(Lq, tpf, T, A, block_m=64, block_n=32):
    """Key tiles each CTA of the CUDA kernel walks: text tiles, then the audio tiles of every frame in its rows."""
    n_text, n_a = -(-T // block_n), -(-A // block_n)
    return [n_text + ((min(m0 + block_m, Lq) - 1) // tpf - m0 // tpf + 1) * n_a for m0 in range(0, Lq, block_m)]


# (frames, tokens_per_frame, text_len, audio_window): per CTA one key tile (no text, one frame), two exact tiles,
# odd and even tile counts with partial last tiles (text 65, audio 33), CTAs spanning 1, 2 and 4 frames.
PIPELINE_CASES = [(2, 64, 0, 5), (2, 64, 32, 32), (3, 40, 65, 32), (2, 100, 512, 33), (5, 16, 31, 64)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("F_,tpf,T,A", PIPELINE_CASES)
def test_cuda_pipeline_edges(F_, tpf, T, A, dtype):
    """The CUDA kernel's cp.async double buffer: tile counts of 1, odd and even, partial tiles.  text_k/v and
    audio_k/v are views into buffers whose rows past T / A are NaN: a row past the end that is read instead of
    zero-filled shows up."""
    B, H, D = 1, 2, 64
    tiles = _cuda_tiles_per_cta(F_ * tpf, tpf, T, A)
    assert min(tiles) >= 1
    q = torch.randn(B, F_ * tpf, H, D, device="cuda").to(dtype)
    pad = 40
    bufs = [torch.full((B, T + pad, H, D), float("nan"), device="cuda", dtype=dtype) for _ in range(2)]
    bufs += [torch.full((B, F_, A + pad, H, D), float("nan"), device="cuda", dtype=dtype) for _ in range(2)]
    tk, tv = (b[:, :T] for b in bufs[:2])
    ak, av = (b[:, :, :A] for b in bufs[2:])
    for x in (tk, tv, ak, av):
        x.copy_(torch.randn(x.shape, device="cuda"))
    args = (q, tk, tv, ak, av, tpf, 0.75, 1 / math.sqrt(D))
    _skip_unless_runnable("cuda", args)
    out = _dispatch.implementation(_FWD, "cuda")(*args)[0]
    ref = audio_cross_attention_ref(*(x.float() for x in args[:5]), *args[5:])[0]
    plain = _plain_torch(*(x.contiguous() for x in args[:5]), tpf, 0.75)
    err = (out.float() - ref).abs().max().item()
    err_pt = (plain.float() - ref).abs().max().item()
    assert err <= 2 * err_pt + FLOOR[dtype], f"tiles per CTA {tiles}: error {err:.3g}, plain PyTorch {err_pt:.3g}"


def test_pipeline_cases_cover_the_tile_counts():
    """The cases above reach the double buffer's edge cases (computed, so a change of tile size is noticed)."""
    counts = [t for F_, tpf, T, A in PIPELINE_CASES for t in _cuda_tiles_per_cta(F_ * tpf, tpf, T, A)]
    assert {1, 2} <= set(counts) and any(t % 2 and t > 1 for t in counts) and max(counts) >= 16, counts
    assert any(T % 32 for _, _, T, _ in PIPELINE_CASES) and any(A % 32 for *_, A in PIPELINE_CASES)


# --- the sm_90 wgmma + TMA kernel (csrc/audio_cross_attention_sm90.cu): compute capability 9.0 only ---------------

# (batch, frames, tokens_per_frame, heads, head_dim, text_len, audio_window)
SM90_CASES = [
    (2, 3, 97, 3, 64, 77, 7),       # batch 2, odd query count, 128-row CTAs straddle frames, text % 64 != 0
    (1, 3, 1024, 4, 128, 512, 32),  # the 512x512 chunk shape (fewer heads): 8 text tiles + 1 audio tile per CTA
    (2, 5, 33, 2, 128, 19, 1),      # a single audio token, 4-5 frames per CTA
    (1, 2, 130, 2, 64, 0, 64),      # no text, one exact audio tile; the second consumer of the last CTA has no rows
    (1, 7, 1, 2, 128, 300, 129),    # one query per frame: 7 frames x 3 audio tiles + 5 text tiles in one CTA
    (2, 4, 200, 1, 128, 1000, 70),  # 16 text tiles + 2 audio tiles per frame: the 4-stage ring wraps many times
]


def _sm90_ready(args):
    _skip_unless_runnable("cuda", args)
    from lipforcing.ops.cuda.audio_cross_attention import sm90_problem

    why = sm90_problem(*args[:5])
    if why is not None:
        pytest.skip(f"the sm_90 audio kernel does not run here: {why}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,F_,tpf,H,D,T,A", SM90_CASES)
def test_sm90_forward_vs_reference(B, F_, tpf, H, D, T, A, dtype):
    xs = _inputs(B, F_, tpf, H, D, T, A, dtype)
    args = (*xs, tpf, 0.75, 1 / math.sqrt(D))
    _sm90_ready(args)
    out, lse_t, lse_a = _dispatch.implementation(_FWD, "cuda")(*args)
    ref, ref_lse_t, ref_lse_a = audio_cross_attention_ref(*(x.float() for x in xs), *args[5:])
    err = (out.float() - ref).abs().max().item()
    err_pt = (_plain_torch(*xs, tpf, 0.75).float() - ref).abs().max().item()
    assert err <= 2 * err_pt + FLOOR[dtype], f"sm90 {dtype}: error {err:.3g}, plain PyTorch {err_pt:.3g}"
    if T == 0:
        assert torch.isneginf(lse_t).all()
    else:
        torch.testing.assert_close(lse_t, ref_lse_t, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(lse_a, ref_lse_a, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sm90_agrees_with_mma_sync_and_env_switch(dtype, monkeypatch):
    """LIPFORCING_CUDA_SM90=0 runs the mma.sync kernel instead; both agree to rounding, and the lse too."""
    from lipforcing.ops.cuda.audio_cross_attention import sm90_problem

    xs = _inputs(2, 3, 97, 2, 128, 77, 7, dtype)
    args = (*xs, 97, 1.25, 1 / math.sqrt(128))
    _sm90_ready(args)
    fn = _dispatch.implementation(_FWD, "cuda")
    o90, lt90, la90 = fn(*args)
    monkeypatch.setenv("LIPFORCING_CUDA_SM90", "0")
    assert sm90_problem(*xs) == "LIPFORCING_CUDA_SM90=0"
    o80, lt80, la80 = fn(*args)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(o90.float(), o80.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lt90, lt80, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(la90, la80, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("F_,tpf,T,A", [(2, 64, 0, 5), (3, 40, 65, 33), (2, 300, 512, 64), (9, 16, 31, 1)])
def test_sm90_reads_nothing_past_the_views(F_, tpf, T, A, dtype):
    """text_k/v and audio_k/v (and q) are views into NaN-padded buffers: TMA must zero-fill rows past T / A / Lq
    (the tensor map's dims are the views'), never read the padding."""
    B, H, D = 1, 2, 64
    pad = 70
    qbuf = torch.full((B, F_ * tpf + pad, H, D), float("nan"), device="cuda", dtype=dtype)
    bufs = [torch.full((B, T + pad, H, D), float("nan"), device="cuda", dtype=dtype) for _ in range(2)]
    bufs += [torch.full((B, F_, A + pad, H, D), float("nan"), device="cuda", dtype=dtype) for _ in range(2)]
    q = qbuf[:, :F_ * tpf]
    tk, tv = (b[:, :T] for b in bufs[:2])
    ak, av = (b[:, :, :A] for b in bufs[2:])
    for x in (q, tk, tv, ak, av):
        x.copy_(torch.randn(x.shape, device="cuda"))
    args = (q, tk, tv, ak, av, tpf, 0.75, 1 / math.sqrt(D))
    _sm90_ready(args)
    out = _dispatch.implementation(_FWD, "cuda")(*args)[0]
    ref = audio_cross_attention_ref(*(x.float() for x in args[:5]), *args[5:])[0]
    plain = _plain_torch(*(x.contiguous() for x in args[:5]), tpf, 0.75)
    err = (out.float() - ref).abs().max().item()
    err_pt = (plain.float() - ref).abs().max().item()
    assert err <= 2 * err_pt + FLOOR[dtype], f"error {err:.3g}, plain PyTorch {err_pt:.3g}"


def test_sm90_problem_reasons():
    """Inputs the sm_90 kernel cannot take go to the mma.sync kernel, with the reason."""
    xs = _inputs(1, 2, 8, 2, 96, 4, 2, torch.bfloat16)
    args = (*xs, 8, 1.0, 0.1)
    _skip_unless_runnable("cuda", args)
    from lipforcing.ops.cuda.audio_cross_attention import sm90_problem

    if torch.cuda.get_device_capability() != (9, 0):
        assert "9.0" in sm90_problem(*xs) or "built without" in sm90_problem(*xs)
        return
    assert "head_dim" in sm90_problem(*xs)
    q, tk, tv, ak, av = _inputs(1, 2, 8, 2, 64, 4, 2, torch.bfloat16)
    assert sm90_problem(q, tk, tv, ak, av) is None
    tk_t = torch.randn(1, 2, 4, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # head stride > token's
    assert "text_k" in sm90_problem(q, tk_t, tv, ak, av)
    # ... and the cuda backend still computes it (mma.sync kernel)
    out = _dispatch.implementation(_FWD, "cuda")(q, tk_t, tv, ak, av, 8, 1.0, 0.125)[0]
    ref = audio_cross_attention_ref(q.float(), tk_t.float(), tv.float(), ak.float(), av.float(), 8, 1.0, 0.125)[0]
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tpf", [7, 40, 100])
def test_sm90_nonfinite_audio_stays_in_its_frame(tpf, dtype):
    """inf / NaN in frame 1's audio_k / audio_v poison only frame 1's rows, also where a warpgroup's 64 rows (and a
    CTA's 128) straddle frames: the other rows never see that tile's values (P = 0 times inf would be NaN)."""
    B, F_, H, D, T, A = 1, 4, 2, 128, 45, 3
    xs = list(_inputs(B, F_, tpf, H, D, T, A, dtype))
    xs[3][0, 1, 1, 0, 2] = float("nan")
    xs[4][0, 1, 0, 0, 5] = float("inf")
    xs[4][0, 1, 2, 1, 7] = float("nan")
    args = (*xs, tpf, 0.9, 1 / math.sqrt(D))
    _sm90_ready(args)
    out = _dispatch.implementation(_FWD, "cuda")(*args)[0]
    in_f1 = (torch.arange(F_ * tpf, device="cuda") // tpf) == 1
    assert (~torch.isfinite(out[0, in_f1])).any(-1).all()
    assert torch.isfinite(out[0, ~in_f1]).all()
    ref = audio_cross_attention_ref(*(x.float() for x in xs), *args[5:])[0]
    plain = _plain_torch(*xs, tpf, 0.9).float()
    err = (out[0, ~in_f1].float() - ref[0, ~in_f1]).abs().max().item()
    err_pt = (plain[0, ~in_f1] - ref[0, ~in_f1]).abs().max().item()
    assert err <= 2 * err_pt + FLOOR[dtype], f"error {err:.3g}, plain PyTorch {err_pt:.3g}"
