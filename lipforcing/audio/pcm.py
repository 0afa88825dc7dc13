"""PCM input validation: whatever a host pushes becomes a 1-D float32 tensor in [-1, 1].

The model side of lipforcing works at 16 kHz mono with one 25 fps video frame per 640 samples (40 ms).
"""
from __future__ import annotations

import numpy as np
import torch

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640 samples = one video frame
# input rates a session or an audio file may have (telephony to studio); resampled to SAMPLE_RATE
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000

# Float PCM is nominally in [-1, 1]; samples beyond this magnitude are refused.  Loud or slightly clipped audio
# passes (the bound is 10^4 times full scale); what it stops is garbage (uninitialised buffers, int samples cast to
# float without scaling are at most 32768 and are stopped too, 1e20 bursts) that would drive the audio features
# non-finite and poison a session.
MAX_FLOAT_AMPLITUDE = 1e4

# accepted input dtypes; int16 is scaled by 1/32768, floats are taken as they are (nominally [-1, 1])
_NP_FLOATS = (np.float32, np.float64)
_TORCH_FLOATS = (torch.float32, torch.float64)


def check_sample_rate(sample_rate, name: str = "sample_rate") -> int:
    """Return ``sample_rate`` as an int; TypeError unless it is an integer, ValueError unless it is > 0."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise TypeError(f"{name} must be an int (samples per second, e.g. 16000), got "
                        f"{type(sample_rate).__name__} {sample_rate!r}")
    if sample_rate <= 0:
        raise ValueError(f"{name} must be > 0, got {sample_rate}")
    return int(sample_rate)


def to_mono_float(pcm, sample_rate, *, name: str = "pcm") -> torch.Tensor:
    """Validate one piece of mono PCM and return it as a float32 torch tensor.

    Args:
        pcm: 1-D ``numpy.ndarray`` or ``torch.Tensor`` of samples. dtype int16 (scaled by 1/32768 to [-1, 1))
            or float32/float64 (taken as given; nominally in [-1, 1], not clipped; ``|x| <=``
            :data:`MAX_FLOAT_AMPLITUDE` = 1e4 required). Length 0 is allowed.
        sample_rate: int, samples per second of ``pcm`` (checked here; resampling is ``lipforcing.audio.resample``).
    Returns:
        float32 tensor of shape (len,), on the input tensor's device (CPU for numpy input). Never aliases the
        input (the caller may reuse its buffer).
    Raises:
        TypeError: ``pcm`` is not an array/tensor, has another dtype (int32, uint8, float16, complex, ...), or
            ``sample_rate`` is not an int.
        ValueError: ``pcm`` is not 1-D (stereo / multi-channel: mix down first, e.g. ``x.mean(axis=1)``),
            contains NaN or inf or a float sample beyond +-1e4, or ``sample_rate`` <= 0.
    """
    check_sample_rate(sample_rate)
    if isinstance(pcm, np.ndarray):
        if pcm.dtype == np.int16:
            x = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
        elif pcm.dtype.type in _NP_FLOATS:
            x = torch.from_numpy(np.array(pcm, dtype=np.float32, copy=True))
        else:
            raise TypeError(f"{name} must have dtype int16, float32 or float64, got numpy {pcm.dtype}")
        shape = pcm.shape
    elif isinstance(pcm, torch.Tensor):
        if pcm.dtype == torch.int16:
            x = pcm.detach().to(torch.float32).contiguous() / 32768.0
        elif pcm.dtype in _TORCH_FLOATS:
            x = pcm.detach().to(torch.float32, copy=True).contiguous()
        else:
            raise TypeError(f"{name} must have dtype int16, float32 or float64, got torch "
                            f"{str(pcm.dtype).replace('torch.', '')}")
        shape = tuple(pcm.shape)
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor of mono samples, got {type(pcm).__name__}")
    if len(shape) != 1:
        raise ValueError(f"{name} must be 1-D mono samples (len,), got shape {tuple(shape)}; mix multi-channel "
                         "audio down to mono first (e.g. x.mean(axis=-1) for (len, channels))")
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")
    check_amplitude(x, name)
    return x


def interleaved_int16_to_mono(data, channels: int = 1) -> np.ndarray:
    """Interleaved int16 PCM (bytes or a buffer, e.g. a host's audio frame) -> mono samples a session takes: the
    int16 samples themselves for one channel, the mean of the channels as float32 in [-1, 1] for more."""
    pcm = np.frombuffer(data, dtype=np.int16)
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0
    return pcm


def float_to_int16(audio) -> np.ndarray:
    """Float PCM in [-1, 1] (a frame's ``audio``) -> int16 samples, rounded, clipped to the int16 range."""
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


def check_amplitude(x, name: str = "pcm") -> None:
    """ValueError naming ``name`` when a float sample of ``x`` (tensor or array) exceeds
    :data:`MAX_FLOAT_AMPLITUDE` in magnitude (float32 in [-1, 1] is the expected range)."""
    if not len(x):
        return
    mag = x.abs() if isinstance(x, torch.Tensor) else np.abs(x)
    peak = float(mag.max())
    if peak > MAX_FLOAT_AMPLITUDE:
        count = int((mag > MAX_FLOAT_AMPLITUDE).sum())
        raise ValueError(f"{name} has {count} sample(s) beyond +-{MAX_FLOAT_AMPLITUDE:g} (largest magnitude "
                         f"{peak:.3g}); float PCM must be in [-1, 1] (int16 samples as floats: divide by 32768)")
