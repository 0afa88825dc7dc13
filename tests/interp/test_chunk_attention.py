"""Triton chunk_attention (and its cache write) vs the reference, run by the Triton interpreter on the CPU
(or compiled on a GPU when one is present and TRITON_INTERPRET is unset).

Every case streams several chunks through two caches -- one driven by the Triton backend, one by the
reference -- and checks each chunk's output and the cache contents after every write."""
import pytest
import torch

from lipforcing import RollingKVCache
from lipforcing.ops import block_causal_attention, chunk_attention, rope_spec
from lipforcing.ops.reference import block_causal_attention_ref
from tests.kernel_helpers import interpreting, triton_test_device

pytestmark = pytest.mark.interp

DEVICE = triton_test_device()

# Outputs are O(1) (softmax averages of unit normals).  fp32: the kernel and the reference differ only in the
# order of the float32 sums.  fp16: the kernel rounds P (and rotated q/k) to fp16 before its dots, the reference
# does not; 2e-3 is a few fp16 ulps at 1.0.
ATOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def _stream(B, H, D, chunk, window, sink, lengths, dtype, rope=None):
    """Run both backends over chunks of the given lengths; returns the max output error."""
    kw = dict(chunk_size=chunk, window=window, sink=sink, dtype=dtype, device=DEVICE)
    c_tri, c_ref = RollingKVCache(B, H, D, **kw), RollingKVCache(B, H, D, **kw)
    worst = 0.0
    for n in lengths:
        q, k, v = (torch.randn(B, n, H, D, device=DEVICE).to(dtype) for _ in range(3))
        out = chunk_attention(q, k, v, c_tri, write=True, rope=rope, backend="triton")
        ref = chunk_attention(q, k, v, c_ref, write=True, rope=rope, backend="reference")
        assert out.shape == q.shape and out.dtype == dtype
        worst = max(worst, (out.float() - ref.float()).abs().max().item())
        # the cache write is a copy: bit-exact, and pos advances on the device
        assert torch.equal(c_tri.pos, c_ref.pos)
        assert torch.equal(c_tri.k, c_ref.k) and torch.equal(c_tri.v, c_ref.v)
    return worst


# (B, H, D, chunk, window, sink, chunk lengths)
CASES = {
    # ring of 48 slots wrapped 4 times, sink not a multiple of the chunk, batch 2
    "wrap": (2, 2, 32, 48, 96, 16, [48] * 6),
    # window == chunk: no ring at all, no sink
    "ring0": (1, 2, 64, 16, 16, 0, [16] * 3),
    # chunk longer than the ring (48 > 16): the write keeps only the newest tokens per slot; short last chunk
    "long_chunk": (1, 1, 32, 48, 64, 5, [48, 48, 48, 7]),
    # sink bigger than a chunk (filled over two chunks), odd head_dim handled by padding
    "big_sink": (1, 1, 24, 8, 24, 12, [8, 8, 8, 8, 3]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_absolute_mode_matches_reference(case, dtype):
    err = _stream(*CASES[case][:6], CASES[case][6], dtype)
    assert err <= ATOL[dtype], f"{case} {dtype}: max error {err}"


# (B, H, D, grid, chunk, window, sink, chunk lengths) -- sizes are whole frames of grid[0]*grid[1] tokens
ROPE_CASES = {
    "wrap": (2, 1, 32, (2, 4), 16, 48, 8, [16] * 6 + [8]),
    "ring0_nosink": (1, 2, 64, (2, 2), 8, 8, 0, [8] * 3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_dynamic_rope_matches_reference(case, dtype):
    B, H, D, grid, chunk, window, sink, lengths = ROPE_CASES[case]
    # max_frames just above the window so a wrong (absolute) time index would read past the table's end
    spec = rope_spec(D, grid, max_frames=(sink + window) // (grid[0] * grid[1]) + 1, device=DEVICE)
    err = _stream(B, H, D, chunk, window, sink, lengths, dtype, rope=spec)
    assert err <= ATOL[dtype], f"{case} {dtype}: max error {err}"


def test_streaming_equals_block_causal_sequence():
    """DESIGN.md: streaming N chunks with write=True and rope=None equals block_causal_attention on the whole
    sequence (here checked against the reference of the full-sequence op)."""
    B, H, D, chunk, window, sink, L = 1, 2, 32, 16, 40, 5, 77
    q, k, v = (torch.randn(B, L, H, D, device=DEVICE) for _ in range(3))
    cache = RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink, device=DEVICE)
    outs = [chunk_attention(q[:, s:s + chunk], k[:, s:s + chunk], v[:, s:s + chunk], cache, write=True,
                            backend="triton") for s in range(0, L, chunk)]
    full, _ = block_causal_attention_ref(q, k, v, chunk, window, sink, D ** -0.5)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-5, rtol=0)
    # and the Triton full-sequence kernel agrees with the streamed chunks
    tri = block_causal_attention(q, k, v, chunk_size=chunk, window=window, sink=sink, backend="triton")
    torch.testing.assert_close(tri, full, atol=2e-5, rtol=0)


def test_write_false_leaves_cache_untouched():
    cache = RollingKVCache(1, 1, 32, chunk_size=8, window=24, sink=4, device=DEVICE)
    x = torch.randn(1, 8, 1, 32, device=DEVICE)
    chunk_attention(x, x, x, cache, write=True, backend="triton")
    k0, v0, p0 = cache.k.clone(), cache.v.clone(), cache.pos.clone()
    q, k, v = (torch.randn(1, 8, 1, 32, device=DEVICE) for _ in range(3))
    out = chunk_attention(q, k, v, cache, write=False, backend="triton")
    ref = chunk_attention(q, k, v, cache, write=False, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert torch.equal(cache.k, k0) and torch.equal(cache.v, v0) and torch.equal(cache.pos, p0)


def test_gpu_tile_shapes(monkeypatch):
    """The GPU tile sizes differ from the interpreter's: run unequal tiles (BLOCK_M 32, BLOCK_N 16) too."""
    import lipforcing.kernels.chunk_attention as mod

    monkeypatch.setattr(mod, "launch_config",
                        lambda *a, **k: dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1))
    err = _stream(1, 1, 32, 40, 72, 3, [40, 40, 40, 21], torch.float32)
    assert err <= ATOL[torch.float32]


def test_unsupported_reasons():
    from lipforcing.kernels.chunk_attention import chunk_attention_triton_unsupported as why

    x = torch.zeros(1, 4, 1, 512)
    assert "head_dim" in why(x, x, x, x, x, None, 4, 4, 0, False, 1.0, None, None, 0, 0)
    if interpreting():
        xb = torch.zeros(1, 4, 1, 32, dtype=torch.bfloat16)
        assert "bfloat16" in why(xb, xb, xb, xb, xb, None, 4, 4, 0, False, 1.0, None, None, 0, 0)
