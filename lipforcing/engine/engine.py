"""The :class:`Engine`: one per device, holding the causal student, the VAE, the audio front end and the text
conditioning that every :class:`~lipforcing.engine.Session` it opens shares; plus the argument checks and the
default components of :meth:`Engine.load`."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING, ContextManager

import numpy as np
import torch

from lipforcing import face, schedule
from lipforcing.audio.pcm import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from lipforcing.config import VIDEO_FRAMES_PER_LATENT, ModelConfig

if TYPE_CHECKING:
    from lipforcing.engine.session import Session

logger = logging.getLogger("lipforcing.engine")

__all__ = ["Engine", "parse_resolution", "check_seed"]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
_REAL_RESOLUTION = 512
_TINY_RESOLUTION = 32
_DEFAULT_TEXT_LEN = 512   # Wan pads the UMT5 prompt embedding to 512 tokens


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


def parse_resolution(resolution, default: int) -> tuple[int, int]:
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


def check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__} {seed!r}")
    if not -(1 << 63) <= int(seed) < (1 << 64):
        raise ValueError(f"{name} must fit in 64 bits, got {seed}")
    return int(seed)


def _load_text(text, text_dim: int) -> torch.Tensor:
    """A prompt embedding from a tensor or a file (.safetensors: the single tensor in it; .pt/.pth: a tensor)."""
    if isinstance(text, (str, os.PathLike)):
        from lipforcing._weights import read_weight_file

        path = os.fspath(text)
        text, _ = read_weight_file(path, "prompt embedding")    # errors name the file; pickled objects refused
        if path.endswith(".safetensors"):
            if len(text) != 1:
                raise ValueError(f"{path} holds {len(text)} tensors ({sorted(text)[:5]}); expected exactly one "
                                 "prompt embedding")
            text = next(iter(text.values()))
        elif isinstance(text, dict) and len(text) == 1:
            text = next(iter(text.values()))
    if not isinstance(text, torch.Tensor):
        raise TypeError(f"text must be a tensor (L, text_dim) / (1, L, text_dim) or a path to one, got "
                        f"{type(text).__name__}")
    if text.dim() == 2:
        text = text[None]
    if text.dim() != 3 or text.shape[0] != 1 or text.shape[-1] != text_dim or not text.is_floating_point():
        raise ValueError(f"text must be a float (1, L, text_dim={text_dim}) prompt embedding, got {text.dtype} "
                         f"{tuple(text.shape)}")
    if not bool(torch.isfinite(text).all()):     # it conditions every chunk: NaN would make all of them NaN
        raise ValueError(f"text (the prompt embedding) holds {int((~torch.isfinite(text)).sum())} NaN/inf values")
    return text


# ------------------------------------------------------------------------------------------------------ engine
class Engine:
    """One per device: the causal student, the VAE, the audio front end and the text conditioning, shared by every
    :class:`Session` it opens.  Build it with :meth:`Engine.load`.

    Attributes
    ----------
    model : the causal student (``CausalLipSyncDiT``, eval mode, no grad).  config : its ModelConfig.
    vae : the ``WanVAE`` (streaming encoder, and the exact decoder unless ``decoder`` is set).
    decoder : None (frames decoded by the Wan VAE) or a TAEHV model (``lipforcing.decoders``), the fast decoder;
        :meth:`stream_decoder` opens the per-session stream of either.  audio : the audio front end
        (``lipforcing.audio.AudioFeatures``: ``feature_dim``, ``lookahead_samples``, ``stream()``).
    device, dtype : where the model runs and its parameter dtype.  resolution : (H, W) of the face crops.
    chunk_frames : video frames per chunk after the first (12); first_chunk_frames : 9; latent_chunk_frames : 3.
    fps (25), sample_rate (16000), samples_per_frame (640).
    cuda_graphs : whether the DiT passes run as captured CUDA graphs.
    stage : ``stage(name) -> context manager`` around every stage of a chunk (see :mod:`lipforcing.engine`); replace
        it to profile (``engine.stage = factory``), the engine itself holds no timing code.
    """

    fps = FPS
    sample_rate = SAMPLE_RATE
    samples_per_frame = SAMPLES_PER_FRAME
    manifest = None          # set by load: the weight bundle used (lipforcing.weights.Manifest), else None
    random_weights = False   # set by load: True when the student's weights are random

    def __init__(self, model, vae, audio, context: torch.Tensor, *, resolution, mask=None,
                 cuda_graphs: bool = False, vae_frames_per_step: int | None = None,
                 vae_latents_per_step: int | None = None, backend: str = "auto", decoder=None,
                 max_batch: int = 8, max_sessions=None):
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
        self.decoder = _check_decoder(decoder, vae, self.device)
        self.audio = audio
        for attr in ("feature_dim", "lookahead_samples", "stream"):
            if not hasattr(audio, attr):
                raise TypeError(f"audio front end must follow lipforcing.audio.AudioFeatures (missing {attr!r}); got "
                                f"{type(audio).__name__}")
        if audio.feature_dim != c.audio_dim:
            raise ValueError(f"the audio front end gives {audio.feature_dim}-dim features but the model expects "
                             f"audio_dim={c.audio_dim}")
        self.resolution = parse_resolution(resolution, _REAL_RESOLUTION)
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
        from lipforcing.engine.scheduler import Scheduler

        self.scheduler = Scheduler(self, max_batch=max_batch, max_sessions=max_sessions)
        # how batched DiT passes run their linear layers: per session on the CPU (bit-exact with a session alone),
        # on all rows at once on a GPU (the fast form; equal within rounding); see chunk_step.forward_chunks
        self.batch_linear = "split" if self.device.type == "cpu" else "fold"

    # -------------------------------------------------------------------------------------------- construction
    @classmethod
    def load(cls, checkpoint=None, *, model=None, device="cpu", dtype=None, seed: int = 0, vae=None,
             audio_encoder=None, text=None, resolution=None, mask=None, cuda_graphs: bool = False,
             vae_frames_per_step: int | None = None, vae_latents_per_step: int | None = None,
             backend: str = "auto", decoder=None, max_batch: int = 8, max_sessions=None,
             threads: int | None = None) -> "Engine":
        """Load (or randomly initialise) everything a stream needs.

        Which weights:

        * ``Engine.load()`` (no checkpoint, no ``model``): the embedded default model, the weight bundle in
          ``lipforcing/weights/default/`` (student, VAE, prompt embedding, resolution and audio front end, checked
          against its ``manifest.json``; one log line names it), or the bundle ``$LIPFORCING_DEFAULT_WEIGHTS``
          names.  While none is shipped (or with ``LIPFORCING_DEFAULT_WEIGHTS=none``): random weights of the tiny
          preset, as ``Engine.load(model="tiny")``.
        * ``Engine.load(model="tiny")`` (a preset name or a ModelConfig, no checkpoint): random weights of that
          model drawn with ``seed`` (said so in one log line), whether or not a default is shipped.
        * ``Engine.load(checkpoint)``: the student's weights from a file, folder or list (see
          ``lipforcing.load_model``), or a bundle folder (one holding ``manifest.json``, written by
          :func:`lipforcing.weights.write_default`), loaded like the default.

        ``engine.manifest`` is the bundle used (a :class:`lipforcing.weights.Manifest`) or None;
        ``engine.random_weights`` says whether the student's weights are random.  ``vae``, ``text``,
        ``audio_encoder``, ``resolution`` and ``decoder`` given explicitly replace the bundle's.  A bundle that
        ships a TAEHV decoder (``decoder.safetensors``) decodes with it by default (``decoder="wan"``: the exact Wan
        VAE decoder instead); the bundle's log line says which decoder is used.

        checkpoint : student weights or a bundle folder (above), or None.
        model : preset name (``"tiny"``, ``"1.3b"``, ``"14b"``) or a ModelConfig: without a checkpoint, random
            weights of it; with one, the config to load it into (None or ``"tiny"``: read from the checkpoint).
        device, dtype : e.g. ``"cuda"``, ``"bf16"`` (default: bf16 on CUDA, fp32 on CPU).
        vae : a ``WanVAE``, a ``VAEConfig``, a preset name (``"tiny"``, ``"wan2.1"``) or a checkpoint path.
            Default: the tiny VAE for the tiny model, else a randomly initialised Wan2.1 VAE (logged).
        audio_encoder : an ``AudioFeatures`` object or a local wav2vec2 folder.  Default: the built-in log-mel
            front end (``audio_dim // 2`` mel bands) when the model's ``audio_dim`` is small (the tiny preset),
            else a randomly initialised wav2vec2-base (needs ``transformers``; logged).
        text : prompt embedding (1, L, text_dim) tensor or file; default: random (seeded) for random weights,
            zeros (1, 512, text_dim) with a warning for a checkpoint.
        resolution : face-crop size, int or (H, W), multiple of 16 (default 512; 32 for the tiny preset).
        mask : custom (H, W) mouth mask (bool or float, 1 = generate), or the path of a mask image in LatentSync's
            ``mask.png`` convention (white = keep, black = regenerate; any size with the crop's aspect ratio);
            default :func:`lipforcing.face.mouth_mask`.
        cuda_graphs : capture the DiT passes and updates of the chunk step as CUDA graphs (per session, at its
            first chunk) and replay them (CUDA only, ``rope_mode="dynamic"``).
        vae_frames_per_step / vae_latents_per_step : VAE streaming step sizes (default: a whole chunk per call).
        backend : ``backend=`` of every ``lipforcing.ops`` call the engine makes (attention, denoise_update):
            ``"auto" | "cuda" | "triton" | "reference"``; sets ``model.attn_backend`` (the model is the engine's).
        decoder : how frames are decoded: None (default: the bundle's TAEHV decoder when the bundle used ships one
            and its own VAE is used, else the Wan VAE's decoder), ``"wan"`` (the Wan VAE's decoder, exact), ``"taehv"``
            (the TAEHV architecture with random weights drawn with ``seed``: the ``"tiny"`` widths for the tiny
            model, ``taew2_1``'s otherwise; logged), a path to ``taew2_1.pth`` / ``.safetensors`` (or a tiny
            checkpoint from ``lipforcing train --stage decoder``), or a ``TAEHV`` model.  The frame accounting
            (one frame per 640 samples, pts) does not depend on it.
        max_batch : most sessions whose chunks the scheduler runs as one DiT pass (1: no batching).
        max_sessions : admission control of :meth:`session`: None (no limit, default), an int, or ``"auto"`` (the
            real-time capacity measured from the chunk steps so far, :meth:`Scheduler.capacity`); a session
            beyond it raises :class:`~lipforcing.engine.AdmissionError`.
        threads : CPU engines only: torch's intra-op thread count, set process-wide with
            ``torch.set_num_threads``.  Default: 1 for tiny models (their tensors are too small to split: more
            threads made the tiny engine 5-10x slower on a 2-core CPU), torch's own setting otherwise.
            ``engine.threads`` says what was used (None on a GPU).
        """
        from lipforcing.model import build_model, load_model

        device = _as_device(device)
        dtype = _as_dtype(dtype, device)
        seed = check_seed(seed)
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
                raise TypeError(f"threads must be an int or None, got {type(threads).__name__} {threads!r}")
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
        notes = []
        bundle = _bundle(checkpoint, model)
        bundle_decoder = None         # why the bundle's frames are decoded as they are (its log line says it)
        if bundle is not None:
            net = bundle.load_student(device=device, dtype=dtype)
            cfg = net.config
            if decoder is None and bundle.has_decoder and vae is None:
                decoder = bundle.load_decoder(device=device, dtype=dtype)
                bundle_decoder = f"the bundle's TAEHV decoder ({bundle.path('decoder').name})"
            elif decoder is None or _is_wan(decoder):
                bundle_decoder = "the Wan VAE decoder"
                if bundle.has_decoder:      # trained on the bundle's VAE latents, not on those of another VAE
                    bundle_decoder += (" (decoder='wan'" if decoder is not None else " (vae= replaces the bundle's "
                                       "VAE") + "; the bundle's TAEHV decoder is not used)"
            elif isinstance(decoder, str) and decoder.lower() == "taehv":
                bundle_decoder = "a randomly initialised TAEHV decoder (decoder='taehv')"
            else:
                bundle_decoder = "the TAEHV decoder given (decoder=)"
            vae = bundle.load_vae(device=device, dtype=dtype) if vae is None else vae
            text = bundle.load_text() if text is None else text
            audio_encoder = bundle.audio_features(device=device) if audio_encoder is None else audio_encoder
            resolution = bundle.resolution if resolution is None else resolution
            logger.info("lipforcing.Engine: using the %s model %s; frames decoded by %s",
                        "default" if checkpoint is None else "bundled", bundle.describe(), bundle_decoder)
        elif checkpoint is None:
            why = ""
            if model is None:       # no default model: none shipped, or LIPFORCING_DEFAULT_WEIGHTS=none
                model, w = "tiny", _weights_module()
                why = (f"; {w.ENV_VAR}={os.environ[w.ENV_VAR].strip()}" if os.environ.get(w.ENV_VAR, "").strip()
                       else f"; no default model shipped: {w.DEFAULT_FOLDER / w.MANIFEST} absent")
            cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_name(model)
            with _seeded(seed, device):
                net = build_model(cfg, causal=True, device=device, dtype=dtype)
            name = model if isinstance(model, str) else "custom"
            notes.append(f"random weights of the {name!r} model (seed {seed}{why})")
        else:
            cfg = None if model is None or (isinstance(model, str) and model == "tiny") else model
            net = load_model(checkpoint, config=cfg, causal=True, device=device, dtype=dtype)
            cfg = net.config
        tiny = cfg.audio_dim <= 256
        if device.type == "cpu" and (threads is not None or tiny):
            torch.set_num_threads(int(threads) if threads is not None else 1)
        vae_obj, note = _make_vae(vae, tiny=tiny, device=device, dtype=dtype, seed=seed)
        if note:
            notes.append(note)
        dec_obj, note = _make_decoder(decoder, vae_obj, tiny=tiny, device=device, dtype=dtype, seed=seed)
        if note:
            notes.append(note)
        audio_obj, note = _make_audio(audio_encoder, cfg, device=device, seed=seed)
        if note:
            notes.append(note)
        if text is None:
            if checkpoint is None and bundle is None:
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
        engine = cls(net, vae_obj, audio_obj, ctx.to(dtype), resolution=res, mask=mask, cuda_graphs=cuda_graphs,
                     vae_frames_per_step=vae_frames_per_step, vae_latents_per_step=vae_latents_per_step,
                     backend=backend, decoder=dec_obj, max_batch=max_batch, max_sessions=max_sessions)
        engine.threads = torch.get_num_threads() if device.type == "cpu" else None
        engine.manifest = bundle
        engine.random_weights = bundle is None and checkpoint is None
        return engine

    def _check_mask(self, mask) -> torch.Tensor:
        if isinstance(mask, (str, os.PathLike)):       # a mask image, LatentSync's convention (white = keep)
            return face.load_mask(mask, self.resolution)
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != self.resolution:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a {self.resolution} (height, width) array (1 = generate), got {got}")
        return mask.cpu() if mask.dtype == torch.bool else mask.cpu().float() > 0.5

    # -------------------------------------------------------------------------------------------------- decoding
    @property
    def decoder_name(self) -> str:
        """``"wan-vae"`` (the exact decoder) or ``"taehv"``."""
        return "wan-vae" if self.decoder is None else "taehv"

    def stream_decoder(self):
        """A fresh per-session :class:`~lipforcing.vae.streaming.StreamingDecoder` (``reset``, ``decode``,
        ``flush``): the Wan VAE's, or TAEHV's when the engine has ``decoder``.  Both take the DiT's normalised
        latents (TAEHV itself takes raw latents: its stream maps them back with the VAE's mean/std) and return
        1 + 4(n - 1) frames for the first n latents of a clip, 4n after, in [-1, 1]."""
        if self.decoder is None:
            return self.vae.stream_decoder(latents_per_step=self.vae_latents_per_step)
        from lipforcing.decoders import TAEHVStreamDecoder

        return TAEHVStreamDecoder(self.decoder, latents_mean=self.vae.config.latents_mean,
                                  latents_std=self.vae.config.latents_std, latents_per_step=self.vae_latents_per_step)

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
                max_buffer_seconds: float = 60.0, aligned: bool | None = None, face_index: int | None = None,
                box=None, region: str = "mouth") -> "Session":
        """Open a stream.  ``reference``: video frames (N, H, W, 3) uint8 (numpy or torch; one (H, W, 3) frame is a
        still image) of any size, a path to a video (PyAV), or what :meth:`prepare` returned or wrote.  Frames
        at the engine's resolution are taken as aligned face crops (``aligned=True`` insists, ``False``
        detects anyway); other frames go through the face stage (:mod:`lipforcing.engine.reference`): the face
        (the largest, or ``face_index`` / the one overlapping ``box`` (x0, y0, x1, y1)) is tracked and aligned,
        and each ``Frame.image`` is the full frame with the generated ``region`` (``"mouth"`` or ``"face"``)
        pasted back, ``Frame.face`` the generated crop.  A clip without a usable face raises
        :class:`lipforcing.face.FaceError` here, before any generation.
        ``sample_rate``: rate of the pushed audio (int; resampled to 16 kHz).  ``seed``: noise seed.
        ``max_buffer_seconds``: most audio a session buffers before ``push_audio`` refuses more (BufferError).
        Raises :class:`~lipforcing.engine.AdmissionError` when ``max_sessions`` says the engine is full."""
        from lipforcing.engine.reference import prepare_reference
        from lipforcing.engine.session import Session

        self.scheduler.admit()
        ref = prepare_reference(self, reference, aligned=aligned, face_index=face_index, box=box, region=region)
        return Session(self, ref, sample_rate=sample_rate, seed=seed, max_buffer_seconds=max_buffer_seconds)

    def prepare(self, reference, path=None, *, aligned: bool | None = None, face_index: int | None = None, box=None,
                region: str = "mouth"):
        """Run the face stage of a reference once (detection, tracking, transforms) and return it (a
        :class:`~lipforcing.engine.reference.Reference` that :meth:`session` takes); with ``path``, also write it
        there (safetensors) so that ``engine.session(path)`` later skips detection.  Arguments as in
        :meth:`session`."""
        from lipforcing.engine.reference import prepare_reference, save_reference

        ref = prepare_reference(self, reference, aligned=aligned, face_index=face_index, box=box, region=region)
        if path is not None:
            save_reference(ref, path)
        return ref

    def close(self) -> None:
        """Close every open session and stop the scheduler's worker thread (joined).  Idempotent."""
        for s in self.scheduler.open_sessions():
            s.close()
        self.scheduler.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """The scheduler's numbers (open sessions, queued chunks, chunk latency and step-time percentiles, batch
        sizes, real-time capacity): see :meth:`Scheduler.stats`."""
        return self.scheduler.stats()

    def _reference_frames(self, reference, *, aligned: bool = True) -> torch.Tensor:
        """Read and check reference frames; ``aligned``: they must be crops at the engine's resolution."""
        if isinstance(reference, (str, os.PathLike)):
            from lipforcing.media import read_video

            reference = read_video(reference)[0]
        if isinstance(reference, np.ndarray):
            if reference.dtype != np.uint8:
                raise TypeError(f"reference frames must be uint8 RGB (N, H, W, 3), got numpy {reference.dtype}; "
                                "convert float frames in [0, 1] with (x * 255).round().astype(np.uint8)")
            # a read-only array (np.asarray(PIL.Image), a memmap) is copied: torch.from_numpy warns on it
            reference = torch.from_numpy(np.ascontiguousarray(reference) if reference.flags.writeable
                                         else np.array(reference, order="C"))
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
        if aligned and tuple(reference.shape[1:3]) != (H, W):
            raise ValueError(f"reference frames must be {H}x{W} aligned face crops (this engine's resolution), got "
                             f"{reference.shape[1]}x{reference.shape[2]}; resize/crop them, or load the engine with "
                             f"resolution=... to match")
        reference = reference.contiguous()
        if self.device.type == "cuda":
            reference = reference.pin_memory()
        return reference


def _weights_module():
    import lipforcing.weights

    return lipforcing.weights


def _bundle(checkpoint, model):
    """``Engine.load``'s weight bundle: the default one (no checkpoint, no model), a checkpoint folder holding a
    manifest.json, or None (random weights / a plain checkpoint)."""
    w = _weights_module()
    if checkpoint is None:
        return w.default_manifest() if model is None else None
    if isinstance(checkpoint, (str, os.PathLike)) and os.path.isdir(checkpoint) \
            and os.path.isfile(os.path.join(checkpoint, w.MANIFEST)):
        bundle = w.read_manifest(checkpoint)
        if not (model is None or (isinstance(model, str) and model == "tiny") or model == bundle.model):
            raise ValueError(f"model={model!r} does not match the model of the bundle {checkpoint} "
                             f"({bundle.model}); leave model out to load a bundle")
        return bundle
    return None


def _make_vae(vae, *, tiny: bool, device, dtype, seed: int):
    from lipforcing.vae import VAEConfig, WanVAE, load_vae

    if isinstance(vae, WanVAE):
        return vae.to(device=device, dtype=dtype), None
    if isinstance(vae, (str, os.PathLike)) and os.path.exists(os.fspath(vae)):
        return load_vae(vae, device=device, dtype=dtype), None
    if isinstance(vae, os.PathLike) or (isinstance(vae, str) and (os.sep in vae or vae.lower().endswith(
            (".pth", ".pt", ".safetensors", ".bin", ".ckpt")))):
        # a path (not a preset name such as "tiny" or "wan2.1") that is not there
        raise FileNotFoundError(f"vae {os.fspath(vae)!r}: no such file or folder (expected a VAE checkpoint path, a "
                                "preset name 'wan2.1' / 'tiny', a VAEConfig or a WanVAE)")
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


def _is_wan(decoder) -> bool:
    return isinstance(decoder, str) and decoder.lower() in ("wan", "wan-vae", "vae")


def _make_decoder(decoder, vae, *, tiny: bool, device, dtype, seed: int):
    """``Engine.load``'s ``decoder=`` (a bundle's decoder already loaded in its place) -> (TAEHV model or None,
    log note)."""
    if decoder is None or _is_wan(decoder):
        return None, None
    from lipforcing.decoders import TAEHV, TAEHVConfig, load_decoder

    channels_last = device.type == "cuda"       # faster convolutions on a GPU
    if isinstance(decoder, TAEHV):
        net = decoder
    elif isinstance(decoder, str) and decoder.lower() == "taehv":
        name = "tiny" if tiny else "taew2_1"
        base = TAEHVConfig.from_name(name)
        cfg = TAEHVConfig.for_spatial_factor(vae.spatial_factor, encoder_width=base.encoder_width,
                                             decoder_widths=base.decoder_widths)
        with _seeded(seed + 4, device), torch.device(device):
            net = TAEHV(cfg)         # PyTorch's default initialisation, drawn from the seeded RNG
        note = f"a randomly initialised {name!r} TAEHV decoder (pass decoder=PATH to taew2_1.pth for real frames)"
        return _place_decoder(net, device, dtype, channels_last), note
    elif isinstance(decoder, (str, os.PathLike)):
        if not os.path.exists(os.fspath(decoder)):
            raise FileNotFoundError(f"decoder {os.fspath(decoder)!r}: no such file (expected 'wan', 'taehv', a "
                                    "taew2_1.pth/.safetensors path or a TAEHV model)")
        net = load_decoder(decoder)
    else:
        raise TypeError(f"decoder must be None, 'wan', 'taehv', a checkpoint path or a TAEHV model, got "
                        f"{type(decoder).__name__}")
    return _place_decoder(net, device, dtype, channels_last), None


def _place_decoder(net, device, dtype, channels_last: bool):
    net = net.to(device=device, dtype=dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net.eval().requires_grad_(False)


def _check_decoder(decoder, vae, device):
    if decoder is None:
        return None
    from lipforcing.decoders import TAEHV

    if not isinstance(decoder, TAEHV):
        raise TypeError(f"decoder must be None (the Wan VAE decodes) or a lipforcing.decoders.TAEHV, got "
                        f"{type(decoder).__name__}")
    if decoder.latent_channels != vae.z_dim:
        raise ValueError(f"the decoder takes {decoder.latent_channels} latent channels but the VAE has "
                         f"z_dim={vae.z_dim}")
    if decoder.spatial_factor != vae.spatial_factor:
        raise ValueError(f"the decoder upsamples {decoder.spatial_factor}x but the VAE's latents are "
                         f"{vae.spatial_factor}x smaller than the frames")
    if decoder.device != device:
        raise ValueError(f"the decoder is on {decoder.device} but the model is on {device}")
    return decoder.eval().requires_grad_(False)


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
