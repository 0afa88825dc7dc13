"""Engine and Session: the push-audio / pull-frames API that lip-sync hosts (LiveKit, Pipecat, WebRTC) drive.

::

    engine = lipforcing.Engine.load("student.safetensors", model="1.3b", device="cuda", vae="Wan2.1_VAE.pth",
                                    audio_encoder="wav2vec2-base-960h/", text="prompt_embedding.pt")
    sess = engine.session(face_frames)          # (N, 512, 512, 3) uint8 aligned face crops, or a video path
    sess.push_audio(pcm)                        # int16 / float32 mono, any length, any number of times
    for frame in sess.frames():                 # non-blocking drain: the frames that are ready now
        show(frame.image, frame.pts); play(frame.audio)
    sess.end_of_speech()                        # flush the last partial chunk
    for frame in sess.frames(): ...             # after end_of_speech: all the remaining frames
    sess.close()

Timeline.  Audio is converted to 16 kHz mono; video is 25 fps, so frame ``i`` covers samples
``[640 i, 640 (i + 1))`` of the speech pushed since the session started (``pts = i / 25`` seconds on that audio
clock).  Exactly one frame comes out per 640 samples pushed (a partial last frame of an utterance counts: its
``audio`` is zero-padded to 640 samples), and the frames depend only on the audio samples, the reference, the
seed and the ``end_of_speech()`` / ``interrupt()`` calls, never on how the audio was split into pushes.

Chunks.  The student generates 3 latent frames per step: 9 video frames for the first chunk of an utterance, 12
afterwards (``Engine.first_chunk_frames``, ``Engine.chunk_frames``).  A chunk is computed once its audio and the
audio front end's lookahead have arrived (``Engine.latency_report()``).  Per chunk (paper, section 5):

  1. ``audio_features``  the front end's streaming features of the chunk's frames -> (1, 3, 4, audio_dim)
  2. ``vae_encode``      the chunk's reference frames (ping-ponged when the reference is shorter than the speech),
                         unmasked and mouth-masked, through one streaming VAE encoder (batch of 2)
  3. ``dit_pass_1``      velocity at t = 0.999 of pure noise eps(seed, 2k) (counter-based, no host sync)
  4. ``denoise_update``  x0 = x - 0.999 v; re-noise to t = 0.769 with eps(seed, 2k + 1)
  5. ``dit_pass_2``      velocity at t = 0.769, then ``denoise_update`` again (t_next = 0) for x0
  6. ``vae_decode``      streaming decode of x0 to frames (uint8, moved to the host)
  7. ``cache_write``     a third pass on the clean x0 at t = 0 writes the chunk's K/V into the rolling cache

Work happens synchronously, in the caller's thread, inside :meth:`Session.frames` (chunks are computed lazily
as the iterator is advanced); ``push_audio`` only validates, resamples and buffers.  One :class:`Engine` serves
many sessions: the weights, VAE, audio front end and text K/V are held once; each session holds its KV caches,
streaming VAE/feature state and at most ``max_buffer_seconds`` of audio (memory is constant over arbitrarily
long streams).  Chunk steps of different sessions are serialised by an engine lock.

Utterances.  ``end_of_speech()`` ends an utterance: its last chunk is computed on audio padded with silence and
only the frames covered by real audio are emitted.  ``interrupt()`` drops the buffered audio and the frames not
yet taken.  Either way the next ``push_audio`` starts a new utterance: the model's KV cache and the streaming
VAE/feature states are reset (in place), frame indices continue from the frames delivered so far, and the
reference video continues from the same position.

Profiling hook.  Every stage above runs inside ``with engine.stage(name):``.  By default ``stage`` returns a
no-op context; a profiler replaces it with any callable returning a context manager, e.g.
``engine.stage = lambda name: my_timer(name)`` (``denoise_update`` is entered twice per chunk).  With
``cuda_graphs=True`` the DiT passes and the updates are replayed CUDA graphs (one per stage, same names).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import numpy as np
import torch

from lipforcing import face, schedule
from lipforcing.audio.features import num_frames
from lipforcing.audio.pcm import (FPS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SAMPLE_RATE, SAMPLES_PER_FRAME,
                                  check_sample_rate, to_mono_float)
from lipforcing.config import VIDEO_FRAMES_PER_LATENT, ModelConfig

logger = logging.getLogger("lipforcing.stream")

__all__ = ["Engine", "Session", "Frame", "STAGES"]

STAGES = ("audio_features", "vae_encode", "dit_pass_1", "denoise_update", "dit_pass_2", "vae_decode",
          "cache_write")
"""Names passed to ``engine.stage(name)``, in the order a chunk runs them (``denoise_update`` twice)."""

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
_REAL_RESOLUTION = 512
_TINY_RESOLUTION = 32
_DEFAULT_TEXT_LEN = 512   # Wan pads the UMT5 prompt embedding to 512 tokens


@dataclass(frozen=True)
class Frame:
    """One output video frame.

    index : frame number in the session (0, 1, 2, ... over the frames delivered; never skipped).
    pts : presentation time in seconds on the audio clock, ``index / 25``.
    image : (H, W, 3) uint8 RGB numpy array (the generated face crop).
    audio : (640,) float32 numpy array: the 16 kHz samples this frame covers (zero-padded after the end of an
        utterance), so a host can keep audio and video paired.
    chunk_id : the model step that produced it (counts chunks over the whole session).
    """

    index: int
    pts: float
    image: np.ndarray
    audio: np.ndarray
    chunk_id: int


# ------------------------------------------------------------------------------------------------------ helpers
def _as_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        key = dtype.lower().replace("torch.", "")
        if key not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
        return _DTYPES[key]
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    raise TypeError(f"dtype must be None, a string like 'bf16' or a floating torch.dtype, got {dtype!r}")


def _as_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a device name like 'cpu', 'cuda' or 'cuda:1' (or a torch.device), got "
                         f"{device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                         "use device='cpu'")
    return dev


def _resolution(resolution, default: int) -> tuple[int, int]:
    if resolution is None:
        resolution = default
    if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool):
        resolution = (int(resolution), int(resolution))
    if (not isinstance(resolution, (tuple, list)) or len(resolution) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in resolution)):
        raise TypeError(f"resolution must be an int or a (height, width) pair of ints, got {resolution!r}")
    h, w = int(resolution[0]), int(resolution[1])
    if h < 16 or w < 16 or h % 16 or w % 16:
        raise ValueError(f"resolution must be positive multiples of 16 (8x VAE downsampling times the 2x2 patch), "
                         f"got {h}x{w}")
    return h, w


def _seeded(seed: int, device: torch.device):
    """Context: the global RNGs seeded with ``seed``, restored afterwards."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=devices))
    torch.manual_seed(seed)
    return stack


