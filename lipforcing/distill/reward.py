"""SyncNet reward for Sync-Window DMD: decode the student's latents, score lip sync, weight each sample's loss.

    video = decoder(gen)                       # (B, 3, T, H, W) in [-1, 1], no gradient
    c_i   = LSE-C(video_i, waveform_i)         # SyncNet v2, offset search +-vshift frames
    w_i   = exp(beta * c_i)                    # beta = 2, detached, no centring or clamping
    total = mean_i(w_i * L_i)

The decoder is any callable latents -> video: ``lipforcing.load_vae(path).decode`` (the Wan VAE), a TAEHV-style
tiny decoder, or :class:`LatentRGBDecoder` (a fixed linear preview used by tests and smoke runs).
"""
from __future__ import annotations

from typing import Callable

import torch

from lipforcing.config import VIDEO_FRAMES_PER_LATENT


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) float in [-1, 1] -> (B, T, H, W, 3) uint8 (RGB), on the CPU."""
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be (batch, 3, frames, height, width), got {tuple(video.shape)}")
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).contiguous().cpu()


class LatentRGBDecoder:
    """A fixed, cheap stand-in for the VAE decoder: per-pixel linear map of the 16 latent channels to RGB
    (seeded random weights), tanh, nearest upsampling by ``scale`` in space and to ``1 + 4(F - 1)`` frames in
    time (the causal Wan VAE's frame count).  For tests and smoke runs only."""

    def __init__(self, channels: int = 16, *, scale: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3, channels, generator=g) / channels ** 0.5
        self.scale = int(scale)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        B, C, F, H, W = latents.shape
        x = torch.einsum("oc,bcfhw->bofhw", self.weight.to(latents.device), latents.float()).tanh()
        reps = torch.full((F,), VIDEO_FRAMES_PER_LATENT, device=x.device)
        reps[0] = 1
        x = x.repeat_interleave(reps, dim=2)
        if self.scale > 1:
            x = x.repeat_interleave(self.scale, dim=3).repeat_interleave(self.scale, dim=4)
        return x


class SyncReward:
    """Per-sample reward weights ``exp(beta * LSE-C)`` of generated latents against their audio.

    decoder : callable (B, 16, F, H, W) latents -> (B, 3, T, H, W) video in [-1, 1].
    syncnet : a :class:`lipforcing.distill.SyncNet` (frozen; evaluated without gradient).
    beta : the weight's temperature (2 in the paper).  vshift : offsets searched (+-15 frames).
    padding : offset averaging of :func:`lipforcing.distill.syncnet.sync_confidence` ("overlap" = the Lip Forcing
        reward scorer, "zeros" = syncnet_python's evaluation).
    confidence_fn : optional replacement scorer ``fn(frames (B, T, H, W, 3) uint8, waveform (B, L)) -> (B,)``
        (e.g. another sync model); default: SyncNet LSE-C.
    """

    def __init__(self, decoder: Callable, syncnet=None, *, beta: float = 2.0, vshift: int = 15,
                 padding: str = "overlap", confidence_fn: Callable | None = None):
        if syncnet is None and confidence_fn is None:
            raise ValueError("SyncReward needs a syncnet or a confidence_fn")
        if syncnet is not None:
            for p in syncnet.parameters():
                p.requires_grad_(False)
        self.decoder, self.syncnet, self.beta = decoder, syncnet, float(beta)
        self.vshift, self.padding, self.confidence_fn = int(vshift), padding, confidence_fn

    @torch.no_grad()
    def confidence(self, latents: torch.Tensor, waveform: torch.Tensor) -> torch.Tensor:
        """LSE-C per sample (B,) float32 on the CPU."""
        frames = video_to_frames(self.decoder(latents.detach()))
        wav = waveform.detach().float().cpu()
        if wav.dim() != 2 or wav.shape[0] != frames.shape[0]:
            raise ValueError(f"waveform must be (batch={frames.shape[0]}, samples), got {tuple(waveform.shape)}")
        if self.confidence_fn is not None:
            c = self.confidence_fn(frames, wav)
        else:
            from lipforcing.distill.syncnet import sync_confidence

            c = sync_confidence(self.syncnet, frames, wav, vshift=self.vshift, padding=self.padding).confidence
        c = torch.as_tensor(c, dtype=torch.float32).reshape(-1)
        if c.shape[0] != frames.shape[0]:
            raise ValueError(f"confidence_fn returned {c.shape[0]} values for a batch of {frames.shape[0]}")
        return c

    def __call__(self, latents: torch.Tensor, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (B,), confidence (B,)), both detached, on latents' device."""
        from lipforcing.distill.syncnet import sync_reward_weight

        c = self.confidence(latents, waveform)
        w = sync_reward_weight(c, self.beta)
        return w.to(latents.device), c.to(latents.device)
