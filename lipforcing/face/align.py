"""Alignment: the similarity transform that puts a face into the model's crop, and the warp that cuts the crop.

Geometry (the Lip Forcing / LatentSync convention).  Three anchors, the two eyebrow centres and the middle of the
nose, are fitted (least squares, rotation + uniform scale + shift) onto the template

    (17, 20)  (58, 20)  (37.5, 40)        (image-left brow, image-right brow, nose; units of a 256 grid)

inside a 75 x 100 box of the same units.  LatentSync scales template and box by 2.8 * R / 256 (the box becomes
the 420 x 560 intermediate crop for R = 512) and then resizes that crop to R x R.  Both steps are linear, so here
they are one affine map: frame -> template units (the similarity) -> crop pixels (x * W / 75, y * H / 100).  The
intermediate size cancels out and the crop is resampled once.

Landmark -> anchor mapping (MediaPipe Face Mesh indices; the 68-point equivalents LatentSync averages in brackets):

    image-left brow  (subject's right): mean of 70 63 105 66 107 46 53 52 65 55        [68-pt 17..21]
    image-right brow (subject's left):  mean of 300 293 334 296 336 276 283 282 295 285  [68-pt 22..26]
    nose: mean of the bridge 168 6 197 4 and the lower nose 98 97 2 326 327              [68-pt 27..35]

Coordinates are continuous pixels: pixel (row i, column j) covers [j, j+1) x [i, i+1), its centre is (j + 0.5,
i + 0.5).  Matrices are (2, 3) float64 and map frame coordinates to crop coordinates.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TEMPLATE", "BOX", "RIGHT_BROW", "LEFT_BROW", "NOSE", "anchors_from_landmarks", "fit_similarity",
           "similarity_to_crop", "crop_matrix", "warp_to_crop", "invert", "footprint"]

TEMPLATE = np.array([[17.0, 20.0], [58.0, 20.0], [37.5, 40.0]])
BOX = (75.0, 100.0)                                     # (width, height) of the template box
RIGHT_BROW = (70, 63, 105, 66, 107, 46, 53, 52, 65, 55)
LEFT_BROW = (300, 293, 334, 296, 336, 276, 283, 282, 295, 285)
NOSE = (168, 6, 197, 4, 98, 97, 2, 326, 327)


def anchors_from_landmarks(points: np.ndarray) -> np.ndarray:
    """(468, 2|3) landmarks in frame pixels -> (3, 2) anchors (image-left brow, image-right brow, nose)."""
    p = np.asarray(points, np.float64)[:, :2]
    return np.stack([p[list(RIGHT_BROW)].mean(0), p[list(LEFT_BROW)].mean(0), p[list(NOSE)].mean(0)])


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift; no reflection) mapping points ``src`` (K, 2) onto
    ``dst`` (K, 2): (2, 3) matrix [[a, -b, tx], [b, a, ty]]."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    # minimise sum |[[a,-b],[b,a]] s + t - d|^2: closed form with complex numbers, z = (a + ib)
    zs, zd = s[:, 0] + 1j * s[:, 1], d[:, 0] + 1j * d[:, 1]
    denom = float((np.abs(zs) ** 2).sum())
    if denom <= 0:
        raise ValueError("cannot fit a similarity to coincident points")
    z = (np.conj(zs) * zd).sum() / denom
    a, b = z.real, z.imag
    R = np.array([[a, -b], [b, a]])
    t = md - R @ ms
    return np.concatenate([R, t[:, None]], 1)


def similarity_to_crop(sim: np.ndarray, resolution: tuple[int, int]) -> np.ndarray:
    """Compose a frame -> template-units similarity with the template box -> crop scaling: (2, 3) frame -> crop."""
    H, W = resolution
    D = np.diag([W / BOX[0], H / BOX[1]])
    return np.concatenate([D @ sim[:, :2], (D @ sim[:, 2])[:, None]], 1)


def crop_matrix(anchors: np.ndarray, resolution: tuple[int, int]) -> np.ndarray:
    """(3, 2) anchors in frame pixels -> the (2, 3) frame -> crop affine for a crop of ``resolution`` (H, W)."""
    return similarity_to_crop(fit_similarity(anchors, TEMPLATE), resolution)


def invert(m: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) (or (N, 2, 3)) affine."""
    m = np.asarray(m, np.float64)
    A = np.linalg.inv(m[..., :2])
    t = -(A @ m[..., 2:])
    return np.concatenate([A, t], -1)


