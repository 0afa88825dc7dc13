"""GPU tier for denoise_update: the CUDA and Triton backends against the reference, in fp32/bf16/fp16.

Explicit noise: bitwise equal to the reference (no FMA contraction, same operation order).  Seeded noise: the same
(seed, offset) gives the same noise on every backend (up to the last-ulp rounding of log/cos).  CUDA-graph
capture with t / t_next / seed / offset as device tensors changed between replays.  One launch, no host sync.
"""
import pytest
import torch

from lipforcing.ops import denoise_update
from lipforcing.ops._dispatch import BackendUnavailable
from lipforcing.ops.reference import philox4x32, philox_normal

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (1, 16, 3, 64, 64) is one chunk of latents; the others are odd sizes, a vector tail and a sample boundary that
# falls inside a 16-byte vector.
SHAPES = [(1, 16, 3, 64, 64), (3, 5, 7), (2, 4099), (5, 3, 1, 1, 3)]
# One output ulp (relative) per dtype: seeded noise may differ from the reference in the last float32 bit,
# which can flip the final rounding to a low-precision dtype.
ULP = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _available(backend):
    if backend == "cuda":
        from lipforcing.ops import cuda as cuda_ext

        reason = cuda_ext.unavailable_reason()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(params=["cuda", "triton"])
def backend(request):
    _available(request.param)
    return request.param


def _inputs(shape, dtype, n=3):
    return [torch.randn(shape, device=DEV).to(dtype) for _ in range(n)]


