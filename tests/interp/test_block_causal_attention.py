"""Triton block_causal_attention forward and backward vs the reference (float32 autograd), run by the Triton
interpreter on the CPU (or compiled on a GPU when one is present and TRITON_INTERPRET is unset)."""
import pytest
import torch

from lipforcing.ops import block_causal_attention
from lipforcing.ops.reference import block_causal_attention_ref
from tests.kernel_helpers import record_device_guard, triton_test_device

pytestmark = pytest.mark.interp

DEVICE = triton_test_device()

# fp32: only the summation order differs.  fp16: the kernel rounds P and dS to fp16 before its dots (as every
# FlashAttention does); gradients of unit-normal inputs are O(1), so a few fp16 ulps.
ATOL = {torch.float32: 3e-5, torch.float16: 4e-3}

# (B, L, H, D, chunk, window, sink): lengths that are not multiples of the tile (16 here) nor of the chunk
CASES = {
    "no_window": (1, 97, 2, 32, 16, None, 0),
    "window_sink": (2, 97, 1, 32, 16, 48, 5),
    "chunk48_len200": (1, 200, 1, 64, 48, 96, 16),
    "window_eq_chunk": (1, 50, 1, 32, 13, 13, 0),
    "sink_over_chunks": (1, 70, 1, 32, 7, 20, 33),
}


def _check(B, L, H, D, chunk, window, sink, dtype):
    q, k, v = (torch.randn(B, L, H, D, device=DEVICE).to(dtype).requires_grad_() for _ in range(3))
    g = torch.randn(B, L, H, D, device=DEVICE).to(dtype)
    out = block_causal_attention(q, k, v, chunk_size=chunk, window=window, sink=sink, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), g)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref, _ = block_causal_attention_ref(qr, kr, vr, chunk, window, sink, D ** -0.5)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), g.float())
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert a.dtype == dtype and a.shape == b.shape
        err = (a.float() - b).abs().max().item()
        assert err <= ATOL[dtype], f"{name}: max error {err} (dtype {dtype})"


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_fp32(case):
    _check(*CASES[case], torch.float32)


@pytest.mark.parametrize("case", ["window_sink", "chunk48_len200"])
def test_forward_backward_fp16(case):
    _check(*CASES[case], torch.float16)


def test_lse_matches_reference():
    from lipforcing.kernels.block_causal_attention import block_causal_attention_triton

    q, k, v = (torch.randn(1, 45, 2, 32, device=DEVICE) for _ in range(3))
    _, lse = block_causal_attention_triton(q, k, v, 10, 30, 4, 0.3)
    _, lse_ref = block_causal_attention_ref(q, k, v, 10, 30, 4, 0.3)
    assert lse.shape == (1, 2, 45) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)])
def test_gpu_tile_shapes(monkeypatch, tiles):
    """GPU configs use unequal query/key tiles (e.g. 128 x 64): check the range splitting with unequal tiles."""
    import lipforcing.kernels.block_causal_attention as mod

    bm, bn = tiles
    monkeypatch.setattr(mod, "launch_config",
                        lambda *a, **k: dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1))
    _check(1, 150, 1, 32, 24, 72, 10, torch.float32)


@pytest.mark.parametrize("what", ["k", "v"])
def test_hidden_nonfinite_key_never_leaks(what):
    """A NaN in a key/value that a row does not see (a later chunk, or out of its window) leaves the row exactly
    as without it, forward and dq; rows that see it are NaN on both backends.  Chunk 13 with 16-row tiles puts
    the poisoned key into masked boundary tiles of rows that do not see it."""
    from lipforcing.ops.reference import block_causal_mask

    L, chunk, window, sink, j = 61, 13, 26, 3, 30
    q, k, v = (torch.randn(1, L, 1, 16, device=DEVICE) for _ in range(3))
    poisoned = dict(k=k.clone(), v=v.clone())
    poisoned[what][0, j, 0, :] = float("nan")
    sees = block_causal_mask(L, L, chunk, window, sink)[:, j].to(DEVICE)
    g = torch.randn(1, L, 1, 16, device=DEVICE)
    outs = {}
    for name, (kk, vv) in (("clean", (k, v)), ("poisoned", (poisoned["k"], poisoned["v"]))):
        qg = q.clone().requires_grad_()
        for backend in ("triton", "reference"):
            out = block_causal_attention(qg, kk, vv, chunk_size=chunk, window=window, sink=sink, backend=backend)
            outs[name, backend] = (out.detach(), torch.autograd.grad(out, qg, g)[0])
    for backend in ("triton", "reference"):
        out, dq = outs["poisoned", backend]
        clean, dq_clean = outs["clean", backend]
        assert torch.equal(out[:, ~sees], clean[:, ~sees]), backend
        assert torch.equal(dq[:, ~sees], dq_clean[:, ~sees]), backend
        assert torch.isnan(out[:, sees]).all(), backend
    assert torch.equal(torch.isfinite(outs["poisoned", "triton"][0]), torch.isfinite(outs["poisoned", "reference"][0]))


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_nonfinite_query_gives_nan_row_on_both_backends():
    q, k, v = (torch.randn(1, 40, 2, 16, device=DEVICE) for _ in range(3))
    q[0, 17, 1, 5] = float("nan")
    q[0, 3, 0, 0] = float("inf")
    tri = block_causal_attention(q, k, v, chunk_size=10, window=20, sink=2, backend="triton")
    ref = block_causal_attention(q, k, v, chunk_size=10, window=20, sink=2, backend="reference")
    finite = torch.isfinite(tri)
    assert torch.equal(finite, torch.isfinite(ref)) and not finite[0, 17, 1].any()
    torch.testing.assert_close(tri[finite], ref[finite], atol=3e-5, rtol=0)


def test_launchers_enter_the_device_guard(monkeypatch):
    """Forward and backward launch inside device_guard(q) (on a GPU: torch.cuda.device(q.device), so tensors on
    cuda:1 launch there even when cuda:0 is current); here the guard is recorded and the kernels still run."""
    import lipforcing.kernels.block_causal_attention as mod

    entered = record_device_guard(monkeypatch, mod)
    q, k, v = (torch.randn(1, 20, 1, 16, device=DEVICE).requires_grad_() for _ in range(3))
    out = block_causal_attention(q, k, v, chunk_size=8, backend="triton")
    assert entered == [q.device]
    out.sum().backward()
    assert entered == [q.device] * 2


def test_device_guard_selects_the_tensors_device(monkeypatch):
    import contextlib

    from lipforcing.kernels import _attention_common

    calls = []

    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", lambda d: calls.append(d) or contextlib.nullcontext())
    with _attention_common.device_guard(FakeCuda()):
        pass
    assert calls == [torch.device("cuda", 1)]
    with _attention_common.device_guard(torch.zeros(1)):
        pass
    assert len(calls) == 1
