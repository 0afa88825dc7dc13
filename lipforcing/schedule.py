"""Flow-matching (rectified-flow) schedule math: the single source of these formulas in lipforcing.

Convention (Wan2.1 / the Lip Forcing paper)::

    x_t = (1 - t) * x0 + t * eps          t in [0, 1]; t = 0 is data, t = 1 is noise
    v   = eps - x0                        the network predicts the velocity v = d x_t / d t
    model timestep = 1000 * t             (Wan's 0..1000 scale)

Given ``x_t`` and ``t`` any one of (x0, eps, v) determines the other two::

    x0 = x_t - t v             eps = x_t + (1 - t) v
    v  = (x_t - x0) / t        eps = (x_t - (1 - t) x0) / t
    x0 = (x_t - t eps)/(1 - t)    v = (eps - x_t) / (1 - t)

Timestep shift ``s`` (s = 5 everywhere in the paper) warps a uniform ``u`` towards the noise end::

    t = s u / (1 + (s - 1) u),      u = t / (s - (s - 1) t)

Schedules
    * teacher: 50 Euler steps on ``linspace(1, 0, 51)[:-1]`` shifted with s = 5 (``teacher_sigmas``); the
      Sync-Window band [0.556, 0.882] is steps 40..20 of it.
    * student: ``STUDENT_TIMESTEPS = (0.999, 0.769, 0.0)``: predict x0 at 0.999, re-noise to 0.769 with fresh
      noise, predict x0 at 0.769 (then a cache-write pass on the clean x0 at t = 0).
    * DMD: one t per sample, ``u ~ U[0.001, 0.999]`` then shifted (``sample_dmd_timesteps``).

Tensor helpers take ``t`` as a Python float, a 0-d tensor, a per-sample ``(B,)`` tensor, or a per-frame
``(B, F)`` tensor for video latents ``(B, C, F, H, W)`` (diffusion forcing gives each chunk its own t).  They
compute in float32 (float64 if an input is float64) and return ``x_t``'s dtype.  The fused GPU form of
``x0_from_velocity`` followed by ``add_noise`` is :func:`lipforcing.ops.denoise_update`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

SHIFT = 5.0
"""Timestep shift used by the teacher, the DMD timestep draw and the student schedule."""
TIMESTEP_SCALE = 1000.0
"""The network's timestep input is ``TIMESTEP_SCALE * t``."""
TEACHER_STEPS = 50
STUDENT_TIMESTEPS: tuple[float, ...] = (0.999, 0.769, 0.0)
"""The student's two-step schedule: denoise at 0.999 and 0.769, then 0 (clean x0, the cache-write pass)."""
DMD_T_RANGE = (0.001, 0.999)
"""Range of the uniform ``u`` drawn for DMD before the shift."""


# --------------------------------------------------------------------------------------------------- time warps
def shift_time(u, shift: float = SHIFT):
    """``t = s u / (1 + (s - 1) u)``: maps [0, 1] onto [0, 1] monotonically, pushing mass towards t = 1.

    ``u`` is a float or a tensor (returned in kind).  ``shift = 1`` is the identity."""
    _check_shift(shift)
    return shift * u / (1.0 + (shift - 1.0) * u)


def unshift_time(t, shift: float = SHIFT):
    """Inverse of :func:`shift_time`: ``u = t / (s - (s - 1) t)``."""
    _check_shift(shift)
    return t / (shift - (shift - 1.0) * t)


def timestep_input(t):
    """The network's timestep input on Wan's 0..1000 scale: ``1000 * t`` (float or tensor)."""
    return TIMESTEP_SCALE * t


