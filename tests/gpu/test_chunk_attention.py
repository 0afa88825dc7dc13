"""GPU tier of chunk_attention: every backend (triton, cuda, and the library backends flash_attn / cudnn) x
fp32/fp16/bf16, with and without dynamic RoPE, write=False and write=True, against the fp32 reference; the sm_90
wgmma kernel (raw, with per-batch key counts, and through backend="cuda"); the Triton
backward; a CUDA-graph capture of a loop of chunk steps (no allocation, no host sync per step).

Pass rule (FlashAttention's): error vs the fp32 reference <= 2 x the error of plain PyTorch in the same dtype
(scores and P @ V computed in that dtype) + a small floor."""
import pytest
import torch

from lipforcing import RollingKVCache
from lipforcing.ops import chunk_attention, rope_spec
from lipforcing.ops.reference import (cache_slot_positions, cache_write_ref, chunk_attention_ref,
                                      window_relative_positions)
from lipforcing.ops.rope import rotate

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def _can_run(backend, dtype, head_dim):
    if backend in ("flash_attn", "cudnn"):
        if dtype == torch.float32:
            return f"{backend}: fp16/bf16 only"
        if backend == "flash_attn" and _dense_missing("flash_attn"):
            return "flash-attn is not installed"
        if backend == "cudnn" and not torch.backends.cudnn.is_available():
            return "no cuDNN"
    if backend == "cuda":
        from lipforcing.ops import cuda as ext

        if ext.unavailable_reason() is not None:
            return ext.unavailable_reason()
        if dtype == torch.float32 or head_dim not in (64, 128):
            return "cuda kernel: fp16/bf16, head_dim 64/128"
    return None


def _dense_missing(name):
    from lipforcing.ops.chunk_attention_dense import _flash_modules

    return all(f is None for f in _flash_modules())


def _plain_torch(q, k, v, k_cache, v_cache, pos, chunk, window, sink, scale, rope):
    """chunk attention the plain PyTorch way in q's dtype (gather keys, scores and P @ V in low precision)."""
    n = q.shape[1]
    slot_pos, valid = cache_slot_positions(pos, sink, k_cache.shape[1] - sink)
    valid = valid & ((slot_pos < sink) | (slot_pos >= torch.clamp(pos + chunk - window, min=sink)))
    cur = pos + torch.arange(n, device=q.device)
    keys_k, keys_v = torch.cat([k_cache, k], 1), torch.cat([v_cache, v], 1)
    valid = torch.cat([valid, torch.ones(n, dtype=torch.bool, device=q.device)])
    if rope is not None:
        tpf = rope.tokens_per_frame
        end = pos + chunk
        key_abs = torch.cat([slot_pos, cur])
        q = rotate(q, window_relative_positions(cur, end, window, sink) // tpf, cur % tpf, rope).to(k.dtype)
        keys_k = rotate(keys_k, window_relative_positions(key_abs, end, window, sink) // tpf,
                        key_abs.clamp(min=0) % tpf, rope).to(k.dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q, keys_k) * scale
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s.float(), -1).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, keys_v)


