"""Measurements on generated face crops against the procedural world's ground truth (no learned weights needed).

* :func:`mouth_opening_estimate`: the mouth opening read from pixels.  Per frame, the mean darkness
  (255 - luma) inside the world's mouth box is mapped linearly so that the same person rendered with a closed mouth
  reads 0 and with a fully open mouth reads 1 (both rendered with that frame's head pose).
* :func:`windowed_correlation`: per-window mean-removed (Pearson) correlation of two series, averaged over
  windows (default 50 frames = 2 s, hop 25): local co-movement, insensitive to slow drifts in brightness.
* :func:`psnr` / :func:`ssim` on a region (a boolean pixel mask), images uint8.
"""
from __future__ import annotations

import numpy as np

__all__ = ["luma_darkness", "box_darkness", "opening_calibration", "mouth_opening_estimate", "windowed_correlation", "psnr", "ssim",
           "frame_loudness"]


def luma_darkness(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, H, W) float darkness 255 - luma (BT.601)."""
    f = frames.astype(np.float64)
    return 255.0 - (0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2])


def box_darkness(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mean darkness inside each frame's box [top, bottom, left, right): (T,)."""
    d = luma_darkness(frames)
    return np.array([d[i, t:b, l:r].mean() for i, (t, b, l, r) in enumerate(boxes[:len(frames)])])


def opening_calibration(clip, num_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mouth-box darkness of ``clip``'s person rendered closed and fully open, per frame: ((T,), (T,))."""
    from lipforcing.world.mouth import MouthTrack
    from lipforcing.world.render import render_frames

    T = len(clip.frames) if num_frames is None else num_frames
    size = clip.frames.shape[1:3]
    cache = getattr(clip, "_calibration", None)
    if cache is not None and len(cache[0]) >= T:
        return cache[0][:T], cache[1][:T]
    closed = render_frames(clip.identity, MouthTrack.closed(T), clip.motion, clip.blink, size)
    opened = render_frames(clip.identity, MouthTrack(np.ones(T, np.float32), np.full(T, 0.5, np.float32)),
                           clip.motion, clip.blink, size)
    d0, d1 = box_darkness(closed, clip.boxes), box_darkness(opened, clip.boxes)
    try:
        clip._calibration = (d0, d1)
    except AttributeError:  # pragma: no cover - slotted objects
        pass
    return d0, d1


def mouth_opening_estimate(frames: np.ndarray, clip) -> np.ndarray:
    """Estimated opening per frame (T,) of ``frames`` showing ``clip``'s person and head motion (see the module
    docstring); about 0 closed, 1 fully open; clipped to [-0.5, 1.5] (noise reads far outside)."""
    T = len(frames)
    d0, d1 = opening_calibration(clip, T)
    d = box_darkness(frames, clip.boxes)
    return np.clip((d - d0) / np.maximum(d1 - d0, 1e-6), -0.5, 1.5)


def frame_loudness(audio: np.ndarray, num_frames: int) -> np.ndarray:
    """RMS of each video frame's 640 samples: (T,)."""
    from lipforcing.world.mouth import window_rms

    return window_rms(audio, num_frames)


def windowed_correlation(x, y, *, window: int = 50, hop: int = 25) -> float:
    """Mean over windows of the Pearson correlation of x and y (windows where either is constant are skipped;
    NaN when none is left).  A series shorter than ``window`` is one window."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = min(len(x), len(y))
    if n < 3:
        return float("nan")
    starts = range(0, max(1, n - window + 1), hop) if n >= window else [0]
    cs = []
    for s in starts:
        a, b = x[s:s + window], y[s:s + window]
        a, b = a - a.mean(), b - b.mean()
        den = np.sqrt((a * a).sum() * (b * b).sum())
        if den > 1e-12:
            cs.append(float((a * b).sum() / den))
    return float(np.mean(cs)) if cs else float("nan")


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float:
    """PSNR (dB, peak 255) of uint8 images/videos ``a`` vs ``b`` over ``region`` (bool, broadcast to (..., H, W))."""
    err = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if region is not None:
        m = np.broadcast_to(region[..., None], err.shape)
        mse = err[m].mean()
    else:
        mse = err.mean()
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def _blur(x: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Separable Gaussian blur over the last two axes (reflect padding)."""
    import torch
    import torch.nn.functional as F

    r = int(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = k / k.sum()
    t = torch.from_numpy(np.ascontiguousarray(x, np.float64)).reshape(-1, 1, *x.shape[-2:])
    t = F.pad(t, (r, r, r, r), mode="reflect")
    t = F.conv2d(F.conv2d(t, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return t.reshape(x.shape).numpy()


def ssim(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean SSIM (Gaussian window, sigma 1.5, on luma) of uint8 frames (T, H, W, 3) over ``region`` (H, W)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    la, lb = 255.0 - luma_darkness(a), 255.0 - luma_darkness(b)
    mu_a, mu_b = _blur(la), _blur(lb)
    saa = _blur(la * la) - mu_a ** 2
    sbb = _blur(lb * lb) - mu_b ** 2
    sab = _blur(la * lb) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    if region is not None:
        return float(s[:, region].mean())
    return float(s.mean())
