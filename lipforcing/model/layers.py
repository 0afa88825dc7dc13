"""Small building blocks of the Wan2.1 DiT: norms, timestep embedding, patchify / unpatchify, timestep checks.

Precision follows Wan: norms and the adaLN modulation run in float32 whatever the parameter dtype; the residual
stream is float32; linear layers run in the parameter dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim with a learned scale (key ``weight``), computed in float32.

    Returns ``x``'s dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (Wan's ``WanLayerNorm``); returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding: ``[cos(t w_i), sin(t w_i)]``, ``w_i = 10000 ** (-i / (dim/2))``.

    t: any shape, on the 0..1000 scale.  Computed in float64, returned float32 with shape ``(*t.shape, dim)``."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = t.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1).float()


def linear_f32(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` computed in float32 (Wan runs the time embedding / projection under fp32 autocast)."""
    b = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), b)


def patchify(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             patch_size: tuple[int, int, int]) -> torch.Tensor:
    """The Conv3d patch embedding (kernel = stride = patch) as one matmul.

    x: (B, C, F, H, W); weight: (dim, C, pt, ph, pw) (a Conv3d weight).  Returns (B, F/pt * H/ph * W/pw, dim)
    in the weight's dtype, tokens ordered frame-major, then row, then column."""
    B, C, Fr, H, W = x.shape
    pt, ph, pw = patch_size
    x = x.to(weight.dtype).reshape(B, C, Fr // pt, pt, H // ph, ph, W // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, (Fr // pt) * (H // ph) * (W // pw), C * pt * ph * pw)
    return F.linear(x, weight.reshape(weight.shape[0], -1), bias)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int],
               channels: int) -> torch.Tensor:
    """Inverse of the patch layout of Wan's head: x (B, f*h*w, pt*ph*pw*channels) with the last dim ordered
    (pt, ph, pw, c)  ->  (B, channels, f*pt, h*ph, w*pw)."""
    B = x.shape[0]
    f, h, w = grid
    pt, ph, pw = patch_size
    x = x.reshape(B, f, h, w, pt, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, channels, f * pt, h * ph, w * pw)


def frame_timesteps(timestep, batch: int, frames: int, device) -> torch.Tensor:
    """Normalise a timestep argument to a float32 (batch, frames) tensor on ``device``.

    Accepts a Python number, a 0-d tensor, a (batch,) tensor (one t per sample) or a (batch, frames) tensor
    (one t per latent frame, diffusion forcing).  Values are on Wan's 0..1000 scale."""
    if isinstance(timestep, bool):
        raise TypeError("timestep must be a number or a tensor, got bool")
    if isinstance(timestep, (int, float)):
        return torch.full((batch, frames), float(timestep), dtype=torch.float32, device=device)
    if not isinstance(timestep, torch.Tensor):
        raise TypeError(f"timestep must be a number or a tensor of shape (batch,) or (batch, frames), got "
                        f"{type(timestep).__name__}")
    t = timestep.to(device=device, dtype=torch.float32)
    if t.dim() == 0:
        return t.expand(batch, frames)
    if t.dim() == 1 and t.shape[0] == batch:
        return t[:, None].expand(batch, frames)
    if t.dim() == 2 and tuple(t.shape) == (batch, frames):
        return t
    raise ValueError(f"timestep must have shape (batch,) = ({batch},) or (batch, frames) = ({batch}, {frames}), "
                     f"got {tuple(t.shape)}")


def xavier_linear_(layer: nn.Linear) -> None:
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        # small non-zero biases (not Wan's zeros) so random-weight models exercise every term
        nn.init.uniform_(layer.bias, -1.0 / math.sqrt(layer.in_features), 1.0 / math.sqrt(layer.in_features))
