"""Audio input handling and feature front ends.

- ``to_mono_float(pcm, sample_rate)``: validate int16 / float PCM (numpy or torch, mono) -> float32 tensor.
- ``resample(x, orig_sr, new_sr=16000)`` and the streaming ``Resampler``: polyphase windowed-sinc resampling.
- ``AudioFeatures`` (protocol): ``feature_dim``, ``frames(pcm)`` -> (N_frames, feature_dim), ``stream()``.
  Implementations: ``MelFeatures`` (built-in log-mel, exact streaming) and ``Wav2VecFeatures`` (the paper's
  wav2vec2-base-960h recipe, 10752 dims per frame; bounded-context streaming; needs ``transformers``).

16 kHz mono; one 25 fps video frame = ``SAMPLES_PER_FRAME`` = 640 samples.
"""
from __future__ import annotations

from lipforcing._lazy import lazy_attributes
from lipforcing.audio.features import AudioFeatures, FeatureStream, num_frames
from lipforcing.audio.mel import MelFeatures
from lipforcing.audio.pcm import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, to_mono_float
from lipforcing.audio.resample import Resampler, resample

_LAZY = {"Wav2VecFeatures": "lipforcing.audio.wav2vec"}

__all__ = ["AudioFeatures", "FeatureStream", "MelFeatures", "Wav2VecFeatures", "Resampler", "resample",
           "to_mono_float", "num_frames", "SAMPLE_RATE", "FPS", "SAMPLES_PER_FRAME"]


__getattr__ = lazy_attributes(globals(), _LAZY)
