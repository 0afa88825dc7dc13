"""Teacher trajectories and the Euler-jump probe (tiny teacher, 4-step schedule)."""
from __future__ import annotations

import pytest
import torch

from lipforcing import ModelConfig, build_model, schedule
from lipforcing.distill.teacher import euler_jump, euler_jump_grid, sample_trajectory
from lipforcing.model.teacher import Condition, cfg_velocity, sample


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny")
    teacher = build_model(cfg, causal=False).eval()
    teacher.attn_backend = "reference"
    g = torch.Generator().manual_seed(1)
    B, F, H, W = 2, 3, 4, 4
    cond = Condition(y=torch.randn(B, 49, F, H, W, generator=g), context=torch.randn(B, 5, cfg.text_dim, generator=g),
                     audio=torch.randn(B, F, 4, cfg.audio_dim, generator=g))
    noise = torch.randn(B, 16, F, H, W, generator=g)
    return teacher, cond, noise


def test_trajectory_matches_sampler(setup):
    teacher, cond, noise = setup
    traj = sample_trajectory(teacher, noise, cond, steps=4, guidance=4.5)
    final = sample(teacher, noise, cond, steps=4, guidance=4.5)
    assert len(traj.xs) == 5 and len(traj.x0s) == 4
    torch.testing.assert_close(traj.final, final)
    torch.testing.assert_close(traj.sigmas[:-1], schedule.teacher_sigmas(4))
    # x0 prediction at step j: x_j - sigma_j * v_j, and x_{j+1} = x_j + (sigma_{j+1} - sigma_j) v_j
    for j in range(4):
        s, sn = traj.sigmas[j].item(), traj.sigmas[j + 1].item()
        v = (traj.xs[j + 1] - traj.xs[j]) / (sn - s)
        torch.testing.assert_close(traj.x0s[j], traj.xs[j] - s * v, rtol=1e-4, atol=1e-4)


def test_euler_jump_one_step_equals_sampler_prefix(setup):
    """A jump from step 0 to step 1 is exactly the sampler's first Euler step; the re-evaluation there is the
    sampler's x0 prediction at step 1 (same CFG)."""
    teacher, cond, noise = setup
    traj = sample_trajectory(teacher, noise, cond, steps=4, guidance=4.5)
    out = euler_jump(teacher, noise, cond, j0=0, j1=1, s0=4.5, s1=4.5, steps=4)
    torch.testing.assert_close(out["x_jump"], traj.xs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["x0"], traj.x0s[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["x0_first"], traj.x0s[0], rtol=1e-4, atol=1e-4)


def test_euler_jump_uses_the_two_scales(setup):
    teacher, cond, noise = setup
    steps, j1 = 50, 30
    sig = schedule.teacher_sigmas(steps).tolist()
    out = euler_jump(teacher, noise, cond, j0=0, j1=j1, s0=1.0, s1=4.5, t0=0.999)
    assert out["t0"] == 0.999 and abs(out["t1"] - 0.769) < 1e-3 and out["t1"] == sig[j1]
    neg = cond.negative_context()
    with torch.no_grad():
        v0 = cfg_velocity(teacher, cond.model_input(noise), torch.full((2,), 999.0), cond.context, cond.audio, neg, 1.0)
        xj = noise + (sig[j1] - 0.999) * v0
        v1 = cfg_velocity(teacher, cond.model_input(xj), torch.full((2,), 1000 * sig[j1]), cond.context, cond.audio,
                          neg, 4.5)
    torch.testing.assert_close(out["x0"], xj - sig[j1] * v1, rtol=1e-4, atol=1e-4)
    swapped = euler_jump(teacher, noise, cond, j0=0, j1=j1, s0=4.5, s1=1.0, t0=0.999)
    assert not torch.allclose(swapped["x0"], out["x0"])
    with pytest.raises(ValueError, match="j1"):
        euler_jump(teacher, noise, cond, j0=5, j1=5)


def test_euler_jump_grid_rows(setup):
    teacher, cond, noise = setup
    rows = euler_jump_grid(teacher, noise, cond, j1_values=(2,), scales=(1.0, 4.5), steps=4,
                           metrics={"mean": lambda x0: x0.mean()})
    assert [(r["s0"], r["s1"]) for r in rows] == [(1.0, 1.0), (1.0, 4.5), (4.5, 1.0), (4.5, 4.5)]
    assert all(r["j1"] == 2 and isinstance(r["mean"], float) for r in rows)
    assert len({r["mean"] for r in rows}) == 4
