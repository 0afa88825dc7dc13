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


# --- hardening (issue 13): layouts, overlapping out=, grad, NaN times, float64 noise -----------------------------

def _layouts(shape=(3, 5, 7)):
    """(name, tensor) pairs of fresh random tensors with the given logical shape in several memory layouts."""
    base = torch.randn(shape)
    transposed = torch.randn(shape[::-1]).permute(*range(len(shape) - 1, -1, -1))
    sliced = torch.randn(shape[0], 2 * shape[1] + 1, shape[2])[:, 1::2]
    expanded = torch.randn(1, shape[1], 1).expand(shape)
    return [("contiguous", base), ("transposed", transposed), ("sliced", sliced), ("expanded", expanded)]


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_layouts_give_the_formula_and_contiguous_outputs(layout):
    x = dict(_layouts())[layout]
    f, n = (dict(_layouts())[layout] for _ in range(2))
    assert not x.is_contiguous()
    x0, xn = ops.denoise_update(x, f, 0.999, 0.769, noise=n, backend="reference")
    assert x0.is_contiguous() and xn.is_contiguous()
    want_x0 = x - 0.999 * f
    assert torch.equal(x0, want_x0) and torch.equal(xn, (1 - 0.769) * want_x0 + 0.769 * n)


def _offset_views(n, shift, dtype=torch.float32):
    buf = torch.randn(2 * n + abs(shift) + 8, dtype=dtype)
    return buf[:n], buf[shift:shift + n]


@pytest.mark.parametrize("shift", [1, 5, 11])
def test_out_buffers_that_partly_overlap_each_other_are_refused(shift):
    x, f, n = (torch.randn(3, 4) for _ in range(3))
    a, b = _offset_views(12, shift)
    with pytest.raises(ValueError, match=r"out\[0\] and out\[1\] must not overlap"):
        ops.denoise_update(x, f, 0.9, 0.3, noise=n, out=(a.view(3, 4), b.view(3, 4)), backend="reference")


@pytest.mark.parametrize("which", ["x_t", "flow", "noise"])
def test_out_partly_overlapping_an_input_is_refused(which):
    buf = torch.randn(40)
    args = {"x_t": torch.randn(3, 4), "flow": torch.randn(3, 4), "noise": torch.randn(3, 4)}
    args[which] = buf[:12].view(3, 4)
    out = (buf[2:14].view(3, 4), torch.empty(3, 4))   # shifted by two elements
    with pytest.raises(ValueError, match=rf"out\[0\] partly overlaps {which}"):
        ops.denoise_update(args["x_t"], args["flow"], 0.9, 0.3, noise=args["noise"], out=out, backend="reference")
    # a wider dtype at the same address is also a partial overlap (element i spans inputs 2i and 2i+1)
    x16 = torch.randn(3, 4, dtype=torch.float16)
    wide = torch.empty(24, dtype=torch.float16)
    wide[:12] = x16.flatten()
    with pytest.raises(ValueError, match=r"out\[1\] partly overlaps x_t"):
        ops.denoise_update(wide[:12].view(3, 4), x16, 0.9, 0.0,
                           out=(torch.empty(3, 4), wide.view(torch.float32).view(3, 4)), backend="reference")


def test_exact_aliasing_still_allowed_and_disjoint_views_of_one_buffer_too():
    buf = torch.randn(3, 8)
    x, f = buf[:, :4].clone(), buf[:, 4:].clone()
    n = torch.randn(3, 4)
    want = ops.denoise_update(x, f, 0.9, 0.3, noise=n, backend="reference")
    store = torch.empty(24)
    o0, o1 = store[:12].view(3, 4), store[12:].view(3, 4)   # adjacent, disjoint
    ops.denoise_update(x, f, 0.9, 0.3, noise=n, out=(o0, o1), backend="reference")
    assert torch.equal(o0, want[0]) and torch.equal(o1, want[1])
    got = ops.denoise_update(x, f, 0.9, 0.3, noise=n, out=(f, n), backend="reference")
    assert got[0] is f and torch.equal(f, want[0]) and torch.equal(n, want[1])


@pytest.mark.parametrize("which", ["x_t", "flow", "noise", "t"])
def test_requires_grad_is_refused_with_no_backward(which):
    args = {"x_t": torch.randn(2, 3), "flow": torch.randn(2, 3), "noise": torch.randn(2, 3),
            "t": torch.tensor([0.9, 0.5])}
    args[which].requires_grad_(True)
    with pytest.raises(ValueError, match=rf"no backward, but {which} requires grad"):
        ops.denoise_update(args["x_t"], args["flow"], args["t"], 0.3, noise=args["noise"], backend="reference")
    with torch.no_grad():   # fine without grad mode: nothing would be recorded
        x0, _ = ops.denoise_update(args["x_t"], args["flow"], args["t"], 0.3, noise=args["noise"],
                                   backend="reference")
    assert not x0.requires_grad


@pytest.mark.parametrize("name,value", [("t", torch.tensor(float("nan"))), ("t", torch.tensor([0.5, float("nan")])),
                                        ("t_next", torch.tensor(float("inf"))), ("t_next", torch.tensor(-0.25)),
                                        ("t", float("nan")), ("t_next", float("-inf"))])
def test_non_finite_or_out_of_range_times_are_refused(name, value):
    times = {"t": 0.9, "t_next": 0.3, name: value}
    with pytest.raises(ValueError, match=rf"^{name} must be in \[0, 1\]"):
        ops.denoise_update(torch.randn(2, 3), torch.randn(2, 3), times["t"], times["t_next"], seed=3,
                           backend="reference")


def test_float64_noise_is_accepted_and_rounded_to_float32():
    x, f = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    n64 = torch.randn(2, 3, 5, dtype=torch.float64)
    got = ops.denoise_update(x, f, 0.7, 0.4, noise=n64, backend="reference")
    want = ops.denoise_update(x, f, 0.7, 0.4, noise=n64.float(), backend="reference")
    assert got[0].dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
