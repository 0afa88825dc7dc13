"""Triton chunk_attention (and its cache write) vs the reference, run by the Triton interpreter on the CPU
(or compiled on a GPU when one is present and TRITON_INTERPRET is unset).

Every case streams several chunks through two caches -- one driven by the Triton backend, one by the
reference -- and checks each chunk's output and the cache contents after every write."""
import pytest
import torch

from lipforcing import RollingKVCache
from lipforcing.ops import block_causal_attention, chunk_attention, rope_spec
from lipforcing.ops.reference import block_causal_attention_ref
from tests.kernel_helpers import interpreting, record_device_guard, triton_test_device

pytestmark = pytest.mark.interp

DEVICE = triton_test_device()

# Outputs are O(1) (softmax averages of unit normals).  fp32: the kernel and the reference differ only in the
# order of the float32 sums.  fp16: the kernel rounds P (and rotated q/k) to fp16 before its dots, the reference
# does not; 2e-3 is a few fp16 ulps at 1.0.
ATOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def _stream(B, H, D, chunk, window, sink, lengths, dtype, rope=None):
    """Run both backends over chunks of the given lengths, each chunk first with write=False (attend to the cache
    + the chunk without storing) and then write=True (store first, then attend densely); returns the max output
    error of both against the reference."""
    kw = dict(chunk_size=chunk, window=window, sink=sink, dtype=dtype, device=DEVICE)
    c_tri, c_ref = RollingKVCache(B, H, D, **kw), RollingKVCache(B, H, D, **kw)
    worst = 0.0
    for n in lengths:
        q, k, v = (torch.randn(B, n, H, D, device=DEVICE).to(dtype) for _ in range(3))
        ref = chunk_attention(q, k, v, c_ref, write=True, rope=rope, backend="reference")
        read = chunk_attention(q, k, v, c_tri, write=False, rope=rope, backend="triton")
        out = chunk_attention(q, k, v, c_tri, write=True, rope=rope, backend="triton")
        assert out.shape == q.shape and out.dtype == dtype
        worst = max(worst, (out.float() - ref.float()).abs().max().item(),
                    (read.float() - ref.float()).abs().max().item())
        # the cache write is a copy: bit-exact, and pos advances on the device
        assert torch.equal(c_tri.pos, c_ref.pos)
        assert torch.equal(c_tri.k, c_ref.k) and torch.equal(c_tri.v, c_ref.v)
    return worst


# (B, H, D, chunk, window, sink, chunk lengths)
CASES = {
    # ring of 40 slots wrapped 3 times, sink not a multiple of the chunk, batch 2
    "wrap": (2, 1, 32, 24, 40, 13, [24] * 6),
    # window == chunk: each chunk sees only itself (and no sink)
    "window_eq_chunk": (1, 2, 64, 16, 16, 0, [16] * 3),
    # window not a multiple of the chunk; short last chunk (its oldest window slots are masked)
    "short_last": (1, 1, 32, 48, 64, 5, [48, 48, 48, 7]),
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
    "window_eq_chunk_nosink": (1, 2, 64, (2, 2), 8, 8, 0, [8] * 3),
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
    # split-KV at these tiles: 5 slot tiles + 3 chunk-key tiles of 16 over 3 segments, partials of 32 rows
    err, err_lse = _split_stream(1, 1, 16, 40, 72, 3, [40, 21], torch.float32, (3,))
    assert err <= ATOL[torch.float32] and err_lse <= LSE_ATOL[torch.float32], (err, err_lse)
    monkeypatch.setattr(mod, "launch_config",
                        lambda *a, **k: dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1))
    err = _backward_errors(1, 1, 24, 12, 36, 6, 5, 10, torch.float32, rope=None)
    assert max(err) <= GRAD_ATOL[torch.float32], err


