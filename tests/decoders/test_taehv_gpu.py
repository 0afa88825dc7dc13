"""GPU checks of the TAEHV decoder (skipped without CUDA): fp16/bf16 channels-last against an fp32 reference (the
2x-plain-PyTorch rule), streaming vs parallel within low-precision rounding, a warmed-up chunk step captured in a
CUDA graph replays like eager with the state kept in place, no allocator growth across steady-state chunks."""
from __future__ import annotations

import pytest
import torch

from lipforcing.decoders import TAEHV, TAEHVStreamDecoder
from tests.decoders.reference import randomize_
from tests.tolerance import assert_close_to_reference

pytestmark = pytest.mark.gpu


def _model(dtype, channels_last=True):
    m = randomize_(TAEHV()).eval().requires_grad_(False).to("cuda", dtype)
    return m.to(memory_format=torch.channels_last) if channels_last else m


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_channels_last_matches_fp32(dtype):
    base = randomize_(TAEHV()).eval().requires_grad_(False)
    z = torch.randn(1, 4, 16, 16, 16)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref32 = base.to("cuda").decode_video(z.cuda()).float()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    plain = base.to(dtype).decode_video(z.cuda().to(dtype))                       # NCHW, same dtype
    fast = base.to(memory_format=torch.channels_last).decode_video(z.cuda().to(dtype))
    assert fast.dtype == dtype and fast.shape == (1, 13, 3, 128, 128)
    assert_close_to_reference(fast, ref32, plain, floor=1e-2, name=f"taehv {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_stream_matches_parallel_on_gpu(dtype):
    m = _model(dtype)
    z = torch.randn(1, 16, 9, 8, 8, device="cuda", dtype=dtype)
    with torch.inference_mode():
        whole = m.decode_video(z.transpose(1, 2)).transpose(1, 2) * 2 - 1
        dec = TAEHVStreamDecoder(m, normalize=False)
        parts = torch.cat([dec.decode(z[:, :, i:i + 3]) for i in range(0, 9, 3)], dim=2)
    assert parts.shape == whole.shape == (1, 3, 33, 64, 64)
    # cuDNN picks algorithms by batch size: equal up to rounding (a wrong state would be off by ~0.1-1)
    err = (parts.float() - whole.float()).abs()
    tol = (1e-3, 1e-5) if dtype == torch.float32 else (1e-1, 5e-3)      # (max, mean)
    assert err.max() <= tol[0] and err.mean() <= tol[1], (err.max().item(), err.mean().item())


def test_chunk_step_captures_in_a_cuda_graph():
    m = _model(torch.float16)
    dec = TAEHVStreamDecoder(m)
    chunks = [torch.randn(1, 16, 3, 16, 16, device="cuda", dtype=torch.float16) for _ in range(5)]
    static_in = chunks[1].clone()
    with torch.inference_mode():
        dec.decode(chunks[0])                                   # first chunk: 9 frames, allocates the state
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):                                  # warm up cuDNN on the steady-state shapes
                snapshot = [s.clone() for s in dec.state]
                dec.decode(static_in)
                for s, v in zip(dec.state, snapshot):
                    s.copy_(v)
        torch.cuda.current_stream().wait_stream(side)
        ptrs = [s.data_ptr() for s in dec.state]
        # eager reference on a second decoder with the same history
        ref = TAEHVStreamDecoder(m)
        ref.decode(chunks[0])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = dec.decode(static_in)
        assert [s.data_ptr() for s in dec.state] == ptrs
        for z in chunks[1:]:
            static_in.copy_(z)
            graph.replay()
            want = ref.decode(z)
            err = (static_out.float() - want.float()).abs()
            assert err.max() <= 1e-1 and err.mean() <= 5e-3, (err.max().item(), err.mean().item())
        # steady state allocates nothing new in eager mode either
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = ref.decode(chunks[2])
        del out
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
