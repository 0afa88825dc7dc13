"""A dependency-free log-mel front end: one 2 * n_mels vector per 25 fps video frame.

Layout.  Mel frames use a 640-sample (40 ms) periodic Hann window with a 320-sample (20 ms) hop; mel frame j
is centred on sample 320 j + 160, so video frame f (samples [640 f, 640 f + 640)) owns mel frames 2f and
2f + 1, centred on the middles of its two halves.  Together they read samples [640 f - 160, 640 f + 800):
160 samples (10 ms) of left context and 160 samples of lookahead.  The feature of frame f is
[log-mel(2f), log-mel(2f + 1)] (2 * n_mels values); samples before the start of the stream are zeros.

Every frame is a function of a fixed span of samples, so streaming is exact: a stream's output equals
``frames()`` on the whole clip for any split into pushes (identical arithmetic; equal up to float rounding of
batched FFT/matmul).
"""
from __future__ import annotations

import math

import torch

from lipforcing.audio.features import BufferedFeatureStream, as_pcm16k, num_frames
from lipforcing.audio.pcm import SAMPLE_RATE, SAMPLES_PER_FRAME

_WIN = 640
_HOP = 320
_EDGE = (_WIN - _HOP) // 2    # 160: context on each side of a video frame


def _hz_to_mel(f):
    return 2595.0 * math.log10(1.0 + f / 700.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, fmin: float, fmax: float) -> torch.Tensor:
    """HTK-style triangular mel filters on the rfft bins: (n_fft // 2 + 1, n_mels) float64."""
    mels = torch.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    bins = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft
    lo, ce, hi = hz[:-2], hz[1:-1], hz[2:]
    up = (bins[:, None] - lo[None]) / (ce - lo)[None]
    down = (hi[None] - bins[:, None]) / (hi - ce)[None]
    return torch.clamp(torch.minimum(up, down), min=0.0)


class MelFeatures:
    """Built-in log-mel front end (see the module docstring for the exact framing).

    Args:
        n_mels: mel bands per 20 ms half-frame; ``feature_dim = 2 * n_mels``.
        fmin, fmax: band edges in Hz (0 <= fmin < fmax <= 8000).
        device, dtype: where and in which dtype features are returned (the math runs in float32).
    """

    sample_rate = SAMPLE_RATE
    samples_per_frame = SAMPLES_PER_FRAME
    lookahead_samples = _EDGE

    def __init__(self, n_mels: int = 40, *, fmin: float = 0.0, fmax: float = 8000.0, device=None,
                 dtype: torch.dtype = torch.float32, eps: float = 1e-6):
        if isinstance(n_mels, bool) or not isinstance(n_mels, int) or n_mels < 1:
            raise ValueError(f"n_mels must be an int >= 1, got {n_mels!r}")
        if not 0.0 <= fmin < fmax <= SAMPLE_RATE / 2:
            raise ValueError(f"need 0 <= fmin < fmax <= {SAMPLE_RATE // 2}, got fmin={fmin}, fmax={fmax}")
        self.n_mels = n_mels
        self.feature_dim = 2 * n_mels
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.eps = eps
        self._window = torch.hann_window(_WIN, periodic=True, dtype=torch.float32, device=self.device)
        self._fb = mel_filterbank(n_mels, _WIN, SAMPLE_RATE, fmin, fmax).to(self.device, torch.float32)

    def _from_segment(self, seg: torch.Tensor, n: int) -> torch.Tensor:
        """seg: samples [640 f0 - 160, 640 (f0 + n) + 160) -> (n, feature_dim) for frames f0 .. f0 + n - 1."""
        seg = seg.to(self.device, torch.float32)
        fr = seg.unfold(0, _WIN, _HOP)                                # (2n, 640)
        power = torch.fft.rfft(fr * self._window, n=_WIN).abs().pow(2)
        logmel = torch.log(power @ self._fb + self.eps)             # (2n, n_mels)
        return logmel.reshape(n, self.feature_dim).to(self.dtype)

    def frames(self, pcm) -> torch.Tensor:
        """Whole clip -> (ceil(len / 640), 2 * n_mels).  ``pcm``: 16 kHz mono (see ``to_mono_float``)."""
        x = as_pcm16k(pcm)
        n = num_frames(x.numel())
        if n == 0:
            return torch.zeros(0, self.feature_dim, device=self.device, dtype=self.dtype)
        x = x.to(self.device)
        seg = torch.cat([x.new_zeros(_EDGE), x, x.new_zeros(n * SAMPLES_PER_FRAME - x.numel() + _EDGE)])
        return self._from_segment(seg, n)

    def stream(self) -> "MelStream":
        return MelStream(self)


class MelStream(BufferedFeatureStream):
    """Exact incremental :class:`MelFeatures`: emits frame f once 640 (f + 1) + 160 samples have arrived."""

    def __init__(self, fe: MelFeatures):
        super().__init__()
        self.fe = fe

    def _emit(self, end: int) -> torch.Tensor:
        f0, P = self.frames_emitted, SAMPLES_PER_FRAME
        if end <= f0:
            return torch.zeros(0, self.fe.feature_dim, device=self.fe.device, dtype=self.fe.dtype)
        seg = self._buf.read(f0 * P - _EDGE, end * P + _EDGE)
        out = self.fe._from_segment(seg, end - f0)
        self.frames_emitted = end
        self._buf.drop_before(end * P - _EDGE)
        return out

    def push(self, pcm) -> torch.Tensor:
        self._buf.append(as_pcm16k(pcm))
        return self._emit(max(0, (self._buf.end - _EDGE) // SAMPLES_PER_FRAME))

    def flush(self) -> torch.Tensor:
        n = num_frames(self._buf.end)
        self._buf.pad_to(n * SAMPLES_PER_FRAME)   # the lookahead past it reads as zeros
        return self._emit(n)
