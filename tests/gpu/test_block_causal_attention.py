"""GPU tier of block_causal_attention: the Triton backend x fp32/fp16/bf16, forward and backward, against the fp32
reference (autograd), with the rule error <= 2 x plain PyTorch's error in the same dtype + a small floor."""
import pytest
import torch

from lipforcing.ops import block_causal_attention
from lipforcing.ops.reference import block_causal_attention_ref, block_causal_mask

pytestmark = pytest.mark.gpu

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def _plain_torch(q, k, v, chunk, window, sink, scale):
    """Masked attention in q's dtype (scores and P @ V in low precision), differentiable."""
    mask = block_causal_mask(q.shape[1], k.shape[1], chunk, window, sink, q.device)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = torch.softmax(s.float().masked_fill(~mask, float("-inf")), -1).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("shape", [(2, 1025, 3, 64, 96, 288, 32), (1, 700, 2, 128, 128, None, 0),
                                   (1, 333, 2, 128, 48, 48, 0)], ids=["window_sink", "no_window", "window_eq_chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_forward_backward(dtype, shape):
    B, L, H, D, chunk, window, sink = shape
    scale = D ** -0.5
    q, k, v = (torch.randn(B, L, H, D, device="cuda").to(dtype).requires_grad_() for _ in range(3))
    g = torch.randn(B, L, H, D, device="cuda").to(dtype)
    out = block_causal_attention(q, k, v, chunk_size=chunk, window=window, sink=sink, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), g)
    plain = _plain_torch(q, k, v, chunk, window, sink, scale)
    plain_grads = torch.autograd.grad(plain, (q, k, v), g)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref, _ = block_causal_attention_ref(qr, kr, vr, chunk, window, sink, scale)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), g.float())
    for name, a, p, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (plain, *plain_grads), (ref, *ref_grads)):
        err = (a.float() - r).abs().max().item()
        err_pt = (p.float() - r).abs().max().item()
        assert err <= 2 * err_pt + FLOOR[dtype], f"{name} {dtype}: error {err} vs plain PyTorch {err_pt}"
