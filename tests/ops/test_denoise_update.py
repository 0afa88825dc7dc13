"""CPU tier: denoise_update (reference backend): exact math with explicit noise, the Philox generator (known
answers, determinism, statistics), per-sample times, out=, opcheck and errors."""
import math

import pytest
import torch

from lipforcing import ops
from lipforcing.ops.reference import philox4x32

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_with_explicit_noise(dtype):
    x, f, eps = (torch.randn(2, 16, 3, 5, 7).to(dtype) for _ in range(3))
    x0, xn = ops.denoise_update(x, f, 0.999, 0.769, noise=eps, backend="reference")
    exp_x0 = x.float() - 0.999 * f.float()
    exp_xn = (1 - 0.769) * exp_x0 + 0.769 * eps.float()
    assert x0.dtype == dtype and xn.dtype == dtype
    assert torch.equal(x0, exp_x0.to(dtype)) and torch.equal(xn, exp_xn.to(dtype))


def test_t_next_zero_returns_x0():
    x, f = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    x0, xn = ops.denoise_update(x, f, 0.769, 0.0, backend="reference")  # no seed needed when t_next == 0
    assert torch.equal(x0, xn)


def test_per_sample_and_tensor_times():
    x, f, eps = (torch.randn(3, 2, 4, 4) for _ in range(3))
    t = torch.tensor([0.999, 0.5, 0.1])
    tn = torch.tensor(0.769)
    x0, xn = ops.denoise_update(x, f, t, tn, noise=eps, backend="reference")
    for b in range(3):
        e0 = x[b] - t[b] * f[b]
        torch.testing.assert_close(x0[b], e0)
        torch.testing.assert_close(xn[b], (1 - 0.769) * e0 + 0.769 * eps[b])


def test_any_input_strides():
    x, f, eps = (torch.randn(2, 5, 3, 4) for _ in range(3))
    expected = ops.denoise_update(x, f, 0.9, 0.3, noise=eps, backend="reference")
    xp, fp, ep = (t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for t in (x, f, eps))
    assert xp.stride(-1) != 1
    got = ops.denoise_update(xp, fp, 0.9, 0.3, noise=ep, backend="reference")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_out_in_place_aliasing_input():
    x, f, eps = (torch.randn(2, 3, 4) for _ in range(3))
    expected = ops.denoise_update(x, f, 0.9, 0.3, noise=eps, backend="reference")
    buf0, xt = torch.empty_like(x), x.clone()
    r0, r1 = ops.denoise_update(xt, f, 0.9, 0.3, noise=eps, out=(buf0, xt), backend="reference")
    assert r0 is buf0 and r1 is xt
    assert torch.equal(buf0, expected[0]) and torch.equal(xt, expected[1])


def test_philox_known_answers():
    # Random123's published known-answer vectors for Philox4x32-10.
    vectors = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
               ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
               ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, expected in vectors:
        out = philox4x32(*(torch.tensor([c]) for c in ctr), *(torch.tensor([k]) for k in key))
        assert tuple(int(o) for o in out) == expected


def _noise(shape, seed, offset=0):
    x = torch.zeros(shape)
    f = -torch.ones(shape)  # x0 = x - 1 * f = 1 everywhere; with t_next = 1, x_next = eps
    return ops.denoise_update(x, f, 1.0, 1.0, seed=seed, offset=offset, backend="reference")[1]


def test_seed_determinism_and_freshness():
    a, b = _noise((4, 1000), 7), _noise((4, 1000), 7)
    assert torch.equal(a, b)
    assert not torch.allclose(a, _noise((4, 1000), 8))
    assert not torch.allclose(a, _noise((4, 1000), 7, offset=1))
    # the generator is counter based: the first elements do not depend on the tensor size
    assert torch.equal(_noise((10,), 7), a.flatten()[:10])
    # a seed held in a device tensor gives the same noise as the int (graph-capture friendly)
    assert torch.equal(_noise((4, 1000), torch.tensor(7)), a)
    assert torch.equal(_noise((4, 1000), 2**64 - 1), _noise((4, 1000), -1))


def test_noise_statistics():
    n = 1_000_000
    z = _noise((n,), 1234).double()
    tol = 5 / math.sqrt(n)  # five standard errors
    assert abs(z.mean().item()) < tol
    assert abs(z.std().item() - 1) < 5 * math.sqrt(0.5 / n) * 1.5
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < tol  # lag-1
    assert abs(torch.corrcoef(torch.stack([z[:-64], z[64:]]))[0, 1].item()) < tol  # lag-64
    # tails of a standard normal: P(|z| > 3) = 0.0027
    frac = (z.abs() > 3).double().mean().item()
    assert abs(frac - 0.0026998) < 5 * math.sqrt(0.0027 / n)


def test_opcheck():
    x, f = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    o0, o1 = torch.empty_like(x), torch.empty_like(x)
    torch.library.opcheck(torch.ops.lipforcing.denoise_update.default,
                          (x, f, None, 0.9, torch.tensor([0.3, 0.2]), 0.0, None, torch.tensor(5), 0, None, 3, o0,
                           o1, "reference"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(flow=torch.randn(2, 3)), r"flow must have the shape of x_t"),
    (dict(t=1.5), r"t must be in \[0, 1\]"),
    (dict(t_next="0.5"), r"t_next must be a float or a tensor"),
    (dict(t=torch.tensor([0.1, 0.2, 0.3])), r"t must be a 0-d tensor or have shape \(batch,\) = \(2,\)"),
    (dict(seed=None), r"needs noise=... or seed=..."),
    (dict(seed=1.5), r"seed must be an int"),
    (dict(seed=torch.tensor(3.0)), r"seed must be a 0-d int64 tensor"),
    (dict(noise=torch.randn(2, 5)), r"noise must have the shape of x_t"),
    (dict(out=(torch.empty(2, 4), torch.empty(2, 4))), r"out\[0\] must be a contiguous tensor of shape \(2, 4, 4\)"),
    (dict(x_t=torch.randn(2, 4, 4).double()), r"x_t must have dtype in"),
])
def test_errors(kwargs, match):
    args = dict(x_t=torch.randn(2, 4, 4), flow=torch.randn(2, 4, 4), t=0.9, t_next=0.5, seed=1)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.denoise_update(args.pop("x_t"), args.pop("flow"), args.pop("t"), args.pop("t_next"), **args)
