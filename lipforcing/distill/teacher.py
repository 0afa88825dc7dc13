"""Teacher utilities for distillation: recorded 50-step trajectories and the Euler-jump probe.

The sampler itself (50 shifted Euler steps with CFG) is :func:`lipforcing.model.teacher.sample`; here it is run
with a callback to record every step, and the paper's 2x2 trajectory analysis is reproduced by
:func:`euler_jump`: one guided teacher velocity at step ``j0`` (CFG ``s0``), a single Euler jump to the noise level
of step ``j1``, then one more teacher evaluation there (CFG ``s1``) whose x0 prediction is the result.  Sweeping
``j1`` and (s0, s1) in {1, 4.5}^2 re-derives the student's two-step schedule (t = 0.999 -> sigma_j1) for a new
teacher: the paper picks j1 = 30 (tau = 0.769) with the no-CFG -> CFG order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from lipforcing import schedule
from lipforcing.model.teacher import Condition, cfg_velocity, sample


@dataclass
class Trajectory:
    """A recorded teacher trajectory.

    sigmas : (steps + 1,) float64 noise levels, sigmas[0] = 1 ... sigmas[-1] = 0.
    xs : list of steps + 1 tensors (B, 16, F, H, W): xs[j] is the state at sigmas[j] (xs[0] is the noise).
    x0s : list of ``steps`` tensors: the x0 prediction ``x_j - sigma_j v_j`` made at step j.
    """

    sigmas: torch.Tensor
    xs: list
    x0s: list

    @property
    def final(self) -> torch.Tensor:
        return self.xs[-1]


def sample_trajectory(teacher, noise: torch.Tensor, cond: Condition, *, steps: int = schedule.TEACHER_STEPS,
                      shift: float = schedule.SHIFT, guidance: float = 4.5, keep_states: bool = True) -> Trajectory:
    """Run the teacher sampler (``lipforcing.model.teacher.sample``) and record each step.

    ``keep_states=False`` keeps only the x0 predictions and the final sample (memory).  Runs without gradient."""
    sigmas = schedule.teacher_sigmas(steps, shift, dtype=torch.float64)
    sig = sigmas.tolist() + [0.0]
    xs = [noise.float()]
    x0s = []
    prev = {"x": noise.float()}

    def record(j: int, x_next: torch.Tensor, v: torch.Tensor) -> None:
        x0s.append(schedule.x0_from_velocity(prev["x"], v.float(), sig[j]).cpu())
        prev["x"] = x_next
        if keep_states or j == steps - 1:
            xs.append(x_next.detach().cpu())

    sample(teacher, noise, cond, steps=steps, shift=shift, guidance=guidance, callback=record)
    return Trajectory(torch.tensor(sig, dtype=torch.float64), xs, x0s)


def euler_jump(teacher, x: torch.Tensor, cond: Condition, *, j0: int = 0, j1: int = 30, s0: float = 1.0,
               s1: float = 4.5, steps: int = schedule.TEACHER_STEPS, shift: float = schedule.SHIFT,
               t0: float | None = None) -> dict:
    """The Euler-jump probe: two teacher evaluations standing in for a whole trajectory.

    x : (B, 16, F, H, W) the state at step ``j0`` (pure noise for j0 = 0).  ``t0`` overrides the noise level of
    that state (e.g. the student's 0.999 instead of sigma_0 = 1).

    1. v0 = teacher velocity at (x, t0 = sigma_j0) with CFG s0;  x0_first = x - t0 v0.
    2. jump: x_j1 = x + (sigma_j1 - t0) v0 (one Euler step of the flow ODE straight to sigma_j1).
    3. v1 = teacher velocity at (x_j1, sigma_j1) with CFG s1;  x0 = x_j1 - sigma_j1 v1.

    Returns a dict with ``x0`` (the probe's output), ``x0_first``, ``x_jump``, ``t0`` and ``t1``.  No gradient.
    """
    sigmas = schedule.teacher_sigmas(steps, shift, dtype=torch.float64).tolist() + [0.0]
    for name, j in (("j0", j0), ("j1", j1)):
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j <= steps:
            raise ValueError(f"{name} must be an int step index in [0, {steps}], got {j!r}")
    if j1 <= j0:
        raise ValueError(f"j1 ({j1}) must come after j0 ({j0})")
    ta = float(sigmas[j0] if t0 is None else t0)
    tb = float(sigmas[j1])
    B = x.shape[0]
    neg = cond.negative_context()
    with torch.no_grad():
        tin = torch.full((B,), schedule.timestep_input(ta), device=x.device)
        v0 = cfg_velocity(teacher, cond.model_input(x.float()), tin, cond.context, cond.audio, neg, float(s0)).float()
        x0_first = schedule.x0_from_velocity(x.float(), v0, ta)
        x_jump = schedule.euler_step(x.float(), v0, ta, tb)
        if tb == 0.0:
            x0 = x_jump
        else:
            tin = torch.full((B,), schedule.timestep_input(tb), device=x.device)
            v1 = cfg_velocity(teacher, cond.model_input(x_jump), tin, cond.context, cond.audio, neg,
                              float(s1)).float()
            x0 = schedule.x0_from_velocity(x_jump, v1, tb)
    return {"x0": x0, "x0_first": x0_first, "x_jump": x_jump, "t0": ta, "t1": tb}


def euler_jump_grid(teacher, noise: torch.Tensor, cond: Condition, *, j1_values: Iterable[int] = (20, 30, 40),
                    scales: Sequence[float] = (1.0, 4.5), metrics: dict[str, Callable] | None = None,
                    steps: int = schedule.TEACHER_STEPS, shift: float = schedule.SHIFT) -> list[dict]:
    """The paper's factorial: for every j1 and every (s0, s1) in ``scales`` x ``scales``, run :func:`euler_jump`
    from ``noise`` (j0 = 0) and evaluate ``metrics`` (name -> fn(x0) -> float, e.g. a sync score of the decoded
    video, or the MSE to the ground truth).  Returns one row per probe: j1, t1, s0, s1, the metrics (and the x0
    when no metrics are given)."""
    rows = []
    for j1 in j1_values:
        for s0 in scales:
            for s1 in scales:
                out = euler_jump(teacher, noise, cond, j0=0, j1=int(j1), s0=s0, s1=s1, steps=steps, shift=shift)
                row = {"j1": int(j1), "t1": out["t1"], "s0": float(s0), "s1": float(s1)}
                if metrics:
                    for name, fn in metrics.items():
                        row[name] = float(fn(out["x0"]))
                else:
                    row["x0"] = out["x0"]
                rows.append(row)
    return rows
