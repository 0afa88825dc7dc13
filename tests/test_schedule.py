"""lipforcing.schedule: flow-matching formulas checked against independent derivations and the paper's values."""
import math

import pytest
import torch

from lipforcing import schedule


def _rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------------- shift
def test_shift_known_values():
    # Shift 5 of u = 1, .75, .5, .25 is the 4-step list of the paper's earlier configs (0.999 aside).
    assert schedule.shift_time(1.0) == 1.0
    assert schedule.shift_time(0.0) == 0.0
    assert schedule.shift_time(0.75) == pytest.approx(15 / 16)
    assert schedule.shift_time(0.5) == pytest.approx(5 / 6)
    assert schedule.shift_time(0.25) == pytest.approx(5 / 8)
    assert schedule.shift_time(0.3, shift=1.0) == pytest.approx(0.3)


def test_shift_inverse_and_monotone():
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    t = schedule.shift_time(u)
    assert torch.all(t[1:] > t[:-1])
    assert torch.all(t >= u)  # shift > 1 moves every interior point towards the noise end
    torch.testing.assert_close(schedule.unshift_time(t), u, rtol=0, atol=1e-14)
    # derivative at 0 is s, at 1 is 1/s: d/du [s u / (1 + (s-1) u)] = s / (1 + (s-1) u)^2
    h = 1e-7
    assert (schedule.shift_time(h) - schedule.shift_time(0.0)) / h == pytest.approx(5.0, rel=1e-5)
    assert (schedule.shift_time(1.0) - schedule.shift_time(1 - h)) / h == pytest.approx(0.2, rel=1e-5)


def test_shift_rejects_bad_shift():
    with pytest.raises(ValueError, match="shift"):
        schedule.shift_time(0.5, shift=0.0)
    with pytest.raises(ValueError, match="shift"):
        schedule.unshift_time(0.5, shift=-1.0)


# --------------------------------------------------------------------------------------------------- schedules
def test_teacher_sigmas_paper_values():
    s = schedule.teacher_sigmas()
    assert s.shape == (50,) and s.dtype == torch.float64
    assert s[0].item() == 1.0
    # The Sync-Window band edges and the student's middle step (paper section 2/4.3).
    assert round(s[20].item(), 3) == 0.882
    assert round(s[30].item(), 3) == 0.769
    assert round(s[40].item(), 3) == 0.556
    assert torch.all(s[1:] < s[:-1]) and s[-1].item() > 0


def test_teacher_sigmas_independent_formula():
    n, sh = 7, 3.0
    got = schedule.teacher_sigmas(n, sh, dtype=torch.float32)
    want = [sh * (1 - j / n) / (1 + (sh - 1) * (1 - j / n)) for j in range(n)]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))
    with pytest.raises(ValueError, match="num_steps"):
        schedule.teacher_sigmas(0)


def test_student_schedule():
    assert schedule.student_timesteps() == [0.999, 0.769, 0.0]
    assert schedule.STUDENT_TIMESTEPS == (0.999, 0.769, 0.0)
    # 0.769 is the teacher's step 30 (the no-CFG -> CFG jump target).
    assert abs(schedule.STUDENT_TIMESTEPS[1] - schedule.teacher_sigmas()[30].item()) < 5e-4


def test_timestep_input():
    assert schedule.timestep_input(0.769) == pytest.approx(769.0)
    torch.testing.assert_close(schedule.timestep_input(torch.tensor([0.0, 0.5, 1.0])),
                               torch.tensor([0.0, 500.0, 1000.0]))


# --------------------------------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("t", [0.999, 0.769, 0.3, "per_sample", "zero_d"])
def test_conversions_round_trip(t):
    x0, eps = _rand(3, 5, 7, seed=1), _rand(3, 5, 7, seed=2)
    if t == "per_sample":
        t = torch.tensor([0.2, 0.769, 0.95], dtype=torch.float64)
        tb = t.view(3, 1, 1)
    elif t == "zero_d":
        t = tb = torch.tensor(0.5, dtype=torch.float64)
    else:
        tb = t
    # Independent construction: interpolate, then differentiate the line in t.
    x_t = (1 - tb) * x0 + tb * eps
    v = eps - x0
    torch.testing.assert_close(schedule.add_noise(x0, eps, t), x_t)
    torch.testing.assert_close(schedule.velocity(x0, eps), v)
    torch.testing.assert_close(schedule.x0_from_velocity(x_t, v, t), x0)
    torch.testing.assert_close(schedule.eps_from_velocity(x_t, v, t), eps)
    torch.testing.assert_close(schedule.velocity_from_x0(x_t, x0, t), v)
    torch.testing.assert_close(schedule.eps_from_x0(x_t, x0, t), eps)
    torch.testing.assert_close(schedule.x0_from_eps(x_t, eps, t), x0)
    torch.testing.assert_close(schedule.velocity_from_eps(x_t, eps, t), v)


