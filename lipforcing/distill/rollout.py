"""Self-Forcing rollout of the causal student (stage 2) and a differentiable chunk forward.

Rollout (Lip Forcing section 4.1 / Self Forcing), for every chunk in stream order::

    x = eps_chunk                                         # pure noise, used as the state at t = 0.999
    for s, t in enumerate(t_list[:-1]):                   # (0.999, 0.769)
        if s == exit_step:  x0 = G(x, t)  WITH gradient;  break
        x0 = G(x, t) without gradient;  x = (1 - t_next) x0 + t_next eps'    # fresh noise ("sde")
    gen_chunk = x0
    G(x0, t = 0, write=True) without gradient             # cache write of the clean chunk

``exit_step`` is drawn once per rollout (uniform over the denoising steps; on rank 0 and broadcast when
torch.distributed is initialised) and shared by all chunks.  Past K/V live in the student's RollingKVCaches,
written under ``no_grad``, so gradient flows only through the current chunk's exit forward.

The student's streaming op (``ops.chunk_attention``) is inference-only, so the exit forward goes through
:func:`forward_chunk_train`: the same computation as ``CausalLipSyncDiT.forward_chunk(..., write=False)`` with the
cached keys/values gathered and attended by differentiable PyTorch attention (SDPA).  The two agree to float
rounding (tested); the non-exit and cache-write passes use the student's own ``forward_chunk``.
"""
from __future__ import annotations

import math
import types
from typing import Sequence

import torch
import torch.nn.functional as F

from lipforcing import ops, schedule
from lipforcing.model.layers import frame_timesteps, patchify
from lipforcing.model.teacher import Condition
from lipforcing.ops.reference import window_relative_positions
from lipforcing.ops.rope import apply_rope, rotate


# --------------------------------------------------------------------------------------------------- attention
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, *, rope=None,
                     scale: float | None = None) -> torch.Tensor:
    """Differentiable twin of ``ops.chunk_attention(q, k, v, cache, write=False, rope=rope)``.

    q, k, v : (B, n, H, D) the current chunk (gradient flows into them).  The cached keys/values are read as
    constants (they were written without gradient).  ``rope``: None (q, k already rotated: absolute mode) or the
    stream's RopeSpec (dynamic RoPE: q and all keys rotated with window-relative time positions).
    Returns (B, n, H, D) in q's dtype.  Reads ``cache.pos`` on the host (training only).
    """
    B, n, H, D = q.shape
    S, R, chunk, window = cache.sink, cache.ring, cache.chunk_size, cache.window
    P = int(cache.pos.item())
    end = P + chunk
    past = list(range(min(S, P))) + list(range(max(S, end - window), P))
    slots = [p if p < S else S + (p - S) % R for p in past]
    dev = q.device
    slot_idx = torch.tensor(slots, dtype=torch.long, device=dev)
    pk = cache.k.index_select(1, slot_idx).to(k.dtype)
    pv = cache.v.index_select(1, slot_idx).to(v.dtype)
    keys_k = torch.cat([pk, k], dim=1)
    keys_v = torch.cat([pv, v], dim=1)
    if rope is not None:
        tpf = rope.tokens_per_frame
        key_abs = torch.tensor(past + list(range(P, P + n)), dtype=torch.long, device=dev)
        cur = key_abs[len(past):]
        end_t = torch.tensor(end, device=dev)
        key_t = window_relative_positions(key_abs, end_t, window, S) // tpf
        q_t = window_relative_positions(cur, end_t, window, S) // tpf
        q = rotate(q, q_t, cur % tpf, rope).to(v.dtype)
        keys_k = rotate(keys_k, key_t, key_abs % tpf, rope).to(v.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys_k.transpose(1, 2), keys_v.transpose(1, 2),
                                         scale=scale)
    return out.transpose(1, 2).to(q.dtype)


def forward_chunk_train(student, x: torch.Tensor, timestep, state, audio: torch.Tensor | None = None) -> torch.Tensor:
    """``student.forward_chunk(x, timestep, state, audio, write=False)`` with gradient (the exit step).

    Same arguments and result as the student's method; the cache is read, never written.  Under FSDP2 this is
    registered as a forward method of the student (see :func:`lipforcing.distill.trainer.shard_model`) and is
    then called as ``student.forward_chunk_train(...)``."""
    c = student.config
    B, Fr, gh, gw = student._check_x(x)
    if B != state.batch:
        raise ValueError(f"x has batch {B} but the stream was started with batch {state.batch}")
    if Fr > c.chunk_frames:
        raise ValueError(f"x has {Fr} latent frames; a chunk has at most chunk_frames={c.chunk_frames}")
    if state.grid is None:
        student._allocate(state, (gh, gw))
    elif state.grid != (gh, gw):
        raise ValueError(f"x has a latent grid of {(gh, gw)} tokens but the stream was set up for {state.grid}")
    tpf = gh * gw
    t = frame_timesteps(timestep, B, Fr, x.device)
    e, e0 = student.embed_time(t)
    audio_tok = student.audio_tokens(audio, B, Fr)
    tokens = patchify(x, student.patch_embedding.weight, student.patch_embedding.bias, c.patch_size).float()
    if c.rope_mode == "absolute":
        spec = student.rope_table(state.grid, state.frame + Fr, x.device)
        t_pos = (torch.arange(Fr, device=x.device) + state.frame).repeat_interleave(tpf)

        def attend_for(i):
            def attend(q, k, v):
                q = apply_rope(q, t_pos, spec).to(v.dtype)
                k = apply_rope(k, t_pos, spec).to(v.dtype)
                return cached_attention(q, k, v, state.caches[i])
            return attend
    else:
        def attend_for(i):
            def attend(q, k, v):
                return cached_attention(q, k, v, state.caches[i], rope=state.rope)
            return attend
    h = student.run_blocks(tokens, e0, attend_for, state.text_kv, audio_tok, tokens_per_frame=tpf,
                           audio_scale=state.audio_scale)
    return student.output(h, e, (Fr, gh, gw))


def _method(student, name: str, fn):
    """The student's (possibly FSDP-registered) method ``name``, else ``fn`` bound to it."""
    m = student.__dict__.get(name)
    return m if m is not None else types.MethodType(fn, student)


# --------------------------------------------------------------------------------------------------- rollout
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
    train_chunk = _method(student, "forward_chunk_train", forward_chunk_train)
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
                    v = train_chunk(inp, schedule.timestep_input(t), state, audio)
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
