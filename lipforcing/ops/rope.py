"""Wan-style 3-D rotary position embedding: tables, the spec the attention ops take, and the plain rotation.

Convention (DESIGN.md section 2): head_dim ``d`` holds ``c = d/2`` complex pairs made of *adjacent* real dims
``(x[2i], x[2i+1])``.  The pairs are split into ``(c - 2*(c//3), c//3, c//3)`` for (time, height, width); inside a
part of ``n`` pairs, pair ``j`` turns at frequency ``theta ** (-2j / (2n))``.  A token at (t, h, w) has pair ``j``
rotated by ``pos_axis(j) * freq(j)``.  For d=128: 22/21/21 pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Number of complex pairs for (time, height, width)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


@dataclass(frozen=True)
class RopeSpec:
    """What the attention ops need to rotate q/k in the Wan 3-D convention.

    ``cos``/``sin``: float32 (P, head_dim // 2) tables; column j belongs to the time, height or width part
    (``rope_split``) and row p is position p along that axis.  ``grid``: (height, width) of a latent frame in
    tokens; tokens are ordered frame-major, then row, then column (``tokens_per_frame = h * w``).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    grid: tuple[int, int]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return 2 * self.cos.shape[1]

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def to(self, device) -> "RopeSpec":
        return RopeSpec(self.cos.to(device), self.sin.to(device), self.grid)


def rope_spec(head_dim: int, grid: tuple[int, int], *, max_frames: int = 1024, theta: float = 10000.0,
              device=None) -> RopeSpec:
    """Build the cos/sin tables (computed in float64, stored in float32) for ``head_dim`` and a frame grid."""
    ct, ch, cw = rope_split(head_dim)
    rows = max(max_frames, grid[0], grid[1])
    pos = torch.arange(rows, dtype=torch.float64)
    cols = []
    for n in (ct, ch, cw):
        freq = theta ** (-torch.arange(n, dtype=torch.float64) * 2 / (2 * n))
        cols.append(torch.outer(pos, freq))
    angles = torch.cat(cols, dim=1)
    return RopeSpec(torch.cos(angles).float().to(device), torch.sin(angles).float().to(device), tuple(grid))


def axis_positions(t_pos: torch.Tensor, spec: RopeSpec, token_in_frame: torch.Tensor) -> torch.Tensor:
    """Per-token, per-pair table row: (..., head_dim//2) int64 from time positions and in-frame token indices."""
    ct, ch, cw = rope_split(spec.head_dim)
    w = spec.grid[1]
    hpos, wpos = token_in_frame // w, token_in_frame % w
    parts = [t_pos.unsqueeze(-1).expand(*t_pos.shape, ct), hpos.unsqueeze(-1).expand(*hpos.shape, ch),
             wpos.unsqueeze(-1).expand(*wpos.shape, cw)]
    return torch.cat(parts, dim=-1)


def rotate(x: torch.Tensor, t_pos: torch.Tensor, token_in_frame: torch.Tensor, spec: RopeSpec, *,
           inverse: bool = False) -> torch.Tensor:
    """Rotate ``x`` (B, L, H, D) in float32 with per-token time positions ``t_pos`` (L,) and in-frame token
    indices ``token_in_frame`` (L,) (height = index // grid_w, width = index % grid_w).  Returns float32.

    ``inverse=True`` rotates by the negative angles: the inverse and, the rotation being orthogonal, also the
    transpose, so it maps the gradient w.r.t. the rotated tensor to the gradient w.r.t. ``x``."""
    rows = axis_positions(t_pos.to(x.device).long(), spec, token_in_frame.to(x.device).long())  # (L, D/2)
    cols = torch.arange(spec.cos.shape[1], device=x.device)
    cos = spec.cos.to(x.device)[rows, cols][None, :, None, :]
    sin = spec.sin.to(x.device)[rows, cols][None, :, None, :]
    if inverse:
        sin = -sin
    xf = x.float()
    a, b = xf[..., 0::2], xf[..., 1::2]
    out = torch.empty_like(xf)
    out[..., 0::2] = a * cos - b * sin  # (a + ib) * (cos + i sin)
    out[..., 1::2] = a * sin + b * cos
    return out


def apply_rope(x: torch.Tensor, t_pos: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Rotate ``x`` (B, L, H, D); token l has time position ``t_pos[l]`` and in-frame index
    ``l % tokens_per_frame``.  Returns float32."""
    token_in_frame = torch.arange(x.shape[1], device=x.device) % spec.tokens_per_frame
    return rotate(x, t_pos, token_in_frame, spec)