def test_unsupported_reasons():
    from lipforcing.kernels.chunk_attention import chunk_attention_triton_unsupported as why

    x = torch.zeros(1, 4, 1, 512)
    assert "head_dim" in why(x, x, x, x, x, None, 4, 4, 0, False, 1.0, None, None, 0, 0)
    if interpreting():
        xb = torch.zeros(1, 4, 1, 32, dtype=torch.bfloat16)
        assert "bfloat16" in why(xb, xb, xb, xb, xb, None, 4, 4, 0, False, 1.0, None, None, 0, 0)


# ---- backward (write=False): Triton flash-style vs the reference ----

GRAD_ATOL = {torch.float32: 5e-5, torch.float16: 6e-3}


def _backward_errors(B, H, D, chunk, window, sink, written, n, dtype, rope):
    """Write ``written`` chunks, then compare out, dq, dk, dv of a ``write=False`` step of n tokens."""
    cache = RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        for _ in range(written):
            x = torch.randn(B, chunk, H, D, device=DEVICE).to(dtype)
            chunk_attention(x, torch.randn_like(x), torch.randn_like(x), cache, write=True, rope=rope,
                            backend="reference")
    q, k, v, g = (torch.randn(B, n, H, D, device=DEVICE).to(dtype) for _ in range(4))
    results = []
    for backend in ("triton", "reference"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = chunk_attention(*leaves, cache, write=False, rope=rope, backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves, g)))
    for x in results[0]:
        assert x.dtype == dtype
    return [(a.float() - b.float()).abs().max().item() for a, b in zip(*results)]


# (B, H, D, chunk, window, sink, chunks written, tokens of the step, grid or None)
BWD_CASES = {
    "empty_cache": (1, 2, 32, 16, 32, 0, 0, 16, None),
    "wrapped_sink_odd_d": (2, 1, 24, 6, 18, 5, 7, 6, None),
    "short_step": (1, 2, 16, 8, 24, 3, 4, 5, None),
    "rope_wrapped": (1, 2, 24, 6, 18, 6, 6, 6, (2, 3)),
    "rope_filling": (2, 1, 32, 8, 24, 8, 1, 8, (2, 4)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(BWD_CASES))
def test_backward_matches_reference(case, dtype):
    B, H, D, chunk, window, sink, written, n, grid = BWD_CASES[case]
    rope = None if grid is None else rope_spec(D, grid, max_frames=(sink + window) // (grid[0] * grid[1]) + 1,
                                               device=DEVICE)
    errs = _backward_errors(B, H, D, chunk, window, sink, written, n, dtype, rope)
    assert errs[0] <= ATOL[dtype] and max(errs[1:]) <= GRAD_ATOL[dtype], f"{case}: out/dq/dk/dv errors {errs}"


# ---- masked slots, NaN/inf agreement, device guard ----

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_in_invisible_slots_and_nan_agreement():
    """Stale or unwritten slots holding NaN never reach the output (selected away, not multiplied by 0), and
    NaN/inf in q or k give the same NaN pattern as the reference."""
    B, H, D, chunk, window, sink = 1, 2, 16, 8, 24, 3
    kw = dict(chunk_size=chunk, window=window, sink=sink, device=DEVICE)
    cache = RollingKVCache(B, H, D, **kw)
    for _ in range(4):
        x = torch.randn(B, chunk, H, D, device=DEVICE)
        chunk_attention(x, x, x, cache, write=True, backend="triton")
    from lipforcing.ops.reference import cache_slot_positions

    p, filled = cache_slot_positions(cache.pos, sink, window)
    lo = max(int(cache.pos) + chunk - window, sink)
    hidden = ~(filled & ((p < sink) | (p >= lo)))
    assert hidden.sum() == chunk
    cache.k[:, hidden] = float("nan")
    cache.v[:, hidden] = float("inf")
    q, k, v = (torch.randn(B, chunk, H, D, device=DEVICE) for _ in range(3))
    out = chunk_attention(q, k, v, cache, write=False, backend="triton")
    assert out.isfinite().all()
    torch.testing.assert_close(out, chunk_attention(q, k, v, cache, write=False, backend="reference"),
                               atol=2e-5, rtol=0)
    q[0, 2, 1, 5] = float("nan")
    k[0, 4, 0, 1] = float("inf")
    q[0, :, 0, 1] = q[0, :, 0, 1].abs() + 0.1  # +inf scores in head 0
    got = chunk_attention(q, k, v, cache, write=False, backend="triton")
    ref = chunk_attention(q, k, v, cache, write=False, backend="reference")
    assert got.isnan().any()
    assert torch.equal(got.isnan(), ref.isnan())
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0, equal_nan=True)


