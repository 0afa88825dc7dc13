"""Resampler: accuracy against analytic band-limited signals, alias rejection, streaming == whole clip."""
import math

import numpy as np
import pytest
import torch

from lipforcing.audio import Resampler, resample


def _tones(sr, n, freqs, amps, phases):
    t = torch.arange(n, dtype=torch.float64) / sr
    return sum(a * torch.sin(2 * math.pi * f * t + p) for f, a, p in zip(freqs, amps, phases))


@pytest.mark.parametrize("orig", [48000, 44100, 22050, 8000, 11025, 24001])
def test_bandlimited_signal_matches_analytic(orig):
    g = np.random.default_rng(orig)
    freqs = g.uniform(50, 0.42 * min(orig, 16000), 6)   # below both Nyquists (and the roll-off)
    amps = g.uniform(0.02, 0.15, 6)
    phases = g.uniform(0, 2 * math.pi, 6)
    n = int(0.3 * orig) + 17
    x = _tones(orig, n, freqs, amps, phases).float()
    y = resample(x, orig, 16000)
    assert y.dtype == torch.float32
    assert y.numel() == math.ceil(n * 16000 / orig)
    ref = _tones(16000, y.numel(), freqs, amps, phases)
    edge = 200  # the zero padding before the start and after the end is not the analytic signal
    err = (y[edge:-edge].double() - ref[edge:-edge]).abs().max().item()
    assert err < 3e-3, err


def test_alias_rejected_when_downsampling():
    orig = 48000
    x = _tones(orig, orig // 2, [11000.0], [0.5], [0.3]).float()   # above the 8 kHz Nyquist of 16 kHz
    y = resample(x, orig)
    rms = y[300:-300].pow(2).mean().sqrt().item()
    assert rms < 1e-3 * 0.5 / math.sqrt(2), rms


def test_identity_rate():
    x = torch.randn(1234)
    y = resample(x, 16000, 16000)
    torch.testing.assert_close(y, x)


@pytest.mark.parametrize("orig", [44100, 48000, 8000, 24001])
def test_streaming_equals_whole(orig):
    g = torch.Generator().manual_seed(orig)
    x = torch.randn(orig // 3 + 5, generator=g) * 0.3
    whole = resample(x, orig)
    r = Resampler(orig)
    out, i = [], 0
    while i < x.numel():
        k = int(torch.randint(1, 900, (1,), generator=g))
        out.append(r.push(x[i:i + k]))
        i += k
    out.append(r.flush())
    stream = torch.cat(out)
    assert stream.shape == whole.shape
    torch.testing.assert_close(stream, whole, rtol=0, atol=1e-6)


def test_streaming_latency_and_state_bounded():
    r = Resampler(48000)
    total_out = 0
    for _ in range(200):                       # 200 x 10 ms pieces
        y = r.push(torch.randn(480))
        total_out += y.numel()
        assert r._buf.numel() <= 480 + 2 * r.lookahead + 4
    # everything but the lookahead has been produced already
    assert total_out >= 200 * 160 - r.lookahead // 3 - 2
    total_out += r.flush().numel()
    assert total_out == 200 * 160


def test_flush_resets():
    r = Resampler(44100)
    x = torch.randn(5000)
    a = torch.cat([r.push(x), r.flush()])
    b = torch.cat([r.push(x), r.flush()])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_errors():
    with pytest.raises(TypeError, match="orig_sr"):
        Resampler(44100.0)
    with pytest.raises(ValueError, match="new_sr"):
        Resampler(44100, 0)
    with pytest.raises(TypeError, match="1-D float"):
        Resampler(44100).push(torch.zeros(2, 10))
    with pytest.raises(TypeError, match="1-D float"):
        Resampler(44100).push(np.zeros(10, np.float32))