def teacher_sigmas(num_steps: int = TEACHER_STEPS, shift: float = SHIFT, *, dtype=torch.float64,
                   device=None) -> torch.Tensor:
    """The teacher's ``num_steps`` shifted noise levels, from 1 down (the terminal 0 is not included).

    ``sigmas[j] = shift_time(1 - j / num_steps)`` for j = 0 .. num_steps - 1, i.e. ``linspace(1, 0, n + 1)[:-1]``
    shifted.  With the defaults sigma_20 = 0.882, sigma_30 = 0.769, sigma_40 = 0.556.  Returns ``(num_steps,)``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return shift_time(u, shift).to(dtype=dtype, device=device)


def euler_step(x_t: torch.Tensor, velocity: torch.Tensor, t, t_next) -> torch.Tensor:
    """One flow-matching Euler step: ``x_{t_next} = x_t + (t_next - t) v`` (the teacher's sampler step)."""
    tt, tn = _as_time(t, x_t), _as_time(t_next, x_t)
    return _out(_f(x_t) + (tn - tt) * _f(velocity), x_t)


# --------------------------------------------------------------------------------------------------- noising
def add_noise(x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps``; returns x0's dtype."""
    tt = _as_time(t, x0)
    return _out((1.0 - tt) * _f(x0) + tt * _f(eps), x0)


def velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ``v = eps - x0`` (independent of t); returns x0's dtype."""
    return _out(_f(eps) - _f(x0), x0)


# --------------------------------------------------------------------------------------------------- conversions
def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """``x0 = x_t - t v``."""
    tt = _as_time(t, x_t)
    return _out(_f(x_t) - tt * _f(v), x_t)


def eps_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """``eps = x_t + (1 - t) v``."""
    tt = _as_time(t, x_t)
    return _out(_f(x_t) + (1.0 - tt) * _f(v), x_t)


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
    """``v = (x_t - x0) / t``; undefined at t = 0 (division by zero gives inf/nan there)."""
    tt = _as_time(t, x_t)
    return _out((_f(x_t) - _f(x0)) / tt, x_t)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
    """``eps = (x_t - (1 - t) x0) / t``; undefined at t = 0."""
    tt = _as_time(t, x_t)
    return _out((_f(x_t) - (1.0 - tt) * _f(x0)) / tt, x_t)


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """``x0 = (x_t - t eps) / (1 - t)``; undefined at t = 1."""
    tt = _as_time(t, x_t)
    return _out((_f(x_t) - tt * _f(eps)) / (1.0 - tt), x_t)


def velocity_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """``v = (eps - x_t) / (1 - t)``; undefined at t = 1."""
    tt = _as_time(t, x_t)
    return _out((_f(eps) - _f(x_t)) / (1.0 - tt), x_t)


# --------------------------------------------------------------------------------------------------- training draws
def sample_dmd_timesteps(batch: int, *, shift: float = SHIFT, t_range: Sequence[float] = DMD_T_RANGE,
                         generator: torch.Generator | None = None, device=None,
                         dtype=torch.float32) -> torch.Tensor:
    """One DMD timestep per sample: ``u ~ U[lo, hi]`` (default [0.001, 0.999]), then ``t = shift_time(u)``.

    Returns ``(batch,)`` in ``dtype`` on ``device``; ``generator`` (on that device) makes it reproducible."""
    lo, hi = _check_range(t_range)
    _check_batch(batch)
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    return shift_time(lo + (hi - lo) * u, shift).to(dtype)


def sample_chunk_timesteps(batch: int, num_chunks: int, *, timesteps: Sequence[float] = STUDENT_TIMESTEPS,
                           generator: torch.Generator | None = None, device=None,
                           dtype=torch.float32) -> torch.Tensor:
    """Diffusion-forcing draw: each chunk of each sample gets a t chosen uniformly from ``timesteps`` (default
    the student's list {0.999, 0.769, 0}).  Returns ``(batch, num_chunks)``."""
    _check_batch(batch)
    _check_batch(num_chunks, "num_chunks")
    if len(timesteps) == 0:
        raise ValueError("timesteps must not be empty")
    table = torch.tensor([float(v) for v in timesteps], dtype=dtype, device=device)
    idx = torch.randint(len(timesteps), (batch, num_chunks), generator=generator, device=device)
    return table[idx]


def student_timesteps() -> list[float]:
    """The student's schedule as a list ``[0.999, 0.769, 0.0]`` (pairs (t, t_next) are consecutive entries)."""
    return list(STUDENT_TIMESTEPS)


# --------------------------------------------------------------------------------------------------- helpers
def _check_shift(shift) -> None:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0 or math.isinf(shift):
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")


def _check_range(r) -> tuple[float, float]:
    lo, hi = (float(v) for v in r)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"t_range must satisfy 0 <= lo <= hi <= 1, got {tuple(r)}")
    return lo, hi


def _check_batch(n, name: str = "batch") -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _f(x: torch.Tensor) -> torch.Tensor:
    return x.to(_compute_dtype(x))


def _out(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y.to(like.dtype)


def _as_time(t, x: torch.Tensor):
    """``t`` as something that broadcasts against ``x`` (B, ...): a float stays a float; a 0-d tensor stays 0-d;
    ``(B,)`` becomes ``(B, 1, ..., 1)``; ``(B, F)`` (per frame) becomes ``(B, 1, F, 1, 1)`` for ``(B, C, F, H, W)``."""
    if not isinstance(t, torch.Tensor):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"t must be a float or a tensor, got {type(t).__name__}")
        return float(t)
    t = t.to(device=x.device, dtype=_compute_dtype(x))
    if t.dim() == 0:
        return t
    if t.dim() == 1 and t.shape[0] == x.shape[0]:
        return t.reshape(-1, *([1] * (x.dim() - 1)))
    if t.dim() == 2 and x.dim() == 5 and tuple(t.shape) == (x.shape[0], x.shape[2]):
        return t.reshape(t.shape[0], 1, t.shape[1], 1, 1)
    raise ValueError(f"t must be a float, a 0-d tensor, a (batch,) tensor or, for (B, C, F, H, W) latents, a "
                     f"(batch, frames) tensor; got shape {tuple(t.shape)} for x of shape {tuple(x.shape)}")