def test_device_guard_entered(monkeypatch):
    """Every launcher runs under device_guard(tensor) (torch.cuda.device on a GPU): record that it is entered
    with the inputs' device, for the forward (both write modes, with RoPE) and the backward."""
    import lipforcing.kernels.chunk_attention as mod

    seen = record_device_guard(monkeypatch, mod)
    D = 16
    spec = rope_spec(D, (1, 2), max_frames=8, device=DEVICE)
    cache = RollingKVCache(1, 1, D, chunk_size=2, window=4, sink=2, device=DEVICE)
    x = torch.randn(1, 2, 1, D, device=DEVICE)
    chunk_attention(x, x, x, cache, write=True, rope=spec, backend="triton")
    assert seen and set(seen) == {x.device}
    seen.clear()
    leaf = x.clone().requires_grad_()
    chunk_attention(leaf, x, x, cache, write=False, backend="triton").sum().backward()
    assert len(seen) >= 2 and set(seen) == {x.device}


@pytest.mark.parametrize("use_rope", [False, True])
def test_dense_staging_of_the_library_backends(use_rope):
    """The flash_attn / cudnn backends attend densely to the first ``workspace.count`` slots of what
    ``chunk_attention_dense._prepare`` hands them: check that buffer with plain attention on the CPU, for write=False
    (chunk overlaid on its target slots, cache untouched) and write=True, while the cache fills and after it wraps."""
    from lipforcing.ops.chunk_attention_dense import _prepare

    B, H, D, grid, chunk, window, sink = 2, 1, 16, (1, 2), 4, 10, 2
    rope = rope_spec(D, grid, max_frames=8, device=DEVICE) if use_rope else None
    cos, sin, gh, gw = (rope.cos, rope.sin, *grid) if use_rope else (None, None, 0, 0)
    kw = dict(chunk_size=chunk, window=window, sink=sink, device=DEVICE)
    cache, ref_cache = RollingKVCache(B, H, D, **kw), RollingKVCache(B, H, D, **kw)
    for _ in range(6):
        q, k, v = (torch.randn(B, chunk, H, D, device=DEVICE) for _ in range(3))
        expected = chunk_attention(q, k, v, ref_cache, write=True, rope=rope, backend="reference")
        for write in (False, True):
            before = (cache.k.clone(), cache.pos.clone())
            q_eff, ks, vs, ws = _prepare(q, k, v, cache.k, cache.v, cache.pos, chunk, window, sink, write, cos, sin,
                                         gh, gw)
            count = int(ws.count[0])
            assert ws.count.tolist() == [min(int(cache.pos) + chunk, sink + window)] * B
            if not write:
                assert torch.equal(cache.k, before[0]) and torch.equal(cache.pos, before[1])
            s = torch.einsum("bqhd,bkhd->bhqk", q_eff.float(), ks[:, :count].float()) * D ** -0.5
            out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vs[:, :count].float())
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
        cache.pos.add_(chunk)  # _prepare leaves pos to the backend
        assert torch.equal(cache.k, ref_cache.k)


def test_device_guard_entered_by_denoise_update(monkeypatch):
    """denoise_update's Triton launcher runs under device_guard(x_t) as well (issue 16)."""
    import lipforcing.kernels.denoise_update as mod
    from lipforcing.ops import denoise_update

    seen = record_device_guard(monkeypatch, mod)
    x = torch.randn(2, 3, 5, device=DEVICE)
    flow = torch.randn_like(x)
    x0, _ = denoise_update(x, flow, 0.5, 0.0, backend="triton")
    assert seen == [x.device]
    torch.testing.assert_close(x0, x - 0.5 * flow)


