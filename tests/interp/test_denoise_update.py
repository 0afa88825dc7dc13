"""Triton backend of denoise_update under the Triton interpreter (CPU, fp32/fp16), against the reference."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # tests/conftest.py does this for the session; repeated here so the file also runs on its own.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lipforcing.ops import denoise_update  # noqa: E402
from lipforcing.ops._dispatch import BackendUnavailable  # noqa: E402
from lipforcing.ops.reference import philox_normal  # noqa: E402

pytestmark = [
    pytest.mark.interp,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                       reason="needs TRITON_INTERPRET=1 (CPU-only run)"),
    # Philox's low-word products wrap on purpose (uint32); numpy under the interpreter warns about it
    pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning"),
]

SHAPES = [(3, 5, 7), (2, 16, 3, 9, 11), (1, 4133)]  # odd sizes; 4133 and 9504 cross the 4096-element block


def _inputs(shape, dtype):
    # fresh every run: the global generator is seeded per test by tests/conftest.py (LIPFORCING_TEST_SEED)
    return [torch.randn(shape).to(dtype) for _ in range(3)]


def _both(*args, **kwargs):
    tri = denoise_update(*args, backend="triton", **kwargs)
    ref = denoise_update(*args, backend="reference", **kwargs)
    return tri, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_explicit_noise_is_exact(shape, dtype):
    x, f, n = _inputs(shape, dtype)
    (x0, xn), (r0, rn) = _both(x, f, 0.999, 0.769, noise=n)
    assert x0.dtype == dtype and xn.dtype == dtype
    assert torch.equal(x0, r0) and torch.equal(xn, rn)
    # and the formula itself, written out independently in float32
    want_x0 = x.float() - 0.999 * f.float()
    assert torch.equal(x0, want_x0.to(dtype))


@pytest.mark.parametrize("t, t_next", [(0.3, 0.123456789), (1.0, 1.0), (0.769, 0.0), (0.0, 0.5)])
def test_explicit_noise_times(t, t_next):
    x, f, n = _inputs((4, 3, 17), torch.float32)
    (x0, xn), (r0, rn) = _both(x, f, t, t_next, noise=n)
    assert torch.equal(x0, r0) and torch.equal(xn, rn)


def test_mixed_dtypes_noise_and_out():
    x, f, _ = _inputs((2, 3, 33), torch.float16)
    n = torch.randn(2, 3, 33)  # fp32 noise for fp16 latents
    outs = (torch.empty(2, 3, 33), torch.empty(2, 3, 33, dtype=torch.float16))
    tri = denoise_update(x, f, 0.999, 0.769, noise=n, out=outs, backend="triton")
    ref = denoise_update(x, f, 0.999, 0.769, noise=n, backend="reference")
    assert tri[0] is outs[0] and tri[1] is outs[1]
    assert torch.equal(tri[1], ref[1])
    # x0 kept in fp32: the fp32 value before rounding to fp16
    assert torch.equal(tri[0], x.float() - 0.999 * f.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 4099)])
def test_seeded_noise_matches_reference(shape, dtype):
    x, f, _ = _inputs(shape, dtype)
    (x0, xn), (r0, rn) = _both(x, f, 0.999, 0.769, seed=1234, offset=7)
    assert torch.equal(x0, r0)
    if dtype == torch.float32:
        torch.testing.assert_close(xn, rn, rtol=0, atol=2e-6)
    else:  # one fp16 rounding step of slack for the last-ulp difference of log/cos
        torch.testing.assert_close(xn.float(), rn.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("seed, offset", [(0, 0), (1, 1), (-1, 3), (2**40 + 3, 2**33 + 1), (2**64 - 5, 2**63 + 9)])
def test_raw_noise_matches_philox_scheme(seed, offset):
    # t = 0, t_next = 1 gives x_next = eps: compare the kernel's noise with the documented scheme directly.
    x = torch.randn(3, 1001)
    _, eps = denoise_update(x, x, 0.0, 1.0, seed=seed, offset=offset, backend="triton")
    want = philox_normal(x.numel(), (seed + 2**63) % 2**64 - 2**63, (offset + 2**63) % 2**64 - 2**63, x.device)
    torch.testing.assert_close(eps.flatten(), want, rtol=0, atol=2e-6)


def test_seed_and_offset_tensors_equal_ints():
    x, f, _ = _inputs((2, 5, 13), torch.float32)
    a = denoise_update(x, f, 0.999, 0.769, seed=99, offset=5, backend="triton")
    b = denoise_update(x, f, 0.999, 0.769, seed=torch.tensor(99), offset=torch.tensor(5), backend="triton")
    assert torch.equal(a[1], b[1])
    c = denoise_update(x, f, 0.999, 0.769, seed=99, offset=6, backend="triton")
    d = denoise_update(x, f, 0.999, 0.769, seed=100, offset=5, backend="triton")
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[1], d[1])


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.float16])
def test_per_sample_and_0d_times(t_dtype):
    B = 3
    x, f, n = _inputs((B, 2, 37), torch.float32)  # 74 elements per sample: not a multiple of anything
    t = torch.tensor([0.999, 0.5, 0.1], dtype=t_dtype)
    tn = torch.tensor([0.769, 0.0, 0.3], dtype=t_dtype)
    (x0, xn), (r0, rn) = _both(x, f, t, tn, noise=n)
    assert torch.equal(x0, r0) and torch.equal(xn, rn)
    # per-sample t equals separate scalar calls on each sample
    for b in range(B):
        s0, sn = denoise_update(x[b:b + 1], f[b:b + 1], t[b].item(), tn[b].item(), noise=n[b:b + 1],
                                backend="triton")
        if t_dtype == torch.float32:
            assert torch.equal(s0[0], x0[b]) and torch.allclose(sn[0], xn[b], rtol=0, atol=1e-7)
    (x0, xn), (r0, rn) = _both(x, f, torch.tensor(0.999, dtype=t_dtype), torch.tensor(0.769), seed=3, offset=1)
    assert torch.equal(x0, r0)
    torch.testing.assert_close(xn, rn, rtol=0, atol=2e-6)


def test_per_sample_times_are_read_only_inside_the_batch():
    # Lanes of the last block past numel have batch index >= B: their per-sample t must not be loaded.  The
    # memory after t and t_next holds inf, so a stray load makes inf * 0 = NaN in those lanes, which the
    # interpreter (numpy) reports as an invalid-value warning, turned into an error here.
    import warnings

    B = 3
    x, f, n = [torch.randn(B, 2, 37) for _ in range(3)]
    t_big = torch.full((64,), float("inf"))
    tn_big = torch.full((64,), float("inf"))
    t_big[:B] = torch.rand(B) * 0.9 + 0.05
    tn_big[:B] = torch.rand(B) * 0.9 + 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        (x0, xn), (r0, rn) = _both(x, f, t_big[:B], tn_big[:B], noise=n)
    assert torch.equal(x0, r0) and torch.equal(xn, rn)


def test_t_next_zero_returns_x0():
    x, f, _ = _inputs((2, 3, 29), torch.float32)
    x0, xn = denoise_update(x, f, 0.769, 0.0, backend="triton")  # no seed needed
    assert torch.equal(x0, xn)
    x0, xn = denoise_update(x, f, torch.tensor([0.769, 0.5]), torch.zeros(2), seed=4, backend="triton")
    assert torch.equal(x0, xn)
    assert torch.equal(x0, x - torch.tensor([0.769, 0.5]).view(2, 1, 1) * f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_out_aliasing_inputs(dtype):
    x, f, n = _inputs((2, 3, 41), dtype)
    ref = denoise_update(x, f, 0.999, 0.769, noise=n, backend="reference")
    xa, fa = x.clone(), f.clone()
    got = denoise_update(xa, fa, 0.999, 0.769, noise=n, out=(xa, fa), backend="triton")
    assert got[0] is xa and got[1] is fa
    assert torch.equal(xa, ref[0]) and torch.equal(fa, ref[1])
    xb = x.clone()
    got = denoise_update(xb, f, 0.999, 0.769, seed=11, out=(torch.empty_like(x), xb), backend="triton")
    want = denoise_update(x, f, 0.999, 0.769, seed=11, backend="triton")
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_non_contiguous_inputs():
    x, f, n = _inputs((3, 8, 10), torch.float32)
    xs, fs = x[:, ::2], f[:, 1::2]
    (x0, xn), (r0, rn) = _both(xs, fs, 0.999, 0.769, noise=n[:, :4])
    assert torch.equal(x0, r0) and torch.equal(xn, rn)


def test_bfloat16_is_refused_under_the_interpreter():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailable, match="bfloat16"):
        denoise_update(x, x, 0.5, 0.0, backend="triton")


def test_cuda_backend_refuses_cpu_tensors():
    from lipforcing.ops.cuda.denoise_update import denoise_update_cuda_unsupported

    x = torch.randn(2, 8)
    reason = denoise_update_cuda_unsupported(x, x, None, 0.5, None, 0.0, None, None, 0, None, 0, x, x.clone())
    assert reason is not None and "CUDA tensors" in reason and "cpu" in reason
    with pytest.raises(BackendUnavailable, match="cuda"):
        denoise_update(x, x, 0.5, 0.0, backend="cuda")


# --- hardening (issue 13) ------------------------------------------------------------------------------------

def _layout(kind, shape, dtype):
    """A fresh random tensor of logical ``shape`` stored transposed, sliced or expanded."""
    if kind == "transposed":
        return torch.randn(shape[::-1]).to(dtype).permute(*range(len(shape) - 1, -1, -1))
    if kind == "sliced":
        return torch.randn(shape[0], 2 * shape[1] + 1, *shape[2:]).to(dtype)[:, 1::2]
    return torch.randn(1, shape[1], *([1] * (len(shape) - 2))).to(dtype).expand(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 9, 4133)])
def test_layouts_match_the_formula(kind, shape, dtype):
    x, f, n = (_layout(kind, shape, dtype) for _ in range(3))
    assert not x.is_contiguous()
    (x0, xn), (r0, rn) = _both(x, f, 0.999, 0.769, noise=n)
    assert x0.is_contiguous() and xn.is_contiguous()
    want_x0 = x.float() - 0.999 * f.float()
    assert torch.equal(x0, want_x0.to(dtype)) and torch.equal(x0, r0) and torch.equal(xn, rn)
    # seeded noise: the flat index follows the logical (C-order) layout, not the input's memory order
    (s0, sn), (q0, qn) = _both(x, f, 0.999, 0.769, seed=5)
    assert torch.equal(s0, q0)
    torch.testing.assert_close(sn.float(), qn.float(), rtol=1e-3 if dtype == torch.float16 else 2e-6, atol=1e-5)


def test_partly_overlapping_out_is_refused_before_any_kernel_runs():
    x, f, n = _inputs((3, 40), torch.float32)
    buf = torch.randn(200)
    before = buf.clone()
    with pytest.raises(ValueError, match=r"out\[0\] and out\[1\] must not overlap"):
        denoise_update(x, f, 0.9, 0.3, noise=n, out=(buf[:120].view(3, 40), buf[7:127].view(3, 40)),
                       backend="triton")
    xs = buf[:120].view(3, 40)
    with pytest.raises(ValueError, match=r"out\[1\] partly overlaps x_t"):
        denoise_update(xs, f, 0.9, 0.3, noise=n, out=(torch.empty(3, 40), buf[40:160].view(3, 40)),
                       backend="triton")
    assert torch.equal(buf, before)


def test_float64_noise():
    x, f, _ = _inputs((2, 3, 33), torch.float16)
    n64 = torch.randn(2, 3, 33, dtype=torch.float64)
    got = denoise_update(x, f, 0.999, 0.769, noise=n64, backend="triton")
    want = denoise_update(x, f, 0.999, 0.769, noise=n64.float(), backend="reference")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
