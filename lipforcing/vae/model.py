"""Wan2.1-compatible causal 3-D convolutional VAE.

The module tree and parameter names are those of the official Wan2.1 VAE (``WanVAE_`` in Wan2.1's
``wan/modules/vae.py``), so ``Wan2.1_VAE.pth`` loads without renaming::

    encoder.conv1                      CausalConv3d 3 -> dim
    encoder.downsamples.N              ResidualBlock | AttentionBlock | Resample (flat, in order)
    encoder.middle.{0,1,2}             ResidualBlock, AttentionBlock, ResidualBlock
    encoder.head.{0,2}                 RMS_norm, (SiLU), CausalConv3d -> 2 * z_dim
    conv1                              1x1x1, 2 z -> 2 z      (mean | log-variance)
    conv2                              1x1x1, z -> z          (before the decoder)
    decoder.conv1 / middle / upsamples.N / head

Time is causal everywhere: a frame's output depends on it and on earlier frames only.  Every layer takes an
optional ``state`` dict that carries what it must remember between calls (the last two input frames of each
3-tap causal conv, the last frame of each temporal downsampler, whether the sequence has started), so a clip can
be processed piece by piece.  The whole-clip methods (:meth:`WanVAE.encode`, :meth:`WanVAE.decode`) are
themselves such a piece-by-piece loop in Wan's canonical steps (encoder: frame 0, then 4 frames at a time;
decoder: one latent frame at a time), which is exactly what the streaming objects in
:mod:`lipforcing.vae.streaming` run; that is why streaming is bit-for-bit equal to whole-clip processing.

Temporal resampling (what the causal caches must reproduce):

* downsample3d (encoder), input frames x0 x1 x2 ...::

      out0 = x0                 (frame 0 passes through: the first frame is an image)
      out_i = conv(x_{2i-2}, x_{2i-1}, x_{2i})      i >= 1   (3 taps, stride 2, no padding)

* upsample3d (decoder), input frames y0 y1 y2 ...::

      out = [y0] + interleave(causal_conv(y1, y2, ...))     (zero history before y1; each frame -> 2 frames)

So ``1 + 4k`` video frames <-> ``1 + k`` latent frames with Wan2.1's two temporal stages.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lipforcing.vae.config import VAEConfig

State = Optional[dict]
"""Streaming state: ``None`` = the call holds the whole sequence; a dict (keyed by module) = carry caches."""

__all__ = ["CausalConv3d", "RMS_norm", "Resample", "ResidualBlock", "AttentionBlock", "Encoder3d", "Decoder3d",
           "WanVAE"]


class CausalConv3d(nn.Conv3d):
    """3-D convolution padded on the past side of time only (and symmetrically in space).

    ``padding=(pt, ph, pw)`` follows ``nn.Conv3d`` but the time padding becomes ``2 * pt`` frames in front and
    none behind.  With a ``state`` dict the last ``2 * pt`` input frames are remembered under ``state[self]`` and
    used instead of zeros on the next call (fewer than that at the start: the rest is zero padding), so feeding a
    sequence in pieces equals feeding it at once.  Kernels with no time padding keep no state.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = padding if isinstance(padding, (tuple, list)) else (padding,) * 3
        self.context = 2 * pt                       # frames of history the kernel looks back
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        have = 0
        if self.context and state is not None:
            prev = state.get(self)
            if prev is not None:
                x = torch.cat([prev, x], dim=2)
                have = prev.shape[2]
            # clone: keep only the tail, not the whole activation, alive
            state[self] = x[:, :, -self.context:].clone()
        x = F.pad(x, self.space_pad + (self.context - have, 0))
        return F.conv3d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class RMS_norm(nn.Module):  # noqa: N801  (official name)
    """``x / ||x||_2 * sqrt(dim) * gamma (+ bias)`` over the channel axis (dim 1).

    ``images=False``: 5-D input, gamma (dim, 1, 1, 1); ``images=True``: 4-D input, gamma (dim, 1, 1).
    """

    def __init__(self, dim: int, channel_first: bool = True, images: bool = True, bias: bool = False):
        super().__init__()
        tail = (1, 1) if images else (1, 1, 1)
        shape = (dim, *tail) if channel_first else (dim,)
        self.channel_first = channel_first
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x, dim=1 if self.channel_first else -1) * self.scale * self.gamma
        return y if self.bias is None else y + self.bias