# ---- split-KV forward (kernels/chunk_attention_split.py): S key segments + the log-sum-exp combine ----

SPLITS = (1, 2, 3, 5)
# the log-sum-exp of the scores (O(1)-O(10)): fp16 rounds the rotated q/k the kernel reads
LSE_ATOL = {torch.float32: 1e-4, torch.float16: 3e-3}


def _split_stream(B, H, D, chunk, window, sink, lengths, dtype, splits, rope=None):
    """Stream chunks through a reference cache; at every step run the Triton launcher with each forced split
    count, write=False on the live cache and write=True on a copy of it.  Returns the max error of the outputs
    and of the write=False log-sum-exp against the reference (and checks the copies' caches after the write)."""
    from lipforcing.kernels.chunk_attention import chunk_attention_triton
    from lipforcing.ops.reference import chunk_attention_ref

    kw = dict(chunk_size=chunk, window=window, sink=sink, dtype=dtype, device=DEVICE)
    cache = RollingKVCache(B, H, D, **kw)
    scale = D ** -0.5
    rope_args = (rope.cos, rope.sin, *rope.grid) if rope is not None else (None, None, 0, 0)
    worst_out = worst_lse = 0.0
    for n in lengths:
        q, k, v = (torch.randn(B, n, H, D, device=DEVICE).to(dtype) for _ in range(3))
        ref, ref_lse = chunk_attention_ref(q, k, v, cache.k, cache.v, cache.pos, chunk_size=chunk, window=window,
                                           sink=sink, write=False, scale=scale, rope=rope, return_lse=True)
        for s in splits:
            out, lse = chunk_attention_triton(q, k, v, cache.k, cache.v, cache.pos, chunk, window, sink, False,
                                              scale, *rope_args, splits=s)
            kc, vc, pc = cache.k.clone(), cache.v.clone(), cache.pos.clone()
            out_w = chunk_attention_triton(q, k, v, kc, vc, pc, chunk, window, sink, True, scale, *rope_args,
                                           splits=s)
            assert out.dtype == out_w.dtype == dtype and lse.shape == (B, H, n)
            worst_out = max(worst_out, *((o.float() - ref.float()).abs().max().item() for o in (out, out_w)))
            worst_lse = max(worst_lse, (lse - ref_lse).abs().max().item())
        chunk_attention(q, k, v, cache, write=True, rope=rope, backend="reference")
        assert torch.equal(kc, cache.k) and torch.equal(vc, cache.v) and torch.equal(pc, cache.pos)
    return worst_out, worst_lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_kv_matches_reference(dtype):
    """S = 1, 2, 3, 5 segments over 2..4 key tiles of 16 (interpreter tiles; slots 8 + 24, chunk 24 = 16 + 8
    keys): empty segments (2 tiles over 5), uneven ones (4 over 3), the chunk's own keys split between segments,
    a segment that is only the 8-key tail tile, a wrapped ring and a short last chunk (7 keys, the oldest window
    slots masked)."""
    splits = SPLITS if dtype == torch.float32 else SPLITS[2:]  # fp16: the rounding paths, fewer launches
    err, err_lse = _split_stream(1, 1, 16, 24, 24, 8, [24, 24, 7], dtype, splits)
    assert err <= ATOL[dtype] and err_lse <= LSE_ATOL[dtype], (err, err_lse)