def _close(a, b, dtype, atol=4e-6):
    torch.testing.assert_close(a.float(), b.float(), rtol=ULP[dtype], atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_explicit_noise_exact(backend, shape, dtype):
    x, f, n = _inputs(shape, dtype)
    got = denoise_update(x, f, 0.999, 0.769, noise=n, backend=backend)
    ref = denoise_update(x, f, 0.999, 0.769, noise=n, backend="reference")
    cpu = denoise_update(x.cpu(), f.cpu(), 0.999, 0.769, noise=n.cpu(), backend="reference")
    for g, r, c in zip(got, ref, cpu):
        assert g.dtype == dtype
        assert torch.equal(g, r)
        assert torch.equal(g.cpu(), c)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_and_mixed_dtypes(backend, dtype):
    # Offsets of one element break 16-byte alignment (the CUDA backend's generic kernel); fp32 outputs and fp32
    # noise for low-precision inputs mix dtypes.
    base = _inputs((4 * 1000 + 1,), dtype)
    x, f = base[0][1:].view(4, 1000), base[1][1:].view(4, 1000)
    n = torch.randn(4, 1000, device=DEV)
    outs = (torch.empty(4, 1000, device=DEV), torch.empty(4 * 1000 + 1, device=DEV, dtype=dtype)[1:].view(4, 1000))
    got = denoise_update(x, f, 0.9, 0.3, noise=n, out=outs, backend=backend)
    ref = denoise_update(x, f, 0.9, 0.3, noise=n, backend="reference")
    assert got[0] is outs[0] and got[1] is outs[1]
    assert torch.equal(got[0], x.float() - 0.9 * f.float())
    assert torch.equal(got[1], ref[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_seeded_noise_same_on_every_backend(shape, dtype):
    x, f, _ = _inputs(shape, dtype)
    outs = {}
    for b in ("cuda", "triton", "reference"):
        try:
            outs[b] = denoise_update(x, f, 0.999, 0.769, seed=20260611, offset=3, backend=b)
        except BackendUnavailable:
            continue
    cpu = denoise_update(x.cpu(), f.cpu(), 0.999, 0.769, seed=20260611, offset=3, backend="reference")
    assert "triton" in outs
    for b, (x0, xn) in outs.items():
        assert torch.equal(x0.cpu(), cpu[0]), b
        _close(xn.cpu(), cpu[1], dtype)


@pytest.mark.parametrize("seed, offset", [(0, 0), (-1, 2**40 + 7), (2**64 - 5, 2**63 + 9)])
def test_raw_noise_is_the_documented_scheme(backend, seed, offset):
    x = torch.randn(7, 1001, device=DEV)
    _, eps = denoise_update(x, x, 0.0, 1.0, seed=seed, offset=offset, backend=backend)
    signed = lambda v: (v + 2**63) % 2**64 - 2**63  # noqa: E731
    want = philox_normal(x.numel(), signed(seed), signed(offset), "cpu")
    torch.testing.assert_close(eps.flatten().cpu(), want, rtol=0, atol=4e-6)


def test_noise_statistics_and_seeds(backend):
    x = torch.zeros(1_000_003, device=DEV)
    _, e1 = denoise_update(x, x, 0.0, 1.0, seed=7, offset=0, backend=backend)
    _, e2 = denoise_update(x, x, 0.0, 1.0, seed=7, offset=0, backend=backend)
    _, e3 = denoise_update(x, x, 0.0, 1.0, seed=8, offset=0, backend=backend)
    _, e4 = denoise_update(x, x, 0.0, 1.0, seed=7, offset=1, backend=backend)
    assert torch.equal(e1, e2)
    assert not torch.equal(e1, e3) and not torch.equal(e1, e4)
    e = e1.double()
    n = e.numel()
    assert abs(e.mean().item()) < 5 / n**0.5  # 5 sigma
    assert abs(e.std().item() - 1.0) < 5 * (0.5 / n) ** 0.5
    assert abs((e[1:] * e[:-1]).mean().item()) < 5 / n**0.5  # lag-1 correlation
    assert abs((e1.double() * e3.double()).mean().item()) < 5 / n**0.5  # independent streams


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.bfloat16])
def test_per_sample_times(backend, t_dtype):
    x, f, n = _inputs((3, 2, 37), torch.float32)  # 74 elements per sample: boundaries inside vectors
    t = torch.tensor([0.999, 0.5, 0.1], device=DEV, dtype=t_dtype)
    tn = torch.tensor([0.769, 0.0, 0.3], device=DEV, dtype=t_dtype)
    got = denoise_update(x, f, t, tn, noise=n, backend=backend)
    ref = denoise_update(x, f, t, tn, noise=n, backend="reference")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    got = denoise_update(x, f, t, tn, seed=5, offset=torch.tensor(9, device=DEV), backend=backend)
    ref = denoise_update(x, f, t, tn, seed=5, offset=9, backend="reference")
    assert torch.equal(got[0], ref[0])
    _close(got[1], ref[1], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_t_next_zero_returns_x0(backend, dtype):
    x, f = _inputs((2, 16, 3, 8, 8), dtype, n=2)
    x0, xn = denoise_update(x, f, 0.769, 0.0, backend=backend)
    assert torch.equal(x0, xn)
    x0, xn = denoise_update(x, f, torch.tensor(0.769, device=DEV), torch.zeros((), device=DEV), seed=1,
                            backend=backend)
    assert torch.equal(x0, xn)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_aliasing_inputs(backend, dtype):
    x, f, n = _inputs((2, 16, 3, 8, 9), dtype)
    ref = denoise_update(x, f, 0.999, 0.769, noise=n, backend="reference")
    xa, fa = x.clone(), f.clone()
    got = denoise_update(xa, fa, 0.999, 0.769, noise=n, out=(xa, fa), backend=backend)
    assert got[0] is xa and got[1] is fa
    assert torch.equal(xa, ref[0]) and torch.equal(fa, ref[1])


def test_one_launch_and_no_host_sync(backend):
    x, f = _inputs((1, 16, 3, 64, 64), torch.bfloat16, n=2)
    t, tn = torch.tensor(0.999, device=DEV), torch.tensor(0.769, device=DEV)
    seed, offset = torch.tensor(1, device=DEV), torch.tensor(2, device=DEV)
    outs = (torch.empty_like(x), torch.empty_like(x))
    denoise_update(x, f, t, tn, seed=seed, offset=offset, out=outs, backend=backend)  # warm-up / JIT
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any implicit host sync inside the op raises
    try:
        denoise_update(x, f, t, tn, seed=seed, offset=offset, out=outs, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        denoise_update(x, f, t, tn, seed=seed, offset=offset, out=outs, backend=backend)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    assert len(kernels) == 1, kernels
    assert "denoise_update" in kernels[0], kernels


def test_cuda_graph_replay_with_changing_scalars(backend):
    x, f = _inputs((2, 16, 3, 16, 16), torch.bfloat16, n=2)
    t = torch.tensor(0.999, device=DEV)
    tn = torch.tensor([0.769, 0.5], device=DEV)
    seed = torch.tensor(123, device=DEV)
    offset = torch.tensor(0, device=DEV)
    outs = (torch.empty_like(x), torch.empty_like(x))

    def step():
        denoise_update(x, f, t, tn, seed=seed, offset=offset, out=outs, backend=backend)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up (Triton JIT, dispatch caches) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    seen = []
    for t_val, tn_val, off_val in ((0.999, (0.769, 0.5), 0), (0.769, (0.0, 0.25), 1), (0.5, (0.9, 0.1), 2)):
        t.fill_(t_val)
        tn.copy_(torch.tensor(tn_val, device=DEV))
        offset.fill_(off_val)
        graph.replay()
        torch.cuda.synchronize()
        ref = denoise_update(x, f, t_val, tn.clone(), seed=123, offset=off_val, backend="reference")
        assert torch.equal(outs[0], ref[0])
        _close(outs[1], ref[1], torch.bfloat16)
        seen.append(outs[1].clone())
    assert not torch.equal(seen[0], seen[2])  # a new offset gives fresh noise without re-capture


@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_int64_indexing_beyond_2_pow_32(backend_name):
    # 2^32 + 1027 fp16 elements: flat indices pass 2^31 (int64 addressing) and 2^32 (the counter's high word);
    # check the last elements against the scheme evaluated at their indices.
    _available(backend_name)
    numel = 2**32 + 1027
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 26 GiB of GPU memory")
    x = torch.zeros(numel, device=DEV, dtype=torch.float16)
    xn = torch.empty_like(x)
    denoise_update(x, x, 0.0, 1.0, seed=77, offset=5, out=(torch.empty_like(x), xn), backend=backend_name)
    i = torch.arange(numel - 4096, numel, dtype=torch.int64)
    r0, r1, _, _ = philox4x32(i & 0xFFFFFFFF, i >> 32, torch.full_like(i, 5), torch.zeros_like(i),
                              torch.tensor(77), torch.tensor(0))
    u1 = ((r0 >> 8) + 1).float() * 2.0**-24
    u2 = (r1 >> 8).float() * 2.0**-24
    want = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    torch.testing.assert_close(xn[-4096:].float().cpu(), want, rtol=2**-10, atol=1e-3)
    del x, xn
    torch.cuda.empty_cache()


# --- hardening (issue 13): layouts on every backend, auto included ----------------------------------------------

def _layout(kind, shape, dtype):
    if kind == "transposed":
        return torch.randn(shape[::-1], device=DEV).to(dtype).permute(*range(len(shape) - 1, -1, -1))
    if kind == "sliced":
        return torch.randn(shape[0], 2 * shape[1] + 1, *shape[2:], device=DEV).to(dtype)[:, 1::2]
    return torch.randn(1, shape[1], *([1] * (len(shape) - 2)), device=DEV).to(dtype).expand(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("name", ["cuda", "triton", "auto"])
def test_layouts_on_every_backend(name, kind, dtype):
    if name == "cuda":
        _available("cuda")
    shape = (2, 16, 3, 8, 9)
    x, f, n = (_layout(kind, shape, dtype) for _ in range(3))
    x0, xn = denoise_update(x, f, 0.999, 0.769, noise=n, backend=name)
    r0, rn = denoise_update(x.contiguous(), f.contiguous(), 0.999, 0.769, noise=n.contiguous(), backend="reference")
    assert x0.is_contiguous() and xn.is_contiguous()
    assert torch.equal(x0, r0) and torch.equal(xn, rn)


def test_partly_overlapping_out_is_refused(backend):
    x, f, n = _inputs((2, 64), torch.float32)
    buf = torch.randn(300, device=DEV)
    with pytest.raises(ValueError, match="must not overlap"):
        denoise_update(x, f, 0.9, 0.3, noise=n, out=(buf[:128].view(2, 64), buf[1:129].view(2, 64)),
                       backend=backend)
