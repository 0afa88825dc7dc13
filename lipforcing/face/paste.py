"""Paste-back: inverse-warp a generated crop into its full frame and blend it with a feathered mask (torch).

The blend weight is built once per crop size and region, in crop space:

    region  = the mouth mask (``"mouth"``, the default: only the regenerated lower face is composited) or the whole
              crop (``"face"``);
    edge    = sqrt(area of the region) / 20 pixels (LatentSync's rule);
    weight  = Gaussian blur (sigma = edge / 2, radius edge) of the region eroded by 2 * edge,

so the weight falls to exactly 0 at least ``edge`` pixels inside the region's boundary.  For every frame pixel
inside the bounding box of the crop's footprint, the crop and the weight are sampled bilinearly at the pixel's
crop coordinates; ``out = frame + weight * (crop - frame)``, rounded.  Pixels where the weight is 0 (everything
outside the blend region, and every frame that has no face) keep their input values bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lipforcing.face.align import _sample, footprint, pixel_grid

__all__ = ["blend_weight", "paste_back", "footprint"]

REGIONS = ("mouth", "face")


def _erode(x: torch.Tensor, r: int) -> torch.Tensor:
    # binary erosion by a (2r+1)^2 square = min-pool, done as a row pass then a column pass (separable);
    # outside the crop counts as 0
    if r <= 0:
        return x
    x = -F.max_pool2d(F.pad(-x, (r, r, 0, 0), value=0.0), (1, 2 * r + 1), stride=1)
    return -F.max_pool2d(F.pad(-x, (0, 0, r, r), value=0.0), (2 * r + 1, 1), stride=1)


def _blur(x: torch.Tensor, r: int, sigma: float) -> torch.Tensor:
    if r <= 0:
        return x
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    x = F.conv2d(F.pad(x, (r, r, 0, 0)), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r)), k.view(1, 1, -1, 1))


def blend_weight(region_mask: torch.Tensor) -> torch.Tensor:
    """(H, W) bool region (True = composite) -> (H, W) float32 feathered weight in [0, 1], exactly 0 within
    ``sqrt(area) / 20`` pixels of the region's boundary and outside it."""
    if not isinstance(region_mask, torch.Tensor) or region_mask.dim() != 2:
        raise ValueError("region_mask must be an (H, W) tensor")
    m = region_mask.to(torch.float32)[None, None].cpu()
    area = float(m.sum())
    if area <= 0:
        raise ValueError("the blend region is empty")
    edge = max(1, int(round(math.sqrt(area) / 20)))
    # the blur spreads the core by `edge` pixels, so the weight is exactly 0 outside the region eroded by `edge`
    w = _blur(_erode(m, 2 * edge), edge, edge / 2)
    return w[0, 0].clamp(0, 1)


def paste_back(frame: torch.Tensor, crop: torch.Tensor, matrix: np.ndarray, weight: torch.Tensor) -> torch.Tensor:
    """Composite a generated crop into its frame.

    frame (H, W, 3) uint8; crop (h, w, 3) uint8 (or float 0..255) on the same device; matrix (2, 3) frame -> crop
    (the one that cut the crop); weight (h, w) float from :func:`blend_weight`.  Returns a new (H, W, 3) uint8
    frame; pixels where the warped weight is 0 are copied unchanged.
    """
    if frame.dim() != 3 or frame.shape[-1] != 3 or frame.dtype != torch.uint8:
        raise ValueError(f"frame must be (H, W, 3) uint8, got {frame.dtype} {tuple(frame.shape)}")
    h, w = crop.shape[:2]
    if tuple(weight.shape) != (h, w):
        raise ValueError(f"weight must have the crop's size {(h, w)}, got {tuple(weight.shape)}")
    out = frame.clone()
    cols = torch.nonzero(weight.amax(0) > 0)
    rows = torch.nonzero(weight.amax(1) > 0)
    if len(cols) == 0:
        return out
    # only frame pixels whose crop position can see a positive weight (bilinear reach: 1 crop pixel)
    rect = (int(cols[0]) - 1, int(rows[0]) - 1, int(cols[-1]) + 2, int(rows[-1]) + 2)
    box = footprint(matrix, (h, w), tuple(frame.shape[:2]), rect=rect)
    if box is None:
        return out
    x0, y0, x1, y1 = box
    dev = frame.device
    m = torch.as_tensor(np.asarray(matrix, np.float64), device=dev)[None]
    coords = pixel_grid(m, torch.arange(y0, y1, device=dev), torch.arange(x0, x1, device=dev))
    src = torch.cat([crop.to(dev, torch.float32).permute(2, 0, 1), weight.to(dev, torch.float32)[None]])[None]
    s = _sample(src, coords, "bilinear")[0]                  # (4, y1-y0, x1-x0)
    a = s[3:].clamp(0, 1)
    region = out[y0:y1, x0:x1].permute(2, 0, 1).to(torch.float32)
    blended = (region + a * (s[:3] - region)).round().clamp(0, 255).to(torch.uint8)
    out[y0:y1, x0:x1] = torch.where(a > 0, blended, out[y0:y1, x0:x1].permute(2, 0, 1)).permute(1, 2, 0)
    return out
