"""Audio conditioning modules: frame grouping, AudioPack, and the additive per-layer projections.

Audio enters the network as ``audio`` of shape (B, F, 4, audio_dim): for each latent frame the features of the 4
video frames it covers.  :func:`group_audio_frames` builds it from per-video-frame features the way OmniAvatar's
AudioPack does (prepend 3 copies of frame 0, then group by 4), so latent frame ``k`` sees video frames
``4k-3 .. 4k`` and latent 0 sees frame 0 four times.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lipforcing.config import VIDEO_FRAMES_PER_LATENT, ModelConfig
from lipforcing.model.layers import xavier_linear_


def num_latent_frames(num_video_frames: int) -> int:
    """Latent frames of a clip of ``1 + 4k`` video frames: ``1 + k``."""
    if num_video_frames < 1 or (num_video_frames - 1) % VIDEO_FRAMES_PER_LATENT:
        raise ValueError(f"a clip must have 1 + 4k video frames, got {num_video_frames}")
    return 1 + (num_video_frames - 1) // VIDEO_FRAMES_PER_LATENT


def group_audio_frames(features: torch.Tensor) -> torch.Tensor:
    """Per-video-frame audio features (B, N_video, audio_dim), ``N_video = 1 + 4(F-1)``  ->  (B, F, 4, audio_dim).

    Prepends 3 copies of video frame 0, then groups consecutive runs of 4 frames (OmniAvatar's AudioPack layout).
    Returns a new tensor in the input dtype."""
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a (batch, video_frames, audio_dim) tensor, got {shape}")
    B, N, D = features.shape
    frames = num_latent_frames(N)
    pad = features[:, :1].expand(B, VIDEO_FRAMES_PER_LATENT - 1, D)
    return torch.cat([pad, features], dim=1).reshape(B, frames, VIDEO_FRAMES_PER_LATENT, D)


def check_audio(audio: torch.Tensor, batch: int, frames: int, audio_dim: int) -> None:
    if not isinstance(audio, torch.Tensor):
        raise TypeError(f"audio must be a tensor (batch, frames, 4, audio_dim) or None, got {type(audio).__name__}")
    expected = (batch, frames, VIDEO_FRAMES_PER_LATENT, audio_dim)
    if tuple(audio.shape) != expected:
        raise ValueError(f"audio must have shape (batch, frames, 4, audio_dim) = {expected} (4 video-frame features "
                         f"per latent frame; see lipforcing.model.audio.group_audio_frames), got "
                         f"{tuple(audio.shape)}")


class AudioPack(nn.Module):
    """OmniAvatar's AudioPack: the 4 video-frame features of a latent frame, concatenated frame-major
    (feature ``i*audio_dim + c`` is frame ``i``, channel ``c``), then ``Linear(4*audio_dim -> A*audio_token_dim)``
    and ``LayerNorm(audio_token_dim)``.  ``A = config.audio_tokens_per_frame`` (1 in ``"add"`` mode, which is
    exactly OmniAvatar's module).  Keys: ``proj.{weight,bias}``, ``norm_out.{weight,bias}``.

    forward: audio (B, F, 4, audio_dim)  ->  tokens (B, F, A, audio_token_dim) in the parameter dtype."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tokens = config.audio_tokens_per_frame
        self.token_dim = config.audio_token_dim
        self.proj = nn.Linear(VIDEO_FRAMES_PER_LATENT * config.audio_dim, self.tokens * self.token_dim)
        self.norm_out = nn.LayerNorm(self.token_dim)  # torch default eps 1e-5, as in OmniAvatar

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        B, Fr = audio.shape[:2]
        x = self.proj(audio.reshape(B, Fr, -1).to(self.proj.weight.dtype))
        return self.norm_out(x.reshape(B, Fr, self.tokens, self.token_dim))

    def reset_parameters(self) -> None:
        xavier_linear_(self.proj)
        self.norm_out.reset_parameters()