@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda", "flash_attn", "cudnn"])
def test_backend_vs_reference(backend, dtype, head_dim, use_rope):
    why = _can_run(backend, dtype, head_dim)
    if why:
        pytest.skip(why)
    B, H, grid = 2, 3, (4, 8)  # 32 tokens per frame
    chunk, window, sink = 96, 288, 32  # 3, 9 and 1 frames: ring of 192 slots, wrapped several times below
    rope = rope_spec(head_dim, grid, device="cuda") if use_rope else None
    cache = RollingKVCache(B, H, head_dim, chunk_size=chunk, window=window, sink=sink, dtype=dtype, device="cuda")
    scale = head_dim ** -0.5
    # the library backends run full chunks only (auto would fall back to Triton for the short last one)
    for n in [chunk] * 7 + ([] if backend in ("flash_attn", "cudnn") else [40]):
        q, k, v = (torch.randn(B, n, H, head_dim, device="cuda").to(dtype) for _ in range(3))
        args = (cache.k, cache.v, cache.pos)
        ref = chunk_attention_ref(q.float(), k.float(), v.float(), cache.k.float(), cache.v.float(), cache.pos.clone(),
                                  chunk_size=chunk, window=window, sink=sink, write=False, scale=scale, rope=rope)
        plain = _plain_torch(q, k, v, *args, chunk, window, sink, scale, rope)
        k_before = cache.k.clone()
        read = chunk_attention(q, k, v, cache, write=False, rope=rope, backend=backend)
        assert torch.equal(cache.k, k_before)
        err = (read.float() - ref).abs().max().item()
        assert err <= 2 * (plain.float() - ref).abs().max().item() + FLOOR[dtype], f"{backend} write=False {err}"
        out = chunk_attention(q, k, v, cache, write=True, rope=rope, backend=backend)
        err = (out.float() - ref).abs().max().item()
        err_pt = (plain.float() - ref).abs().max().item()
        assert err <= 2 * err_pt + FLOOR[dtype], f"{backend} {dtype}: error {err} vs plain PyTorch {err_pt}"
        # the write went through the reference's rule too
        expect_k = k_before.clone()
        cache_write_ref(k, v, expect_k, torch.empty_like(expect_k), cache.pos - n, sink=sink)
        assert torch.equal(cache.k, expect_k)


@pytest.mark.parametrize("backend", ["triton", "cuda", "flash_attn", "cudnn"])
def test_cuda_graph_capture_of_chunk_loop(backend):
    """A loop of chunk steps (write=True) captured once and replayed equals eager execution: nothing in a step
    allocates outside the graph pool or reads pos on the host."""
    dtype, D = torch.bfloat16, 128
    why = _can_run(backend, dtype, D)
    if why:
        pytest.skip(why)
    B, H, chunk, window, sink, steps = 1, 4, 128, 384, 64, 5
    cache = RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink, dtype=dtype, device="cuda")
    rope = rope_spec(D, (8, 8), device="cuda")
    qkv = [[torch.randn(B, chunk, H, D, device="cuda", dtype=dtype) for _ in range(3)] for _ in range(steps)]

    def loop():
        return [chunk_attention(q, k, v, cache, write=True, rope=rope, backend=backend) for q, k, v in qkv]

    eager = loop()  # also compiles / loads the kernels before capture
    eager_k = cache.k.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cache.reset()
        with torch.cuda.graph(graph, stream=s):
            captured = loop()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(2):  # replay twice from an empty cache: same results each time
        cache.reset()
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, eager):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert torch.equal(cache.k, eager_k)
        assert int(cache.pos) == steps * chunk