def test_split_kv_dynamic_rope():
    """Dynamic RoPE with 3 segments, batch 2: the ring wraps at the second chunk, the third is short."""
    dtype = torch.float32
    D, grid, chunk, window, sink = 16, (2, 2), 8, 8, 4
    spec = rope_spec(D, grid, max_frames=(sink + window) // 4 + 1, device=DEVICE)
    err, err_lse = _split_stream(2, 1, D, chunk, window, sink, [8, 8, 4], dtype, (3,), rope=spec)
    assert err <= ATOL[dtype] and err_lse <= LSE_ATOL[dtype], (err, err_lse)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_split_kv_nan_in_invisible_slots():
    """A split forward selects masked slots away as the one-pass forward does: NaN there never reaches any
    segment's partial, and the combine keeps the output finite and equal to the reference; NaN/inf in q or k
    give the reference's NaN pattern through the combine."""
    from lipforcing.kernels.chunk_attention import chunk_attention_triton
    from lipforcing.ops.reference import cache_slot_positions

    B, H, D, chunk, window, sink = 1, 2, 16, 8, 24, 3
    cache = RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink, device=DEVICE)
    for _ in range(4):
        x = torch.randn(B, chunk, H, D, device=DEVICE)
        chunk_attention(x, x, x, cache, write=True, backend="reference")
    p, filled = cache_slot_positions(cache.pos, sink, window)
    lo = max(int(cache.pos) + chunk - window, sink)
    cache.k[:, ~(filled & ((p < sink) | (p >= lo)))] = float("nan")
    q, k, v = (torch.randn(B, chunk, H, D, device=DEVICE) for _ in range(3))
    out, _ = chunk_attention_triton(q, k, v, cache.k, cache.v, cache.pos, chunk, window, sink, False, D ** -0.5,
                                    None, None, 0, 0, splits=3)
    assert out.isfinite().all()
    torch.testing.assert_close(out, chunk_attention(q, k, v, cache, write=False, backend="reference"), atol=2e-5,
                               rtol=0)
    q[0, 2, 1, 5] = float("nan")  # head 1: one NaN query row; head 0: an inf key, +inf scores in every row
    k[0, 4, 0, 1] = float("inf")
    q[0, :, 0, 1] = q[0, :, 0, 1].abs() + 0.1
    got, _ = chunk_attention_triton(q, k, v, cache.k, cache.v, cache.pos, chunk, window, sink, False, D ** -0.5,
                                    None, None, 0, 0, splits=3)
    ref = chunk_attention(q, k, v, cache, write=False, backend="reference")
    assert got.isnan().any() and torch.equal(got.isnan(), ref.isnan())


def test_choose_splits():
    from lipforcing.kernels.chunk_attention_split import choose_splits

    # 1.3B: 24 query tiles x 12 heads = 288 programs on 132 SMs (2.18 waves), 112 key tiles of 64 (7168 slots)
    s13 = choose_splits(288, 112, 132)
    assert 2 <= s13 <= 8
    assert choose_splits(960, 112, 132) == 1          # 14B, 40 heads: 7.3 waves
    assert choose_splits(288, 112, None) == 1         # CPU / interpreter without an explicit SM count
    assert choose_splits(288, 5, 132) == 1            # too few key tiles to share
    assert choose_splits(8, 400, 132) == 8            # a handful of programs, many tiles: the most segments
    assert choose_splits(400, 112, 132) == 1          # >= 3 waves already
    assert choose_splits(400, 112, 132, programs_per_sm=2) > 1  # 1.5 waves when two programs fit an SM
    # (kept to bounds on purpose: the cost model's constants are unmeasured, the exact S may change with them)


def test_split_count_of_the_launcher(monkeypatch):
    """The launcher splits by the explicit SM count (none on the CPU without it) and validates a forced count;
    2 heads: the combine's head strides."""
    import lipforcing.kernels.chunk_attention as mod

    seen = []
    real = mod.combine_splits
    monkeypatch.setattr(mod, "combine_splits", lambda po, pl, out, lse, s, n, h: (seen.append(s),
                                                                                   real(po, pl, out, lse, s, n, h)))
    cache = RollingKVCache(1, 2, 16, chunk_size=32, window=96, sink=0, device=DEVICE)
    x = torch.randn(1, 32, 2, 16, device=DEVICE)
    args = (x, x, x, cache.k, cache.v, cache.pos, 32, 96, 0, False, 0.25, None, None, 0, 0)
    ref = chunk_attention(x, x, x, cache, write=False, backend="reference")
    expected = mod.forward_splits(x, cache.k, 32, False, num_sms=16)
    assert expected > 1
    out, _ = mod.chunk_attention_triton(*args, num_sms=16)
    assert seen == [expected]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    seen.clear()
    if not x.is_cuda:
        mod.chunk_attention_triton(*args)
        assert seen == []
    with pytest.raises(ValueError, match="splits"):
        mod.chunk_attention_triton(*args, splits=0)


