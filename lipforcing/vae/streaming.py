"""Streaming encode/decode over a :class:`~lipforcing.vae.model.WanVAE`, and the pluggable-decoder interface.

::

    enc = vae.stream_encoder()            # normalize=True by default (DiT latent space)
    z0 = enc.encode(video[:, :, :9])      # first call: 1 + 4m frames -> 1 + m latents
    z1 = enc.encode(video[:, :, 9:21])    # later calls: 4m frames -> m latents
    dec = vae.stream_decoder()
    x0 = dec.decode(z[:, :, :3])          # first latent -> 1 frame, each later latent -> 4 frames
    x1 = dec.decode(z[:, :, 3:6])

Both are bit-for-bit equal (``torch.equal``) to ``vae.encode`` / ``vae.decode`` of the whole clip with the same
step setting (default: Wan's canonical steps, frame 0 then 4 frames per encoder call, one latent per decoder call),
for any split of the clip into calls: the whole-clip methods run this very loop, and every internal call sees the
same tensors either way.  A larger ``frames_per_step`` / ``latents_per_step`` runs fewer, bigger convolutions
(faster on a GPU); results then match the default steps up to float rounding, and streaming stays bit-equal to
whole-clip processing with the same step as long as every call's frame count is a multiple of the step.

State is a fixed set of small tensors (two frames per causal 3-tap conv, one per temporal downsampler), replaced
on every call, so memory stays constant over arbitrarily long streams.  Caches are detached after each call:
gradients do not flow from one call into the previous ones (use ``vae.encode``/``vae.decode`` for that).
Nothing here synchronises with the GPU except the optional input range check (``vae.check_inputs``).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from lipforcing.vae.model import WanVAE, _detach_state

__all__ = ["StreamEncoder", "StreamDecoder", "StreamingDecoder", "LatentDecoder", "DecoderStream", "check_latents"]

_RANGE_TOL = 1e-3


@runtime_checkable
class DecoderStream(Protocol):
    """One causal decoding stream.  ``decode(z)``: z (B, z_dim, n, h, w) *raw* (un-normalised) latents, the next n
    latent frames of the clip -> their video frames (B, 3, F, 8h, 8w) with F = 1 + 4(n - 1) on the first call
    and 4n later, in about [-1, 1] (the caller clamps)."""

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class StreamingDecoder(Protocol):
    """What the engine holds per session to turn latents into frames: the Wan VAE's :class:`StreamDecoder`
    (``vae.stream_decoder()``, exact) or a TAEHV :class:`~lipforcing.decoders.TAEHVStreamDecoder` (fast).

    ``decode(latents)``: latents (B, z_dim, n, h, w) in the DiT's normalised space (the default of both), the next
    n >= 1 latent frames of the clip -> frames (B, 3, F, 8h, 8w) in [-1, 1], F = 1 + 4(n - 1) on the first call
    and 4n afterwards.  ``flush()``: end the clip and return the frames still held back (B, 3, F', H, W) (F' = 0
    for both causal decoders).  ``reset()``: forget the clip without returning anything."""

    def reset(self) -> None: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def flush(self) -> torch.Tensor: ...


@runtime_checkable
class LatentDecoder(Protocol):
    """A decoder that can be plugged into a :class:`WanVAE` with ``vae.set_decoder(...)``: ``stream()`` opens a
    fresh :class:`DecoderStream`.  :class:`lipforcing.decoders.TAEHV` implements it; the engine uses a TAEHV
    through :class:`StreamingDecoder` instead (``Engine.load(decoder=...)``), leaving the VAE unchanged."""

    def stream(self) -> DecoderStream: ...


def check_latents(latents, channels: int, device: torch.device, owner: str) -> None:
    """What every :class:`StreamingDecoder` ``decode(latents)`` accepts: a floating-point (B, channels, n, h, w)
    tensor with B, n, h, w >= 1 on ``device``; ``owner`` names the decoder in the device error."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if latents.dim() != 5 or latents.shape[1] != channels:
        raise ValueError(f"latents must be (B, {channels}, n, h, w) (5-D, z_dim = {channels} channels in dim 1), got "
                         f"shape {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be a floating-point tensor, got dtype {latents.dtype}")
    b, _, n, h, w = latents.shape
    if min(b, n, h, w) == 0:
        raise ValueError(f"latents must have at least one frame and a non-empty B, h, w; got shape "
                         f"{tuple(latents.shape)}")
    if latents.device != device:
        raise ValueError(f"latents are on {latents.device} but the {owner} is on {device}")