@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_backward_vs_reference(dtype, use_rope):
    """The Triton flash-style backward (write=False) against the fp32 reference backward, 2x rule vs plain PyTorch
    autograd in the same dtype."""
    B, H, D, grid = 1, 4, 128, (4, 8)
    chunk, window, sink = 96, 288, 32
    rope = rope_spec(D, grid, device="cuda") if use_rope else None
    cache = RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink, dtype=dtype, device="cuda")
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(B, chunk, H, D, device="cuda").to(dtype)
            chunk_attention(x, torch.randn_like(x), torch.randn_like(x), cache, write=True, rope=rope)
    q, k, v, g = (torch.randn(B, chunk, H, D, device="cuda").to(dtype) for _ in range(4))
    grads = {}
    for name, dt, backend in (("tri", dtype, "triton"), ("ref", torch.float32, "reference")):
        c = cache
        if dt != dtype:
            c = RollingKVCache(B, H, D, chunk_size=chunk, window=window, sink=sink, dtype=dt, device="cuda")
            c.k.copy_(cache.k), c.v.copy_(cache.v), c.pos.copy_(cache.pos)
        leaves = [x.to(dt).requires_grad_() for x in (q, k, v)]
        out = chunk_attention(*leaves, c, write=False, rope=rope, backend=backend)
        grads[name] = torch.autograd.grad(out, leaves, g.to(dt))
    scale = D ** -0.5
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    plain = _plain_torch(*leaves, cache.k, cache.v, cache.pos, chunk, window, sink, scale, rope)
    grads["plain"] = torch.autograd.grad(plain, leaves, g)
    for i, name in enumerate("qkv"):
        err = (grads["tri"][i].float() - grads["ref"][i]).abs().max().item()
        err_pt = (grads["plain"][i].float() - grads["ref"][i]).abs().max().item()
        assert err <= 2 * err_pt + FLOOR[dtype], f"d{name} {dtype}: error {err} vs plain PyTorch {err_pt}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_tensors_on_another_device_than_the_current_one(backend):
    """Device guard: tensors on cuda:1 while cuda:0 is current run on cuda:1 (forward, write, backward)."""
    dtype, D = torch.float16, 64
    why = _can_run(backend, dtype, D)
    if why:
        pytest.skip(why)
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    cache = RollingKVCache(1, 2, D, chunk_size=32, window=64, sink=16, dtype=dtype, device=dev)
    ref_cache = RollingKVCache(1, 2, D, chunk_size=32, window=64, sink=16, dtype=torch.float32, device=dev)
    for _ in range(4):
        q, k, v = (torch.randn(1, 32, 2, D, device=dev, dtype=dtype) for _ in range(3))
        out = chunk_attention(q, k, v, cache, write=True, backend=backend)
        ref = chunk_attention(q.float(), k.float(), v.float(), ref_cache, write=True, backend="reference")
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = chunk_attention(*leaves, cache, write=False, backend="triton")
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert all(g.device == dev and g.isfinite().all() for g in grads)
    assert torch.cuda.current_device() == 0



def _kernel_tiles(pos, n, window, sink, block=64):
    """(key tiles, keys in the last tile, ring wrapped) of the mma.sync kernel's key walk at this step (see the
    header of csrc/chunk_attention.cu)."""
    total = min(pos, sink) + min(max(pos - sink, 0), window) + n
    return -(-total // block), total - (total - 1) // block * block, pos - sink > window


def _mma_sync_chunk_attention(q, k, v, cache, rope, scale):
    """The sm_80+ mma.sync kernel itself (lipforcing._C.chunk_attention, launch_chunk_attention), write=True,
    whatever kernel the cuda backend dispatches to on this GPU."""
    from lipforcing.ops.cuda import DTYPE_CODES, extension, stream_handle

    B, n, H, D = q.shape
    out = torch.empty_like(q)
    strides = [s for t in (q, k, v, cache.k, cache.v, out) for s in t.stride()[:3]]
    gh, gw = rope.grid if rope is not None else (1, 1)
    with torch.cuda.device(q.device):
        extension().chunk_attention(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), cache.pos.data_ptr(),
            out.data_ptr(), rope.cos.data_ptr() if rope is not None else 0,
            rope.sin.data_ptr() if rope is not None else 0, strides, B, n, H, D, cache.chunk_size, cache.window,
            cache.sink, gh, gw, float(scale), DTYPE_CODES[q.dtype], True, stream_handle(q))
    return out


# (chunk, window, sink, head_dim): streams of 7 full chunks and a short one whose key walks cover one tile, even
# and odd tile counts, key counts that are not multiples of the 64-key tile (and, second case, are), row tables
# not aligned to tiles (sink 8), whole tiles of stale ring slots (sink 64, chunk 64) and a wrapped ring.
PIPELINE_CASES = [(40, 120, 8, 64), (64, 192, 64, 128)]