# ---- q_rotated / chunk_in_cache: q rotated and the chunk stored ahead (ops.qk_norm), issue 16 item 3 ----

# (B, H, D, chunk, window, sink, chunk lengths, grid): ring wraps with a sink of one frame and a short last chunk;
# sink of two frames filled over two chunks (the chunk writes into sink slots)
PREPARED_CASES = {
    "wrap_short_last": (2, 1, 16, 4, 8, 2, [4] * 4 + [2], (1, 2)),
    "sink_over_chunks": (1, 1, 12, 2, 6, 4, [2] * 6, (1, 2)),
}


def _qk_norm_window(q, k, v, cache, rope, write):
    """(q, k normalised by ops.qk_norm; the same q also rotated at its window-relative frame of ``cache``'s next
    step), and with ``write`` k, v stored in the chunk's slots (pos not advanced)."""
    from lipforcing.ops import qk_norm

    H, D = q.shape[2], q.shape[3]
    ones = torch.ones(H * D, device=q.device)
    qn, kn = qk_norm(q, k, ones, ones, eps=1e-6, backend="reference")
    qr, kr = qk_norm(q, k, ones, ones, eps=1e-6, rope=rope, rope_positions="window", cache=cache,
                     v=v if write else None, backend="reference")
    assert torch.equal(kr, kn)  # window mode rotates q only
    return qn, kn, qr


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(PREPARED_CASES))
def test_prepared_q_and_chunk_equal_the_plain_op(case, dtype, backend):
    """Each chunk: write=False with q_rotated, then write=True with q_rotated + chunk_in_cache after qk_norm
    stored the chunk, against the plain op (which rotates q and stores the chunk itself) on a second cache.  With
    chunk_in_cache the op gets k, v filled with garbage: it must read the chunk from its slots and not store."""
    B, H, D, chunk, window, sink, lengths, grid = PREPARED_CASES[case]
    rope = rope_spec(D, grid, max_frames=8, device=DEVICE)
    kw = dict(chunk_size=chunk, window=window, sink=sink, dtype=dtype, device=DEVICE)
    plain, prep = RollingKVCache(B, H, D, **kw), RollingKVCache(B, H, D, **kw)
    # fp16: the plain op rounds its rotated q to fp16 on Triton like qk_norm does; the reference rotates in fp32
    atol = 0.0 if dtype == torch.float32 and backend == "triton" else ATOL[dtype]
    wrong_err = 0.0
    for n in lengths:
        q, k, v = (torch.randn(B, n, H, D, device=DEVICE).to(dtype) for _ in range(3))
        qn, kn, qr = _qk_norm_window(q, k, v, prep, rope, write=False)
        want = chunk_attention(qn, kn, v, plain, write=False, rope=rope, backend=backend)
        got = chunk_attention(qr, kn, v, prep, write=False, rope=rope, backend=backend, q_rotated=True)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)
        # the test can fail: an un-rotated q given as rotated changes the output (little at frame 0)
        wrong = chunk_attention(qn, kn, v, prep, write=False, rope=rope, backend=backend, q_rotated=True)
        wrong_err = max(wrong_err, (wrong.float() - want.float()).abs().max().item())
        assert torch.equal(prep.k, plain.k) and torch.equal(prep.pos, plain.pos)  # write=False wrote nothing
        _, _, qr = _qk_norm_window(q, k, v, prep, rope, write=True)  # stores kn, v; pos unchanged
        want = chunk_attention(qn, kn, v, plain, write=True, rope=rope, backend=backend)
        junk = torch.full_like(v, 7.0)
        got = chunk_attention(qr, junk, junk, prep, write=True, rope=rope, backend=backend, q_rotated=True,
                              chunk_in_cache=True)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)
        assert torch.equal(prep.pos, plain.pos)
        assert torch.equal(prep.k, plain.k) and torch.equal(prep.v, plain.v)
    assert wrong_err > 10 * max(atol, 1e-6)
    assert int(plain.pos) > sink + window  # the ring wrapped