def _check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__} {seed!r}")
    if not -(1 << 63) <= int(seed) < (1 << 64):
        raise ValueError(f"{name} must fit in 64 bits, got {seed}")
    return int(seed)


def _load_text(text, text_dim: int) -> torch.Tensor:
    """A prompt embedding from a tensor or a file (.safetensors: the single tensor in it; .pt/.pth: a tensor)."""
    if isinstance(text, (str, os.PathLike)):
        path = os.fspath(text)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path)
            if len(tensors) != 1:
                raise ValueError(f"{path} holds {len(tensors)} tensors ({sorted(tensors)[:5]}); expected exactly one "
                                 "prompt embedding")
            text = next(iter(tensors.values()))
        else:
            text = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(text, dict) and len(text) == 1:
                text = next(iter(text.values()))
    if not isinstance(text, torch.Tensor):
        raise TypeError(f"text must be a tensor (L, text_dim) / (1, L, text_dim) or a path to one, got "
                        f"{type(text).__name__}")
    if text.dim() == 2:
        text = text[None]
    if text.dim() != 3 or text.shape[0] != 1 or text.shape[-1] != text_dim or not text.is_floating_point():
        raise ValueError(f"text must be a float (1, L, text_dim={text_dim}) prompt embedding, got {text.dtype} "
                         f"{tuple(text.shape)}")
    return text


class _PcmBuffer:
    """16 kHz float32 samples of one utterance, addressed from its first sample; holds [start, end)."""

    def __init__(self):
        self._parts: list[torch.Tensor] = []
        self.start = 0
        self.end = 0

    def append(self, x: torch.Tensor) -> None:
        if x.numel():
            self._parts.append(x)
            self.end += x.numel()

    def _data(self) -> torch.Tensor:
        if len(self._parts) != 1:
            self._parts = [torch.cat(self._parts) if self._parts else torch.zeros(0)]
        return self._parts[0]

    def read(self, a: int, b: int) -> torch.Tensor:
        """Samples [a, b); zeros past ``end``.  ``a`` must not precede ``start`` (dropped history)."""
        assert a >= self.start, (a, self.start)
        data = self._data()
        out = data[a - self.start: min(b, self.end) - self.start]
        if b > self.end:
            out = torch.cat([out, out.new_zeros(b - max(a, self.end))])
        return out

    def drop_before(self, a: int) -> None:
        a = min(a, self.end)
        if a > self.start:
            self._parts = [self._data()[a - self.start:].clone()]
            self.start = a

    @property
    def held(self) -> int:
        return self.end - self.start


class _Utterance:
    """Audio of one utterance and how far its chunks got.  Frame f (local) is session frame ``first_index + f``."""

    def __init__(self, first_index: int):
        self.first_index = first_index
        self.pcm = _PcmBuffer()
        self.closed = False
        self.num_frames: int | None = None    # frames to emit, known once closed
        self.num_chunks: int | None = None
        self.chunks_done = 0


def _chunk_span(c: int, first: int, per: int) -> tuple[int, int]:
    """Local video frames [lo, hi) of chunk ``c`` of an utterance (first chunk ``first`` frames, then ``per``)."""
    if c == 0:
        return 0, first
    return first + (c - 1) * per, first + c * per


