"""CPU tier: RollingKVCache + chunk_attention (reference backend) vs block_causal_attention, an independent
dynamic-RoPE oracle, opcheck and error messages."""
import math

import pytest
import torch

import lipforcing
from lipforcing import ops
from tests.ops.oracles import dense_block_causal

# (batch, heads, head_dim, chunk, window, sink, chunks, last) — `last` = tokens of the final chunk
STREAMS = [
    (1, 2, 16, 8, 24, 5, 12, 8),   # ring of 16 tokens wrapped ~5 times
    (2, 1, 8, 6, 6, 0, 9, 6),      # window == chunk: ring of 0 tokens, no sink
    (1, 2, 8, 7, 21, 0, 10, 3),    # no sink, short last chunk
    (2, 3, 16, 4, 12, 10, 14, 4),  # sink longer than a chunk
    (1, 1, 8, 5, 15, 5, 11, 2),    # sink == chunk, short last chunk
]


def _stream(q, k, v, cache, chunk, write=True, **kw):
    outs = []
    for s in range(0, q.shape[1], chunk):
        sl = slice(s, s + chunk)
        outs.append(ops.chunk_attention(q[:, sl], k[:, sl], v[:, sl], cache, write=write, backend="reference", **kw))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("B,H,D,chunk,window,sink,n,last", STREAMS)
def test_streaming_equals_block_causal(B, H, D, chunk, window, sink, n, last):
    L = (n - 1) * chunk + last
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    cache = lipforcing.RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink)
    streamed = _stream(q, k, v, cache, chunk)
    full = ops.block_causal_attention(q, k, v, chunk_size=chunk, window=window, sink=sink, backend="reference")
    torch.testing.assert_close(streamed, full, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(streamed.double(), dense_block_causal(q, k, v, chunk, window, sink), atol=2e-5,
                               rtol=1e-5)
    assert int(cache.pos) == L


def test_ring_wraps_and_reset_restarts():
    B, H, D, chunk, window, sink = 1, 2, 8, 4, 12, 3
    L = 4 * 15  # ring of 8 tokens, (60 - 3) / 8 > 7 wraps
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    cache = lipforcing.RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink)
    ptrs = (cache.k.data_ptr(), cache.v.data_ptr(), cache.pos.data_ptr())
    first = _stream(q, k, v, cache, chunk)
    cache.reset()
    second = _stream(q, k, v, cache, chunk)
    assert torch.equal(first, second)
    assert ptrs == (cache.k.data_ptr(), cache.v.data_ptr(), cache.pos.data_ptr()), "cache reallocated"


def test_write_false_leaves_cache_untouched():
    cache = lipforcing.RollingKVCache(1, 2, 8, chunk_size=4, window=8, sink=2)
    warm = torch.randn(1, 4, 2, 8)
    ops.chunk_attention(warm, warm, warm, cache, write=True, backend="reference")
    before = (cache.k.clone(), cache.v.clone(), cache.pos.clone())
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    out_nowrite = ops.chunk_attention(q, k, v, cache, write=False, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(before, (cache.k, cache.v, cache.pos)))
    out_write = ops.chunk_attention(q, k, v, cache, write=True, backend="reference")
    assert torch.equal(out_nowrite, out_write)  # the write happens after attending
    assert int(cache.pos) == 8


# ---- dynamic RoPE: an independent oracle (complex rotation in float64, positions from the key list) ----

