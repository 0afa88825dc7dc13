"""wav2vec 2.0 audio features as the Lip Forcing / OmniAvatar models consume them.

Recipe (whole clip, as the reference code does it):
  1. zero-mean / unit-variance normalisation of the waveform over the clip (the ``Wav2Vec2FeatureExtractor``
     step of wav2vec2-base-960h, ``do_normalize=True``: (x - mean) / sqrt(var + 1e-7));
  2. zero-pad to N = ceil(len / 640) video frames (N * 640 samples);
  3. the convolutional feature encoder (50 Hz, 2N - 1 frames) is **linearly interpolated to N frames**
     (``align_corners=True``) *before* the feature projection and the transformer encoder;
  4. the feature is ``last_hidden_state`` concatenated with all ``hidden_states`` (the encoder input after the
     positional convolution + LayerNorm, then the output of every layer): (num_hidden_layers + 2) * hidden_size
     values per video frame, 14 * 768 = 10752 for wav2vec2-base.

Streaming.  wav2vec 2.0 attends over the whole utterance (and its positional convolution spans 128 CNN frames,
about 2.6 s), so no incremental computation can equal the whole-utterance encoding.  The stream here computes a
bounded-context approximation: the frames of each block are taken from the recipe above applied to a window of
``window_frames`` video frames that ends ``lookahead_frames`` frames after the block (the window is shorter at
the start of a stream).  Windows are fixed by the frame grid, so the output does not depend on how the audio is
split into pushes, and each frame costs one bounded encoder pass (blocks ready together are batched), so the
cost per chunk is constant however long the stream.  Frames near the end of their window see less future than
in the whole-utterance encoding; a larger ``lookahead_frames`` moves the approximation closer at the price of
latency.

The model is loaded from a LOCAL directory (``Wav2Vec2Model.from_pretrained(local_dir)``; nothing is
downloaded): the folder of ``facebook/wav2vec2-base-960h`` (config.json + weights; a CTC checkpoint loads, its
head is dropped).  ``transformers`` is needed (the ``audio`` extra).
"""
from __future__ import annotations

import json
import os
import threading

import torch
import torch.nn.functional as F

from lipforcing.audio.features import BufferedFeatureStream, as_pcm16k, num_frames
from lipforcing.audio.pcm import SAMPLE_RATE, SAMPLES_PER_FRAME

_NORM_EPS = 1e-7
_MAX_BATCH = 32     # windows per encoder call when a large push completes many blocks at once


def _check_int(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


class Wav2VecFeatures:
    """wav2vec 2.0 front end (see the module docstring).

    Args:
        local_dir: folder with ``config.json`` and the weights (``Wav2Vec2Model.from_pretrained`` format).
        device, dtype: where the encoder runs and the dtype of the returned features (normalisation is float32).
        normalize: waveform normalisation; ``None`` reads ``do_normalize`` from ``preprocessor_config.json`` in
            ``local_dir`` (True when the file is absent, as for wav2vec2-base-960h).
        window_frames, lookahead_frames, block_frames: defaults for :meth:`stream` (3 s window, 80 ms lookahead,
            one frame per block).
    Attributes:
        feature_dim: (num_hidden_layers + 2) * hidden_size.
        lookahead_samples: 640 * lookahead_frames (for block_frames = 1).
    """

    sample_rate = SAMPLE_RATE
    samples_per_frame = SAMPLES_PER_FRAME

    def __init__(self, local_dir, device=None, dtype: torch.dtype = torch.float32, *, normalize: bool | None = None,
                 window_frames: int = 75, lookahead_frames: int = 2, block_frames: int = 1):
        local_dir = os.fspath(local_dir)
        if not os.path.isdir(local_dir):
            raise ValueError(f"local_dir must be an existing directory holding a wav2vec 2.0 model (config.json + "
                             f"weights), got {local_dir!r}")
        try:
            from transformers import Wav2Vec2Model
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("Wav2VecFeatures needs `transformers` (pip install 'lipforcing[audio]')") from e
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        model = Wav2Vec2Model.from_pretrained(local_dir)
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        cfg = self.model.config
        self.feature_dim = (cfg.num_hidden_layers + 2) * cfg.hidden_size
        if normalize is None:
            normalize = True
            pre = os.path.join(local_dir, "preprocessor_config.json")
            if os.path.isfile(pre):
                with open(pre) as fh:
                    normalize = bool(json.load(fh).get("do_normalize", True))
        self.normalize = bool(normalize)
        self._defaults = self._check_stream_args(window_frames, lookahead_frames, block_frames)
        self.lookahead_samples = lookahead_frames * SAMPLES_PER_FRAME
        self._lock = threading.Lock()

    @staticmethod
    def _check_stream_args(window_frames, lookahead_frames, block_frames):
        _check_int("window_frames", window_frames, 1)
        _check_int("lookahead_frames", lookahead_frames, 0)
        _check_int("block_frames", block_frames, 1)
        if window_frames < block_frames + lookahead_frames:
            raise ValueError(f"window_frames ({window_frames}) must be >= block_frames + lookahead_frames "
                             f"({block_frames} + {lookahead_frames})")
        return window_frames, lookahead_frames, block_frames

    # -- whole clip -------------------------------------------------------------------------------------------------
    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) float32 -> normalised per row over its L samples."""
        if not self.normalize:
            return x
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        return (x - mean) / torch.sqrt(var + _NORM_EPS)

    @torch.no_grad()
    def _encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """x: (B, L) float32 raw samples with L <= 640 n (normalised here, then zero-padded) -> (B, n, D)."""
        x = self._normalize(x.to(self.device, torch.float32))
        x = F.pad(x, (0, n * SAMPLES_PER_FRAME - x.shape[1])).to(self.dtype)

        def to_video_rate(module, inputs, out):   # (B, C, 2n - 1) CNN features -> (B, C, n), before the encoder
            return F.interpolate(out, size=n, mode="linear", align_corners=True)

        with self._lock:
            handle = self.model.feature_extractor.register_forward_hook(to_video_rate)
            try:
                out = self.model(x, output_hidden_states=True, return_dict=True)
            finally:
                handle.remove()
        return torch.cat([out.last_hidden_state, *out.hidden_states], dim=-1)

    def frames(self, pcm) -> torch.Tensor:
        """Whole clip -> (ceil(len / 640), feature_dim) in ``dtype`` on ``device``.  ``pcm``: 16 kHz mono."""
        x = as_pcm16k(pcm)
        n = num_frames(x.numel())
        if n == 0:
            return torch.zeros(0, self.feature_dim, device=self.device, dtype=self.dtype)
        return self._encode(x[None], n)[0]

    def stream(self, *, window_frames: int | None = None, lookahead_frames: int | None = None,
               block_frames: int | None = None) -> "Wav2VecStream":
        """A bounded-context stream; arguments default to the constructor's."""
        w, la, b = self._defaults
        args = self._check_stream_args(w if window_frames is None else window_frames,
                                       la if lookahead_frames is None else lookahead_frames,
                                       b if block_frames is None else block_frames)
        return Wav2VecStream(self, *args)


