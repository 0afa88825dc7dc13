"""lipforcing.distill.mfcc against python_speech_features.mfcc (the library SyncNet's evaluation calls)."""
import math

import numpy as np
import pytest
import torch

psf = pytest.importorskip("python_speech_features")

from lipforcing.distill import mfcc  # noqa: E402


def _speech_like(n, sr, seed):
    """Voiced segments (harmonics of a gliding pitch, formant-shaped), noise bursts and exact silences."""
    g = np.random.default_rng(seed)
    t = np.arange(n) / sr
    f0 = 110 + 40 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) * np.exp(-((k * 130 - 700) / 500) ** 2) for k in range(1, 30))
    env = (np.sin(2 * np.pi * 4 * t) > -0.3).astype(float)
    x = voiced * env + 0.05 * g.standard_normal(n) * (1 - env)
    x[n // 3:n // 3 + 900] = 0.0                         # a stretch of digital silence
    return (x / np.abs(x).max() * 12000).astype(np.int16)


def _check(x, sr, **kw):
    ref = psf.mfcc(x, sr).T                              # (13, frames), float64
    got = mfcc(x, sr, **kw)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n", [16000, 16000 + 77, 640 * 81, 401, 400, 399, 123])
def test_random_int16(n):
    x = (np.random.default_rng(n).standard_normal(n) * 3000).astype(np.int16)
    _check(x, 16000)


@pytest.mark.parametrize("n,sr", [(16000 * 2 + 13, 16000), (8000 + 5, 8000)])
def test_speech_like(n, sr):
    _check(_speech_like(n, sr, n), sr)


def test_float_input_and_tensor():
    x = np.random.default_rng(1).uniform(-1, 1, 8000).astype(np.float32)
    _check(x, 16000)
    got = mfcc(torch.from_numpy(x))
    np.testing.assert_allclose(got.double().numpy(), psf.mfcc(x, 16000).T, rtol=1e-4, atol=1e-3)


def test_float64_precision():
    x = _speech_like(9000, 16000, 3)
    got = mfcc(x, 16000, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, psf.mfcc(x, 16000).T, rtol=1e-9, atol=1e-9)


def test_frame_count_rule():
    for n in [1, 399, 400, 401, 560, 561, 16000]:
        expected = 1 if n <= 400 else 1 + math.ceil((n - 400) / 160)
        assert mfcc(np.ones(n, np.float32)).shape == (13, expected)


def test_batch():
    x = (np.random.default_rng(2).standard_normal((3, 5000)) * 2000).astype(np.int16)
    got = mfcc(torch.from_numpy(x))
    assert got.shape[:2] == (3, 13)
    for b in range(3):
        np.testing.assert_allclose(got[b].double().numpy(), psf.mfcc(x[b], 16000).T, rtol=1e-4, atol=1e-3)


def test_errors():
    with pytest.raises(TypeError, match="sample_rate"):
        mfcc(np.zeros(800), 16000.0)
    with pytest.raises(ValueError, match="shape"):
        mfcc(np.zeros((2, 2, 800)))
    with pytest.raises(ValueError, match="empty"):
        mfcc(np.zeros(0))
    with pytest.raises(TypeError, match="audio"):
        mfcc([0.0] * 800)


def test_package_attribute_stays_callable():
    """Importing the SyncNet module (which uses the MFCC front end) leaves lipforcing.distill.mfcc the function."""
    import importlib

    import lipforcing.distill as distill
    importlib.import_module("lipforcing.distill.syncnet")
    importlib.import_module("lipforcing.distill.mfcc_frontend")
    x = (np.random.default_rng(5).standard_normal(2000) * 1000).astype(np.int16)
    np.testing.assert_allclose(distill.mfcc(x).double().numpy(), psf.mfcc(x, 16000).T, rtol=1e-4, atol=1e-3)
