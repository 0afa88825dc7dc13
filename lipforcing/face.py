"""Face-crop helpers for the streaming engine: the lower-face (mouth) mask and ping-pong indexing.

The model regenerates the lower face of aligned face crops.  Lip Forcing uses LatentSync's fixed ``mask.png``
(white = keep the upper face, black = mouth region, about 41 % of the crop, boundary about half-way down); that
file is not shipped here, so :func:`mouth_mask` draws an equivalent region procedurally::

      +-----------------+      keep (upper face)
      |                 |
      |                 |
      |-----_______-----|  <- top (0.5 H)
      | ####### ####### |
      |  #############  |      generate: the half-ellipse below `top`,
      |    #########    |      semi-axes half_width * W and depth * H
      +-----------------+

The mask is applied in two places (as in the paper's reference code):
  * pixel space: the masked video stream is ``frames * keep`` (frames in [-1, 1], so the mouth becomes 0), every
    frame including frame 0; and
  * the latent mask channel: the keep-mask resized bilinearly to the latent grid, thresholded at > 0.5 and then
    inverted, so the channel holds 1 = generate, 0 = keep (:func:`latent_mask`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["mouth_mask", "keep_mask", "latent_mask", "pingpong_index"]


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def mouth_mask(height: int, width: int, *, top: float = 0.5, half_width: float = 0.47, depth: float = 0.55,
               device=None) -> torch.Tensor:
    """The region of an aligned face crop that the model regenerates (LatentSync-style lower-face mask).

    Pixel (i, j) (centre ``(i + 0.5, j + 0.5)``) is in the region when it lies below ``top * height`` and inside
    the ellipse centred at ``(top * height, width / 2)`` with semi-axes ``depth * height`` (down) and
    ``half_width * width`` (across).  The defaults cover about 40 % of the crop, like LatentSync's ``mask.png``.

    Returns a (height, width) bool tensor, True = generate (mouth region), False = keep.
    """
    height, width = _positive_int("height", height), _positive_int("width", width)
    for name, v, hi in (("top", top, 1.0), ("half_width", half_width, None), ("depth", depth, None)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or (hi is not None and v >= hi):
            raise ValueError(f"{name} must be a number in (0, {hi or 'inf'}), got {v!r}")
    y = (torch.arange(height, dtype=torch.float64, device=device) + 0.5) / height
    x = (torch.arange(width, dtype=torch.float64, device=device) + 0.5) / width
    dy = (y[:, None] - top) / depth
    dx = (x[None, :] - 0.5) / half_width
    return (y[:, None] >= top) & (dx * dx + dy * dy <= 1.0)


def keep_mask(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) generate-mask (bool, or float with 1 = generate)  ->  float32 keep-mask (1 = keep, 0 = mouth)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a (height, width) tensor, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    gen = mask if mask.dtype == torch.bool else mask > 0.5
    return (~gen).to(torch.float32)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The latent mask channel: the keep-mask resized bilinearly to ``size`` = (h, w), thresholded at > 0.5,
    then inverted.  Returns (h, w) float32, 1 = generate, 0 = keep."""
    keep = keep_mask(mask)
    small = F.interpolate(keep[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    return 1.0 - (small > 0.5).to(torch.float32)


def pingpong_index(i: int, n: int) -> int:
    """Frame of an ``n``-frame clip shown at step ``i`` when the clip is played forwards, backwards, forwards...
    (0, 1, ..., n-1, n-2, ..., 1, 0, 1, ...); the turning frames are not repeated.  ``n == 1`` always gives 0."""
    if n <= 1:
        return 0
    period = 2 * n - 2
    r = i % period
    return r if r < n else period - r
