"""Distillation losses: Sync-Window guidance, DMD (DMD2 normalisation), the critic's x0-denoising loss and the
diffusion-forcing loss.

Notation (rectified flow, ``lipforcing.schedule``): ``x_t = (1 - t) x0 + t eps``; networks predict the velocity
``v``, converted to ``x0 = x_t - t v``.  ``sg`` = stop-gradient.

Sync-Window DMD (Lip Forcing, Eq. 6)::

    g(t)      = scale if band[0] <= t <= band[1] else 1          (inverted: the other way round)
    x0_teach  = x0_c + (g(t) - 1) (x0_c - x0_u)                   x0_u: empty text + zero audio, same video cond.
    w_i       = 1 / (mean_i |gen - x0_teach| + 1e-6)              per sample, float32 (DMD2)
    grad      = (x0_critic - x0_teach) * w
    L_i       = 0.5 * mean_i (gen - sg(gen - grad))^2             d L_i / d gen = grad / numel_i

so a critic equal to the teacher gives zero gradient.  Per-sample losses are returned so that the SyncNet reward
can weight them (``total = mean_i(r_i * L_i)``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from lipforcing import schedule

SYNC_WINDOW_BAND = (0.556, 0.882)
"""t range where the teacher target uses CFG (teacher steps 40 .. 20 of the 50-step shift-5 schedule)."""
SYNC_WINDOW_SCALE = 4.5
DMD_EPS = 1e-6


# --------------------------------------------------------------------------------------------------- guidance
def guidance_scale(t, *, band: Sequence[float] = SYNC_WINDOW_BAND, scale: float = SYNC_WINDOW_SCALE,
                   inverted: bool = False):
    """The Sync-Window CFG rule: ``scale`` for ``band[0] <= t <= band[1]`` (both edges inclusive), 1.0 elsewhere;
    ``inverted=True`` applies ``scale`` outside the band and 1.0 inside (the paper's ablation).

    ``t`` is a Python number (returns a float) or a tensor of any shape (returns a tensor of that shape, float32 or
    t's dtype if t is float64, on t's device).  ``t`` is on the 0..1 scale (not the network's 0..1000).
    """
    lo, hi = _check_band(band)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    if not isinstance(inverted, bool):
        raise TypeError(f"inverted must be a bool, got {type(inverted).__name__}")
    if isinstance(t, torch.Tensor):
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        tt = t.to(dtype)
        inside = (tt >= lo) & (tt <= hi)
        if inverted:
            inside = ~inside
        return torch.where(inside, torch.full_like(tt, float(scale)), torch.ones_like(tt))
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"t must be a float or a tensor, got {type(t).__name__}")
    inside = lo <= float(t) <= hi
    return float(scale) if inside != inverted else 1.0


def sync_window_target(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, t: torch.Tensor, *,
                       band: Sequence[float] = SYNC_WINDOW_BAND, scale: float = SYNC_WINDOW_SCALE,
                       inverted: bool = False) -> torch.Tensor:
    """Teacher target with gated CFG: ``x0_c + (g(t) - 1) (x0_c - x0_u)`` with g from :func:`guidance_scale`.

    x0_cond, x0_uncond : (B, C, F, H, W) x0 predictions with the real and the negative condition.
    t : (B,) DMD timesteps (0..1).  Returns float32 (B, C, F, H, W)."""
    if x0_cond.shape != x0_uncond.shape:
        raise ValueError(f"x0_cond {tuple(x0_cond.shape)} and x0_uncond {tuple(x0_uncond.shape)} must match")
    g = guidance_scale(_per_sample_t(t, x0_cond), band=band, scale=scale, inverted=inverted).float()
    g = g.reshape(-1, *([1] * (x0_cond.dim() - 1)))
    c, u = x0_cond.float(), x0_uncond.float()
    return c + (g - 1.0) * (c - u)


# --------------------------------------------------------------------------------------------------- DMD
def dmd_gradient(gen: torch.Tensor, critic_x0: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """DMD2-normalised score difference ``(critic_x0 - teacher_x0) / (mean_i |gen - teacher_x0| + 1e-6)``.

    All (B, ...) tensors; the mean is per sample; computed in float32 without gradient.  Returns float32."""
    _same_shape(gen=gen, critic_x0=critic_x0, teacher_x0=teacher_x0)
    with torch.no_grad():
        g, c, te = gen.detach().float(), critic_x0.detach().float(), teacher_x0.detach().float()
        norm = (g - te).abs().flatten(1).mean(dim=1) + DMD_EPS
        w = (1.0 / norm).reshape(-1, *([1] * (g.dim() - 1)))
        return (c - te) * w


def dmd_loss(gen: torch.Tensor, critic_x0: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """Per-sample DMD loss ``L_i = 0.5 * mean_i (gen - sg(gen - grad))^2`` (see the module docstring).

    gen : (B, ...) the student's output (carries the gradient).  critic_x0, teacher_x0 : (B, ...) predictions at
    the noised gen (no gradient is taken through them).  Returns (B,) float32; its gradient w.r.t. ``gen`` is
    ``dmd_gradient(...) / numel_per_sample``.
    """
    grad = dmd_gradient(gen, critic_x0, teacher_x0)
    g = gen.float()
    target = (g - grad).detach()
    return 0.5 * (g - target).pow(2).flatten(1).mean(dim=1)


def predict_x0(model, x_t: torch.Tensor, t: torch.Tensor, cond, **kwargs) -> torch.Tensor:
    """x0 prediction of a velocity network at ``x_t`` (B, 16, F, H, W), t (B,) or (B, F) on 0..1.

    ``cond`` is a :class:`lipforcing.model.teacher.Condition`.  Returns float32."""
    v = model(cond.model_input(x_t), schedule.timestep_input(t), cond.context, cond.audio, **kwargs)
    return schedule.x0_from_velocity(x_t.float(), v.float(), t)


def teacher_x0_pair(teacher, x_t: torch.Tensor, t: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's conditional and unconditional x0 at (x_t, t), both passes always run (one batch of 2B, as
    the reference does for FSDP consistency).  The negative condition is the empty/zero text
    (``cond.negative_context()``) plus zero audio, with the same video conditioning ``y``.  No gradient."""
    B = x_t.shape[0]
    neg = cond.negative_context()
    if neg.shape[0] == 1 and B > 1:
        neg = neg.expand(B, *neg.shape[1:])
    with torch.no_grad():
        if neg.shape != cond.context.shape:   # different text lengths cannot share a batch
            x0_c = predict_x0(teacher, x_t, t, cond)
            x0_u = predict_x0(teacher, x_t, t, _negative(cond, neg))
            return x0_c, x0_u
        both = _stack_cond(cond, neg)
        x0 = predict_x0(teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        return x0[:B], x0[B:]


def sw_dmd_loss(gen: torch.Tensor, teacher, critic, cond, *, t: torch.Tensor | None = None,
                eps: torch.Tensor | None = None, band: Sequence[float] = SYNC_WINDOW_BAND,
                scale: float = SYNC_WINDOW_SCALE, inverted: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Sync-Window DMD loss of the student's output ``gen`` (B, 16, F, H, W).

    Draws (unless given) one t per sample (``schedule.sample_dmd_timesteps``: u ~ U[0.001, 0.999], shift 5) and
    noise eps, forms ``x_t = (1 - t) sg(gen) + t eps``, runs the critic (fake score) and the teacher (cond + uncond)
    without gradient and returns ``(per-sample loss (B,), info)``; info has ``t``, ``guidance`` (B,) and the
    detached ``grad_norm`` (mean |grad| per sample).
    """
    B = gen.shape[0]
    if t is None:
        t = schedule.sample_dmd_timesteps(B, generator=generator, device=gen.device)
    t = _per_sample_t(t, gen).to(gen.device)
    if eps is None:
        eps = torch.randn(gen.shape, generator=generator, device=gen.device, dtype=torch.float32)
    x_t = schedule.add_noise(gen.detach().float(), eps.float(), t)
    with torch.no_grad():
        critic_x0 = predict_x0(critic, x_t, t, cond)
        x0_c, x0_u = teacher_x0_pair(teacher, x_t, t, cond)
        teacher_x0 = sync_window_target(x0_c, x0_u, t, band=band, scale=scale, inverted=inverted)
    loss = dmd_loss(gen, critic_x0, teacher_x0)
    grad = dmd_gradient(gen, critic_x0, teacher_x0)
    info = {"t": t.detach(), "guidance": guidance_scale(t, band=band, scale=scale, inverted=inverted),
            "grad_norm": grad.abs().flatten(1).mean(dim=1)}
    return loss, info


# --------------------------------------------------------------------------------------------------- critic, DF
def critic_loss(critic, gen: torch.Tensor, cond, *, t: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Fake-score (critic) loss: denoising score matching in x0 space on the student's samples,
    ``MSE(critic_x0((1 - t) sg(gen) + t eps, t), sg(gen))`` with t drawn like the DMD t.  Returns the per-sample
    loss (B,) float32 (gradient w.r.t. the critic only)."""
    B = gen.shape[0]
    x0 = gen.detach().float()
    if t is None:
        t = schedule.sample_dmd_timesteps(B, generator=generator, device=gen.device)
    t = _per_sample_t(t, gen).to(gen.device)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=gen.device, dtype=torch.float32)
    x_t = schedule.add_noise(x0, eps.float(), t)
    pred = predict_x0(critic, x_t, t, cond)
    return (pred - x0).pow(2).flatten(1).mean(dim=1)


def df_loss(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Diffusion-forcing loss ``0.5 * MSE(x0_pred, x0)`` over the whole clip, per sample (B,) float32."""
    _same_shape(x0_pred=x0_pred, x0=x0)
    return 0.5 * (x0_pred.float() - x0.detach().float()).pow(2).flatten(1).mean(dim=1)


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_i(w_i * L_i)`` with detached weights (``None`` = plain mean)."""
    if weights is None:
        return losses.mean()
    w = weights.detach().to(losses.device, losses.dtype)
    if w.shape != losses.shape:
        raise ValueError(f"weights shape {tuple(w.shape)} must equal the per-sample losses {tuple(losses.shape)}")
    return (w * losses).mean()


# --------------------------------------------------------------------------------------------------- helpers
def _check_band(band) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in band)
    except (TypeError, ValueError):
        raise ValueError(f"band must be a pair (low, high) of numbers, got {band!r}") from None
    if not lo <= hi:
        raise ValueError(f"band must satisfy low <= high, got {tuple(band)}")
    return lo, hi


def _per_sample_t(t, x: torch.Tensor) -> torch.Tensor:
    B = x.shape[0]
    if not isinstance(t, torch.Tensor):
        return torch.full((B,), float(t), device=x.device)
    if t.dim() == 0:
        return t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"t must be a number or a (batch,) = ({B},) tensor, got shape {tuple(t.shape)}")
    return t


def _same_shape(**tensors) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match, got {shapes}")


def _negative(cond, neg_context):
    from lipforcing.model.teacher import Condition

    audio = None if cond.audio is None else torch.zeros_like(cond.audio)
    return Condition(y=cond.y, context=neg_context, audio=audio, neg_context=neg_context)


def _stack_cond(cond, neg_context):
    """Condition of batch 2B: [real | negative] (same y; empty text and zero audio for the negative half)."""
    from lipforcing.model.teacher import Condition

    audio = None if cond.audio is None else torch.cat([cond.audio, torch.zeros_like(cond.audio)])
    context = torch.cat([cond.context, neg_context.to(cond.context.dtype)])
    return Condition(y=torch.cat([cond.y, cond.y]), context=context, audio=audio)