def test_velocity_is_time_derivative():
    x0, eps = _rand(4, 6, seed=3), _rand(4, 6, seed=4)
    t, h = 0.4, 1e-6
    fd = (schedule.add_noise(x0, eps, t + h) - schedule.add_noise(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, schedule.velocity(x0, eps), rtol=1e-6, atol=1e-6)


def test_euler_step_is_exact_on_a_straight_path():
    # With the true velocity, Euler integration of a rectified flow is exact: stepping the teacher's whole
    # schedule from pure noise lands on x0.
    x0, eps = _rand(2, 3, 4, seed=5), _rand(2, 3, 4, seed=6)
    sig = schedule.teacher_sigmas(50).tolist() + [0.0]
    x = eps.clone()
    for t, tn in zip(sig[:-1], sig[1:]):
        x = schedule.euler_step(x, schedule.velocity(x0, eps), t, tn)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)


def test_per_frame_time_for_video_latents():
    B, C, F, H, W = 2, 3, 4, 2, 2
    x0, eps = _rand(B, C, F, H, W, seed=7), _rand(B, C, F, H, W, seed=8)
    t = torch.tensor([[0.999, 0.769, 0.0, 0.5], [0.0, 0.0, 0.769, 0.999]], dtype=torch.float64)
    got = schedule.add_noise(x0, eps, t)
    for b in range(B):
        for f in range(F):
            tf = t[b, f].item()
            torch.testing.assert_close(got[b, :, f], (1 - tf) * x0[b, :, f] + tf * eps[b, :, f])


def test_dtype_preserved_and_fp32_math():
    x0 = _rand(64, dtype=torch.bfloat16, seed=9)
    eps = _rand(64, dtype=torch.bfloat16, seed=10)
    out = schedule.add_noise(x0, eps, 0.769)
    assert out.dtype == torch.bfloat16
    want = ((1 - 0.769) * x0.float() + 0.769 * eps.float()).bfloat16()
    assert torch.equal(out, want)


def test_bad_time_shape():
    x = _rand(2, 3)
    with pytest.raises(ValueError, match=r"\(batch,\)"):
        schedule.add_noise(x, x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(TypeError, match="t must be"):
        schedule.add_noise(x, x, "0.5")


# --------------------------------------------------------------------------------------------------- draws
def test_dmd_timesteps_distribution():
    g = torch.Generator().manual_seed(0)
    t = schedule.sample_dmd_timesteps(200_000, generator=g)
    assert t.shape == (200_000,) and t.dtype == torch.float32
    lo, hi = schedule.shift_time(0.001), schedule.shift_time(0.999)
    assert t.min().item() >= lo - 1e-7 and t.max().item() <= hi + 1e-7
    # Unshifting must give back a uniform draw on [0.001, 0.999]: compare CDFs at a few points.
    u = schedule.unshift_time(t.double())
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        frac = (u <= 0.001 + 0.998 * q).double().mean().item()
        assert abs(frac - q) < 0.005, (q, frac)
    # Median of t is shift_time(0.5) = 5/6 (the shift concentrates t near the noise end).
    assert abs(t.median().item() - 5 / 6) < 0.005
    # reproducible with the same generator seed
    t2 = schedule.sample_dmd_timesteps(200_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)


def test_chunk_timesteps_draw():
    g = torch.Generator().manual_seed(1)
    t = schedule.sample_chunk_timesteps(300, 7, generator=g)
    assert t.shape == (300, 7)
    vals = torch.tensor(schedule.STUDENT_TIMESTEPS, dtype=torch.float32)
    assert torch.all((t[..., None] == vals).any(-1))
    for v in vals:
        frac = (t == v).float().mean().item()
        assert abs(frac - 1 / 3) < 0.03
    with pytest.raises(ValueError, match="num_chunks"):
        schedule.sample_chunk_timesteps(1, 0)


def test_lazy_attribute():
    import lipforcing

    assert lipforcing.schedule is schedule
    assert math.isclose(schedule.SHIFT, 5.0)