def _chunks_for(n_frames: int, first: int, per: int) -> int:
    if n_frames <= 0:
        return 0
    return 1 + max(0, -(-(n_frames - first) // per))


# ------------------------------------------------------------------------------------------------------ engine
class Engine:
    """One per device: the causal student, the VAE, the audio front end and the text conditioning, shared by every
    :class:`Session` it opens.  Build it with :meth:`Engine.load`.

    Attributes
    ----------
    model : the causal student (``CausalLipSyncDiT``, eval mode, no grad).  config : its ModelConfig.
    vae : the ``WanVAE`` (streaming encoder/decoder per session).  audio : the audio front end
        (``lipforcing.audio.AudioFeatures``: ``feature_dim``, ``lookahead_samples``, ``stream()``).
    device, dtype : where the model runs and its parameter dtype.  resolution : (H, W) of the face crops.
    chunk_frames : video frames per chunk after the first (12); first_chunk_frames : 9; latent_chunk_frames : 3.
    fps (25), sample_rate (16000), samples_per_frame (640).
    cuda_graphs : whether the DiT passes run as captured CUDA graphs.
    stage : ``stage(name) -> context manager`` around every stage of a chunk (see the module docstring); replace
        it to profile (``engine.stage = factory``), the engine itself holds no timing code.
    """

    fps = FPS
    sample_rate = SAMPLE_RATE
    samples_per_frame = SAMPLES_PER_FRAME

    def __init__(self, model, vae, audio, context: torch.Tensor, *, resolution, mask=None,
                 cuda_graphs: bool = False, vae_frames_per_step: int | None = None,
                 vae_latents_per_step: int | None = None, backend: str = "auto"):
        from lipforcing.model.student import CausalLipSyncDiT
        from lipforcing.ops import _dispatch

        if not isinstance(model, CausalLipSyncDiT):
            raise TypeError(f"model must be the causal student (build_model(..., causal=True)), got "
                            f"{type(model).__name__}")
        self.model = model.eval().requires_grad_(False)
        _dispatch.requested_backend(backend)      # validates the name
        self.backend = backend
        self.model.attn_backend = backend
        self.config: ModelConfig = model.config
        self.device = model.device
        self.dtype = model.dtype
        c = self.config
        if c.out_dim != 16 or c.in_dim != 16 + 49:
            raise ValueError(f"the engine builds 16 noisy + 49 conditioning channels; the model has in_dim={c.in_dim}, "
                             f"out_dim={c.out_dim}")
        if c.window_frames is None:
            raise ValueError("streaming needs a finite attention window (config.window_frames is None)")
        self.vae = vae.eval().requires_grad_(False)
        if vae.z_dim != c.out_dim or vae.temporal_factor != VIDEO_FRAMES_PER_LATENT:
            raise ValueError(f"the VAE must have z_dim={c.out_dim} and a temporal factor of "
                             f"{VIDEO_FRAMES_PER_LATENT}; got z_dim={vae.z_dim}, temporal factor {vae.temporal_factor}")
        if vae.device != self.device:
            raise ValueError(f"the VAE is on {vae.device} but the model is on {self.device}")
        # video always comes from uint8 frames (range guaranteed): skip the range check, which syncs with the GPU
        self.vae.check_inputs = False
        self.audio = audio
        for attr in ("feature_dim", "lookahead_samples", "stream"):
            if not hasattr(audio, attr):
                raise TypeError(f"audio front end must follow lipforcing.audio.AudioFeatures (missing {attr!r}); got "
                                f"{type(audio).__name__}")
        if audio.feature_dim != c.audio_dim:
            raise ValueError(f"the audio front end gives {audio.feature_dim}-dim features but the model expects "
                             f"audio_dim={c.audio_dim}")
        self.resolution = _resolution(resolution, _REAL_RESOLUTION)
        s = vae.spatial_factor * c.patch_size[1]
        if self.resolution[0] % s or self.resolution[1] % s:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {s} (VAE factor x patch)")
        self.latent_size = (self.resolution[0] // vae.spatial_factor, self.resolution[1] // vae.spatial_factor)

        self.latent_chunk_frames = c.chunk_frames
        self.chunk_frames = c.chunk_frames * VIDEO_FRAMES_PER_LATENT                  # 12
        self.first_chunk_frames = 1 + (c.chunk_frames - 1) * VIDEO_FRAMES_PER_LATENT  # 9
        self.vae_frames_per_step = self.chunk_frames if vae_frames_per_step is None else vae_frames_per_step
        self.vae_latents_per_step = c.chunk_frames if vae_latents_per_step is None else vae_latents_per_step

        # the mouth mask: pixel keep-mask (1, 1, 1, H, W) and the latent channel (1, 1, F, h, w), 1 = generate
        gen = face.mouth_mask(*self.resolution) if mask is None else self._check_mask(mask)
        self.mouth_mask = gen
        self._keep = face.keep_mask(gen).to(self.device, vae.dtype)[None, None, None]
        lat = face.latent_mask(gen, self.latent_size).to(self.device, self.dtype)
        self._latent_mask = lat[None, None, None].expand(1, 1, c.chunk_frames, *self.latent_size).contiguous()

        self.context = context.to(self.device)
        with torch.no_grad():
            self._template = model.init_stream(self.context, batch=1)    # text K/V computed once, shared
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graphs=True needs a CUDA device, the engine is on {self.device}")
            if c.rope_mode != "dynamic":
                raise ValueError("cuda_graphs=True needs rope_mode='dynamic' (absolute RoPE positions are host-side "
                                 "state that a replayed graph cannot advance)")
        self.cuda_graphs = bool(cuda_graphs)
        self._lock = threading.RLock()
        self.timesteps = tuple(float(t) for t in schedule.STUDENT_TIMESTEPS)

    # -------------------------------------------------------------------------------------------- construction
    @classmethod
    def load(cls, checkpoint=None, *, model="tiny", device="cpu", dtype=None, seed: int = 0, vae=None,
             audio_encoder=None, text=None, resolution=None, mask=None, cuda_graphs: bool = False,
             vae_frames_per_step: int | None = None, vae_latents_per_step: int | None = None,
             backend: str = "auto") -> "Engine":
        """Load (or randomly initialise) everything a stream needs.

        checkpoint : student weights (file, folder or list; see ``lipforcing.load_model``), or None for random
            weights of the preset ``model`` drawn with ``seed`` (said so in one log line).
        model : preset name (``"tiny"``, ``"1.3b"``, ``"14b"``) or a ModelConfig.  With a checkpoint the default
            ``"tiny"`` means "infer the config from the checkpoint".
        device, dtype : e.g. ``"cuda"``, ``"bf16"`` (default: bf16 on CUDA, fp32 on CPU).
        vae : a ``WanVAE``, a ``VAEConfig``, a preset name (``"tiny"``, ``"wan2.1"``) or a checkpoint path.
            Default: the tiny VAE for the tiny model, else a randomly initialised Wan2.1 VAE (logged).
        audio_encoder : an ``AudioFeatures`` object or a local wav2vec2 folder.  Default: the built-in log-mel
            front end (``audio_dim // 2`` mel bands) when the model's ``audio_dim`` is small (the tiny preset),
            else a randomly initialised wav2vec2-base (needs ``transformers``; logged).
        text : prompt embedding (1, L, text_dim) tensor or file; default: random (seeded) for random weights,
            zeros (1, 512, text_dim) with a warning for a checkpoint.
        resolution : face-crop size, int or (H, W), multiple of 16 (default 512; 32 for the tiny preset).
        mask : custom (H, W) mouth mask (bool or float, 1 = generate); default :func:`lipforcing.face.mouth_mask`.
        cuda_graphs : capture the DiT passes and updates of the chunk step as CUDA graphs (per session, at its
            first chunk) and replay them (CUDA only, ``rope_mode="dynamic"``).
        vae_frames_per_step / vae_latents_per_step : VAE streaming step sizes (default: a whole chunk per call).
        backend : ``backend=`` of every ``lipforcing.ops`` call the engine makes (attention, denoise_update):
            ``"auto" | "cuda" | "triton" | "reference"``; sets ``model.attn_backend`` (the model is the engine's).
        """
        from lipforcing.model import build_model, load_model

        device = _as_device(device)
        dtype = _as_dtype(dtype, device)
        seed = _check_seed(seed)
        notes = []
        if checkpoint is None:
            cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_name(model)
            with _seeded(seed, device):
                net = build_model(cfg, causal=True, device=device, dtype=dtype)
            name = model if isinstance(model, str) else "custom"
            notes.append(f"random weights of the {name!r} model (seed {seed})")
        else:
            cfg = None if (isinstance(model, str) and model == "tiny") else model
            net = load_model(checkpoint, config=cfg, causal=True, device=device, dtype=dtype)
            cfg = net.config
        tiny = cfg.audio_dim <= 256
        vae_obj, note = _make_vae(vae, tiny=tiny, device=device, dtype=dtype, seed=seed)
        if note:
            notes.append(note)
        audio_obj, note = _make_audio(audio_encoder, cfg, device=device, seed=seed)
        if note:
            notes.append(note)
        if text is None:
            if checkpoint is None:
                g = torch.Generator().manual_seed(seed + 1)
                length = 16 if tiny else _DEFAULT_TEXT_LEN
                ctx = torch.randn(1, length, cfg.text_dim, generator=g)
                notes.append("a random prompt embedding")
            else:
                ctx = torch.zeros(1, _DEFAULT_TEXT_LEN, cfg.text_dim)
                logger.warning("no prompt embedding given (text=...): using zeros; the paper's students expect the "
                               "UMT5 embedding of 'a person talking'")
        else:
            ctx = _load_text(text, cfg.text_dim)
        if notes:
            logger.warning("lipforcing.Engine: using %s", ", ".join(notes))
        res = resolution if resolution is not None else (_TINY_RESOLUTION if tiny else _REAL_RESOLUTION)
        return cls(net, vae_obj, audio_obj, ctx.to(dtype), resolution=res, mask=mask, cuda_graphs=cuda_graphs,
                   vae_frames_per_step=vae_frames_per_step, vae_latents_per_step=vae_latents_per_step,
                   backend=backend)

    def _check_mask(self, mask) -> torch.Tensor:
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != self.resolution:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a {self.resolution} (height, width) array (1 = generate), got {got}")
        return mask.cpu() if mask.dtype == torch.bool else mask.cpu().float() > 0.5

    # -------------------------------------------------------------------------------------------------- facts
    def stage(self, name: str) -> ContextManager:
        """Context around one stage of a chunk step (no-op; replace with ``engine.stage = factory`` to profile)."""
        return contextlib.nullcontext()

    @property
    def lookahead_samples(self) -> int:
        """Audio past a chunk's last frame that the front end needs before the chunk can be computed."""
        return int(self.audio.lookahead_samples)

    def latency_report(self) -> dict:
        """Algorithmic latency (audio that must be buffered; compute time excluded), in samples and seconds."""
        la = self.lookahead_samples
        first = self.first_chunk_frames * SAMPLES_PER_FRAME + la
        later = self.chunk_frames * SAMPLES_PER_FRAME + la
        return {
            "first_chunk_frames": self.first_chunk_frames,
            "chunk_frames": self.chunk_frames,
            "lookahead_samples": la,
            "lookahead_ms": 1000.0 * la / SAMPLE_RATE,
            "first_chunk_audio_samples": first,
            "first_chunk_audio_ms": 1000.0 * first / SAMPLE_RATE,
            # the first frame of a later chunk waits for the whole chunk plus the lookahead
            "steady_state_audio_ms": 1000.0 * later / SAMPLE_RATE,
            "dit_passes_per_chunk": 3,
        }

    # -------------------------------------------------------------------------------------------------- sessions
    def session(self, reference, *, sample_rate: int = SAMPLE_RATE, seed: int = 0,
                max_buffer_seconds: float = 60.0) -> "Session":
        """Open a stream.  ``reference``: aligned face crops (N, H, W, 3) uint8 (numpy or torch; one (H, W, 3)
        frame is a still image) at the engine's resolution, or a path to a video of them (PyAV).
        ``sample_rate``: rate of the pushed audio (int; resampled to 16 kHz).  ``seed``: noise seed.
        ``max_buffer_seconds``: most audio a session buffers before ``push_audio`` refuses more (BufferError)."""
        return Session(self, reference, sample_rate=sample_rate, seed=seed, max_buffer_seconds=max_buffer_seconds)

    def _reference_frames(self, reference) -> torch.Tensor:
        if isinstance(reference, (str, os.PathLike)):
            from lipforcing.media import read_video

            reference = read_video(reference)[0]
        if isinstance(reference, np.ndarray):
            if reference.dtype != np.uint8:
                raise TypeError(f"reference frames must be uint8 RGB (N, H, W, 3), got numpy {reference.dtype}; "
                                "convert float frames in [0, 1] with (x * 255).round().astype(np.uint8)")
            reference = torch.from_numpy(np.ascontiguousarray(reference))
        elif isinstance(reference, torch.Tensor):
            if reference.dtype != torch.uint8:
                raise TypeError(f"reference frames must be uint8 RGB (N, H, W, 3), got torch "
                                f"{str(reference.dtype).replace('torch.', '')}")
            reference = reference.detach().cpu()
        else:
            raise TypeError(f"reference must be (N, H, W, 3) uint8 frames (numpy or torch) or a video path, got "
                            f"{type(reference).__name__}")
        if reference.dim() == 3:
            reference = reference[None]
        H, W = self.resolution
        if reference.dim() != 4 or reference.shape[-1] != 3:
            raise ValueError(f"reference frames must have shape (N, H, W, 3) (RGB, channels last), got "
                             f"{tuple(reference.shape)}")
        if reference.shape[0] == 0:
            raise ValueError("reference has no frames")
        if tuple(reference.shape[1:3]) != (H, W):
            raise ValueError(f"reference frames must be {H}x{W} aligned face crops (this engine's resolution), got "
                             f"{reference.shape[1]}x{reference.shape[2]}; resize/crop them, or load the engine with "
                             f"resolution=... to match")
        reference = reference.contiguous()
        if self.device.type == "cuda":
            reference = reference.pin_memory()
        return reference


def _make_vae(vae, *, tiny: bool, device, dtype, seed: int):
    from lipforcing.vae import VAEConfig, WanVAE, load_vae

    if isinstance(vae, WanVAE):
        return vae.to(device=device, dtype=dtype), None
    if isinstance(vae, (str, os.PathLike)) and os.path.exists(os.fspath(vae)):
        return load_vae(vae, device=device, dtype=dtype), None
    if vae is None:
        vae = "tiny" if tiny else "wan2.1"
    if isinstance(vae, (str, VAEConfig)):
        cfg = VAEConfig.from_name(vae) if isinstance(vae, str) else vae
        with _seeded(seed + 2, device), torch.device(device):
            net = WanVAE(cfg)       # PyTorch's default initialisation, drawn from the seeded RNG
        net = net.to(dtype=dtype)
        name = vae if isinstance(vae, str) else "custom"
        return net, f"a randomly initialised {name!r} VAE"
    raise TypeError(f"vae must be a WanVAE, a VAEConfig, a preset name or an existing checkpoint path, got {vae!r}")


def _make_audio(audio_encoder, cfg: ModelConfig, *, device, seed: int):
    from lipforcing.audio import MelFeatures

    if audio_encoder is None:
        if cfg.audio_dim <= 256:
            if cfg.audio_dim % 2:
                raise ValueError(f"the built-in mel front end gives 2 * n_mels features; audio_dim={cfg.audio_dim} "
                                 "is odd: pass audio_encoder=...")
            return MelFeatures(n_mels=cfg.audio_dim // 2, device=device), None
        return _random_wav2vec(device, seed), "a randomly initialised wav2vec2-base audio encoder"
    if isinstance(audio_encoder, (str, os.PathLike)):
        from lipforcing.audio import Wav2VecFeatures

        return Wav2VecFeatures(audio_encoder, device=device), None
    return audio_encoder, None


def _random_wav2vec(device, seed: int):
    """wav2vec2-base with random weights, for profiling without the real checkpoint (the front end's loader only
    reads local folders, so the random model is written to a temporary folder and loaded from there)."""
    import tempfile

    try:
        from transformers import Wav2Vec2Config, Wav2Vec2Model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("no audio_encoder given and the model needs wav2vec2 features: pass "
                          "audio_encoder='path/to/wav2vec2-base-960h' (needs transformers)") from e
    from lipforcing.audio import Wav2VecFeatures

    with tempfile.TemporaryDirectory() as tmp:
        with _seeded(seed + 3, torch.device("cpu")):
            Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(tmp)
        return Wav2VecFeatures(tmp, device=device)


# ------------------------------------------------------------------------------------------------------ runner
class _Runner:
    """Per-session model state: KV caches, streaming VAE encoder/decoder, the audio feature stream and, with
    CUDA graphs, the captured chunk step.  ``reset()`` starts a new utterance in place."""

    def __init__(self, engine: Engine, seed: int):
        self.e = engine
        self.seed = seed
        self.state = dataclasses.replace(engine._template, text_kv=list(engine._template.text_kv), caches=[],
                                         grid=None, frame=0, rope=None)
        self.enc = engine.vae.stream_encoder(frames_per_step=engine.vae_frames_per_step)
        self.dec = engine.vae.stream_decoder(latents_per_step=engine.vae_latents_per_step)
        self.feat = engine.audio.stream()
        self.feat_rows: list[torch.Tensor] = []    # emitted feature rows not yet used ...
        self.feat_start = 0                         # ... starting at this local frame
        self.fed = 0                                # samples of the utterance pushed to the feature stream
        self.ref_latent: torch.Tensor | None = None
        self.graphs: _ChunkGraphs | None = None

    def reset(self) -> None:
        self.state.reset()
        self.enc.reset()
        self.dec.reset()
        self.feat.reset()
        self.feat_rows, self.feat_start, self.fed = [], 0, 0
        self.ref_latent = None

    # one chunk ------------------------------------------------------------------------------------------------
    def features(self, utt: _Utterance, lo: int, hi: int, last: bool) -> torch.Tensor:
        """Feature rows of local frames [lo, hi): push the utterance's samples up to the chunk's need (a fixed
        point for each chunk, so the pushes never depend on how the host split the audio)."""
        need = utt.pcm.end if last else min(hi * SAMPLES_PER_FRAME + self.e.lookahead_samples, utt.pcm.end)
        if need > self.fed:
            self.feat_rows.append(self.feat.push(utt.pcm.read(self.fed, need)))
            self.fed = need
        if last:
            self.feat_rows.append(self.feat.flush())
        rows = torch.cat(self.feat_rows) if len(self.feat_rows) != 1 else self.feat_rows[0]
        have = self.feat_start + rows.shape[0]
        if have < hi:
            raise RuntimeError(f"the audio front end emitted features up to frame {have} after {self.fed} samples, "
                               f"but frame {hi - 1} was expected (lookahead_samples={self.e.lookahead_samples} "
                               "understated?)")
        out = rows[lo - self.feat_start: hi - self.feat_start]
        self.feat_rows = [rows[hi - self.feat_start:].clone()]   # a copy, so the consumed rows can be freed
        self.feat_start = hi
        return out

    def conditioning(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 reference frames -> y (1, 49, 3, h, w): [ref latent, mask, masked, unmasked]."""
        e = self.e
        vae = e.vae
        video = frames_u8.to(e.device, non_blocking=True).permute(3, 0, 1, 2)[None].to(vae.dtype)
        video = video / 127.5 - 1.0
        both = torch.cat([video, video * e._keep])           # batch 2: unmasked, mouth-masked
        lat = self.enc.encode(both)                          # (2, 16, 3, h, w), normalised
        if self.ref_latent is None:
            self.ref_latent = lat[:1, :, :1].clone()
        F_ = lat.shape[2]
        y = torch.cat([self.ref_latent.expand(-1, -1, F_, -1, -1).to(e.dtype), e._latent_mask[:, :, :F_],
                       lat[1:2].to(e.dtype), lat[:1].to(e.dtype)], dim=1)
        return y

    def dit(self, y: torch.Tensor, audio: torch.Tensor, chunk_id: int) -> tuple[torch.Tensor, Callable]:
        """The denoising passes; returns x0 (1, 16, 3, h, w) float32 and a callable doing the cache write."""
        e = self.e
        if self.graphs is not None:
            return self.graphs.run(y, audio, chunk_id)
        x0 = _eager_dit(e, self.state, y, audio, self.seed, chunk_id)
        return x0, lambda: _eager_write(e, self.state, x0, y, audio)


def _noise_offsets(chunk_id: int) -> tuple[int, int]:
    return 2 * chunk_id, 2 * chunk_id + 1


def _model_input(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.to(y.dtype), y], dim=1)


def _eager_dit(e: Engine, state, y, audio, seed: int, chunk_id: int) -> torch.Tensor:
    from lipforcing import ops

    t0, t1, t2 = e.timesteps
    off0, off1 = _noise_offsets(chunk_id)
    shape = (1, e.config.out_dim, y.shape[2], *y.shape[3:])
    with e.stage("dit_pass_1"):
        zeros = torch.zeros(shape, device=y.device, dtype=torch.float32)
        _, x = ops.denoise_update(zeros, zeros, 0.0, 1.0, seed=seed, offset=off0, backend=e.backend)  # x = eps
        v = e.model.forward_chunk(_model_input(x, y), schedule.timestep_input(t0), state, audio, write=False)
        v = v.contiguous()  # the velocity is a permuted view: copy it here so the copy counts as part of the pass
    with e.stage("denoise_update"):
        _, x = ops.denoise_update(x, v, t0, t1, seed=seed, offset=off1, backend=e.backend)
    with e.stage("dit_pass_2"):
        v = e.model.forward_chunk(_model_input(x, y), schedule.timestep_input(t1), state, audio,
                                  write=False).contiguous()
    with e.stage("denoise_update"):
        x0, _ = ops.denoise_update(x, v, t1, t2, backend=e.backend)
    return x0


def _eager_write(e: Engine, state, x0, y, audio) -> None:
    e.model.forward_chunk(_model_input(x0, y), schedule.timestep_input(e.timesteps[2]), state, audio, write=True)


class _ChunkGraphs:
    """The chunk step as five CUDA graphs sharing one private memory pool, one per stage (pass 1 with its noise
    draw, update 1, pass 2, update 2, cache write), replayed in capture order.  Static inputs: y, audio and the
    noise seed/offsets (0-d int64 device tensors, so replays draw fresh noise without a host sync).

    Captured after the session's first (eager) chunk, which serves as the warm-up (Triton autotuning, cuBLAS
    handles, cache allocation).  The graphs read the session's KV-cache buffers, which never move
    (``RollingKVCache`` resets in place), so they stay valid across utterances.  UNVERIFIED: written without a GPU.
    """

    def __init__(self, e: Engine, state, y: torch.Tensor, audio: torch.Tensor, seed: int):
        from lipforcing import ops

        self.e = e
        dev = y.device
        self.y = y.clone()
        self.audio = audio.clone()
        self.seed = torch.tensor(seed - (1 << 64) if seed >= (1 << 63) else seed, dtype=torch.int64, device=dev)
        self.off0 = torch.zeros((), dtype=torch.int64, device=dev)
        self.off1 = torch.zeros((), dtype=torch.int64, device=dev)
        t0, t1, t2 = e.timesteps
        shape = (1, e.config.out_dim, y.shape[2], *y.shape[3:])
        zeros = torch.zeros(shape, device=dev, dtype=torch.float32)
        self.x = torch.empty(shape, device=dev, dtype=torch.float32)
        self.x1 = torch.empty_like(self.x)
        self.x0 = torch.empty_like(self.x)
        scratch = torch.empty_like(self.x)
        scratch2 = torch.empty_like(self.x)
        model = e.model
        ts = [schedule.timestep_input(t) for t in (t0, t1, t2)]
        self.pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(dev)
        self.graphs = {}
        keep = {}   # outputs of one graph read by the next: kept alive so the pool does not reuse their memory

        def capture(name, fn):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
                keep[name] = fn()
            self.graphs[name] = g

        capture("dit_pass_1", lambda: (
            ops.denoise_update(zeros, zeros, 0.0, 1.0, seed=self.seed, offset=self.off0, out=(scratch, self.x),
                               backend=e.backend),
            model.forward_chunk(_model_input(self.x, self.y), ts[0], state, self.audio, write=False).contiguous())[1])
        capture("denoise_update_1", lambda: ops.denoise_update(self.x, keep["dit_pass_1"], t0, t1, seed=self.seed,
                                                                offset=self.off1, out=(scratch, self.x1),
                                                                backend=e.backend))
        capture("dit_pass_2", lambda: model.forward_chunk(_model_input(self.x1, self.y), ts[1], state, self.audio,
                                                          write=False).contiguous())
        capture("denoise_update_2", lambda: ops.denoise_update(self.x1, keep["dit_pass_2"], t1, t2,
                                                                out=(self.x0, scratch2), backend=e.backend))
        capture("cache_write", lambda: model.forward_chunk(_model_input(self.x0, self.y), ts[2], state, self.audio,
                                                           write=True))
        self._keep = keep
        self._buffers = (zeros, scratch, scratch2)   # allocated outside the graphs: keep their memory
        torch.cuda.synchronize(dev)

    def run(self, y: torch.Tensor, audio: torch.Tensor, chunk_id: int):
        e = self.e
        self.y.copy_(y)
        self.audio.copy_(audio)
        off0, off1 = _noise_offsets(chunk_id)
        self.off0.fill_(off0)
        self.off1.fill_(off1)
        g = self.graphs
        with e.stage("dit_pass_1"):
            g["dit_pass_1"].replay()
        with e.stage("denoise_update"):
            g["denoise_update_1"].replay()
        with e.stage("dit_pass_2"):
            g["dit_pass_2"].replay()
        with e.stage("denoise_update"):
            g["denoise_update_2"].replay()
        return self.x0, g["cache_write"].replay


# ------------------------------------------------------------------------------------------------------ session
class Session:
    """One stream: push audio, pull lip-synced frames.  Open with :meth:`Engine.session`; see the module docstring
    for the timeline, chunking and utterance rules.  Thread-safe (one lock per session; chunk steps of all the
    engine's sessions are serialised)."""

    def __init__(self, engine: Engine, reference, *, sample_rate: int = SAMPLE_RATE, seed: int = 0,
                 max_buffer_seconds: float = 60.0):
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a lipforcing.Engine, got {type(engine).__name__}")
        self.engine = engine
        self.sample_rate = check_sample_rate(sample_rate)
        if not MIN_SAMPLE_RATE <= self.sample_rate <= MAX_SAMPLE_RATE:
            raise ValueError(f"sample_rate must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz, got "
                             f"{self.sample_rate}")
        self.seed = _check_seed(seed)
        if (isinstance(max_buffer_seconds, bool) or not isinstance(max_buffer_seconds, (int, float))
                or not max_buffer_seconds > 0 or math.isinf(max_buffer_seconds)):
            raise ValueError(f"max_buffer_seconds must be a positive finite number, got {max_buffer_seconds!r}")
        min_buffer = (engine.first_chunk_frames + engine.chunk_frames) * SAMPLES_PER_FRAME + engine.lookahead_samples
        self.max_buffer_samples = max(int(max_buffer_seconds * SAMPLE_RATE), min_buffer)
        self.reference = engine._reference_frames(reference)
        self._lock = threading.RLock()
        self._resampler = None
        if self.sample_rate != SAMPLE_RATE:
            from lipforcing.audio import Resampler

            self._resampler = Resampler(self.sample_rate, SAMPLE_RATE)
        self._raw = _PcmBuffer()                  # input-rate samples not yet resampled
        self._raw_block = max(1, self.sample_rate // 50)
        self._utts: deque[_Utterance] = deque()
        self._ready: deque[Frame] = deque()
        self._delivered = 0                       # frames taken by the host (next index after an interrupt)
        self._chunk_id = 0
        self._runner: _Runner | None = None
        self._runner_utt: _Utterance | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def frames_delivered(self) -> int:
        return self._delivered

    @property
    def buffered_samples(self) -> int:
        """16 kHz samples held (audio not yet turned into frames, plus what the resampler holds back)."""
        return sum(u.pcm.held for u in self._utts) + self._raw.held

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the session is closed (close() was called); open a new one with engine.session(...)")

    def _open_utterance(self) -> _Utterance:
        if self._utts and not self._utts[-1].closed:
            return self._utts[-1]
        if self._utts:
            last = self._utts[-1]
            first = last.first_index + last.num_frames
        else:
            first = self._delivered + len(self._ready)
        utt = _Utterance(first)
        self._utts.append(utt)
        return utt

    # ---------------------------------------------------------------------------------------------------- input
    def push_audio(self, pcm, *, sample_rate: int | None = None) -> None:
        """Append mono speech: 1-D numpy/torch, int16 (scaled by 1/32768) or float32/float64 in [-1, 1], any
        length, at the session's ``sample_rate`` (``sample_rate=`` may restate it; a different rate raises).
        Nothing is computed here.  Bad input raises (TypeError / ValueError) and leaves the session unchanged;
        BufferError when more than ``max_buffer_seconds`` of audio would be waiting (drain ``frames()``)."""
        with self._lock:
            self._check_open()
            if sample_rate is not None and check_sample_rate(sample_rate) != self.sample_rate:
                raise ValueError(f"sample_rate={sample_rate} differs from the session's {self.sample_rate} Hz; "
                                 "open a new session for another rate")
            x = to_mono_float(pcm, self.sample_rate)
            if x.device.type != "cpu":
                x = x.cpu()
            incoming = x.numel() if self._resampler is None else -(-x.numel() * SAMPLE_RATE // self.sample_rate)
            if self.buffered_samples + incoming > self.max_buffer_samples:
                raise BufferError(f"the session holds {self.buffered_samples / SAMPLE_RATE:.2f} s of audio that has "
                                  f"not been turned into frames yet; {incoming / SAMPLE_RATE:.2f} s more would exceed "
                                  f"max_buffer_seconds={self.max_buffer_samples / SAMPLE_RATE:g}: drain frames() first")
            if not x.numel():
                return
            utt = self._open_utterance()
            if self._resampler is None:
                utt.pcm.append(x)
                return
            # feed the resampler in fixed-size blocks so its output does not depend on the push sizes
            self._raw.append(x)
            n = (self._raw.held // self._raw_block) * self._raw_block
            if n:
                block = self._raw.read(self._raw.start, self._raw.start + n)
                self._raw.drop_before(self._raw.start + n)
                utt.pcm.append(self._resampler.push(block.contiguous()))

    def end_of_speech(self) -> None:
        """End the current utterance: its last chunk is computed on audio padded with silence, and only the
        frames covered by real audio (a partial last frame counts) are emitted.  No-op without pending audio."""
        with self._lock:
            self._check_open()
            if not self._utts or self._utts[-1].closed:
                return
            utt = self._utts[-1]
            if self._resampler is not None:
                rest = self._raw.read(self._raw.start, self._raw.end)
                self._raw = _PcmBuffer()
                tail = self._resampler.push(rest.contiguous()) if rest.numel() else rest
                utt.pcm.append(tail)
                utt.pcm.append(self._resampler.flush())
                self._resampler.reset()
            e = self.engine
            utt.closed = True
            utt.num_frames = num_frames(utt.pcm.end)
            utt.num_chunks = _chunks_for(utt.num_frames, e.first_chunk_frames, e.chunk_frames)
            if utt.num_chunks == 0 or utt.chunks_done >= utt.num_chunks:
                if utt.chunks_done == 0:
                    self._utts.pop()
                return
            _, hi = _chunk_span(utt.num_chunks - 1, e.first_chunk_frames, e.chunk_frames)
            pad = hi * SAMPLES_PER_FRAME - utt.pcm.end
            if pad > 0:
                utt.pcm.append(torch.zeros(pad))

    def interrupt(self) -> None:
        """Drop the buffered audio and every frame not yet taken; the next ``push_audio`` starts a new utterance
        whose first frame gets the index after the last frame delivered.  The session stays usable."""
        with self._lock:
            self._check_open()
            self._utts.clear()
            self._ready.clear()
            self._raw = _PcmBuffer()
            if self._resampler is not None:
                self._resampler.reset()
            self._runner_utt = None

    def close(self) -> None:
        """Release the session's state (caches, buffers, graphs).  Further calls raise RuntimeError."""
        with self._lock:
            self._closed = True
            self._utts.clear()
            self._ready.clear()
            self._raw = _PcmBuffer()
            self._runner = None
            self._runner_utt = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------------------------------- output
    def frames(self) -> Iterator[Frame]:
        """Yield the frames that can be produced now, computing chunks as the iterator advances, then return
        (never waits for audio).  After ``end_of_speech()`` this yields all the remaining frames."""
        self._check_open()
        return self._drain()

    def _drain(self) -> Iterator[Frame]:
        while True:
            with self._lock:
                if self._closed:
                    return
                if not self._ready and not self._step():
                    return
                frame = self._ready.popleft()
                self._delivered = frame.index + 1
            yield frame

    def _next_work(self) -> tuple[_Utterance, int] | None:
        e = self.engine
        while self._utts:
            utt = self._utts[0]
            c = utt.chunks_done
            if utt.closed:
                if c < utt.num_chunks:
                    return utt, c
                self._utts.popleft()
                continue
            _, hi = _chunk_span(c, e.first_chunk_frames, e.chunk_frames)
            if utt.pcm.end >= hi * SAMPLES_PER_FRAME + e.lookahead_samples:
                return utt, c
            return None
        return None

    def _step(self) -> bool:
        """Compute one chunk if one is ready; append its frames to the ready queue."""
        work = self._next_work()
        if work is None:
            return False
        utt, c = work
        e = self.engine
        with e._lock, torch.no_grad():
            if self._runner is None:
                self._runner = _Runner(e, self.seed)
            runner = self._runner
            if self._runner_utt is not utt:
                if c != 0:
                    raise AssertionError("an utterance must start at its first chunk")
                runner.reset()
                self._runner_utt = utt
            self._ready.extend(self._compute(runner, utt, c))
        utt.chunks_done += 1
        if utt.closed and utt.chunks_done >= utt.num_chunks:
            self._utts.popleft()
        return True

    def _compute(self, runner: _Runner, utt: _Utterance, c: int) -> list[Frame]:
        e = self.engine
        lo, hi = _chunk_span(c, e.first_chunk_frames, e.chunk_frames)
        last = utt.closed and c == utt.num_chunks - 1
        chunk_id = self._chunk_id
        with e.stage("audio_features"):
            feats = runner.features(utt, lo, hi, last).to(e.device)
            if c == 0:
                from lipforcing.model.audio import group_audio_frames

                audio = group_audio_frames(feats[None])
            else:
                audio = feats.reshape(1, -1, VIDEO_FRAMES_PER_LATENT, feats.shape[-1])
        with e.stage("vae_encode"):
            n_ref = self.reference.shape[0]
            idx = torch.tensor([face.pingpong_index(utt.first_index + f, n_ref) for f in range(lo, hi)])
            y = runner.conditioning(self.reference[idx])
        if e.cuda_graphs and runner.graphs is None and self._chunk_id > 0:
            runner.graphs = _ChunkGraphs(e, runner.state, y, audio, self.seed)
        x0, write = runner.dit(y, audio, chunk_id)
        with e.stage("vae_decode"):
            video = runner.dec.decode(x0)                                   # (1, 3, n, H, W) in [-1, 1]
            images = ((video[0].float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
            images = images.permute(1, 2, 3, 0).contiguous().cpu().numpy()  # (n, H, W, 3)
        with e.stage("cache_write"):
            write()
        self._chunk_id += 1
        n_emit = hi if utt.num_frames is None else min(hi, utt.num_frames)
        pcm = utt.pcm.read(lo * SAMPLES_PER_FRAME, hi * SAMPLES_PER_FRAME).numpy()
        out = []
        for f in range(lo, n_emit):
            index = utt.first_index + f
            a = pcm[(f - lo) * SAMPLES_PER_FRAME:(f - lo + 1) * SAMPLES_PER_FRAME].copy()
            out.append(Frame(index=index, pts=index / FPS, image=images[f - lo], audio=a, chunk_id=chunk_id))
        # keep only what later chunks need: frame audio from hi on, and samples not yet fed to the features
        utt.pcm.drop_before(min(hi * SAMPLES_PER_FRAME, runner.fed))
        return out