def _rotate64(x, t, h, w, theta=10000.0):
    """Wan 3-D RoPE of x (B, L, H, D) at per-token (t, h, w), via complex multiplication in float64."""
    D = x.shape[-1]
    c = D // 2
    parts = (c - 2 * (c // 3), c // 3, c // 3)
    angles = []
    for pos, n in zip((t, h, w), parts):
        freq = theta ** (-torch.arange(n, dtype=torch.float64) / n)
        angles.append(pos.double()[:, None] * freq[None, :])
    ang = torch.cat(angles, dim=1)  # (L, c)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], c, 2))
    rot = xc * torch.polar(torch.ones_like(ang), ang)[None, :, None, :]
    return torch.view_as_real(rot).reshape(x.shape)


@pytest.mark.parametrize("sink_frames,window_frames,chunk_frames", [(1, 6, 3), (0, 4, 2), (2, 5, 1)])
def test_dynamic_rope_matches_window_relative_oracle(sink_frames, window_frames, chunk_frames):
    grid = (2, 3)
    tpf = grid[0] * grid[1]
    B, H, D = 1, 2, 24
    chunk, window, sink = chunk_frames * tpf, window_frames * tpf, sink_frames * tpf
    n_chunks = 7
    L = n_chunks * chunk
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    spec = ops.rope_spec(D, grid, max_frames=32)
    cache = lipforcing.RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink)
    got = _stream(q, k, v, cache, chunk, rope=spec)
    for c in range(n_chunks):
        start, end = c * chunk, (c + 1) * chunk
        # visible frames in stream order: sink frames, then the window (which includes this chunk)
        frames = sorted({f for f in range(end // tpf) if f < sink_frames or f >= end // tpf - window_frames})
        rel = {f: i for i, f in enumerate(frames)}
        keys = [f * tpf + j for f in frames for j in range(tpf)]
        kt = torch.tensor([rel[p // tpf] for p in keys])
        kh = torch.tensor([(p % tpf) // grid[1] for p in keys])
        kw = torch.tensor([(p % tpf) % grid[1] for p in keys])
        qidx = list(range(start, end))
        qt = torch.tensor([rel[p // tpf] for p in qidx])
        qh, qw = torch.tensor([(p % tpf) // grid[1] for p in qidx]), torch.tensor([(p % tpf) % grid[1] for p in qidx])
        qr = _rotate64(q[:, start:end], qt, qh, qw)
        kr = _rotate64(k[:, keys], kt, kh, kw)
        s = torch.einsum("bqhd,bkhd->bhqk", qr, kr) / math.sqrt(D)
        expected = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v[:, keys].double())
        torch.testing.assert_close(got[:, start:end].double(), expected, atol=3e-5, rtol=1e-5)


def test_opcheck():
    cache = lipforcing.RollingKVCache(1, 2, 8, chunk_size=4, window=12, sink=2)
    for _ in range(3):
        x = torch.randn(1, 4, 2, 8)
        ops.chunk_attention(x, x, x, cache, write=True, backend="reference")
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    spec = ops.rope_spec(8, (2, 2), max_frames=16)
    for write in (False, True):
        torch.library.opcheck(torch.ops.lipforcing.chunk_attention.default,
                              (q, k, v, cache.k, cache.v, cache.pos, 4, 12, 2, write, 0.3, None, None, 0, 0,
                               "reference"))
        torch.library.opcheck(torch.ops.lipforcing.chunk_attention.default,
                              (q, k, v, cache.k, cache.v, cache.pos, 4, 12, 2, write, 0.3, spec.cos, spec.sin, 2, 2,
                               "reference"))


def test_cache_errors():
    with pytest.raises(ValueError, match=r"window \(4 tokens\) must be >= chunk_size \(8 tokens\)"):
        lipforcing.RollingKVCache(1, 2, 8, chunk_size=8, window=4, sink=0)
    with pytest.raises(ValueError, match="finite window"):
        lipforcing.RollingKVCache(1, 2, 8, chunk_size=8, window=None, sink=0)
    with pytest.raises(ValueError, match="dtype must be"):
        lipforcing.RollingKVCache(1, 2, 8, chunk_size=8, window=8, dtype=torch.int32)
    with pytest.raises(ValueError, match="heads must be >= 1"):
        lipforcing.RollingKVCache(1, 0, 8, chunk_size=8, window=8)


@pytest.mark.parametrize("make,match", [
    (lambda c: (torch.randn(1, 4, 3, 8),) * 3, r"\(batch, heads, head_dim\) = \(1, 3, 8\) but the cache was built"),
    (lambda c: (torch.randn(1, 5, 2, 8),) * 3, r"q has 5 tokens; a chunk must have 1..cache.chunk_size \(4\)"),
    (lambda c: (torch.randn(1, 4, 2, 8).half(),) * 3, r"q has dtype torch.float16 but the cache stores"),
    (lambda c: (torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 3, 2, 8)),
     r"v must have the shape of q"),
    (lambda c: (torch.randn(4, 2, 8),) * 3, r"q must be 4-D \(batch, chunk, heads, head_dim\)"),
])
def test_chunk_attention_errors(make, match):
    cache = lipforcing.RollingKVCache(1, 2, 8, chunk_size=4, window=8, sink=2)
    q, k, v = make(cache)
    with pytest.raises(ValueError, match=match):
        ops.chunk_attention(q, k, v, cache, write=True)
    assert int(cache.pos) == 0


def test_rope_errors():
    cache = lipforcing.RollingKVCache(1, 2, 8, chunk_size=6, window=12, sink=3)
    x = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match=r"cache's sink \(3 tokens\) must be a multiple of the tokens per frame 6"):
        ops.chunk_attention(x, x, x, cache, write=False, rope=ops.rope_spec(8, (2, 3)))
    with pytest.raises(ValueError, match="rope is built for head_dim 16"):
        ops.chunk_attention(x, x, x, cache, write=False, rope=ops.rope_spec(16, (1, 3)))
    with pytest.raises(TypeError, match="cache must be a lipforcing.RollingKVCache"):
        ops.chunk_attention(x, x, x, object(), write=False)
    with pytest.raises(TypeError, match="write must be a bool"):
        ops.chunk_attention(x, x, x, cache, write=1)


# ---- gradients (write=False): the cache is a constant, gradient flows into the current chunk's q, k, v ----

def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def test_gradient_matches_dense_oracle_after_ring_wrapped():
    B, H, D, chunk, window, sink, last = 2, 2, 8, 4, 12, 2, 3
    n_written = 5  # 20 tokens written: the ring of 8 tokens has wrapped
    L = n_written * chunk + last
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    g = torch.randn(B, last, H, D)
    cache = lipforcing.RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink)
    with torch.no_grad():
        _stream(q[:, :-last], k[:, :-last], v[:, :-last], cache, chunk)
    cur = slice(L - last, L)
    qc, kc, vc = _leaves(q[:, cur], k[:, cur], v[:, cur])
    out = ops.chunk_attention(qc, kc, vc, cache, write=False, backend="reference")
    got = torch.autograd.grad(out, (qc, kc, vc), g)
    # oracle: the whole sequence densely, earlier tokens detached, gradient of the last chunk's outputs only
    qo, ko, vo = _leaves(q[:, cur].double(), k[:, cur].double(), v[:, cur].double())
    full = [torch.cat([x[:, :L - last].double(), c], dim=1) for x, c in ((q, qo), (k, ko), (v, vo))]
    ref = dense_block_causal(*full, chunk, window, sink)[:, cur]
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    expected = torch.autograd.grad(ref, (qo, ko, vo), g.double())
    for name, a, b in zip("qkv", got, expected):
        assert a.dtype == torch.float32 and a.abs().sum() > 0, name
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=1e-4, msg=f"d{name}")


def test_gradient_with_dynamic_rope_matches_rotation_oracle():
    grid = (2, 3)
    tpf = 6
    sink_frames, window_frames = 1, 4   # chunk of one frame, ring of 3 frames
    B, H, D = 1, 2, 24
    chunk, window, sink = tpf, window_frames * tpf, sink_frames * tpf
    n_written = 6
    L = (n_written + 1) * chunk
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    g = torch.randn(B, chunk, H, D)
    spec = ops.rope_spec(D, grid, max_frames=16)
    cache = lipforcing.RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink)
    with torch.no_grad():
        _stream(q[:, :-chunk], k[:, :-chunk], v[:, :-chunk], cache, chunk, rope=spec)
    cur = slice(L - chunk, L)
    qc, kc, vc = _leaves(q[:, cur], k[:, cur], v[:, cur])
    out = ops.chunk_attention(qc, kc, vc, cache, write=False, rope=spec, backend="reference")
    got = torch.autograd.grad(out, (qc, kc, vc), g)
    # oracle: visible frames = sink frames, then the window; window-relative time positions
    last = L // tpf - 1
    frames = [f for f in range(last + 1) if f < sink_frames or f > last - window_frames]
    keys = [f * tpf + j for f in frames for j in range(tpf)]
    rel = torch.tensor([i for i in range(len(frames)) for _ in range(tpf)])
    hh = torch.tensor([j // grid[1] for j in range(tpf)] * len(frames))
    ww = torch.tensor([j % grid[1] for j in range(tpf)] * len(frames))
    qo, ko, vo = _leaves(q[:, cur].double(), k[:, cur].double(), v[:, cur].double())
    kk = torch.cat([k[:, keys[:-chunk]].double(), ko], dim=1)
    vv = torch.cat([v[:, keys[:-chunk]].double(), vo], dim=1)
    qr = _rotate64(qo, rel[-chunk:], hh[-chunk:], ww[-chunk:])
    kr = _rotate64(kk, rel, hh, ww)
    p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", qr, kr) / math.sqrt(D), -1)
    ref = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=1e-5)
    expected = torch.autograd.grad(ref, (qo, ko, vo), g.double())
    for name, a, b in zip("qkv", got, expected):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("rope", [False, True])
def test_gradient_unchanged_by_cache_write_before_backward(rope):
    """The rollout's order: exit forward (write=False, with grad), then the cache-write pass of the same chunk,
    then the backward.  The cache is read in place (no copy); the one write in between only overwrites slots the
    forward did not see, so the gradient is unchanged.  A second write could evict visible keys: refused."""
    B, H, D, chunk, window, sink = 1, 2, 12, 6, 18, 6
    spec = ops.rope_spec(D, (2, 3), max_frames=8) if rope else None
    cache = lipforcing.RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(B, chunk, H, D)
            ops.chunk_attention(x, x, x, cache, write=True, rope=spec, backend="reference")
    q, k, v = (torch.randn(B, chunk, H, D) for _ in range(3))
    g = torch.randn(B, chunk, H, D)
    leaves = _leaves(q, k, v)
    out = ops.chunk_attention(*leaves, cache, write=False, rope=spec, backend="reference")
    expected = torch.autograd.grad(out, leaves, g)
    leaves = _leaves(q, k, v)
    out = ops.chunk_attention(*leaves, cache, write=False, rope=spec, backend="reference")
    with torch.no_grad():   # this chunk's cache write
        ops.chunk_attention(q, k, v, cache, write=True, rope=spec, backend="reference")
    got = torch.autograd.grad(out, leaves, g, retain_graph=True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.no_grad():   # the next chunk's write evicts keys the forward saw
        ops.chunk_attention(q, k, v, cache, write=True, rope=spec, backend="reference")
    with pytest.raises(RuntimeError, match="written 2 times after this forward.*snapshot"):
        torch.autograd.grad(out, leaves, g)
    leaves = _leaves(q, k, v)
    out = ops.chunk_attention(*leaves, cache, write=False, rope=spec, backend="reference")
    cache.reset()
    with pytest.raises(RuntimeError, match="was reset after this forward"):
        torch.autograd.grad(out, leaves, g)


def test_write_true_with_gradient_raises_before_writing():
    cache = lipforcing.RollingKVCache(1, 2, 8, chunk_size=4, window=8, sink=2)
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    ops.chunk_attention(q, k, v, cache, write=True, backend="reference")   # no input requires grad: fine
    before = (cache.k.clone(), cache.v.clone(), cache.pos.clone())
    k.requires_grad_()
    with pytest.raises(ValueError, match=r"chunk_attention\(write=True\) is not differentiable.*torch.no_grad"):
        ops.chunk_attention(q, k, v, cache, write=True, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(before, (cache.k, cache.v, cache.pos)))
    with torch.no_grad():
        ops.chunk_attention(q, k, v, cache, write=True, backend="reference")
    assert int(cache.pos) == 8


def test_opcheck_with_gradient():
    cache = lipforcing.RollingKVCache(1, 2, 8, chunk_size=4, window=12, sink=2)
    spec = ops.rope_spec(8, (2, 2), max_frames=16)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(1, 4, 2, 8)
            ops.chunk_attention(x, x, x, cache, write=True, backend="reference")
    q, k, v = _leaves(*(torch.randn(1, 4, 2, 8) for _ in range(3)))
    for cos, sin, gh, gw in ((None, None, 0, 0), (spec.cos, spec.sin, 2, 2)):
        torch.library.opcheck(torch.ops.lipforcing.chunk_attention_read.default,
                              (q, k, v, cache.k, cache.v, cache.pos, 4, 12, 2, 0.3, cos, sin, gh, gw, "reference"))
        out, lse = torch.ops.lipforcing.chunk_attention_read(q.detach(), k.detach(), v.detach(), cache.k, cache.v,
                                                             cache.pos, 4, 12, 2, 0.3, cos, sin, gh, gw,
                                                             "reference")
        torch.library.opcheck(torch.ops.lipforcing.chunk_attention_backward.default,
                              (torch.randn(1, 4, 2, 8), q.detach(), k.detach(), v.detach(), out, lse, cache.k,
                               cache.v, cache.pos, 4, 12, 2, 0.3, cos, sin, gh, gw, "reference"))


# ---- cache layout, reset, masked slots, NaN/inf and validation (issue 13) ----

def test_cache_layout_holds_a_whole_window():
    cache = lipforcing.RollingKVCache(2, 3, 8, chunk_size=4, window=12, sink=5)
    assert cache.k.shape == (2, 5 + 12, 3, 8) and cache.slots == 17
    assert cache.capacity == 5 + 12 - 4  # earlier tokens the next chunk can see
    assert cache.workspace is lipforcing.RollingKVCache(2, 3, 8, chunk_size=4, window=12, sink=5).workspace


def test_streams_with_their_own_workspace():
    """Caches given their own ChunkWorkspace (one per concurrently stepped stream) use it, not the shared one;
    a copy of a cache's buffers (a snapshot) falls back to the shared one; a workspace of another shape is
    refused."""
    from lipforcing.cache import ChunkWorkspace, workspace_of

    kw = dict(chunk_size=4, window=12, sink=5)
    shared = lipforcing.RollingKVCache(2, 3, 8, **kw)
    ws = ChunkWorkspace(2, 17, 4, 3, 8, torch.float32, "cpu")
    own = lipforcing.RollingKVCache(2, 3, 8, workspace=ws, **kw)
    assert own.workspace is ws and shared.workspace is not ws
    assert workspace_of(own.k, 4) is ws and workspace_of(shared.k, 4) is shared.workspace
    assert workspace_of(own.k.clone(), 4) is shared.workspace
    with pytest.raises(ValueError, match=r"workspace must be a ChunkWorkspace made for this cache's shape"):
        lipforcing.RollingKVCache(2, 3, 8, chunk_size=4, window=8, sink=5, workspace=ws)


def test_reset_leaves_a_new_cache():
    """Issue 13: stale values (a NaN included) must not survive reset()."""
    B, H, D, chunk, window, sink = 1, 2, 8, 4, 12, 3
    cache = lipforcing.RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink)
    fresh = lipforcing.RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink)
    for _ in range(5):
        x = torch.randn(B, chunk, H, D)
        x[0, 1, 0, 2] = float("nan")
        ops.chunk_attention(x, x, x, cache, write=True, backend="reference")
    ptrs = (cache.k.data_ptr(), cache.v.data_ptr(), cache.pos.data_ptr())
    cache.reset()
    assert ptrs == (cache.k.data_ptr(), cache.v.data_ptr(), cache.pos.data_ptr()), "cache reallocated"
    for a, b in ((cache.k, fresh.k), (cache.v, fresh.v), (cache.pos, fresh.pos)):
        assert torch.equal(a, b)
    assert (cache.writes, cache.short_tail) == (fresh.writes, fresh.short_tail)
    q, k, v = (torch.randn(B, 3 * chunk, H, D) for _ in range(3))
    torch.testing.assert_close(_stream(q, k, v, cache, chunk), _stream(q, k, v, fresh, chunk), atol=0, rtol=0)


def _poison_invisible_slots(cache):
    """NaN into every slot the next chunk must not see (unwritten, or stale ring tokens)."""
    from lipforcing.ops.reference import cache_slot_positions

    ring = cache.k.shape[1] - cache.sink
    p, filled = cache_slot_positions(cache.pos, cache.sink, ring)
    lo = max(int(cache.pos) + cache.chunk_size - cache.window, cache.sink)
    visible = filled & ((p < cache.sink) | (p >= lo))
    cache.k[:, ~visible] = float("nan")
    cache.v[:, ~visible] = float("nan")
    return int((~visible).sum())


@pytest.mark.parametrize("written", [1, 4, 7])
def test_nan_in_invisible_slots_never_reaches_the_output(written):
    B, H, D, chunk, window, sink = 2, 2, 8, 4, 12, 2
    cache = lipforcing.RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink)
    with torch.no_grad():
        for _ in range(written):
            x = torch.randn(B, chunk, H, D)
            ops.chunk_attention(x, x, x, cache, write=True, backend="reference")
    clean = lipforcing.RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink)
    clean.k.copy_(cache.k), clean.v.copy_(cache.v), clean.pos.copy_(cache.pos)
    assert _poison_invisible_slots(cache) >= (chunk if written * chunk > sink + window - chunk else 1)
    q, k, v = _leaves(*(torch.randn(B, chunk, H, D) for _ in range(3)))
    out = ops.chunk_attention(q, k, v, cache, write=False, backend="reference")
    torch.testing.assert_close(out, ops.chunk_attention(q, k, v, clean, write=False, backend="reference"))
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert out.isfinite().all() and all(g.isfinite().all() for g in grads)


def test_nan_and_inf_in_q_k_propagate_in_the_reference():
    """Issue 13: the reference used to turn NaN/inf rows into zeros while the kernels return NaN."""
    B, H, D, chunk = 1, 2, 8, 4
    cache = lipforcing.RollingKVCache(B, H, D, chunk_size=chunk, window=8, sink=0)
    q, k, v = (torch.randn(B, chunk, H, D) for _ in range(3))
    q[0, 1, 0, 3] = float("nan")
    out = ops.chunk_attention(q, k, v, cache, write=False, backend="reference")
    assert out[0, 1, 0].isnan().all() and out[0, :, 1].isfinite().all() and out[0, 0].isfinite().all()
    q[0, 1, 0, 3] = 1.0
    k[0, 2, 1, 0] = float("inf")  # head 1: a +inf score where q[..., 0] > 0, so inf - inf = NaN in that row
    q[0, 0, 1, 0] = 1.0
    out = ops.chunk_attention(q, k, v, cache, write=False, backend="reference")
    assert out[0, 0, 1].isnan().all() and out[0, :, 0].isfinite().all()


@pytest.mark.parametrize("scale,match", [(float("inf"), "scale must be finite"), (float("nan"), "scale must be"),
                                         (0.0, "scale must be > 0")])
def test_bad_scale_refused(scale, match):
    cache = lipforcing.RollingKVCache(1, 2, 8, chunk_size=4, window=8)
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=match):
        ops.chunk_attention(x, x, x, cache, write=False, scale=scale)


def test_head_dim_zero_refused():
    cache = lipforcing.RollingKVCache(1, 2, 8, chunk_size=4, window=8)
    x = torch.randn(1, 4, 2, 0)
    with pytest.raises(ValueError, match=r"q must have head_dim >= 1"):
        ops.chunk_attention(x, x, x, cache, write=False)


def test_short_chunk_must_be_the_last():
    cache = lipforcing.RollingKVCache(1, 2, 8, chunk_size=4, window=8, sink=1)
    full, short = torch.randn(1, 4, 2, 8), torch.randn(1, 3, 2, 8)
    ops.chunk_attention(short, short, short, cache, write=False)  # a short read is fine
    ops.chunk_attention(full, full, full, cache, write=True)
    ops.chunk_attention(short, short, short, cache, write=True)  # the stream ends here
    for x, write in ((full, True), (full, False), (short, False)):
        with pytest.raises(ValueError, match=r"already holds a short chunk \(3 of 4 tokens\).*reset"):
            ops.chunk_attention(x, x, x, cache, write=write)
    assert int(cache.pos) == 7
    cache.reset()
    ops.chunk_attention(full, full, full, cache, write=True)
    assert int(cache.pos) == 4


# ---- backend order for auto (mocked GPU capabilities; no GPU needed) ----

def _fake_gpu(monkeypatch, cc):
    from lipforcing.ops import _dispatch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    return _dispatch


@pytest.mark.parametrize("cc,first", [((8, 0), "cuda"), ((8, 9), "cuda"), ((9, 0), "triton"), ((10, 0), "triton")])
def test_auto_order_without_measurements(monkeypatch, cc, first):
    d = _fake_gpu(monkeypatch, cc)
    monkeypatch.setattr(d, "_table", lambda: ())
    order = d.auto_order("chunk_attention", torch.device("cuda", 0), torch.bfloat16, 128)
    assert order[0] == first and sorted(order) == sorted(d.BACKENDS)
    assert d.auto_order("chunk_attention", torch.device("cpu")) == d.BACKENDS


def test_auto_order_follows_the_measured_table(monkeypatch):
    d = _fake_gpu(monkeypatch, (9, 0))
    rows = ({"op": "chunk_attention", "arch": "sm_90", "dtype": "bfloat16", "head_dim": 128,
             "order": ["flash_attn", "cuda", "bogus"]},
            {"op": "chunk_attention", "arch": "sm_80", "dtype": "bfloat16", "head_dim": 128, "order": ["cudnn"]})
    monkeypatch.setattr(d, "_table", lambda: rows)
    dev = torch.device("cuda", 0)
    assert d.auto_order("chunk_attention", dev, torch.bfloat16, 128) == ("flash_attn", "cuda", "triton", "reference")
    # no row for this dtype / head_dim / op: the built-in rule (triton first on sm_90)
    assert d.auto_order("chunk_attention", dev, torch.float16, 128)[0] == "triton"
    assert d.auto_order("chunk_attention", dev, torch.bfloat16, 64)[0] == "triton"
    assert d.auto_order("denoise_update", dev, torch.bfloat16, 128)[0] == "triton"


def test_shipped_dispatch_table_is_valid():
    import json

    from lipforcing.ops import _dispatch

    data = json.loads(_dispatch.TABLE_PATH.read_text())
    assert "note" in data and isinstance(data["entries"], list)
    for row in data["entries"]:
        assert {"op", "arch", "dtype", "head_dim", "order"} <= set(row)
        assert set(row["order"]) <= set(_dispatch.BACKENDS + _dispatch.OPTIONAL_BACKENDS)


@pytest.mark.parametrize("backend", ["flash_attn", "cudnn"])
def test_library_backends_need_cuda(backend):
    cache = lipforcing.RollingKVCache(1, 2, 8, chunk_size=4, window=8)
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ops.BackendUnavailable, match=f"{backend}.*needs CUDA tensors"):
        ops.chunk_attention(x, x, x, cache, write=False, backend=backend)
    with pytest.raises(ops.BackendUnavailable, match="no flash_attn implementation"):
        ops.block_causal_attention(x, x, x, chunk_size=4, backend="flash_attn")


def test_auto_with_autograd_prefers_a_forward_that_saves_the_lse(monkeypatch):
    """When autograd records a write=False step, auto picks among the backends whose forward leaves the LSE for
    the flash-style backward (triton, reference), even where the table would put cuda first."""
    import importlib

    from lipforcing.ops import _dispatch

    mod = importlib.import_module("lipforcing.ops.chunk_attention")
    chosen = []
    real = _dispatch.resolve

    def spy(op, impls, backend, device, args, kwargs):
        chosen.append((op, tuple(impls)))
        return real(op, impls, backend, device, args, kwargs)

    monkeypatch.setattr(_dispatch, "resolve", spy)
    cache = lipforcing.RollingKVCache(1, 2, 8, chunk_size=4, window=8)
    x = torch.randn(1, 4, 2, 8)
    ops.chunk_attention(x, x, x, cache, write=False)
    ops.chunk_attention(x.requires_grad_(), x, x, cache, write=False)
    assert chosen[0][1] == tuple(mod._IMPLS) and chosen[1][1] == ("triton", "reference")


def test_dispatch_table_from_a_benchmark_run():
    """bench/update_dispatch_table.py ranks our backends by their time relative to the fastest per shape (a
    backend that missed a shape last), ignoring baselines and RoPE variants, and replaces only the matching table
    rows."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "update_dispatch_table.py"
    spec = importlib.util.spec_from_file_location("update_dispatch_table", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    t = torch.rand(4).mul(0.4).add(1.0).tolist()  # in [1, 1.4): the three backends' ranges do not overlap
    shapes = [dict(Lq=3072, Lk=7168, H=12, D=128), dict(Lq=3072, Lk=7168, H=40, D=128)]
    rows = [dict(op="chunk_attention", backend=b, shape=s, dtype="bfloat16", median_us=us * (1 + i))
            for i, s in enumerate(shapes)
            for b, us in (("cuda", 30 * t[0]), ("triton", 10 * t[1]), ("flash_attn", 20 * t[2]),
                          ("sdpa_flash", 1.0), ("triton_rope", 1.0))]
    rows.append(dict(op="chunk_attention", backend="cudnn", shape=shapes[0], dtype="bfloat16", median_us=0.5))
    (entry,) = tool.rank(rows, "sm_90", "run.json")
    assert entry["order"][:3] == ["triton", "flash_attn", "cuda"] and entry["order"][-1] == "cudnn"
    assert (entry["op"], entry["arch"], entry["dtype"], entry["head_dim"]) == ("chunk_attention", "sm_90",
                                                                              "bfloat16", 128)
    old = {"note": "n", "entries": [dict(entry, order=["cuda"]), dict(entry, arch="sm_80", order=["cuda"])]}
    merged = tool.merge(old, [entry])
    assert merged["note"] == "n" and len(merged["entries"]) == 2
    assert {e["arch"]: e["order"][0] for e in merged["entries"]} == {"sm_80": "cuda", "sm_90": "triton"}


# ---- q_rotated / chunk_in_cache (q rotated and the chunk stored ahead by ops.qk_norm) ----

def _prepared_setup():
    cache = lipforcing.RollingKVCache(1, 2, 8, chunk_size=4, window=8, sink=2)
    return cache, ops.rope_spec(8, (1, 2), max_frames=8), torch.randn(1, 4, 2, 8)


def test_prepared_flag_errors():
    cache, rope, x = _prepared_setup()
    with pytest.raises(ValueError, match=r"chunk_in_cache=True needs write=True"):
        ops.chunk_attention(x, x, x, cache, write=False, rope=rope, chunk_in_cache=True)
    with pytest.raises(ValueError, match=r"q_rotated=True needs rope="):
        ops.chunk_attention(x, x, x, cache, write=True, q_rotated=True)
    with pytest.raises(TypeError, match="q_rotated must be a bool"):
        ops.chunk_attention(x, x, x, cache, write=True, rope=rope, q_rotated=1)
    with pytest.raises(TypeError, match="chunk_in_cache must be a bool"):
        ops.chunk_attention(x, x, x, cache, write=True, chunk_in_cache=None)
    with pytest.raises(ValueError, match=r"q_rotated=True\) has no backward"):
        ops.chunk_attention(x.clone().requires_grad_(), x, x, cache, write=False, rope=rope, q_rotated=True)
    assert int(cache.pos) == 0 and not cache.k.any()
    # chunk_in_cache without rope (absolute mode) is fine: the store is skipped, pos advances
    ops.chunk_attention(x, x, x, cache, write=True, chunk_in_cache=True, backend="reference")
    assert int(cache.pos) == 4 and not cache.k.any()


def test_cuda_backend_declines_the_flags(monkeypatch):
    """lipforcing/ops/cuda is not flag-aware: the op's wrapper declines the flags before the CUDA module's own
    checks, so an explicit backend='cuda' names them and auto falls back; without flags the CUDA checks run."""
    import importlib

    from lipforcing.ops import _dispatch

    mod = importlib.import_module("lipforcing.ops.chunk_attention")
    cuda_mod = importlib.import_module("lipforcing.ops.cuda.chunk_attention")
    cache, rope, x = _prepared_setup()
    args = (x, x, x, cache.k, cache.v, cache.pos, 4, 8, 2, True, 0.3, rope.cos, rope.sin, 1, 2)
    assert "needs CUDA tensors" in mod._cuda_unsupported(*args, False, False)
    for flags in ((True, False), (False, True), (True, True)):
        assert "q_rotated / chunk_in_cache" in mod._cuda_unsupported(*args, *flags)
    # pretend the CUDA backend could run CPU tensors: the flags alone turn it down
    real_applicable = _dispatch._applicable
    monkeypatch.setattr(_dispatch, "_applicable",
                        lambda name, device, explicit: None if name == "cuda" else real_applicable(name, device,
                                                                                                   explicit))
    monkeypatch.setattr(cuda_mod, "chunk_attention_cuda_unsupported", lambda *a: None)
    with pytest.raises(ops.BackendUnavailable, match="pre-rotated q or pre-written chunk"):
        ops.chunk_attention(x, x, x, cache, write=True, rope=rope, q_rotated=True, backend="cuda")
    assert _dispatch.resolve("chunk_attention", mod._IMPLS, "auto", x.device, args + (False, False), {}) == "cuda"
    assert _dispatch.resolve("chunk_attention", mod._IMPLS, "auto", x.device, args + (True, True), {}) != "cuda"
    # so the chunk step does not prepare q / the chunk for a backend that would then be skipped
    assert not mod.takes_prepared(x, cache, write=True, rope=rope)
    assert mod.takes_prepared(x, cache, write=True, rope=rope, backend="reference")
    assert not mod.takes_prepared(x, cache, write=True, rope=None, backend="reference")


def test_opcheck_with_the_flags():
    cache, rope, _ = _prepared_setup()
    for _ in range(3):
        x = torch.randn(1, 4, 2, 8)
        ops.chunk_attention(x, x, x, cache, write=True, backend="reference")
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    for write in (False, True):
        torch.library.opcheck(torch.ops.lipforcing.chunk_attention.default,
                              (q, k, v, cache.k, cache.v, cache.pos, 4, 8, 2, write, 0.3, rope.cos, rope.sin, 1, 2,
                               "reference", True, write))
    torch.library.opcheck(torch.ops.lipforcing.chunk_attention_read.default,
                          (q, k, v, cache.k, cache.v, cache.pos, 4, 8, 2, 0.3, rope.cos, rope.sin, 1, 2, "reference",
                           True))
