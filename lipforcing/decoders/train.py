"""``lipforcing train --stage decoder``: a TAEHV decoder distilled from a Wan-architecture VAE.

Data: clips of the procedural world (``lipforcing.world``), encoded by the VAE to raw latents (no mean/std
normalisation: TAEHV decodes raw latents).  Target (``target``):

* ``"vae"`` (default): the VAE's own decoded frames, i.e. the fast decoder learns to reproduce the exact decoder
  the engine would otherwise run (works for any VAE, also a randomly initialised one);
* ``"pixels"``: the input clip itself (the decoder then also corrects the VAE's reconstruction error).

Loss: L1 + MSE per pixel in TAEHV's [0, 1] range, over the whole clip decoded in parallel (which equals the
streaming decode).  Only the decoder half of the TAEHV is trained; the encoder keeps its initial weights (the
engine encodes with the VAE).  Each checkpoint's ``decoder.safetensors`` has the public key names and its config in
the metadata, so ``lipforcing.load_decoder(path)`` and ``Engine.load(decoder=path)`` / ``--decoder PATH`` read it.
Metrics: ``loss`` and ``psnr`` (dB, against the target).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from lipforcing.decoders.loading import config_metadata
from lipforcing.decoders.taehv import TAEHV, TAEHVConfig
from lipforcing.distill.errors import TrainConfigError
from lipforcing.distill.stages.base import Stage, StageConfig, check_int

__all__ = ["DecoderStageConfig", "DecoderStage"]

TINY_TAEHV = {"encoder_width": 16, "decoder_widths": [32, 16, 16, 16]}


@dataclass
class DecoderStageConfig(StageConfig):
    """``taehv``: TAEHVConfig widths (``spatial_upscale`` follows the VAE); ``vae``: a Wan-VAE preset name or a
    checkpoint (e.g. the ``vae.safetensors`` of ``--stage vae``); ``size``/``frames``: world clips of size x size,
    frames = 1 + 4k."""

    stage: str = "decoder"
    lr: float = 1e-3
    taehv: dict = field(default_factory=lambda: dict(TINY_TAEHV))
    vae: str = "tiny"
    target: str = "vae"
    size: int = 64
    frames: int = 13
    speech: str = "synthetic"
    output_dir: str = "runs/decoder"

    def __post_init__(self):
        super().__post_init__()
        check_int("size", self.size, minimum=8)
        check_int("frames", self.frames)
        if (self.frames - 1) % 4:
            raise TrainConfigError(f"frames must be 1 + 4k (the VAE's clips), got {self.frames}")
        if self.target not in ("vae", "pixels"):
            raise TrainConfigError(f"target must be 'vae' (the VAE's decoded frames) or 'pixels', got "
                                   f"{self.target!r}")
        if self.speech not in ("auto", "espeak", "synthetic"):
            raise TrainConfigError(f"speech must be 'auto', 'espeak' or 'synthetic', got {self.speech!r}")
        if not isinstance(self.vae, str):
            raise TrainConfigError(f"vae must be a preset name or a checkpoint path, got {self.vae!r}")
        if not isinstance(self.taehv, dict):
            raise TrainConfigError(f"taehv must be a mapping of TAEHVConfig fields, got {type(self.taehv).__name__}")
        unknown = sorted(set(self.taehv) - {"latent_channels", "encoder_width", "decoder_widths"})
        if unknown:
            raise TrainConfigError(f"taehv: unknown fields {unknown} (spatial_upscale follows the VAE)")

    def taehv_config(self, spatial_factor: int) -> TAEHVConfig:
        fields = dict(self.taehv)
        if "decoder_widths" in fields:
            fields["decoder_widths"] = tuple(fields["decoder_widths"])
        try:
            return TAEHVConfig.for_spatial_factor(spatial_factor, **fields)
        except (TypeError, ValueError) as exc:
            raise TrainConfigError(f"taehv: {exc}") from None


def _psnr01(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


class DecoderStage(Stage):
    name = "decoder"
    Config = DecoderStageConfig

    def build(self) -> None:
        from lipforcing.vae import VAEConfig, WanVAE, load_vae

        c = self.cfg
        if os.path.exists(c.vae):
            try:
                vae = load_vae(c.vae)
            except (ValueError, OSError) as exc:
                raise TrainConfigError(f"vae {c.vae!r}: {' '.join(str(exc).split())}") from None
        else:
            try:
                vae = WanVAE(VAEConfig.from_name(c.vae))         # drawn from the stage's seeded RNG
            except ValueError as exc:
                raise TrainConfigError(f"vae: {c.vae!r} is neither a file nor a preset ({exc})") from None
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.vae.check_inputs = False
        if self.vae.temporal_factor != 4:
            raise TrainConfigError(f"vae: TAEHV decodes 4x in time, the VAE has a temporal factor of "
                                   f"{self.vae.temporal_factor}")
        if c.size % self.vae.spatial_factor:
            raise TrainConfigError(f"size must be a multiple of the VAE's spatial factor "
                                   f"{self.vae.spatial_factor}, got {c.size}")
        cfg = c.taehv_config(self.vae.spatial_factor)
        if cfg.latent_channels != self.vae.z_dim:
            raise TrainConfigError(f"taehv.latent_channels ({cfg.latent_channels}) must be the VAE's z_dim "
                                   f"({self.vae.z_dim})")
        self.taehv = TAEHV(cfg).to(self.device)
        self.taehv.encoder.requires_grad_(False)
        self.models = {"decoder": (self.taehv, self.optimizer(self.taehv.decoder))}

    def weight_metadata(self, name: str) -> dict:
        return config_metadata(self.taehv.config)

    def batch(self, k) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw latents (B, T', C, h, w), target frames (B, T, 3, H, W) in [0, 1]) of iteration k."""
        from lipforcing.distill.stages.vae import world_video_batch

        c = self.cfg
        seeds = [self.seed_of(k, "clip", b) for b in range(c.batch_size)]
        video, _ = world_video_batch(seeds, c.frames, c.size, c.speech)
        video = video.to(self.device)
        with torch.no_grad():
            z = self.vae.encode(video, normalize=False)
            target = self.vae.decode(z, normalize=False) if c.target == "vae" else video
        return z.transpose(1, 2), ((target.float() + 1) / 2).clamp(0, 1).transpose(1, 2)

    def step(self, k: int) -> dict:
        z, target = self.batch(k)
        out = self.taehv.decode_video(z, clamp=False)          # the clamp would cut the gradient
        err = out - target
        loss = (err.abs() + err ** 2).mean()
        gnorm = self.clip_and_step("decoder", loss)
        return {"loss": loss.item(), "psnr": _psnr01(out.detach().clamp(0, 1), target), "grad_norm": gnorm}
