"""``lipforcing train --stage df``: stage 1, diffusion forcing of the causal student.

Per iteration: each chunk of 3 latent frames gets t from {0.999, 0.769, 0}; x_t per chunk; one block-causal pass
with a random (window, sink) from ``df_attention_configs``; loss 0.5 * MSE(x0_pred, x0).  The loop, checkpoints
and config are :class:`lipforcing.distill.trainer.Trainer`'s; this module holds the stage's step.
"""
from __future__ import annotations

import torch

from lipforcing import schedule

__all__ = ["DFSteps"]


class DFSteps:
    """The df step, mixed into :class:`~lipforcing.distill.trainer.Trainer`."""

    def df_losses(self, k: int, batch: dict, *, attention=None) -> torch.Tensor:
        """Per-sample diffusion-forcing losses of iteration k (with gradient)."""
        from lipforcing.distill.data import batch_condition
        from lipforcing.distill.losses import df_loss
        from lipforcing.distill.rollout import chunk_bounds

        x0, cond = batch_condition(batch, self.device)
        B, _, Fr = x0.shape[:3]
        bounds = chunk_bounds(Fr, self.model_cfg.chunk_frames)
        gens = self.sample_gens(k, "df")
        t_chunk = torch.cat([schedule.sample_chunk_timesteps(1, len(bounds), timesteps=self.cfg.timesteps,
                                                             generator=g) for g in gens])
        sizes = torch.tensor([b - a for a, b in bounds])
        t = t_chunk.repeat_interleave(sizes, dim=1).to(self.device)           # (B, F)
        eps = torch.stack([torch.randn(tuple(x0.shape[1:]), generator=g) for g in gens]).to(self.device)
        x_t = schedule.add_noise(x0, eps, t)
        with self.autocast():
            v = self.student(cond.model_input(x_t), schedule.timestep_input(t), cond.context, cond.audio,
                             attention=attention)
        x0_pred = schedule.x0_from_velocity(x_t, v.float(), t)
        return df_loss(x0_pred, x0)

    def df_attention(self, k: int):
        if not self.cfg.df_random_attention:
            return None
        configs = self.cfg.df_attention_configs
        i = int(torch.randint(len(configs), (1,), generator=self.generator(k, "attention")))
        return tuple(configs[i])

    def df_step(self, k: int) -> dict:
        batch = self.batch(k)
        attention = self.df_attention(k)
        loss = self.df_losses(k, batch, attention=attention).mean()
        self.student_opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = self._clip(self.student, self.cfg.grad_clip)
        self.student_opt.step()
        m = {"df_loss": loss.item(), "student_grad_norm": gnorm}
        if attention is not None:
            m["window"], m["sink"] = attention
        return m