@pytest.mark.parametrize("use_rope", [False, True])
def test_chunk_in_cache_without_q_rotation(use_rope):
    """chunk_in_cache alone (q rotated by the op, or no RoPE at all: absolute mode) on the Triton backend equals
    the plain write; with split-KV (3 segments) as well."""
    import lipforcing.kernels.chunk_attention as mod
    from lipforcing.ops.reference import cache_write_ref

    B, H, D, chunk, window, sink = 1, 2, 16, 4, 12, 2
    rope = rope_spec(D, (1, 2), max_frames=8, device=DEVICE) if use_rope else None
    cos, sin, gh, gw = (rope.cos, rope.sin, 1, 2) if use_rope else (None, None, 0, 0)
    kw = dict(chunk_size=chunk, window=window, sink=sink, device=DEVICE)
    plain, prep = RollingKVCache(B, H, D, **kw), RollingKVCache(B, H, D, **kw)
    for step in range(5):
        q, k, v = (torch.randn(B, chunk, H, D, device=DEVICE) for _ in range(3))
        want = chunk_attention(q, k, v, plain, write=True, rope=rope, backend="triton")
        cache_write_ref(k, v, prep.k, prep.v, prep.pos.clone(), sink=sink)
        got = mod.chunk_attention_triton(q, k * 0, v * 0, prep.k, prep.v, prep.pos, chunk, window, sink, True,
                                         D ** -0.5, cos, sin, gh, gw, False, True, splits=1 + 2 * (step % 2))
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
        assert torch.equal(prep.pos, plain.pos) and torch.equal(prep.k, plain.k)


def test_dense_staging_with_prepared_q_and_chunk():
    """The flash_attn / cudnn staging (_prepare) honours the flags: q_rotated hands q through untouched, and
    chunk_in_cache stores nothing (the chunk's slots already hold it), with the same keys/values as the plain
    staging."""
    from lipforcing.ops import qk_norm
    from lipforcing.ops.chunk_attention_dense import _prepare

    B, H, D, grid, chunk, window, sink = 2, 1, 16, (1, 2), 4, 10, 2
    rope = rope_spec(D, grid, max_frames=8, device=DEVICE)
    kw = dict(chunk_size=chunk, window=window, sink=sink, device=DEVICE)
    plain, prep = RollingKVCache(B, H, D, **kw), RollingKVCache(B, H, D, **kw)
    ones = torch.ones(H * D, device=DEVICE)
    for _ in range(5):
        q, k, v = (torch.randn(B, chunk, H, D, device=DEVICE) for _ in range(3))
        qn, kn = qk_norm(q, k, ones, ones, eps=1e-6, backend="reference")
        qr, _ = qk_norm(q, k, ones, ones, eps=1e-6, rope=rope, rope_positions="window", cache=prep, v=v,
                        backend="reference")
        q0, ks0, vs0, _ = _prepare(qn, kn, v, plain.k, plain.v, plain.pos, chunk, window, sink, True, rope.cos,
                                   rope.sin, *grid)
        q0, ks0, vs0 = q0.clone(), ks0.clone(), vs0.clone()  # the workspace is shared by both caches
        junk = torch.full_like(v, 3.0)
        q1, ks1, vs1, _ = _prepare(qr, junk, junk, prep.k, prep.v, prep.pos, chunk, window, sink, True, rope.cos,
                                   rope.sin, *grid, q_rotated=True, chunk_in_cache=True)
        assert q1 is qr
        torch.testing.assert_close(q1, q0, rtol=0, atol=1e-6)
        assert torch.equal(ks1, ks0) and torch.equal(vs1, vs0)
        assert torch.equal(prep.k, plain.k) and torch.equal(prep.v, plain.v)
        for c in (plain, prep):
            c.pos.add_(chunk)  # _prepare leaves pos to the backend
