"""Head motion and blinks of the procedural world: slow, smooth, independent of the speech.

Both are pure functions of a seed and a frame count, so the same seed gives the same motion whatever else changes
(the training data renders a target and a reference sequence of one person with the same motion and blinks but
different mouths).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["HeadMotion", "head_motion", "blinks"]

FPS = 25


@dataclass(frozen=True)
class HeadMotion:
    """Per-frame head pose: shifts ``dx``, ``dy`` (fractions of the crop), in-plane ``tilt`` (radians) and
    ``scale`` (relative size), each (F,) float64."""

    dx: np.ndarray
    dy: np.ndarray
    tilt: np.ndarray
    scale: np.ndarray


def _smooth_series(rng, n: int, amplitude: float, periods=(2.0, 7.0)) -> np.ndarray:
    """Sum of three sinusoids with random periods in ``periods`` seconds and random phases, peak ~ amplitude."""
    t = np.arange(n) / FPS
    out = np.zeros(n)
    for _ in range(3):
        p = rng.uniform(*periods)
        out += np.sin(2 * np.pi * t / p + rng.uniform(0, 2 * np.pi)) * rng.uniform(0.3, 1.0)
    return amplitude * out / 2.0


def head_motion(num_frames: int, seed: int, *, strength: float = 1.0) -> HeadMotion:
    """Slow head sway: about +-2 % of the crop in x, +-1 % in y, +-3 degrees of tilt, +-2 % scale."""
    rng = np.random.default_rng([int(seed), 0x4D])
    s = float(strength)
    return HeadMotion(dx=_smooth_series(rng, num_frames, 0.02 * s), dy=_smooth_series(rng, num_frames, 0.01 * s),
                      tilt=_smooth_series(rng, num_frames, np.deg2rad(3.0) * s),
                      scale=1.0 + _smooth_series(rng, num_frames, 0.02 * s, periods=(3.0, 9.0)))


def blinks(num_frames: int, seed: int) -> np.ndarray:
    """Eyelid closure per frame in [0, 1] (1 = shut): a blink every 2-6 s, each about 200 ms (close, hold, open)."""
    rng = np.random.default_rng([int(seed), 0xB1])
    out = np.zeros(num_frames)
    shape = np.array([0.5, 1.0, 1.0, 0.6, 0.25])        # closure over the 5 frames of one blink
    f = int(rng.uniform(0.5, 4.0) * FPS)
    while f < num_frames:
        n = min(len(shape), num_frames - f)
        out[f:f + n] = np.maximum(out[f:f + n], shape[:n])
        f += int(rng.uniform(2.0, 6.0) * FPS)
    return out