@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk,window,sink,head_dim", PIPELINE_CASES)
def test_mma_sync_pipeline_edges(chunk, window, sink, head_dim, dtype, use_rope):
    """The cp.async double buffer of the mma.sync kernel, every step of a stream against the fp32 reference (2x
    rule).  Cache slots never written hold NaN: a masked row that is read instead of zero-filled shows up."""
    why = _can_run("cuda", dtype, head_dim)
    if why:
        pytest.skip(why)
    B, H, grid = 1, 2, (2, 4)  # 8 tokens per frame: chunk, window and sink are whole frames
    rope = rope_spec(head_dim, grid, device="cuda") if use_rope else None
    cache = RollingKVCache(B, H, head_dim, chunk_size=chunk, window=window, sink=sink, dtype=dtype, device="cuda")
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    written = torch.zeros(cache.k.shape[1], dtype=torch.bool, device="cuda")
    scale = head_dim ** -0.5
    seen, pos = set(), 0
    for n in [chunk] * 7 + [13]:
        tiles, last, wrapped = _kernel_tiles(pos, n, window, sink)
        seen |= {"one tile" if tiles == 1 else ("odd" if tiles % 2 else "even"), "partial" if last < 64 else "full"}
        seen |= {"wrapped"} if wrapped else set()
        q, k, v = (torch.randn(B, n, H, head_dim, device="cuda").to(dtype) for _ in range(3))
        # the reference and plain PyTorch see zeros where the kernel sees NaN (slots it must never read)
        kc, vc = (torch.where(written[None, :, None, None], c, 0) for c in (cache.k, cache.v))
        ref = chunk_attention_ref(q.float(), k.float(), v.float(), kc.float(), vc.float(), cache.pos.clone(),
                                  chunk_size=chunk, window=window, sink=sink, write=False, scale=scale, rope=rope)
        plain = _plain_torch(q, k, v, kc, vc, cache.pos, chunk, window, sink, scale, rope)
        out = _mma_sync_chunk_attention(q, k, v, cache, rope, scale)
        err = (out.float() - ref).abs().max().item()
        err_pt = (plain.float() - ref).abs().max().item()
        assert err <= 2 * err_pt + FLOOR[dtype], f"pos {pos} ({tiles} tiles): error {err} vs plain PyTorch {err_pt}"
        assert int(cache.pos) == pos + n
        slots = torch.arange(pos, pos + n, device="cuda")
        written[torch.where(slots < sink, slots, sink + (slots - sink) % window)] = True
        pos += n
    assert seen >= {"one tile", "odd", "even", "partial", "wrapped"}, seen
    assert "full" in seen or chunk % 64, seen


def _sm90_extension():
    """lipforcing._C when the sm_90 wgmma kernel can run here, else skip."""
    from lipforcing.ops import cuda as ext

    why = ext.unavailable_reason()
    if why:
        pytest.skip(why)
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel (sm_90a) runs on compute capability 9.0 only")
    if not hasattr(ext.extension(), "chunk_attention_sm90"):
        pytest.skip("lipforcing._C was built without the sm_90a kernels")
    return ext.extension()


