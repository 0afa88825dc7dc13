"""denoise_update: the fused step (one launch, in-kernel Philox noise) vs the PyTorch composition.

Shapes: one chunk of latents (1 x 16 x 3 x 64 x 64, launch-bound) and 64 M elements (bandwidth-bound).  Bytes moved
by the fused op: read x_t and flow, write x0 and x_next (4 x numel x itemsize).  ``torch_copy`` copies the same
number of bytes (a 2 x numel tensor into another) and is the bandwidth roof; ``torch`` is the eager composition a
sampler would write (casts, randn_like, two axpys).  Targets (issue 5): fused >= 3x the composition at chunk size,
>= 80% of the copy bandwidth at 64 M elements.  GPU only (bench/conftest.py skips without one).
"""
import pytest
import torch

from lipforcing.ops import BackendUnavailable, denoise_update

pytestmark = pytest.mark.gpu

SHAPES = {"chunk": (1, 16, 3, 64, 64), "64M": (64 * 2**20,)}
_results: dict = {}


def _composition(x, f, t, tn, gen):
    x0 = x.float() - t * f.float()
    eps = torch.randn(x0.shape, device=x0.device, generator=gen)
    xn = (1.0 - tn) * x0 + tn * eps
    return x0.to(x.dtype), xn.to(x.dtype)


def _backend_ok(backend):
    if backend == "cuda":
        from lipforcing.ops import cuda as cuda_ext

        if cuda_ext.unavailable_reason() is not None:
            pytest.skip(cuda_ext.unavailable_reason())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch", "torch_copy"])
def test_bench_denoise_update(bench_record, backend, size, dtype):
    _backend_ok(backend)
    shape = SHAPES[size]
    x = torch.randn(shape, device="cuda").to(dtype)
    f = torch.randn(shape, device="cuda").to(dtype)
    numel = x.numel()
    nbytes = 4 * numel * x.element_size()
    if backend == "torch":
        gen = torch.Generator(device="cuda").manual_seed(0)

        def fn():
            return _composition(x, f, 0.999, 0.769, gen)
    elif backend == "torch_copy":
        src = torch.empty(2 * numel, device="cuda", dtype=dtype)
        dst = torch.empty_like(src)

        def fn():
            return dst.copy_(src)
    else:
        outs = (torch.empty_like(x), torch.empty_like(x))
        seed, offset = torch.tensor(1, device="cuda"), torch.tensor(0, device="cuda")
        t, tn = torch.tensor(0.999, device="cuda"), torch.tensor(0.769, device="cuda")

        def fn():
            return denoise_update(x, f, t, tn, seed=seed, offset=offset, out=outs, backend=backend)

        try:
            fn()
        except BackendUnavailable as exc:
            pytest.skip(str(exc)[:300])

    row = bench_record("denoise_update", backend, {"size": size, "shape": list(shape)}, dtype, fn, nbytes=nbytes)
    _results[(backend, size, str(dtype))] = row.median_us
    got = {b: _results.get((b, size, str(dtype))) for b in ("cuda", "triton", "torch", "torch_copy")}
    if backend == "torch_copy" and got["torch"]:  # runs last for its (size, dtype): print the ratios
        for b in ("cuda", "triton"):
            if got[b]:
                print(f"\ndenoise_update {size} {dtype}: {b} {got[b]:.1f} us, {got['torch'] / got[b]:.2f}x the "
                      f"composition, {got['torch_copy'] / got[b]:.0%} of copy bandwidth")