def footprint(matrix: np.ndarray, crop_size: tuple[int, int], frame_size: tuple[int, int], *, margin: int = 1,
              rect=None):
    """Integer bounding box (x0, y0, x1, y1) of the frame pixels a crop of ``crop_size`` (h, w) covers under the
    frame -> crop ``matrix`` (only its part ``rect`` = (u0, v0, u1, v1) in crop pixels, if given), grown by
    ``margin`` pixels and clipped to the frame (H, W); None when it misses the frame."""
    h, w = crop_size
    H, W = frame_size
    u0, v0, u1, v1 = (0, 0, w, h) if rect is None else rect
    inv = invert(matrix)
    corners = np.array([[u0, v0, 1], [u1, v0, 1], [u0, v1, 1], [u1, v1, 1]], np.float64) @ inv.T
    x0, y0 = np.floor(corners.min(0)).astype(int) - margin
    x1, y1 = np.ceil(corners.max(0)).astype(int) + margin
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    if x0 >= x1 or y0 >= y1:
        return None
    return int(x0), int(y0), int(x1), int(y1)


def _sample(src: torch.Tensor, coords: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample (N, C, h, w) ``src`` at continuous pixel coordinates ``coords`` (N, H', W', 2) (x, y); zeros
    outside."""
    h, w = src.shape[-2:]
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=coords.dtype, device=coords.device)
    grid = coords * scale - 1.0          # align_corners=False: -1 and 1 are the outer pixel edges
    return F.grid_sample(src, grid.to(src.dtype), mode=mode, padding_mode="zeros", align_corners=False)


def pixel_grid(matrix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Coordinates (N, len(rows), len(cols), 2) that the (N, 2, 3) affine ``matrix`` gives the centres of the
    pixels (rows x cols) of its source image."""
    y = rows.to(matrix.dtype) + 0.5
    x = cols.to(matrix.dtype) + 0.5
    A, t = matrix[:, :, :2], matrix[:, :, 2]
    gx = A[:, 0, 0, None, None] * x[None, None, :] + A[:, 0, 1, None, None] * y[None, :, None] + t[:, 0, None, None]
    gy = A[:, 1, 0, None, None] * x[None, None, :] + A[:, 1, 1, None, None] * y[None, :, None] + t[:, 1, None, None]
    return torch.stack([gx, gy], -1)


def warp_to_crop(frames: torch.Tensor, matrices, resolution: tuple[int, int], *, mode: str = "bicubic"
                 ) -> torch.Tensor:
    """Cut aligned crops: frames (N, H, W, 3) uint8, matrices (N, 2, 3) frame -> crop -> (N, h, w, 3) uint8 on the
    frames' device (pixels that fall outside the frame are black).  ``mode``: "bicubic" (default) or
    "bilinear".  Only each crop's footprint in its frame (plus the 2-pixel reach of the bicubic taps) is read."""
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (N, H, W, 3), got {tuple(frames.shape)}")
    h, w = resolution
    H, W = frames.shape[1:3]
    mats = np.asarray(matrices, np.float64).reshape(-1, 2, 3)
    dev = frames.device
    out = torch.zeros(len(frames), h, w, 3, dtype=torch.uint8, device=dev)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    for i in range(len(frames)):
        box = footprint(mats[i], (h, w), (H, W), margin=3)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        m = mats[i].copy()
        m[:, 2] += m[:, :2] @ [x0, y0]               # coordinates inside the sub-image: x = x' + x0
        inv = torch.as_tensor(invert(m), dtype=torch.float64, device=dev)[None]
        src = frames[i, y0:y1, x0:x1].permute(2, 0, 1)[None].to(torch.float32)
        s = _sample(src, pixel_grid(inv, rows, cols), mode)
        out[i] = s[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    return out
