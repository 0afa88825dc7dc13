"""``lipforcing train --stage sf``: stage 2, Self-Forcing with Sync-Window DMD and the SyncNet reward.

When ``k % critic_updates_per_student == 0`` a student update: Self-Forcing rollout (one shared exit step; the
training rollout starts from ``rollout_noise_scale`` * eps = 0.999 eps as in the authors' code), SW-DMD per-sample
loss with t drawn uniform, shifted and clamped to <= ``max_dmd_t`` (0.999), optional reward weights
exp(2 LSE-C), ``mean(w * L)``; then, every iteration, a critic update on a fresh no-grad rollout (x0 denoising at
the same clamped t).  The loop, checkpoints and config are :class:`lipforcing.distill.trainer.Trainer`'s.
"""
from __future__ import annotations

import logging

import torch

from lipforcing import schedule
from lipforcing.distill import checkpoint as ckpt
from lipforcing.distill.errors import TrainConfigError

__all__ = ["SFSteps"]

log = logging.getLogger("lipforcing.train")


class SFSteps:
    """The sf steps and the reward, mixed into :class:`~lipforcing.distill.trainer.Trainer`."""

    def _build_reward(self):
        r = self.cfg.reward
        if self.cfg.stage != "sf" or not r.enabled:
            return None
        from lipforcing.distill.reward import LatentRGBDecoder, SyncReward
        from lipforcing.distill.syncnet import SyncNet

        if r.decoder == "vae":
            if not r.vae_path:
                raise TrainConfigError("reward.decoder='vae' needs reward.vae_path (the Wan2.1 VAE weights)")

            from lipforcing.distill.stages.vae import resolve_vae

            vae = resolve_vae(r.vae_path, device=self.device)     # a vae run folder, checkpoint or weight file
            vae.requires_grad_(False)

            def decoder(z):
                return vae.decode(z)
        else:
            decoder = LatentRGBDecoder(self.model_cfg.out_dim, scale=r.decoder_scale)
        if r.syncnet_path:
            from lipforcing.distill.syncnet_small import load_syncnet

            p = ckpt.resolve_checkpoint(r.syncnet_path)                  # a syncnet run folder works too
            syncnet = load_syncnet(p / "syncnet.safetensors" if p.is_dir() else p)
        else:
            log.warning("no reward.syncnet_path: SyncNet has random weights (tests / smoke runs only)")
            torch.manual_seed(self.cfg.seed)
            syncnet = SyncNet()
        return SyncReward(decoder, syncnet.to(self.device).eval(), beta=r.beta, vshift=r.vshift, padding=r.padding)

    def rollout(self, k: int, cond, shape, tag: str, *, grad: bool):
        from lipforcing.distill.rollout import draw_exit_step, self_forcing_rollout

        gens = self.sample_gens(k, tag + "/noise")
        noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in gens]).to(self.device)
        noise = noise * self.cfg.rollout_noise_scale          # the authors' training rollout starts at 0.999 eps
        exit_step = draw_exit_step(len(self.cfg.timesteps) - 1, generator=self.generator(k, tag + "/exit"),
                                   device=self.device)
        with self.autocast():
            return self_forcing_rollout(self.student, noise, cond, timesteps=self.cfg.timesteps,
                                        exit_step=exit_step, grad=grad,
                                        generator=self.sample_gens(k, tag + "/steps"))

    def _dmd_noise(self, k: int, tag: str, shape):
        gens = self.sample_gens(k, tag)
        t = torch.cat([schedule.sample_dmd_timesteps(1, generator=g) for g in gens]).to(self.device)
        t = t.clamp(max=self.cfg.max_dmd_t)                  # shift(0.999) = 0.9998: clamped as the authors do
        eps = torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in gens]).to(self.device)
        return t, eps

    def student_update(self, k: int, batch: dict) -> dict:
        from lipforcing.distill.data import batch_condition
        from lipforcing.distill.losses import sw_dmd_loss, weighted_mean

        x0, cond = batch_condition(batch, self.device)
        gen, info = self.rollout(k, cond, x0.shape, "student", grad=True)
        t, eps = self._dmd_noise(k, "dmd", x0.shape)
        with self.autocast():
            losses, dinfo = sw_dmd_loss(gen, self.teacher, self.critic, cond, t=t, eps=eps,
                                        band=self.cfg.guidance_band, scale=self.cfg.guidance_scale,
                                        inverted=self.cfg.guidance_inverted)
        m = {"exit_step": info["exit_step"], "dmd_loss": losses.mean().item(),
             "dmd_grad_mean_abs": dinfo["grad_norm"].mean().item(), "dmd_t_mean": t.mean().item()}
        weights = None
        if self.reward is not None:
            if "waveform" not in batch:
                raise ValueError("the reward needs a 'waveform' in every sample")
            weights, conf = self.reward(gen, batch["waveform"])
            m["sync_confidence"] = conf.float().mean().item()
            m["reward_weight_mean"] = weights.float().mean().item()
        total = weighted_mean(losses, weights)
        self.student_opt.zero_grad(set_to_none=True)
        total.backward()
        m["student_grad_norm"] = self._clip(self.student, self.cfg.grad_clip)
        self.student_opt.step()
        self.student_opt.zero_grad(set_to_none=True)
        m["student_loss"] = total.item()
        return m

    def critic_losses(self, k: int, batch: dict) -> torch.Tensor:
        from lipforcing.distill.data import batch_condition
        from lipforcing.distill.losses import critic_loss

        x0, cond = batch_condition(batch, self.device)
        with torch.no_grad():
            gen, _ = self.rollout(k, cond, x0.shape, "critic", grad=False)
        t, eps = self._dmd_noise(k, "critic/dsm", x0.shape)
        with self.autocast():
            return critic_loss(self.critic, gen, cond, t=t, eps=eps)

    def critic_update(self, k: int, batch: dict) -> dict:
        loss = self.critic_losses(k, batch).mean()
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = self._clip(self.critic, self.cfg.critic_grad_clip)
        self.critic_opt.step()
        self.critic_opt.zero_grad(set_to_none=True)
        return {"critic_loss": loss.item(), "critic_grad_norm": gnorm}

    def sf_step(self, k: int) -> dict:
        batch = self.batch(k)
        m = {}
        if k % self.cfg.critic_updates_per_student == 0:
            m.update(self.student_update(k, batch))
        m.update(self.critic_update(k, batch))
        return m