class Upsample(nn.Upsample):
    """Nearest-exact 2-D upsampling computed in float32 (exact: it only copies values; bf16 support)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


def _per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D module to every frame: (B, C, T, H, W) -> fn((B*T, C, H, W)) -> (B, C', T, H', W')."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class Resample(nn.Module):
    """Spatial 2x up/down-sampling, optionally with a causal temporal 2x stage (see the module docstring).

    mode: ``"upsample2d"``, ``"upsample3d"`` (channels dim -> dim // 2), ``"downsample2d"``, ``"downsample3d"``
    (channels kept) or ``"none"``.
    """

    MODES = ("none", "upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        super().__init__()
        self.dim = dim
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode.startswith("downsample"):
            # pad right/bottom by one, 3x3 stride 2: H -> H / 2 for even H
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        else:
            self.resample = nn.Identity()
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def _time_up(self, x: torch.Tensor, state: State) -> torch.Tensor:
        started = state is not None and self in state
        head = None
        if not started:
            head, x = x[:, :, :1], x[:, :, 1:]          # frame 0 is not upsampled in time
            if state is not None:
                state[self] = True
        if x.shape[2] == 0:
            return head
        b, c, t, h, w = x.shape
        y = self.time_conv(x, state)                     # (B, 2C, T, H, W), zero history before frame 1
        # channel group j of step t becomes output frame 2t + j
        y = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return y if head is None else torch.cat([head, y], dim=2)

    def _time_down(self, x: torch.Tensor, state: State) -> torch.Tensor:
        prev = state.get(self) if state is not None else None
        t = x.shape[2]
        if prev is None:
            if t % 2 != 1:
                raise RuntimeError(f"downsample3d: the first piece must have an odd frame count, got {t}")
            out = x[:, :, :1]                            # frame 0 passes through
            if t >= 3:
                out = torch.cat([out, self.time_conv(x)], dim=2)
        else:
            if t % 2 != 0:
                raise RuntimeError(f"downsample3d: later pieces must have an even frame count, got {t}")
            out = self.time_conv(torch.cat([prev, x], dim=2))
        if state is not None:
            state[self] = x[:, :, -1:].clone()
        return out

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, state)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._time_down(x, state)
        return x


class ResidualBlock(nn.Module):
    """``shortcut(x) + conv(silu(norm(conv(silu(norm(x))))))`` with causal 3x3x3 convs.

    ``residual`` indices match Wan's: 0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout, 6 conv.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, state) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no mixing across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)        # the block starts as the identity (as in Wan)

    def _frame_attention(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)      # (N, HW, 3C): q | k | v channels
        q, k, v = qkv.unsqueeze(1).split(c, dim=-1)                      # (N, 1, HW, C) each
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        return x + _per_frame(self._frame_attention, x)


def _run(layers, x: torch.Tensor, state: State) -> torch.Tensor:
    for layer in layers:
        x = layer(x, state) if isinstance(layer, (CausalConv3d, ResidualBlock, AttentionBlock, Resample)) \
            else layer(x)
    return x


class Encoder3d(nn.Module):
    """Video (B, 3, 1 + 4k, H, W) -> (B, z_dim, 1 + k, H / 8, W / 8) with Wan2.1's stages.

    ``z_dim`` here is the head's output width (the VAE passes ``2 * z``: mean and log-variance).
    """

    def __init__(self, dim=128, z_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_downsample=(True, True, False), dropout=0.0):
        super().__init__()
        self.dim = dim
        self.z_dim = z_dim
        dims = [dim * u for u in (1, *dim_mult)]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(cin, cout, dropout))
                if scale in attn_scales:
                    layers.append(AttentionBlock(cout))
                cin = cout
            if i != len(dim_mult) - 1:
                layers.append(Resample(cout, "downsample3d" if temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c, dropout), AttentionBlock(c), ResidualBlock(c, c, dropout))
        self.head = nn.Sequential(RMS_norm(c, images=False), nn.SiLU(), CausalConv3d(c, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        x = self.conv1(x, state)
        x = _run(self.downsamples, x, state)
        x = _run(self.middle, x, state)
        return _run(self.head, x, state)


class Decoder3d(nn.Module):
    """Latents (B, z_dim, 1 + k, h, w) -> video (B, 3, 1 + 4k, 8h, 8w) (before clamping)."""

    def __init__(self, dim=128, z_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_upsample=(False, True, True), dropout=0.0):
        super().__init__()
        self.dim = dim
        self.z_dim = z_dim
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], dropout))
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2           # every upsampler halves the channels it emits
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout, dropout))
                if scale in attn_scales:
                    layers.append(AttentionBlock(cout))
                cin = cout
            if i != len(dim_mult) - 1:
                layers.append(Resample(cout, "upsample3d" if temperal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        c = dims[-1]
        self.head = nn.Sequential(RMS_norm(c, images=False), nn.SiLU(), CausalConv3d(c, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, state: State = None) -> torch.Tensor:
        x = self.conv1(x, state)
        x = _run(self.middle, x, state)
        x = _run(self.upsamples, x, state)
        return _run(self.head, x, state)


def _detach_state(state: dict) -> None:
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            state[k] = v.detach()


class WanVAE(nn.Module):
    """Wan2.1 VAE with whole-clip and streaming encode/decode.

    The state dict is exactly the official one (``encoder.*``, ``conv1.*``, ``conv2.*``, ``decoder.*``); the
    latent statistics are non-persistent buffers taken from the config.  A different decoder (e.g. a small
    TAEHV-style network) can be plugged in with :meth:`set_decoder`; the Wan decoder stays loaded.

    Video tensors are (B, 3, T, H, W) in [-1, 1] with T = 1 + 4k and H, W multiples of 8; latents are
    (B, z_dim, 1 + k, H / 8, W / 8).  Outputs have the dtype of the VAE's parameters.  Set ``check_inputs =
    False`` to skip the value-range check of video inputs (the only check that reads tensor values, i.e. that
    synchronises with a GPU).
    """

    def __init__(self, config: VAEConfig | str | None = None):
        super().__init__()
        if config is None:
            config = VAEConfig()
        elif isinstance(config, str):
            config = VAEConfig.from_name(config)
        elif not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig, a preset name or None, got {type(config).__name__}")
        self.config = config
        c = config
        self.z_dim = c.z_dim
        self.encoder = Encoder3d(c.dim, c.z_dim * 2, c.dim_mult, c.num_res_blocks, c.attn_scales,
                                 c.temporal_downsample, c.dropout)
        self.conv1 = CausalConv3d(c.z_dim * 2, c.z_dim * 2, 1)
        self.conv2 = CausalConv3d(c.z_dim, c.z_dim, 1)
        self.decoder = Decoder3d(c.dim, c.z_dim, c.dim_mult, c.num_res_blocks, c.attn_scales,
                                 c.temporal_downsample[::-1], c.dropout)
        self._init_stats()
        self.fast_decoder: Optional[nn.Module] = None
        self.check_inputs = True

    def _init_stats(self, device=None) -> None:
        # Non-persistent: not part of Wan's checkpoint.  `.to(dtype)` casts them with the weights, which is harmless
        # (the constants have 4-5 significant digits).
        self.register_buffer("latents_mean", torch.tensor(self.config.latents_mean, device=device),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(self.config.latents_std, device=device),
                             persistent=False)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    # ------------------------------------------------------------------------------------------ normalisation
    def _stat(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return getattr(self, name).to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)

    def normalize_latents(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw latent mean -> what the DiT sees: ``(mu - mean) * (1 / std)`` per channel (Wan's formula)."""
        return (mu - self._stat("latents_mean", mu)) * (1.0 / self._stat("latents_std", mu))

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize_latents`: ``z / (1 / std) + mean``."""
        return z / (1.0 / self._stat("latents_std", z)) + self._stat("latents_mean", z)

    # --------------------------------------------------------------------------------------------- raw steps
    def _encode_step(self, frames: torch.Tensor, state: dict) -> torch.Tensor:
        """Encoder + ``conv1`` on the next frames of a clip; returns the raw latent mean of those frames."""
        h = self.conv1(self.encoder(frames, state))
        return h[:, : self.z_dim]

    def _decode_step(self, z: torch.Tensor, state: dict) -> torch.Tensor:
        """``conv2`` + decoder on the next raw latent frames; returns video frames (not clamped)."""
        return self.decoder(self.conv2(z), state)

    # ----------------------------------------------------------------------------------------- public methods
    def stream_encoder(self, *, normalize: bool = True, frames_per_step: int | None = None):
        """A :class:`~lipforcing.vae.streaming.StreamEncoder` over this VAE (see there)."""
        from lipforcing.vae.streaming import StreamEncoder

        return StreamEncoder(self, normalize=normalize, frames_per_step=frames_per_step)

    def stream_decoder(self, *, normalize: bool = True, latents_per_step: int | None = None):
        """A :class:`~lipforcing.vae.streaming.StreamDecoder` over this VAE (and its plugged decoder, if any)."""
        from lipforcing.vae.streaming import StreamDecoder

        return StreamDecoder(self, normalize=normalize, latents_per_step=latents_per_step)

    def encode(self, video: torch.Tensor, normalize: bool = True, *,
               frames_per_step: int | None = None) -> torch.Tensor:
        """Encode a whole clip to its latent mean.

        video: (B, 3, 1 + 4k, H, W) float in [-1, 1], H and W multiples of 8.
        Returns (B, z_dim, 1 + k, H / 8, W / 8) in the VAE's dtype; ``normalize=True`` applies the per-channel
        ``(mu - mean) / std`` (what the DiT expects), ``False`` returns the raw mean.
        ``frames_per_step``: frames per internal encoder call after frame 0 (multiple of 4; default 4, Wan's).
        Gradients flow through this method (the streaming objects detach their caches instead).
        """
        enc = self.stream_encoder(normalize=normalize, frames_per_step=frames_per_step)
        enc._detach = False
        return enc.encode(video)

    def decode(self, latents: torch.Tensor, normalize: bool = True, *,
               latents_per_step: int | None = None) -> torch.Tensor:
        """Decode a whole clip of latents to video in [-1, 1] (clamped).

        latents: (B, z_dim, 1 + k, h, w) float; ``normalize=True`` means they are normalised (DiT space) and
        are mapped back with ``z * std + mean`` first.  Returns (B, 3, 1 + 4k, 8h, 8w) in the VAE's dtype.
        ``latents_per_step``: latent frames per internal decoder call (default 1, Wan's).
        """
        dec = self.stream_decoder(normalize=normalize, latents_per_step=latents_per_step)
        dec._detach = False
        return dec.decode(latents)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction with the latent mean: ``decode(encode(video, False), False)``."""
        return self.decode(self.encode(video, normalize=False), normalize=False)

    # -------------------------------------------------------------------------------------- pluggable decoder
    def set_decoder(self, decoder: Optional[nn.Module]) -> None:
        """Use ``decoder`` for :meth:`decode` and :meth:`stream_decoder` (``None``: back to the Wan decoder).

        The object must follow :class:`~lipforcing.vae.streaming.LatentDecoder`: ``decoder.stream()`` returns an
        object whose ``decode(z)`` maps the next *raw* latent frames (B, z_dim, n, h, w) to their video frames
        (the first latent frame of a stream -> 1 frame, each later one -> 4), causally.  An ``nn.Module`` is
        registered as the submodule ``fast_decoder`` (so ``.to()`` moves it and its weights appear under
        ``fast_decoder.*`` in the state dict).
        """
        if decoder is not None and not callable(getattr(decoder, "stream", None)):
            raise TypeError(f"decoder must have a stream() method returning an object with decode(z); got "
                            f"{type(decoder).__name__}")
        if isinstance(decoder, nn.Module) or decoder is None:
            self.fast_decoder = decoder
        else:
            self.__dict__.pop("fast_decoder", None)
            self._modules.pop("fast_decoder", None)
            object.__setattr__(self, "fast_decoder", decoder)

    def _open_decoder(self) -> Any:
        """An object with ``decode(z_raw) -> frames`` holding fresh causal state."""
        if self.fast_decoder is not None:
            return self.fast_decoder.stream()
        return _WanDecoderStream(self)

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, z_dim={c.z_dim}, dim_mult={c.dim_mult}, num_res_blocks={c.num_res_blocks}, "
                f"temporal_downsample={c.temporal_downsample}")


class _WanDecoderStream:
    """The Wan decoder as a :class:`~lipforcing.vae.streaming.DecoderStream`."""

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.state: dict = {}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae._decode_step(z, self.state)

    def detach_(self) -> None:
        _detach_state(self.state)
