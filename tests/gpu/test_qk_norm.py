"""GPU tier for qk_norm: bf16 (which the Triton interpreter cannot run) at the 1.3B width (12 heads x 128) against
the reference.  The interpreter tests (tests/interp/test_qk_norm.py) run compiled on the GPU in the `interp` stage
of bench/gpu_session.sh."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

@pytest.mark.parametrize("rope", [False, True])
def test_bf16_at_the_13b_width_matches_reference(rope):
    from lipforcing.ops import qk_norm, rope_spec

    B, L, H, D = 1, 3 * 257, 12, 128          # 3 frames of a 257-token grid: odd token count
    q, k = (torch.randn(B, L, H, D, device="cuda").to(torch.bfloat16) for _ in range(2))
    wq, wk = (1 + 0.1 * torch.randn(H * D, device="cuda")).to(torch.bfloat16), torch.randn(H * D, device="cuda")
    kw = dict(eps=1e-6)
    if rope:
        kw.update(rope=rope_spec(D, (1, 257), max_frames=8, device="cuda"), frame_offset=2)
    got = qk_norm(q, k, wq, wk, backend="triton", **kw)
    want = qk_norm(q, k, wq, wk, backend="reference", **kw)
    for g, w in zip(got, want):
        # one bf16 ulp of the output: the kernel's rstd may differ from torch.mean's in the last fp32 bits
        torch.testing.assert_close(g.float(), w.float(), rtol=2 ** -7, atol=2 ** -7)
