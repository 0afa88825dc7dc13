"""MFCC in torch, numerically the ``python_speech_features.mfcc`` defaults that SyncNet's evaluation uses.

Steps (all in float64, like the numpy original):
  pre-emphasis y[0] = x[0], y[n] = x[n] - 0.97 x[n - 1];
  frames of round_half_up(0.025 sr) samples every round_half_up(0.01 sr) samples, rectangular window; one frame
  if the signal is not longer than a frame, else 1 + ceil((len - frame) / step); the tail is zero-padded;
  power spectrum |rfft(frame, 512)|^2 / 512 (frames longer than 512 are truncated, shorter ones zero-padded);
  26 triangular mel filters with edges on FFT bins floor(513 * mel2hz(m) / sr), m evenly spaced in mel from
  0 Hz to sr / 2 (mel = 2595 log10(1 + hz / 700));
  log (zeros replaced by float64 eps), DCT-II (orthonormal), first 13, lifter 1 + 11 sin(pi n / 22);
  c0 replaced by the log of the frame's total power (appendEnergy).

SyncNet's evaluation reads the wav as int16, so MFCC is computed on int16-magnitude samples; pass int16 audio
(or float audio scaled by 32768) to match it.
"""
from __future__ import annotations

import decimal
import math

import numpy as np
import torch

_EPS64 = float(np.finfo(np.float64).eps)


def _round_half_up(x: float) -> int:
    return int(decimal.Decimal(x).quantize(decimal.Decimal("1"), rounding=decimal.ROUND_HALF_UP))


def _filterbank(nfilt: int, nfft: int, sr: int, lowfreq: float, highfreq: float) -> torch.Tensor:
    """(nfilt, nfft // 2 + 1) float64, the triangular filters on integer FFT bins."""
    hz2mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)   # noqa: E731
    mel2hz = lambda mel: 700.0 * (10.0 ** (mel / 2595.0) - 1.0)   # noqa: E731
    mels = np.linspace(hz2mel(lowfreq), hz2mel(highfreq), nfilt + 2)
    bins = np.floor((nfft + 1) * mel2hz(mels) / sr)
    k = np.arange(nfft // 2 + 1, dtype=np.float64)[None, :]
    lo, ce, hi = bins[:-2, None], bins[1:-1, None], bins[2:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rise = np.where((k >= lo) & (k < ce), (k - lo) / (ce - lo), 0.0)
        fall = np.where((k >= ce) & (k < hi), (hi - k) / (hi - ce), 0.0)
    return torch.from_numpy(rise + fall)


def _dct_ortho(n_in: int, n_out: int) -> torch.Tensor:
    """(n_in, n_out) float64 matrix of the orthonormal DCT-II, first n_out coefficients."""
    n = torch.arange(n_in, dtype=torch.float64)[:, None]
    k = torch.arange(n_out, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * k * (2 * n + 1) / (2 * n_in)) * math.sqrt(2.0 / n_in)
    m[:, 0] /= math.sqrt(2.0)
    return m


def mfcc(audio, sample_rate: int = 16000, *, numcep: int = 13, nfilt: int = 26, nfft: int = 512,
         winlen: float = 0.025, winstep: float = 0.01, preemph: float = 0.97, ceplifter: int = 22,
         append_energy: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MFCC of ``audio`` with the ``python_speech_features.mfcc`` defaults (see the module docstring).

    Args:
        audio: (len,) or (batch, len) numpy array or torch tensor (int16 or float; values used as given).
        sample_rate: int, Hz.
    Returns:
        (numcep, frames) or (batch, numcep, frames) tensor of ``dtype`` on the input's device (CPU for numpy);
        frames = 1 if len <= frame length, else 1 + ceil((len - frame) / step).  No gradient is tracked.
    Raises:
        TypeError / ValueError: non-numeric audio, more than 2 dims, an empty signal, or a bad sample rate.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise TypeError(f"sample_rate must be an int, got {type(sample_rate).__name__}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    if isinstance(audio, np.ndarray):
        if not (np.issubdtype(audio.dtype, np.integer) or np.issubdtype(audio.dtype, np.floating)):
            raise TypeError(f"audio must have an integer or float dtype, got {audio.dtype}")
        x = torch.from_numpy(np.asarray(audio, dtype=np.float64))
    elif isinstance(audio, torch.Tensor):
        if audio.is_complex() or audio.dtype == torch.bool:
            raise TypeError(f"audio must have an integer or float dtype, got {audio.dtype}")
        x = audio.detach().to(torch.float64)
    else:
        raise TypeError(f"audio must be a numpy.ndarray or torch.Tensor, got {type(audio).__name__}")
    if x.dim() not in (1, 2):
        raise ValueError(f"audio must be (len,) or (batch, len), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError("audio must not be empty")
    squeeze = x.dim() == 1
    x = x.reshape(-1, x.shape[-1])
    dev = x.device
    L = x.shape[1]

    # pre-emphasis
    if preemph:
        x = torch.cat([x[:, :1], x[:, 1:] - preemph * x[:, :-1]], dim=1)
    # framing (rectangular window), zero-padded tail
    flen = _round_half_up(winlen * sample_rate)
    fstep = _round_half_up(winstep * sample_rate)
    nframes = 1 if L <= flen else 1 + int(math.ceil((L - flen) / fstep))
    padlen = (nframes - 1) * fstep + flen
    x = torch.nn.functional.pad(x, (0, padlen - L))
    frames = x.unfold(1, flen, fstep)                               # (B, nframes, flen)
    # power spectrum (rfft with n=nfft truncates or zero-pads the frame)
    pspec = torch.fft.rfft(frames, n=nfft).abs().pow(2) / nfft      # (B, nframes, nfft//2+1)
    energy = pspec.sum(-1)
    energy = torch.where(energy == 0, torch.full_like(energy, _EPS64), energy)
    fb = _filterbank(nfilt, nfft, sample_rate, 0.0, sample_rate / 2).to(dev)
    feat = pspec @ fb.T
    feat = torch.where(feat == 0, torch.full_like(feat, _EPS64), feat)
    ceps = torch.log(feat) @ _dct_ortho(nfilt, numcep).to(dev)      # (B, nframes, numcep)
    if ceplifter > 0:
        n = torch.arange(numcep, dtype=torch.float64, device=dev)
        ceps = ceps * (1.0 + (ceplifter / 2.0) * torch.sin(math.pi * n / ceplifter))
    if append_energy:
        ceps[..., 0] = torch.log(energy)
    out = ceps.transpose(1, 2).to(dtype)
    return out[0] if squeeze else out
