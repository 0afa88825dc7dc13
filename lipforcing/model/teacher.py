"""The bidirectional teacher: classifier-free guidance and the 50-step shifted Euler sampler.

The teacher (and the DMD critic) is ``build_model(config, causal=False)``, a :class:`LipSyncDiT` attending over
the whole clip.  Its CFG negative (OmniAvatar / Lip Forcing) is the *empty-prompt* text embedding plus *zero* audio
features, with the same video conditioning channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lipforcing import schedule


@dataclass
class Condition:
    """What the network is conditioned on, besides the noisy latents.

    y : (B, in_dim - 16, F, H, W) conditioning channels (reference latent, mouth mask, masked video latents,
        reference-sequence latents), concatenated after the 16 noisy channels.
    context : (B, Lt, text_dim) prompt embedding.  neg_context : the empty-prompt embedding (the CFG negative;
        ``None`` = zeros of context's shape, the released loader's fallback).
    audio : (B, F, 4, audio_dim) or None.
    """

    y: torch.Tensor
    context: torch.Tensor
    audio: torch.Tensor | None = None
    neg_context: torch.Tensor | None = None

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """[x (noisy, 16 ch) | y] along channels, in x's dtype."""
        return torch.cat([x, self.y.to(x.dtype)], dim=1)

    def negative_context(self) -> torch.Tensor:
        return torch.zeros_like(self.context) if self.neg_context is None else self.neg_context


def cfg_velocity(model, x: torch.Tensor, timestep, context: torch.Tensor, audio: torch.Tensor | None,
                 neg_context: torch.Tensor, scale: float, **kwargs) -> torch.Tensor:
    """Classifier-free guided velocity: ``uncond + scale * (cond - uncond)``.

    cond = ``model(x, timestep, context, audio)``; uncond = ``model(x, timestep, neg_context, zeros_like(audio))``
    (the same video conditioning, which lives in x's channels).  ``scale == 1`` runs the conditional pass only.
    Both passes run as one batch of 2B.  Returns float32 (B, 16, F, H, W).  Extra keyword arguments go to the
    model (e.g. ``attention=`` for a causal model).
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if float(scale) == 1.0:
        return model(x, timestep, context, audio, **kwargs)
    if neg_context.shape[0] != context.shape[0] and neg_context.shape[0] == 1:
        neg_context = neg_context.expand(context.shape[0], *neg_context.shape[1:])
    if neg_context.shape != context.shape:
        # different text lengths cannot share a batch: two calls
        cond = model(x, timestep, context, audio, **kwargs)
        uncond = model(x, timestep, neg_context, None if audio is None else torch.zeros_like(audio), **kwargs)
    else:
        B = x.shape[0]
        t2 = timestep
        if isinstance(timestep, torch.Tensor) and timestep.dim() >= 1:
            t2 = torch.cat([timestep, timestep], dim=0)
        a2 = None if audio is None else torch.cat([audio, torch.zeros_like(audio)], dim=0)
        both = model(torch.cat([x, x], dim=0), t2, torch.cat([context, neg_context.to(context.dtype)], dim=0), a2,
                     **kwargs)
        cond, uncond = both[:B], both[B:]
    return uncond + float(scale) * (cond - uncond)


def sample(model, noise: torch.Tensor, cond: Condition, *, steps: int = schedule.TEACHER_STEPS,
           shift: float = schedule.SHIFT, guidance: float = 4.5,
           callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Teacher sampling: ``steps`` Euler steps of the flow ODE on the shifted schedule, with CFG.

    sigmas = ``schedule.teacher_sigmas(steps, shift)`` (1 -> ~0) then 0; each step
    ``x <- x + (sigma_next - sigma) * v(x, 1000 sigma)`` with ``v`` the guided velocity.

    Parameters
    ----------
    model : a bidirectional LipSyncDiT (or anything with its forward signature).
    noise : (B, 16, F, H, W) standard normal, the start at t = 1.
    cond : the Condition (y channels, text, audio, negative text).
    guidance : CFG scale (4.5 in the paper; 1 = no CFG).
    callback : called as ``callback(step, x, velocity)`` after each step.

    Returns
    -------
    x0 : (B, 16, F, H, W) float32 latents.  Runs under ``torch.no_grad()``.
    """
    sigmas = schedule.teacher_sigmas(steps, shift, dtype=torch.float64).tolist() + [0.0]
    x = noise.float()
    neg = cond.negative_context()
    B = x.shape[0]
    with torch.no_grad():
        for j in range(steps):
            t = torch.full((B,), schedule.timestep_input(sigmas[j]), device=x.device, dtype=torch.float32)
            v = cfg_velocity(model, cond.model_input(x), t, cond.context, cond.audio, neg, guidance)
            x = schedule.euler_step(x, v.float(), sigmas[j], sigmas[j + 1])
            if callback is not None:
                callback(j, x, v)
    return x
