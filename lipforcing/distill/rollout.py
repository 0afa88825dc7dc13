"""Self-Forcing rollout of the causal student (stage 2).

Rollout (Lip Forcing section 4.1 / Self Forcing), for every chunk in stream order::

    x = eps_chunk                                         # pure noise, used as the state at t = 0.999
    for s, t in enumerate(t_list[:-1]):                   # (0.999, 0.769)
        if s == exit_step:  x0 = G(x, t)  WITH gradient;  break
        x0 = G(x, t) without gradient;  x = (1 - t_next) x0 + t_next eps'    # fresh noise ("sde")
    gen_chunk = x0
    G(x0, t = 0, write=True) without gradient             # cache write of the clean chunk

``G`` is the student's own streaming forward, ``CausalLipSyncDiT.forward_chunk``.  ``exit_step`` is drawn once
per rollout (uniform over the denoising steps; on rank 0 and broadcast when torch.distributed is initialised) and
shared by all chunks.  Past K/V live in the student's RollingKVCaches, written under ``no_grad``; the exit forward
(``write=False``) is differentiable in the current chunk's q, k, v and reads the cache as a constant.  Gradient
therefore flows only through the current chunk's exit forward.  ``ops.chunk_attention`` keeps no copy of the cache
for its backward, which runs after later chunks were written (and, with gradient checkpointing, re-runs the exit
forward), so that forward reads a copy of the caches.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from lipforcing import ops, schedule
from lipforcing.model.teacher import Condition


# --------------------------------------------------------------------------------------------------- rollout
def _snapshot(state):
    """A shallow copy of a StreamState whose KV caches are copies (k, v, pos cloned): the exit forward reads
    these, since its backward (and a gradient-checkpointing re-run) comes after the real caches were written."""
    snap = copy.copy(state)
    snap.caches = []
    for cache in state.caches:
        c = copy.copy(cache)
        c.k, c.v, c.pos = cache.k.clone(), cache.v.clone(), cache.pos.clone()
        snap.caches.append(c)
    return snap


def randn_like_batch(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise of x's shape (float32, on x's device), drawn on the CPU from ``generator`` (one
    torch.Generator, a list of one per sample, or None for the global RNG) so it is the same on every device."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        eps = torch.stack([torch.randn(tuple(x.shape[1:]), generator=g) for g in generator])
    else:
        eps = torch.randn(tuple(x.shape), generator=generator)
    return eps.to(x.device)


def draw_exit_step(num_steps: int, *, generator: torch.Generator | None = None, device=None) -> int:
    """Uniform exit step in [0, num_steps), drawn on rank 0 and broadcast to all ranks when torch.distributed is
    initialised (every rank must stop at the same step so the FSDP collectives line up)."""
    s = torch.randint(num_steps, (1,), generator=generator)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        dev = device if torch.distributed.get_backend() == "nccl" else "cpu"
        s = s.to(dev)
        torch.distributed.broadcast(s, src=0)
    return int(s.item())


def chunk_bounds(frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """(start, end) latent-frame ranges of the chunks; only the last may be short (the student's convention)."""
    return [(s, min(s + chunk_frames, frames)) for s in range(0, frames, chunk_frames)]


def self_forcing_rollout(student, noise: torch.Tensor, cond: Condition, *,
                         timesteps: Sequence[float] = schedule.STUDENT_TIMESTEPS, exit_step: int | None = None,
                         grad: bool = True, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Roll the student out over a whole clip, chunk by chunk, with the few-step schedule.

    Parameters
    ----------
    student : a :class:`lipforcing.model.CausalLipSyncDiT` (possibly FSDP-sharded).
    noise : (B, 16, F, H, W) the initial noise of every chunk (used directly as the state at ``timesteps[0]``).
    cond : the Condition (y (B, 49, F, H, W), text, audio (B, F, 4, audio_dim) or None).
    timesteps : the schedule including the final 0, default (0.999, 0.769, 0).
    exit_step : index of the denoising step whose x0 is the chunk output and carries the gradient; ``None`` draws
        it uniformly (shared by all chunks; broadcast from rank 0).
    grad : False runs everything without gradient (the critic's fresh samples).
    generator : for the fresh noise between steps: a torch.Generator (CPU), or a list of one per sample (the
        trainer's choice: the noise of a sample then does not depend on how the batch is split across ranks).
        The exit step, when drawn here, uses the first one.

    Returns
    -------
    gen : (B, 16, F, H, W) float32, differentiable w.r.t. the student's parameters through the exit forwards only.
    info : ``{"exit_step": int, "t_exit": float}``.
    """
    ts = [float(v) for v in timesteps]
    if len(ts) < 2 or ts[-1] != 0.0 or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must decrease strictly and end at 0, got {tuple(timesteps)}")
    steps = len(ts) - 1
    if exit_step is None:
        g0 = generator[0] if isinstance(generator, (list, tuple)) else generator
        exit_step = draw_exit_step(steps, generator=g0, device=noise.device)
    if isinstance(exit_step, bool) or not isinstance(exit_step, int) or not 0 <= exit_step < steps:
        raise ValueError(f"exit_step must be an int in [0, {steps}), got {exit_step!r}")
    B, C, Fr, H, W = noise.shape
    grad = bool(grad) and torch.is_grad_enabled()
    with torch.set_grad_enabled(grad):
        state = student.init_stream(cond.context)
    dev_type = noise.device.type
    if torch.is_autocast_enabled(dev_type):
        state.dtype = torch.get_autocast_dtype(dev_type)   # caches hold what the autocast linears produce
    outs = []
    for a, b in chunk_bounds(Fr, student.config.chunk_frames):
        y = cond.y[:, :, a:b]
        audio = None if cond.audio is None else cond.audio[:, a:b]
        x = noise[:, :, a:b].float()
        x0 = None
        for s in range(steps):
            t = ts[s]
            inp = torch.cat([x, y.to(x.dtype)], dim=1)
            if s == exit_step:
                with torch.set_grad_enabled(grad):
                    # a snapshot: chunk_attention's backward reads the caches in place, and later chunks write them
                    v = student.forward_chunk(inp, schedule.timestep_input(t), _snapshot(state) if grad
                                              else state, audio, write=False)
                    x0 = schedule.x0_from_velocity(x, v.float(), t)
                break
            with torch.no_grad():
                v = student.forward_chunk(inp, schedule.timestep_input(t), state, audio, write=False)
                eps = randn_like_batch(x, generator)
                _, x = ops.denoise_update(x, v.float(), t, ts[s + 1], noise=eps)
        outs.append(x0)
        with torch.no_grad():   # cache write of the clean chunk at t = 0 (context noise 0)
            student.forward_chunk(torch.cat([x0.detach(), y.to(x0.dtype)], dim=1), 0.0, state, audio, write=True)
    return torch.cat(outs, dim=2), {"exit_step": exit_step, "t_exit": ts[exit_step]}
