"""Triton block_causal_attention forward and backward vs the reference (float32 autograd), run by the Triton
interpreter on the CPU (or compiled on a GPU when one is present and TRITON_INTERPRET is unset)."""
import pytest
import torch

from lipforcing.ops import block_causal_attention
from lipforcing.ops.reference import block_causal_attention_ref
from tests.kernel_helpers import triton_test_device

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