class Wav2VecStream(BufferedFeatureStream):
    """Incremental :class:`Wav2VecFeatures` over a bounded window.

    Blocks of ``block_frames`` frames start at frame 0 (and again at the frame after each ``flush``).  The block
    [u, u + B) is emitted once 640 (u + B + lookahead_frames) samples have arrived; its features are rows
    u - s .. u + B - 1 - s of ``fe.frames(audio[640 s : 640 e])`` with e = u + B + lookahead_frames and
    s = max(0, e - window_frames).  At ``flush`` the window keeps its start s but ends with the audio (its last
    partial frame zero-padded): ``fe.frames(audio[640 s :])``.
    """

    def __init__(self, fe: Wav2VecFeatures, window_frames: int, lookahead_frames: int, block_frames: int):
        super().__init__()
        self.fe = fe
        self.window_frames, self.lookahead_frames, self.block_frames = window_frames, lookahead_frames, block_frames

    def _window(self, u: int, limit: int | None = None):
        e = u + self.block_frames + self.lookahead_frames
        s = max(0, e - self.window_frames)
        return s, (e if limit is None else min(e, limit))

    def _run(self, units) -> torch.Tensor:
        """units: list of (u, n, s, e, last_sample) -> features of frames u .. u + n - 1 for each, concatenated."""
        P = SAMPLES_PER_FRAME
        outs = []
        i = 0
        while i < len(units):
            # batch consecutive full-length windows (same sample count, same frame count)
            j = i + 1
            u, n, s, e, last = units[i]
            if last == e * P:
                while (j < len(units) and j - i < _MAX_BATCH and units[j][4] == units[j][3] * P
                       and units[j][3] - units[j][2] == e - s):
                    j += 1
            xs = torch.stack([self._buf.read(uu[2] * P, uu[4]) for uu in units[i:j]])
            feats = self.fe._encode(xs, e - s)
            for k, (uu, nn, ss, ee, _) in enumerate(units[i:j]):
                outs.append(feats[k, uu - ss:uu - ss + nn])
            i = j
        if not outs:
            return torch.zeros(0, self.fe.feature_dim, device=self.fe.device, dtype=self.fe.dtype)
        return torch.cat(outs)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        s_next, _ = self._window(self.frames_emitted)
        self._buf.drop_before(s_next * SAMPLES_PER_FRAME)
        return out

    def push(self, pcm) -> torch.Tensor:
        self._buf.append(as_pcm16k(pcm))
        P, B = SAMPLES_PER_FRAME, self.block_frames
        units = []
        u = self.frames_emitted
        while True:
            s, e = self._window(u)
            if e * P > self._buf.end:
                break
            units.append((u, B, s, e, e * P))
            u += B
        out = self._run(units)
        self.frames_emitted = u
        return self._finish(out)

    def flush(self) -> torch.Tensor:
        n_total = num_frames(self._buf.end)
        last = self._buf.end
        units = []
        u = self.frames_emitted
        while u < n_total:
            s, e = self._window(u, limit=n_total)
            units.append((u, min(self.block_frames, n_total - u), s, e, last))
            u += self.block_frames
        out = self._run(units)
        self._buf.pad_to(n_total * SAMPLES_PER_FRAME)
        self.frames_emitted = n_total
        return self._finish(out)
