"""The mouth mask of an aligned face crop: the procedural lower-face region, a user's mask image, the latent channel.

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

import os

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["mouth_mask", "keep_mask", "latent_mask", "load_mask", "MIN_MASK_SIZE"]

MIN_MASK_SIZE = 16


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


def load_mask(mask, resolution: tuple[int, int]) -> torch.Tensor:
    """A user's mouth mask in LatentSync's ``mask.png`` convention (white = keep, black = regenerate), as the
    (H, W) bool generate-mask of a crop of ``resolution``.

    ``mask``: an image path (PNG/JPEG/..., read with OpenCV, colour averaged to grey), or an (h, w) / (h, w, C)
    numpy array or tensor (uint8 0..255, or float 0..1).  Its aspect ratio must match the crop's (it describes the
    whole crop); it is resized (area averaging) to ``resolution`` and thresholded at half grey.
    """
    H, W = _positive_int("height", resolution[0]), _positive_int("width", resolution[1])
    if isinstance(mask, (str, os.PathLike)):
        path = os.fspath(mask)
        if not os.path.isfile(path):
            raise ValueError(f"mask: {path}: no such file (give a mask image, white = keep, black = mouth)")
        from lipforcing.face._nets import cv2_module
        cv2 = cv2_module()
        img = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ValueError(f"mask: {path}: cannot decode it as an image (corrupt or not an image; give a PNG with "
                             "white = keep, black = mouth)")
        arr = img.astype(np.float64) / (65535.0 if img.dtype == np.uint16 else 255.0)
        if arr.ndim == 3:
            arr = arr[..., :3].mean(-1) if arr.shape[2] >= 3 else arr[..., 0]
        where = path
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if arr.ndim == 3:
            arr = arr[..., :3].astype(np.float64).mean(-1)
        if arr.ndim != 2:
            raise ValueError(f"mask must be an (h, w) or (h, w, C) image, got shape {tuple(mask.shape)}")
        arr = arr.astype(np.float64) / (255.0 if np.asarray(mask).dtype == np.uint8 or arr.max() > 1 else 1.0)
        where = "mask array"
    else:
        raise TypeError(f"mask must be an image path or an array, got {type(mask).__name__}")
    h, w = arr.shape
    if min(h, w) < MIN_MASK_SIZE:
        raise ValueError(f"mask: {where} is {w}x{h} pixels; it must be at least {MIN_MASK_SIZE}x{MIN_MASK_SIZE}")
    if abs(w / h - W / H) > 0.02 * (W / H):
        raise ValueError(f"mask: {where} is {w}x{h} pixels (width x height) but the face crop is {W}x{H}; give a "
                         f"mask with the crop's aspect ratio ({W}:{H}), e.g. {W}x{H}")
    if not np.isfinite(arr).all():
        raise ValueError(f"mask: {where} contains NaN or inf")
    t = torch.from_numpy(np.ascontiguousarray(arr, np.float32))[None, None]
    keep = F.interpolate(t, size=(H, W), mode="area")[0, 0] if (h, w) != (H, W) else t[0, 0]
    gen = keep < 0.5
    if not gen.any():
        raise ValueError(f"mask: {where} is white everywhere (nothing to regenerate); black marks the mouth region")
    return gen
