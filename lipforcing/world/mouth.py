"""The mouth model of the procedural world: mouth shape as a deterministic function of the speech.

For video frame f (25 fps, samples [640 f, 640 (f + 1)) at 16 kHz) the mouth is computed from the audio window
that starts ``lead`` seconds later (default 40 ms: in real speech the lips and jaw move slightly before the sound
they shape), 640 samples long:

* **opening** in [0, 1] from the loudness envelope: ``rms / ref`` where ``ref = max(p98(rms), 0.02)`` (the 98th
  percentile of the utterance's window RMS, floored so that silence and near-silence give a closed mouth),
  compressed by ``x ** 0.6``, clipped to 1, then smoothed with a one-pole filter that opens faster than it closes
  (coefficients 0.75 and 0.5 per frame).  A silent clip gives exactly 0 everywhere.
* **spread** in [0, 1] (0 = rounded "o/u", 1 = spread "i/e", 0.5 = neutral) from the spectral centroid of the
  window between 200 Hz and 4 kHz: ``clip((centroid - 900 Hz) / 1400 Hz, 0, 1)``, blended towards 0.5 by
  ``1 - opening`` (a closed mouth is neutral).  Front vowels have a high second formant (high centroid), rounded
  back vowels a low one, so this is a crude viseme axis.

The renderer (:mod:`lipforcing.world.render`) turns (opening, spread) into the lip geometry.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lipforcing.audio.pcm import SAMPLE_RATE, SAMPLES_PER_FRAME

__all__ = ["MouthTrack", "mouth_track", "LEAD_SECONDS", "SAMPLE_RATE", "SAMPLES_PER_FRAME", "window_rms"]

LEAD_SECONDS = 0.04
_FLOOR = 0.02
_ATTACK, _RELEASE = 0.75, 0.5


@dataclass(frozen=True)
class MouthTrack:
    """Per-frame mouth shape: ``opening`` and ``spread``, each (F,) float32 in [0, 1]."""

    opening: np.ndarray
    spread: np.ndarray

    def __len__(self) -> int:
        return len(self.opening)

    def as_array(self) -> np.ndarray:
        """(F, 2) float32: [opening, spread]."""
        return np.stack([self.opening, self.spread], 1).astype(np.float32)

    @classmethod
    def closed(cls, num_frames: int) -> "MouthTrack":
        return cls(np.zeros(num_frames, np.float32), np.full(num_frames, 0.5, np.float32))


def _windows(samples: np.ndarray, num_frames: int, lead: float) -> np.ndarray:
    """(F, 640) audio windows, frame f starting at 640 f + lead * 16000 (zero past the ends)."""
    shift = int(round(lead * SAMPLE_RATE))
    x = np.zeros(num_frames * SAMPLES_PER_FRAME, np.float64)
    src = np.asarray(samples, np.float64)[max(shift, 0):]
    off = max(-shift, 0)
    n = max(0, min(len(src), len(x) - off))
    x[off:off + n] = src[:n]
    return x.reshape(num_frames, SAMPLES_PER_FRAME)


def window_rms(samples: np.ndarray, num_frames: int, *, lead: float = 0.0) -> np.ndarray:
    """RMS of each frame's (lead-shifted) 640-sample window: (F,) float64."""
    return np.sqrt((_windows(samples, num_frames, lead) ** 2).mean(1))


def mouth_track(samples: np.ndarray, num_frames: int, *, lead: float = LEAD_SECONDS) -> MouthTrack:
    """The mouth shape of ``num_frames`` video frames for 16 kHz mono float ``samples`` (see the module docstring).

    Raises ValueError for non-finite samples or ``num_frames < 1``."""
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"samples must be 1-D mono audio, got shape {samples.shape}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if samples.size and not np.isfinite(samples).all():
        raise ValueError("samples contain NaN or inf")
    win = _windows(samples, int(num_frames), lead)
    rms = np.sqrt((win ** 2).mean(1))
    ref = max(float(np.percentile(rms, 98)), _FLOOR)
    target = np.minimum(1.0, (rms / ref) ** 0.6)
    opening = np.empty_like(target)
    prev = 0.0
    for i, v in enumerate(target):
        prev += (_ATTACK if v > prev else _RELEASE) * (v - prev)
        opening[i] = prev
    # spectral centroid in 200 Hz .. 4 kHz
    spec = np.abs(np.fft.rfft(win * np.hanning(SAMPLES_PER_FRAME), axis=1)) ** 2
    freqs = np.fft.rfftfreq(SAMPLES_PER_FRAME, 1.0 / SAMPLE_RATE)
    band = (freqs >= 200) & (freqs <= 4000)
    power = spec[:, band].sum(1)
    centroid = (spec[:, band] * freqs[band]).sum(1) / np.maximum(power, 1e-20)
    raw_spread = np.clip((centroid - 900.0) / 1400.0, 0.0, 1.0)
    raw_spread[power <= 1e-12] = 0.5
    spread = 0.5 + (raw_spread - 0.5) * opening
    return MouthTrack(opening.astype(np.float32), spread.astype(np.float32))
