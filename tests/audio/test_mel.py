"""MelFeatures: frame layout (which samples each video frame reads), exact streaming, the protocol."""
import math

import numpy as np
import pytest
import torch

from lipforcing.audio import AudioFeatures, FeatureStream, MelFeatures


def _push_all(stream, x, sizes):
    out, i, k = [], 0, 0
    while i < x.numel():
        n = sizes[k % len(sizes)]
        out.append(stream.push(x[i:i + n]))
        i += n
        k += 1
    return out


def test_protocol_and_shapes():
    fe = MelFeatures(n_mels=24)
    assert isinstance(fe, AudioFeatures)
    assert isinstance(fe.stream(), FeatureStream)
    assert fe.feature_dim == 48 and fe.samples_per_frame == 640 and fe.sample_rate == 16000
    for n, frames in [(0, 0), (1, 1), (640, 1), (641, 2), (16000, 25)]:
        assert fe.frames(torch.randn(n) * 0.1).shape == (frames, 48)


@pytest.mark.parametrize("sizes", [[160], [320, 7, 1000], [640], [16000], [1, 2, 3, 5000]])
def test_stream_equals_whole_clip(sizes):
    fe = MelFeatures()
    x = torch.randn(16000 + 333, generator=torch.Generator().manual_seed(len(sizes))) * 0.2
    whole = fe.frames(x)
    s = fe.stream()
    out = _push_all(s, x, sizes)
    out.append(s.flush())
    stream = torch.cat(out)
    assert stream.shape == whole.shape == (math.ceil(x.numel() / 640), 80)
    torch.testing.assert_close(stream, whole, rtol=1e-5, atol=1e-5)
    assert s.frames_emitted == whole.shape[0]


def test_frame_reads_its_documented_span():
    """A click at sample p changes exactly the frames f with 640 f - 160 <= p < 640 f + 800."""
    fe = MelFeatures()
    n = 640 * 12
    base = torch.zeros(n)
    quiet = fe.frames(base)
    for p in [0, 159, 160, 500, 639, 640, 799, 800, 801, 3000, 5119, 5121]:
        x = base.clone()
        x[p] = 0.5
        changed = (fe.frames(x) - quiet).abs().amax(dim=1) > 1e-3
        expect = torch.tensor([640 * f - 160 <= p < 640 * f + 800 for f in range(12)])
        assert torch.equal(changed, expect), (p, changed.nonzero().flatten().tolist())


def test_stream_lookahead():
    """Frame f is emitted as soon as 640 (f + 1) + 160 samples have arrived, not before."""
    fe = MelFeatures()
    s = fe.stream()
    assert s.push(torch.zeros(640 + 159)).shape[0] == 0
    assert s.push(torch.zeros(1)).shape[0] == 1
    assert s.push(torch.zeros(640 * 3)).shape[0] == 3
    assert fe.lookahead_samples == 160


def test_tone_lands_in_its_mel_band():
    fe = MelFeatures(n_mels=40)
    t = torch.arange(8000, dtype=torch.float64) / 16000
    for f0 in [300.0, 1000.0, 4000.0]:
        x = (0.3 * torch.sin(2 * math.pi * f0 * t)).float()
        feat = fe.frames(x)[3].reshape(2, 40)   # an interior frame, both halves
        # band centres of the HTK mel scale used by the docstring: 40 bands between 0 and 8000 Hz
        mel = lambda h: 2595 * np.log10(1 + h / 700)   # noqa: E731
        centres = 700 * (10 ** (np.linspace(0, mel(8000), 42)[1:-1] / 2595) - 1)
        best = int(np.argmin(np.abs(centres - f0)))
        for half in feat:
            assert abs(int(half.argmax()) - best) <= 1


def test_flush_then_continue():
    """After flush the stream continues as if zeros up to the frame boundary had been pushed."""
    fe = MelFeatures()
    a = torch.randn(1000) * 0.1
    b = torch.randn(2000) * 0.1
    s = fe.stream()
    out = [s.push(a), s.flush(), s.push(b), s.flush()]
    got = torch.cat(out)
    padded = torch.cat([a, torch.zeros(1280 - 1000), b])
    ref = fe.frames(padded)
    assert got.shape == ref.shape
    # frames not straddling the utterance boundary match; frame 1's lookahead saw zeros at flush time
    torch.testing.assert_close(got[2:], ref[2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:1], ref[:1], rtol=1e-5, atol=1e-5)
    s.reset()
    assert s.frames_emitted == 0 and s.samples_received == 0


def test_history_bounded():
    fe = MelFeatures()
    s = fe.stream()
    for _ in range(300):
        s.push(torch.randn(320) * 0.1)
    assert s._buf.data.numel() <= 640 + 320 + 320


def test_input_validation():
    fe = MelFeatures()
    with pytest.raises(ValueError, match="1-D"):
        fe.frames(torch.zeros(2, 640))
    x = torch.zeros(640)
    x[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fe.stream().push(x)
    with pytest.raises(ValueError, match="n_mels"):
        MelFeatures(n_mels=0)
    # int16 input is accepted and scaled
    xi = (np.random.default_rng(0).standard_normal(1280) * 1000).astype(np.int16)
    torch.testing.assert_close(fe.frames(xi), fe.frames(torch.from_numpy(xi.astype(np.float32) / 32768)))