def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D (B, C, T, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        hint = " (convert uint8 frames with x / 127.5 - 1)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"{name} must be a floating-point tensor{hint}, got dtype {x.dtype}")


def _check_step(name: str, v, multiple: int) -> int:
    if v is None:
        return multiple
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % multiple:
        raise ValueError(f"{name} must be a positive multiple of {multiple}, got {v!r}")
    return v


class _Stream:
    def __init__(self, vae: WanVAE, normalize: bool):
        if not isinstance(vae, WanVAE):
            raise TypeError(f"vae must be a WanVAE, got {type(vae).__name__}")
        self.vae = vae
        self.normalize = bool(normalize)
        self._detach = True
        self.reset()

    def reset(self) -> None:
        """Forget the clip: the next call starts a new one."""
        self._signature = None
        self._count_in = 0
        self._count_out = 0

    def _check_signature(self, name: str, x: torch.Tensor) -> None:
        sig = (x.shape[0], x.shape[3], x.shape[4], x.device)
        if self._signature is not None and sig != self._signature:
            b, h, w, dev = self._signature
            raise ValueError(f"{name}: batch, height, width and device must stay those of the first call "
                             f"(B={b}, H={h}, W={w}, {dev}); got B={sig[0]}, H={sig[1]}, W={sig[2]}, {sig[3]}. "
                             "Call reset() to start a new clip")
        if x.device != self.vae.device:
            raise ValueError(f"{name} is on {x.device} but the VAE is on {self.vae.device}")


class StreamEncoder(_Stream):
    """Encodes a clip in pieces, carrying the causal caches between calls.

    ``encode(frames)``: frames (B, 3, T, H, W) float in [-1, 1], the next frames of the clip, T = 1 + 4m on the
    first call (m >= 0) and 4m (m >= 1) afterwards; H, W multiples of 8 and fixed for the stream.  Returns their
    latents (B, z_dim, T // 4 (+1 on the first call), H / 8, W / 8) in the VAE's dtype, normalised if
    ``normalize``.  Attributes ``frames_in`` / ``latents_out`` count what went through.
    """

    def __init__(self, vae: WanVAE, *, normalize: bool = True, frames_per_step: int | None = None):
        self.frames_per_step = _check_step("frames_per_step", frames_per_step, vae.temporal_factor)
        super().__init__(vae, normalize)

    def reset(self) -> None:
        super().reset()
        self.state: dict = {}

    @property
    def frames_in(self) -> int:
        return self._count_in

    @property
    def latents_out(self) -> int:
        return self._count_out

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        f, s = vae.temporal_factor, vae.spatial_factor
        _check_tensor("frames", frames, 5)
        b, c, t, h, w = frames.shape
        if c != 3:
            raise ValueError(f"frames must have 3 (RGB) channels in dim 1 (B, 3, T, H, W), got shape "
                             f"{tuple(frames.shape)}")
        if h % s or w % s or h == 0 or w == 0:
            raise ValueError(f"frames height and width must be positive multiples of {s}, got {h}x{w}")
        first = self._signature is None
        if first and (t - 1) % f != 0:
            raise ValueError(f"the first piece of a clip must have 1 + {f}m frames (1, {1 + f}, {1 + 2 * f}, ...), "
                             f"got {t}")
        if not first and (t == 0 or t % f != 0):
            raise ValueError(f"after the first piece every piece must have a positive multiple of {f} frames, "
                             f"got {t}")
        self._check_signature("frames", frames)
        if vae.check_inputs and frames.numel():
            lo, hi = torch.aminmax(frames.detach())
            lo, hi = float(lo), float(hi)
            if not (lo >= -1 - _RANGE_TOL and hi <= 1 + _RANGE_TOL):     # also catches NaN
                raise ValueError(f"frames must hold values in [-1, 1], got min {lo:.4g}, max {hi:.4g} "
                                 "(map uint8 frames with x / 127.5 - 1; set vae.check_inputs = False to skip)")
        x = frames.to(vae.dtype)
        pieces = []
        start = 0
        if first:
            pieces.append(x[:, :, :1])          # frame 0 alone, as Wan does
            start = 1
        for i in range(start, t, self.frames_per_step):
            pieces.append(x[:, :, i: i + self.frames_per_step])
        out = []
        for piece in pieces:
            mu = vae._encode_step(piece, self.state)
            out.append(vae.normalize_latents(mu) if self.normalize else mu)
        if self._detach:
            _detach_state(self.state)
        self._signature = (b, h, w, frames.device)
        self._count_in += t
        z = torch.cat(out, dim=2) if len(out) > 1 else out[0]
        self._count_out += z.shape[2]
        return z


class StreamDecoder(_Stream):
    """Decodes latents in pieces, carrying the causal caches between calls.

    ``decode(latents)``: latents (B, z_dim, n, h, w) float, the next n >= 1 latent frames (normalised if
    ``normalize``).  Returns their frames (B, 3, F, 8h, 8w) clamped to [-1, 1] in the VAE's dtype, F = 1 + 4(n - 1)
    on the first call and 4n afterwards.  Uses the VAE's plugged decoder if one is set (``vae.set_decoder``).
    """

    def __init__(self, vae: WanVAE, *, normalize: bool = True, latents_per_step: int | None = None):
        self.latents_per_step = _check_step("latents_per_step", latents_per_step, 1)
        super().__init__(vae, normalize)

    def reset(self) -> None:
        super().reset()
        self.impl = self.vae._open_decoder()

    @property
    def latents_in(self) -> int:
        return self._count_in

    @property
    def frames_out(self) -> int:
        return self._count_out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        f, s = vae.temporal_factor, vae.spatial_factor
        check_latents(latents, vae.z_dim, vae.device, "VAE")
        b, _, n, h, w = latents.shape
        self._check_signature("latents", latents)
        first = self._signature is None
        z = latents.to(vae.dtype)
        if self.normalize:
            z = vae.denormalize_latents(z)
        out = []
        for i in range(0, n, self.latents_per_step):
            piece = z[:, :, i: i + self.latents_per_step]
            frames = self.impl.decode(piece)
            m = piece.shape[2]
            want = (1 + f * (m - 1)) if (first and i == 0) else f * m
            if (not isinstance(frames, torch.Tensor) or frames.dim() != 5
                    or tuple(frames.shape[:2]) != (b, 3) or frames.shape[2] != want
                    or tuple(frames.shape[3:]) != (h * s, w * s)):
                got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
                raise RuntimeError(f"the decoder returned {got} for {m} latent frame(s); expected "
                                   f"{(b, 3, want, h * s, w * s)}")
            out.append(frames.clamp(-1.0, 1.0))
        if self._detach and hasattr(self.impl, "detach_"):
            self.impl.detach_()
        self._signature = (b, h, w, latents.device)
        self._count_in += n
        x = torch.cat(out, dim=2) if len(out) > 1 else out[0]
        self._count_out += x.shape[2]
        return x

    def flush(self) -> torch.Tensor:
        """End the clip (:class:`StreamingDecoder`): the frames still held back, (B, 3, 0, H, W) since the Wan
        decoder is causal (every latent's frames come out with it), then :meth:`reset`.  Before any decode:
        (0, 3, 0, 0, 0)."""
        s = self.vae.spatial_factor
        b, h, w, dev = self._signature if self._signature is not None else (0, 0, 0, self.vae.device)
        out = torch.empty((b, 3, 0, h * s, w * s), device=dev, dtype=self.vae.dtype)
        self.reset()
        return out