@pytest.mark.parametrize("counts", ["random", (517, 1), (128, 256)], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sm90_kernel_vs_reference(dtype, head_dim, counts):
    """The wgmma kernel on its own: batch 2 with different valid-key counts (random ones, mostly not multiples of
    the 128-key tile; all slots and a single key; exact multiples of the tile), n not a multiple of the 128-row
    tile, q a strided view of a fused qkv tensor; stale slots past the count hold large values that must not leak
    in.  2x rule vs plain PyTorch in the same dtype."""
    from lipforcing.ops.cuda import DTYPE_CODES

    ext = _sm90_extension()
    B, n, H, slots = 2, 200, 3, 517
    if counts == "random":  # up to 5 key tiles in the first row (the 2-stage ring wraps), at most 2 in the second
        counts = (torch.randint(1, slots + 1, ()).item(), torch.randint(1, 257, ()).item())
    counts = torch.tensor(counts, dtype=torch.int32, device="cuda")
    qkv = torch.randn(B, n, 3, H, head_dim, device="cuda").to(dtype)
    q = qkv[:, :, 0]
    k, v = (torch.randn(B, slots, H, head_dim, device="cuda").to(dtype) for _ in range(2))
    valid = torch.arange(slots, device="cuda")[None, :] < counts[:, None].long()  # (B, slots)
    k.masked_fill_(~valid[:, :, None, None], 30.0)
    v.masked_fill_(~valid[:, :, None, None], 1000.0)
    out = torch.full((B, n, H, head_dim), float("nan"), device="cuda", dtype=dtype)
    scale = head_dim ** -0.5
    strides = [s for t in (q, k, v, out) for s in t.stride()[:3]]
    ext.chunk_attention_sm90(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), counts.data_ptr(), strides,
                             B, n, slots, H, head_dim, scale, DTYPE_CODES[dtype],
                             torch.cuda.current_stream().cuda_stream)

    def attention(dt):
        s = torch.einsum("bqhd,bkhd->bhqk", q.to(dt), k.to(dt)) * scale
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s.float(), -1).to(dt), v.to(dt))

    ref, plain = attention(torch.float32), attention(dtype)
    assert out.isfinite().all()
    err = (out.float() - ref).abs().max().item()
    err_pt = (plain.float() - ref).abs().max().item()
    assert err <= 2 * err_pt + FLOOR[dtype], f"counts {counts.tolist()}: error {err} vs plain PyTorch {err_pt}"


@pytest.mark.parametrize("heads", [12, 40])
@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sm90_chunk_steps_vs_reference(dtype, use_rope, heads):
    """backend="cuda" on sm_90 runs the dense step + wgmma kernel for full chunks: write=False and write=True,
    with and without dynamic RoPE, the 1.3B / 14B head counts at reduced length (1 sink frame, 9-frame window,
    3-frame chunks of 128 tokens per frame), through the ring's wrap-around; 2x rule vs plain PyTorch."""
    from lipforcing.ops.cuda.chunk_attention import sm90_problem

    _sm90_extension()
    B, D, grid = 1, 128, (8, 16)
    chunk, window, sink = 384, 1152, 128
    rope = rope_spec(D, grid, device="cuda") if use_rope else None
    cache = RollingKVCache(B, heads, D, chunk_size=chunk, window=window, sink=sink, dtype=dtype, device="cuda")
    scale = D ** -0.5
    for _ in range(5):
        q, k, v = (torch.randn(B, chunk, heads, D, device="cuda").to(dtype) for _ in range(3))
        assert sm90_problem(q, chunk) is None
        args = (cache.k, cache.v, cache.pos)
        ref = chunk_attention_ref(q.float(), k.float(), v.float(), cache.k.float(), cache.v.float(), cache.pos.clone(),
                                  chunk_size=chunk, window=window, sink=sink, write=False, scale=scale, rope=rope)
        err_pt = (_plain_torch(q, k, v, *args, chunk, window, sink, scale, rope).float() - ref).abs().max().item()
        k_before = cache.k.clone()
        read = chunk_attention(q, k, v, cache, write=False, rope=rope, backend="cuda")
        assert torch.equal(cache.k, k_before)
        err = (read.float() - ref).abs().max().item()
        assert err <= 2 * err_pt + FLOOR[dtype], f"write=False: error {err} vs plain PyTorch {err_pt}"
        out = chunk_attention(q, k, v, cache, write=True, rope=rope, backend="cuda")
        err = (out.float() - ref).abs().max().item()
        assert err <= 2 * err_pt + FLOOR[dtype], f"write=True: error {err} vs plain PyTorch {err_pt}"
        expect_k = k_before.clone()
        cache_write_ref(k, v, expect_k, torch.empty_like(expect_k), cache.pos - chunk, sink=sink)
        assert torch.equal(cache.k, expect_k)
