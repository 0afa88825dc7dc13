"""Sync-Window guidance, DMD (DMD2 normalisation), critic and diffusion-forcing losses."""
from __future__ import annotations

import math

import pytest
import torch

from lipforcing import distill, schedule
from lipforcing.distill import losses


# ---------------------------------------------------------------------------------------------- guidance_scale
def _below(x: float) -> float:
    return math.nextafter(x, -math.inf)


def _above(x: float) -> float:
    return math.nextafter(x, math.inf)


def test_guidance_scale_band_edges_floats():
    g = distill.guidance_scale
    lo, hi = 0.556, 0.882
    assert g(lo) == 4.5 and g(hi) == 4.5            # both edges inclusive
    assert g(_below(lo)) == 1.0 and g(_above(hi)) == 1.0
    assert g(0.7) == 4.5 and g(0.0) == 1.0 and g(0.999) == 1.0 and g(1.0) == 1.0
    # inverted swaps inside and outside, edges included in the band
    assert g(lo, inverted=True) == 1.0 and g(hi, inverted=True) == 1.0
    assert g(_below(lo), inverted=True) == 4.5 and g(_above(hi), inverted=True) == 4.5
    # configurable band and scale
    assert g(0.3, band=(0.2, 0.3), scale=2.0) == 2.0 and g(_above(0.3), band=(0.2, 0.3), scale=2.0) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_guidance_scale_band_edges_tensors(dtype):
    lo, hi = (torch.tensor(v, dtype=dtype) for v in (0.556, 0.882))
    inf = torch.tensor(math.inf, dtype=dtype)
    t = torch.stack([torch.nextafter(lo, -inf), lo, torch.nextafter(lo, inf), torch.tensor(0.7, dtype=dtype),
                     torch.nextafter(hi, -inf), hi, torch.nextafter(hi, inf), torch.tensor(0.999, dtype=dtype)])
    expect = torch.tensor([1.0, 4.5, 4.5, 4.5, 4.5, 4.5, 1.0, 1.0], dtype=t.dtype)
    out = distill.guidance_scale(t)
    assert out.shape == t.shape and out.dtype == dtype
    assert torch.equal(out, expect)
    inv = distill.guidance_scale(t, inverted=True)
    assert torch.equal(inv, torch.where(expect == 4.5, torch.ones_like(expect), torch.full_like(expect, 4.5)))
    # per-element agreement with the float path, on random t of a 2-D shape
    r = torch.rand(5, 7, dtype=dtype)
    ref = torch.tensor([[distill.guidance_scale(float(v)) for v in row] for row in r], dtype=dtype)
    assert torch.equal(distill.guidance_scale(r), ref)


def test_guidance_scale_errors():
    with pytest.raises(ValueError, match="band"):
        distill.guidance_scale(0.5, band=(0.9, 0.1))
    with pytest.raises(TypeError, match="t must be"):
        distill.guidance_scale("0.5")


def test_sync_window_target_gates_cfg_per_sample():
    g = torch.Generator().manual_seed(0)
    xc, xu = torch.randn(3, 4, 2, 3, 3, generator=g), torch.randn(3, 4, 2, 3, 3, generator=g)
    t = torch.tensor([0.3, 0.7, 0.95])
    out = losses.sync_window_target(xc, xu, t)
    assert torch.allclose(out[0], xc[0]) and torch.allclose(out[2], xc[2])        # CFG 1 outside the band
    assert torch.allclose(out[1], xu[1] + 4.5 * (xc[1] - xu[1]), atol=1e-6)       # CFG 4.5 inside
    inv = losses.sync_window_target(xc, xu, t, inverted=True)
    assert torch.allclose(inv[1], xc[1]) and torch.allclose(inv[0], xu[0] + 4.5 * (xc[0] - xu[0]), atol=1e-6)


# ---------------------------------------------------------------------------------------------- DMD
def test_dmd_gradient_zero_when_critic_equals_teacher():
    g = torch.Generator().manual_seed(1)
    gen = torch.randn(2, 16, 3, 4, 4, generator=g, requires_grad=True)
    teacher = torch.randn(2, 16, 3, 4, 4, generator=g)
    loss = losses.dmd_loss(gen, teacher.clone(), teacher)
    assert loss.shape == (2,)
    assert torch.equal(loss, torch.zeros(2))
    loss.sum().backward()
    assert torch.equal(gen.grad, torch.zeros_like(gen))


