"""Teacher classifier-free guidance and the 50-step shifted Euler sampler."""
import pytest
import torch

from lipforcing.config import ModelConfig
from lipforcing.model import build_model
from lipforcing.model.teacher import Condition, cfg_velocity, sample
from tests.model.helpers import make_inputs


def test_cfg_equals_hand_formula():
    cfg = ModelConfig.from_name("tiny")
    model = build_model(cfg, causal=False).eval()
    x, t, ctx, audio = make_inputs(cfg, frames=3)
    neg = torch.randn_like(ctx)
    s = 4.5
    with torch.no_grad():
        cond = model(x, t, ctx, audio)
        uncond = model(x, t, neg, torch.zeros_like(audio))
        guided = cfg_velocity(model, x, t, ctx, audio, neg, s)
        assert not torch.allclose(cond, uncond, atol=1e-3)
        torch.testing.assert_close(guided, uncond + s * (cond - uncond), rtol=1e-4, atol=1e-4)
        # scale 1 is the conditional prediction; a negative prompt of another length also works (two calls)
        torch.testing.assert_close(cfg_velocity(model, x, t, ctx, audio, neg, 1.0), cond, rtol=0, atol=0)
        neg_short = torch.randn(1, 3, cfg.text_dim)
        u2 = model(x, t, neg_short.expand(2, 3, cfg.text_dim), torch.zeros_like(audio))
        torch.testing.assert_close(cfg_velocity(model, x, t, ctx, audio, neg_short, 2.0), u2 + 2.0 * (cond - u2),
                                   rtol=1e-4, atol=1e-4)


class _PointMass(torch.nn.Module):
    """The exact flow velocity towards one data point x0*: v(x_t, t) = (x_t - x0*) / t; conditional and
    unconditional targets differ so CFG is visible.  Records the timesteps it is called with."""

    def __init__(self, target, neg_target):
        super().__init__()
        self.target, self.neg_target = target, neg_target
        self.calls = []

    def forward(self, x, timestep, context, audio=None):
        self.calls.append(timestep.clone())
        t = (timestep / 1000.0).reshape(-1, 1, 1, 1, 1)
        is_neg = (context.flatten(1).abs().sum(1) == 0).reshape(-1, 1, 1, 1, 1)
        tgt = torch.where(is_neg, self.neg_target, self.target)
        return (x[:, :16] - tgt) / t


def test_sampler_schedule_and_exactness():
    B, F, H, W = 2, 2, 4, 4
    target = torch.randn(1, 16, F, H, W)
    model = _PointMass(target, target)
    cond = Condition(y=torch.randn(B, 49, F, H, W), context=torch.randn(B, 3, 8))
    out = sample(model, torch.randn(B, 16, F, H, W), cond, guidance=1.0)
    # Euler is exact on straight paths: 50 steps land on the data point
    torch.testing.assert_close(out, target.expand(B, -1, -1, -1, -1), rtol=1e-5, atol=1e-5)
    ts = torch.stack([c[0] for c in model.calls]).double() / 1000
    assert len(ts) == 50
    u = torch.linspace(1, 0, 51, dtype=torch.float64)[:-1]
    torch.testing.assert_close(ts, 5 * u / (1 + 4 * u), rtol=1e-6, atol=1e-6)
    assert abs(ts[30].item() - 0.769) < 1e-3 and abs(ts[20].item() - 0.882) < 1e-3


def test_sampler_applies_cfg():
    B, F, H, W = 1, 1, 2, 2
    a, b = torch.randn(1, 16, F, H, W), torch.randn(1, 16, F, H, W)
    model = _PointMass(a, b)
    cond = Condition(y=torch.zeros(B, 49, F, H, W), context=torch.randn(B, 3, 8))  # neg_context None -> zeros
    steps = []
    out = sample(model, torch.randn(B, 16, F, H, W), cond, guidance=3.0, steps=10,
                 callback=lambda j, x, v: steps.append(j))
    assert steps == list(range(10))
    # each step moves along uncond + 3 (cond - uncond); with point masses the result is b + 3 (a - b) exactly
    torch.testing.assert_close(out, b + 3.0 * (a - b), rtol=1e-4, atol=1e-4)


def test_cfg_rejects_bad_scale():
    with pytest.raises(TypeError, match="scale"):
        cfg_velocity(lambda *a: None, None, None, None, None, None, "4.5")
