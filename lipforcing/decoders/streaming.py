"""Streaming TAEHV decode with a fixed-size state: the engine's fast alternative to the Wan VAE's stream decoder.

::

    dec = TAEHVStreamDecoder(taehv)             # DiT-space (normalised) latents in, like vae.stream_decoder()
    x0 = dec.decode(z[:, :, 0:3])               # (1, 3, 9, H, W): the first latent of a stream gives 1 frame
    x1 = dec.decode(z[:, :, 3:6])               # (1, 3, 12, H, W): every later latent gives 4
    dec.flush()                                 # nothing is held back: (1, 3, 0, H, W); the next call starts a new clip

The state is one frame per decoder MemBlock (its input at the previous time step), allocated on the first call
and then overwritten in place, so its storage never changes while a stream runs (the chunk step can be captured in
a CUDA graph once warmed up; nothing here reads tensor values on the host).  At 512x512 it is about 22 M values.

The output equals :meth:`TAEHV.decode_video` of the whole clip for any split of the latents into calls
(bit-equal in fp32 when the convolution is batch-invariant, as PyTorch's own CPU convolution is: oneDNN, NNPACK and
cuDNN pick algorithms by batch size, which changes the last bits; ``torch.backends.mkldnn.flags(enabled=False)`` and
``torch.backends.nnpack.flags(enabled=False)`` give the exact path on the CPU).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lipforcing.decoders.taehv import TAEHV, _memory_format, run_layers
from lipforcing.vae.streaming import check_latents

__all__ = ["TAEHVStreamDecoder"]


class TAEHVStreamDecoder:
    """Decodes latents in pieces with a :class:`TAEHV`, carrying each MemBlock's last input between calls.

    Same interface as the Wan VAE's :class:`~lipforcing.vae.streaming.StreamDecoder` (``reset``, ``decode``,
    ``flush``; see :class:`~lipforcing.vae.streaming.StreamingDecoder`):

    ``decode(latents)``: latents (B, C_lat, n, h, w) float, the next n >= 1 latent frames of the clip.  With
    ``normalize=True`` (default) they are in the DiT's normalised space and are mapped back to raw latents first
    with ``z * std + mean`` (Wan 2.1's statistics unless ``latents_mean``/``latents_std`` are given): TAEHV itself
    takes **raw** latents, unlike the Wan VAE's ``decode(normalize=True)``.  ``normalize=False``: raw latents in.
    Returns frames (B, 3, F, s*h, s*w) (s = the spatial factor, 8 for taew2_1) in [-1, 1] (TAEHV's [0, 1] pixels
    mapped with ``2p - 1``) in the model's dtype, F = 1 + 4(n - 1) on the first call of a clip and 4n afterwards.

    latents_per_step : latent frames per internal decoder pass (default: all of a call in one pass, the fastest
        on a GPU; 1 = strictly one latent at a time).  Results do not depend on it (see the module notes).
    """

    def __init__(self, model: TAEHV, *, normalize: bool = True, latents_mean: Optional[Sequence[float]] = None,
                 latents_std: Optional[Sequence[float]] = None, latents_per_step: Optional[int] = None):
        if not isinstance(model, TAEHV):
            raise TypeError(f"model must be a TAEHV, got {type(model).__name__}")
        if latents_per_step is not None and (isinstance(latents_per_step, bool)
                                             or not isinstance(latents_per_step, int) or latents_per_step < 1):
            raise ValueError(f"latents_per_step must be a positive int or None, got {latents_per_step!r}")
        self.model = model
        self.normalize = bool(normalize)
        self.latents_per_step = latents_per_step
        c = model.latent_channels
        if normalize:
            from lipforcing.vae.config import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

            if latents_mean is None and latents_std is None and c != len(WAN21_LATENTS_MEAN):
                raise ValueError(f"normalize=True needs latents_mean and latents_std for {c} latent channels "
                                 f"(the defaults are Wan 2.1's {len(WAN21_LATENTS_MEAN)})")
            mean = tuple(WAN21_LATENTS_MEAN if latents_mean is None else latents_mean)
            std = tuple(WAN21_LATENTS_STD if latents_std is None else latents_std)
            for name, v in (("latents_mean", mean), ("latents_std", std)):
                if len(v) != c:
                    raise ValueError(f"{name} must have {c} entries (one per latent channel), got {len(v)}")
            self._stats_host = (mean, std)
        self._stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.state: list[torch.Tensor] = []
        self._signature = None
        self._count_in = 0
        self._count_out = 0
        self._first = True

    # ------------------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the clip: the next call starts a new one.  The state keeps its storage (zeroed in place)."""
        for s in self.state:
            s.zero_()
        self._first = True
        self._count_in = 0
        self._count_out = 0

    @property
    def latents_in(self) -> int:
        return self._count_in

    @property
    def frames_out(self) -> int:
        return self._count_out

    @property
    def state_numel(self) -> int:
        """Values held per stream set (0 before the first call)."""
        return sum(s.numel() for s in self.state)

    def _prepare(self, b: int, h: int, w: int, device: torch.device) -> None:
        m = self.model
        sig = (b, h, w, device, m.dtype, _memory_format(m.decoder[1].weight))
        if self._signature is not None and sig != self._signature and not self._first:
            ob, oh, ow, odev = self._signature[:4]
            raise ValueError(f"latents: batch, height, width and device must stay those of the first call (B={ob}, "
                             f"h={oh}, w={ow}, {odev}); got B={b}, h={h}, w={w}, {device}. Call reset() to start "
                             "a new clip")
        if sig == self._signature:
            return
        fmt = sig[-1]
        self.state = [torch.zeros(shape, device=device, dtype=m.dtype).contiguous(memory_format=fmt)
                      for shape in m.decoder_state_shapes(b, h, w)]
        if self.normalize:
            mean, std = self._stats_host
            view = (1, -1, 1, 1, 1)
            self._stats = (torch.tensor(mean, device=device, dtype=m.dtype).view(view),
                           torch.tensor(std, device=device, dtype=m.dtype).view(view))
        self._signature = sig

    # ----------------------------------------------------------------------------------------------- decode
    def _decode_unit(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, n, C, h, w) raw latents in the model's dtype -> frames (B, F, 3, 8h, 8w) in [0, 1]."""
        m = self.model
        b, n, c, h, w = z.shape
        step = self.latents_per_step or n
        fmt = self._signature[-1]
        out = []
        for i in range(0, n, step):
            piece = z[:, i: i + step]
            t = piece.shape[1]
            x = piece.reshape(b * t, c, h, w).contiguous(memory_format=fmt)
            y, t_out = run_layers(m.decoder, x, b, t, self.state)
            y = y.clamp(0, 1).reshape(b, t_out, 3, y.shape[-2], y.shape[-1])
            if self._first:
                y = y[:, m.config.frames_to_trim:]
                self._first = False
            out.append(y)
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        m = self.model
        check_latents(latents, m.latent_channels, m.device, "decoder")
        b, _, n, h, w = latents.shape
        self._prepare(b, h, w, latents.device)
        z = latents.to(m.dtype)
        if self.normalize:
            mean, std = self._stats
            z = z / (1.0 / std) + mean          # the Wan VAE's denormalisation, the same arithmetic
        frames = self._decode_unit(z.transpose(1, 2))
        self._count_in += n
        self._count_out += frames.shape[1]
        return (frames * 2 - 1).transpose(1, 2)

    def flush(self) -> torch.Tensor:
        """End the clip: return the frames still held back (none: TAEHV decodes causally, every latent's frames
        come out with it), shaped (B, 3, 0, H, W), and reset.  Before any decode: (0, 3, 0, 0, 0)."""
        if self._signature is None:
            out = torch.empty((0, 3, 0, 0, 0), device=self.model.device, dtype=self.model.dtype)
        else:
            b, h, w, dev, dtype = self._signature[:5]
            s = self.model.config.spatial_factor
            out = torch.empty((b, 3, 0, h * s, w * s), device=dev, dtype=dtype)
        self.reset()
        return out