def test_dmd_normalisation_and_loss_gradient():
    g = torch.Generator().manual_seed(2)
    B, shape = 3, (16, 3, 4, 4)
    gen = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    critic = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    spread = torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64).view(B, 1, 1, 1, 1)
    teacher = gen + torch.randn(B, *shape, generator=g, dtype=torch.float64) * spread
    # oracle, written from the formula sample by sample
    n = math.prod(shape)
    expect_grad, expect_loss = [], []
    for i in range(B):
        w = 1.0 / ((gen[i] - teacher[i]).abs().sum().item() / n + 1e-6)
        gi = (critic[i] - teacher[i]) * w
        expect_grad.append(gi)
        expect_loss.append(0.5 * (gi ** 2).mean().item())
    grad = losses.dmd_gradient(gen, critic, teacher)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, torch.stack(expect_grad).float(), rtol=1e-5, atol=1e-6)
    x = gen.float().clone().requires_grad_(True)
    loss = losses.dmd_loss(x, critic.float(), teacher.float())
    torch.testing.assert_close(loss, torch.tensor(expect_loss, dtype=torch.float32), rtol=1e-4, atol=1e-8)
    loss.sum().backward()
    # d L_i / d gen_i = grad_i / numel: the student moves along -(critic - teacher), scaled per sample
    torch.testing.assert_close(x.grad, torch.stack(expect_grad).float() / n, rtol=1e-5, atol=1e-9)
    # the scale of gen - teacher does not change the gradient direction, only its size
    assert loss[0] > loss[2]


def _velocity_model(scale_c: float = 0.0):
    """A stand-in network: velocity = a * x_noisy + b * mean(text) + c * mean(audio) (per sample)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, timestep, context, audio=None):
            v = self.a * x[:, :16] + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
            if audio is not None:
                v = v + audio.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1, 1)
            return v + scale_c * timestep.view(-1, 1, 1, 1, 1) / 1000
    return Net()


def test_sw_dmd_loss_uses_negative_condition_and_band():
    from lipforcing.model.teacher import Condition

    g = torch.Generator().manual_seed(3)
    B = 2
    gen = torch.randn(B, 16, 2, 4, 4, generator=g, requires_grad=True)
    cond = Condition(y=torch.randn(B, 49, 2, 4, 4, generator=g), context=torch.randn(B, 5, 8, generator=g) + 1,
                     audio=torch.randn(B, 2, 4, 6, generator=g) + 1)
    teacher, critic = _velocity_model(), _velocity_model()
    t = torch.tensor([0.7, 0.3])
    eps = torch.randn(gen.shape, generator=g)
    loss, info = losses.sw_dmd_loss(gen, teacher, critic, cond, t=t, eps=eps)
    assert torch.equal(info["guidance"], torch.tensor([4.5, 1.0]))
    # critic == teacher: outside the band the DMD gradient vanishes, inside it is the CFG difference
    assert loss[1].item() == 0.0 and loss[0].item() > 0
    # oracle for sample 0: x0 = x_t - t v; cond - uncond velocity = mean(text) + mean(audio) (uncond: zeros)
    x_t = (1 - t[0]) * gen[0].detach() + t[0] * eps[0]
    diff_v = cond.context[0].mean() + cond.audio[0].mean()
    x0_c = x_t - t[0] * (0.5 * x_t + diff_v)
    teach = x0_c + 3.5 * (-t[0] * diff_v)            # x0_c - x0_u = -t * (v_c - v_u)
    w = 1 / ((gen[0].detach() - teach).abs().mean() + 1e-6)
    grad = (x0_c - teach) * w
    torch.testing.assert_close(loss[0], 0.5 * grad.pow(2).mean(), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- critic / DF
def test_critic_loss_is_x0_denoising_on_detached_samples():
    from lipforcing.model.teacher import Condition

    g = torch.Generator().manual_seed(4)
    gen = torch.randn(2, 16, 2, 4, 4, generator=g, requires_grad=True)
    cond = Condition(y=torch.zeros(2, 49, 2, 4, 4), context=torch.zeros(2, 3, 8))
    critic = _velocity_model()
    t, eps = torch.tensor([0.2, 0.9]), torch.randn(gen.shape, generator=g)
    loss = losses.critic_loss(critic, gen, cond, t=t, eps=eps)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * gen.detach() + t.view(-1, 1, 1, 1, 1) * eps
    pred = x_t - t.view(-1, 1, 1, 1, 1) * (0.5 * x_t)
    torch.testing.assert_close(loss, (pred - gen.detach()).pow(2).flatten(1).mean(1))
    loss.sum().backward()
    assert gen.grad is None and critic.a.grad is not None and critic.a.grad.abs() > 0


def test_df_loss_and_weighted_mean():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    torch.testing.assert_close(losses.df_loss(a, b), 0.5 * ((a - b) ** 2).mean(dim=(1, 2)))
    L = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    w = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    total = losses.weighted_mean(L, w)
    torch.testing.assert_close(total, torch.tensor((0.5 + 2 + 6) / 3))
    total.backward()
    assert w.grad is None                       # weights are detached
    torch.testing.assert_close(L.grad, torch.tensor([0.5, 1.0, 2.0]) / 3)
    with pytest.raises(ValueError, match="weights shape"):
        losses.weighted_mean(L, torch.ones(2))


def test_dmd_timestep_draw_is_shifted_uniform():
    t = schedule.sample_dmd_timesteps(20000, generator=torch.Generator().manual_seed(0))
    u = schedule.unshift_time(t.double())
    assert 0.001 - 1e-6 <= u.min() and u.max() <= 0.999 + 1e-6
    assert abs(u.mean().item() - 0.5) < 0.01          # uniform before the shift
    assert abs((t > 0.5).float().mean().item() - (1 - schedule.unshift_time(0.5) - 0.001) / 0.998) < 0.02
