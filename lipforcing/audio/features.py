"""The one interface every audio front end implements, and the sample bookkeeping their streams share.

A front end turns 16 kHz mono float audio into one feature vector per 25 fps video frame (640 samples):

    feats = MelFeatures()                      # or Wav2VecFeatures(local_dir, device, dtype)
    whole = feats.frames(pcm)                  # (ceil(len / 640), feats.feature_dim)
    s = feats.stream()
    for piece in pieces:                       # any sizes
        new = s.push(piece)                    # (n_new, feature_dim): frames whose features are now final
    rest = s.flush()                           # end of utterance: zero-pad, emit the remaining frames

Frame f covers samples [640 f, 640 (f + 1)).  A stream emits frame f once it has seen
``640 (f + 1) + lookahead_samples`` samples (for block-wise front ends, the lookahead of the last frame of
its block; see each class), so the features never depend on how the audio was split into pushes.  A stream
keeps a bounded history, so long streams cost O(1) memory and O(1) work per pushed sample.

``flush()`` ends an utterance: the missing samples up to the frame boundary and the lookahead are zeros.  The
stream may then continue; the zero padding up to the frame boundary stays in its history (it is as if that
silence had been pushed), and frame indices continue from there.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from lipforcing.audio.pcm import SAMPLE_RATE, SAMPLES_PER_FRAME, to_mono_float


@runtime_checkable
class FeatureStream(Protocol):
    """Incremental feature computation for one audio stream."""

    frames_emitted: int      # frames returned so far (index of the next frame to come)
    samples_received: int    # samples pushed so far, plus any flush padding

    def push(self, pcm) -> torch.Tensor:
        """Append 16 kHz samples; return (n_new, feature_dim) for the frames completed by them (n_new may be 0)."""
        ...

    def flush(self) -> torch.Tensor:
        """End of utterance: zero-pad to the frame boundary (and the lookahead); return the remaining frames."""
        ...

    def reset(self) -> None:
        """Forget everything; the next push is frame 0 of a new stream."""
        ...


@runtime_checkable
class AudioFeatures(Protocol):
    """A per-video-frame audio front end (16 kHz in, one ``feature_dim`` vector per 640 samples out)."""

    sample_rate: int         # 16000
    samples_per_frame: int   # 640
    feature_dim: int
    lookahead_samples: int   # audio a stream needs past the end of a frame before emitting it

    def frames(self, pcm) -> torch.Tensor:
        """Whole clip: (ceil(len / 640), feature_dim); a partial last frame is zero-padded."""
        ...

    def stream(self) -> FeatureStream:
        ...


def num_frames(num_samples: int) -> int:
    """Video frames covered by ``num_samples`` samples at 16 kHz / 25 fps (a partial frame counts)."""
    return -(-num_samples // SAMPLES_PER_FRAME)


def as_pcm16k(pcm, name: str = "pcm") -> torch.Tensor:
    """Accept a 1-D float32 tensor as is; anything else goes through ``to_mono_float`` (validation, int16)."""
    if isinstance(pcm, torch.Tensor) and pcm.dtype == torch.float32 and pcm.dim() == 1:
        if pcm.numel() and not bool(torch.isfinite(pcm).all()):
            raise ValueError(f"{name} contains non-finite value(s) (NaN or inf)")
        return pcm
    return to_mono_float(pcm, SAMPLE_RATE, name=name)


class SampleBuffer:
    """Samples of one stream held from absolute index ``start``; indices < 0 and >= ``end`` read as zeros."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.data = torch.zeros(0, dtype=torch.float32)
        self.start = 0          # absolute index of data[0]
        self.end = 0            # total samples appended

    def append(self, x: torch.Tensor) -> None:
        if self.data.device != x.device:
            self.data = self.data.to(x.device)
        self.data = torch.cat([self.data, x.to(torch.float32)])
        self.end += x.numel()

    def read(self, a: int, b: int) -> torch.Tensor:
        """Samples [a, b) (absolute); zeros outside [0, end).  Raises if [a, b) reaches dropped history."""
        if a < self.start and self.start > 0:
            raise AssertionError(f"sample {a} was already dropped (history starts at {self.start})")
        if a >= self.start and b <= self.end:
            return self.data[a - self.start:b - self.start]
        out = self.data.new_zeros(b - a)
        lo, hi = max(a, self.start), min(b, self.end)
        if hi > lo:
            out[lo - a:hi - a] = self.data[lo - self.start:hi - self.start]
        return out

    def drop_before(self, a: int) -> None:
        if a > self.start:
            k = min(a, self.end) - self.start
            self.data = self.data[k:].clone()
            self.start += k

    def pad_to(self, n: int) -> None:
        """Append zeros so that ``end == n`` (no-op if already there)."""
        if n > self.end:
            self.append(self.data.new_zeros(n - self.end))


class BufferedFeatureStream:
    """State shared by the streaming front ends: the samples received so far and the frames already emitted."""

    def __init__(self):
        self._buf = SampleBuffer()
        self.frames_emitted = 0

    @property
    def samples_received(self) -> int:
        return self._buf.end

    def reset(self) -> None:
        self._buf.reset()
        self.frames_emitted = 0
