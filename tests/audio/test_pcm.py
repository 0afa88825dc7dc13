"""to_mono_float: accepted inputs, conversions, and the errors a host gets for bad input."""
import numpy as np
import pytest
import torch

from lipforcing.audio import SAMPLES_PER_FRAME, to_mono_float


def test_constants():
    assert SAMPLES_PER_FRAME == 640  # 16 kHz / 25 fps


def test_int16_scaled():
    x = np.array([0, 1, -1, 16384, -32768, 32767], dtype=np.int16)
    y = to_mono_float(x, 16000)
    assert y.dtype == torch.float32 and y.shape == (6,)
    torch.testing.assert_close(y, torch.tensor([0, 1, -1, 16384, -32768, 32767], dtype=torch.float32) / 32768)
    assert y.min() >= -1.0 and y.max() < 1.0
    # torch int16 gives the same
    torch.testing.assert_close(to_mono_float(torch.from_numpy(x), 16000), y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_numpy_passthrough_and_copy(dtype):
    x = np.random.default_rng(0).uniform(-1, 1, 1001).astype(dtype)
    y = to_mono_float(x, 48000)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), x.astype(np.float32))
    x[0] = 0.5  # the result must not alias the caller's buffer
    y0 = float(y[0])
    x[0] = -0.25
    assert float(y[0]) == y0


def test_float_tensor_no_alias_and_no_grad():
    x = torch.randn(300, requires_grad=True)
    y = to_mono_float(x, 16000)
    assert not y.requires_grad
    with torch.no_grad():
        x[0] = 123.0
    assert float(y[0]) != 123.0
    # a non-contiguous view is accepted
    z = torch.randn(200)[::2]
    torch.testing.assert_close(to_mono_float(z, 16000), z.contiguous())


def test_empty_ok():
    assert to_mono_float(np.zeros(0, np.int16), 16000).shape == (0,)


@pytest.mark.parametrize("bad", [np.zeros((100, 2), np.float32), np.zeros((1, 100), np.int16),
                                 torch.zeros(2, 50), np.float32(0.5) * np.ones((3, 3, 3), np.float32)])
def test_multichannel_rejected(bad):
    with pytest.raises(ValueError, match="1-D"):
        to_mono_float(bad, 16000)


@pytest.mark.parametrize("bad", [np.zeros(10, np.int32), np.zeros(10, np.uint8), np.zeros(10, np.float16),
                                 np.zeros(10, np.complex64), torch.zeros(10, dtype=torch.int64),
                                 torch.zeros(10, dtype=torch.bfloat16)])
def test_wrong_dtype(bad):
    with pytest.raises(TypeError, match="dtype"):
        to_mono_float(bad, 16000)


def test_not_an_array():
    with pytest.raises(TypeError, match="pcm"):
        to_mono_float([0.0, 0.1], 16000)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite(value):
    x = np.zeros(100, np.float32)
    x[37] = value
    with pytest.raises(ValueError, match="non-finite"):
        to_mono_float(x, 16000)
    with pytest.raises(ValueError, match="non-finite"):
        to_mono_float(torch.from_numpy(x), 16000)


@pytest.mark.parametrize("sr", [16000.0, "16000", None, True])
def test_sample_rate_type(sr):
    with pytest.raises(TypeError, match="sample_rate"):
        to_mono_float(np.zeros(10, np.float32), sr)


@pytest.mark.parametrize("sr", [0, -16000])
def test_sample_rate_value(sr):
    with pytest.raises(ValueError, match="sample_rate"):
        to_mono_float(np.zeros(10, np.float32), sr)


def test_numpy_int_sample_rate_ok():
    assert to_mono_float(np.zeros(10, np.float32), np.int64(16000)).shape == (10,)


# --- hardening (issue 13): a documented amplitude bound for float PCM -------------------------------------------

@pytest.mark.parametrize("kind", ["numpy32", "numpy64", "torch32", "torch64"])
@pytest.mark.parametrize("value", [1e30, -1e20, 3.0e4, 10000.5])
def test_float_pcm_beyond_the_bound_is_refused_naming_pcm(kind, value):
    from lipforcing.audio.pcm import MAX_FLOAT_AMPLITUDE

    x = np.random.uniform(-1, 1, 1000).astype(np.float32)
    where = np.random.randint(0, 1000, 3)
    x[where] = value
    pcm = {"numpy32": x, "numpy64": x.astype(np.float64), "torch32": torch.from_numpy(x),
           "torch64": torch.from_numpy(x).double()}[kind]
    assert abs(value) > MAX_FLOAT_AMPLITUDE == 1e4
    with pytest.raises(ValueError, match=r"^pcm has [1-3] sample\(s\) beyond \+-10000"):
        to_mono_float(pcm, 16000)


def test_loud_float_pcm_and_full_scale_int16_pass():
    x = np.random.uniform(-1, 1, 500).astype(np.float32)
    x[7] = 1e4                                  # the bound itself is accepted
    x[8] = -37.5                                # clipped/loud float audio is the caller's business
    assert torch.equal(to_mono_float(x, 16000), torch.from_numpy(x))
    i16 = np.array([-32768, 32767, 0], dtype=np.int16)
    assert to_mono_float(i16, 16000).abs().max() <= 1.0


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_host_int16_frames_to_mono_and_back(channels):
    """The host adapters' conversions (LiveKit, Pipecat, serve): interleaved int16 bytes -> mono, float -> int16."""
    from lipforcing.audio.pcm import float_to_int16, interleaved_int16_to_mono

    n = int(np.random.randint(1, 700))
    raw = np.random.randint(-32768, 32768, size=(n, channels)).astype(np.int16)
    mono = interleaved_int16_to_mono(raw.tobytes(), channels)
    if channels == 1:
        assert mono.dtype == np.int16 and np.array_equal(mono, raw[:, 0])
    else:
        assert mono.dtype == np.float32 and mono.shape == (n,)
        np.testing.assert_allclose(mono, raw.astype(np.float64).mean(axis=1) / 32768.0, rtol=0, atol=1e-6)
    x = np.concatenate([np.random.uniform(-1.5, 1.5, n), [1.0, -1.0, 0.5 / 32768]]).astype(np.float32)
    y = float_to_int16(x)
    assert y.dtype == np.int16
    assert np.array_equal(y, np.clip(np.rint(x.astype(np.float64) * 32768), -32768, 32767).astype(np.int16))
    assert y[-3] == 32767 and y[-2] == -32768
