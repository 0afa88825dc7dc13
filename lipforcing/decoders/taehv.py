"""A TAEHV-compatible tiny video autoencoder (the architecture of the public ``taew2_1`` weights for Wan 2.1).

The state-dict key names are those of the public checkpoint (``encoder.N.*``, ``decoder.N.*``), so ``taew2_1.pth``
and ``taew2_1.safetensors`` load unchanged (see :mod:`lipforcing.decoders.loading`).  Layout inside the network is
(N, T, C, H, W); pixels are in [0, 1]; latents are the *raw* Wan 2.1 latents (no per-channel mean/std
normalisation, unlike what the DiT sees: :class:`~lipforcing.decoders.streaming.TAEHVStreamDecoder` maps between
the two).

Building blocks (every conv is 2-D, applied to each frame; time enters only through MemBlock, TPool and TGrow)::

    MemBlock(Cin, Cout):  y_t = ReLU( conv4(ReLU(conv2(ReLU(conv0([x_t, x_{t-1}]))))) + skip(x_t) )
                          x_{-1} = 0; skip = 1x1 conv (no bias) if Cin != Cout else identity
    TPool(C, s):          frames t*s .. t*s+s-1 stacked along channels (earliest first) -> 1x1 conv s*C -> C
    TGrow(C, s):          1x1 conv C -> s*C, channel group k -> output frame t*s + k

Decoder (indices = state-dict indices), per latent frame: tanh-clamp, conv 16->W0, 3 MemBlocks, then three times
[nearest 2x upsample, TGrow, conv to the next width, 3 MemBlocks] with time strides (1, 2, 2), then conv + ReLU +
conv to RGB.  One latent frame gives 4 frames; the first 3 frames of a stream are dropped, so 1 + k latents give
1 + 4k frames like the Wan VAE.  Everything is causal: frame outputs for latent t depend on latents <= t only,
which is what makes the streaming decoder exact.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["TAEHVConfig", "TAEHV", "MemBlock", "TPool", "TGrow", "Clamp", "run_layers"]


@dataclass(frozen=True)
class TAEHVConfig:
    """Widths of a TAEHV network.

    latent_channels : latent channels (Wan 2.1: 16).
    encoder_width : channels of every encoder stage (taew2_1: 64).
    decoder_widths : channels of the decoder's four resolutions, coarsest first (taew2_1: 256, 128, 64, 64);
        the last one is the width of the final full-resolution conv.
    spatial_upscale : per decoder stage (coarsest first), whether it doubles height and width (taew2_1: all
        three, 8x).  A stage without it has an identity in place of the upsample (same state-dict keys; the
        encoder's matching conv has stride 1), e.g. ``(False, True, True)`` for a 4x VAE.  Not visible in the
        weights: :func:`~lipforcing.decoders.save_decoder` stores it in the safetensors metadata.
    """

    latent_channels: int = 16
    encoder_width: int = 64
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    spatial_upscale: tuple[bool, bool, bool] = (True, True, True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder_widths", tuple(self.decoder_widths))
        ups = tuple(self.spatial_upscale)
        if len(ups) != 3 or not all(isinstance(u, bool) for u in ups):
            raise ValueError(f"TAEHVConfig.spatial_upscale must be 3 bools, got {self.spatial_upscale!r}")
        object.__setattr__(self, "spatial_upscale", ups)
        for name, v in (("latent_channels", self.latent_channels), ("encoder_width", self.encoder_width),
                        *((f"decoder_widths[{i}]", w) for i, w in enumerate(self.decoder_widths))):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TAEHVConfig.{name} must be a positive int, got {v!r}")
        if len(self.decoder_widths) != 4:
            raise ValueError(f"TAEHVConfig.decoder_widths must have 4 entries, got {self.decoder_widths}")

    # fixed by the architecture
    temporal_factor = 4
    encoder_time_strides = (2, 2, 1)
    decoder_time_strides = (1, 2, 2)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height and width (taew2_1: 8)."""
        return 2 ** sum(self.spatial_upscale)

    @classmethod
    def for_spatial_factor(cls, factor: int, **fields) -> "TAEHVConfig":
        """A config whose decoder upsamples ``factor`` (1, 2, 4 or 8) times: the coarsest stages skip theirs."""
        n = {1: 0, 2: 1, 4: 2, 8: 3}.get(factor)
        if n is None:
            raise ValueError(f"TAEHV supports spatial factors 1, 2, 4 and 8, got {factor!r}")
        return cls(spatial_upscale=tuple(i >= 3 - n for i in range(3)), **fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def frames_to_trim(self) -> int:
        """Frames dropped at the start of a decoded stream (temporal factor - 1)."""
        return self.temporal_factor - 1

    @classmethod
    def from_name(cls, name: str) -> "TAEHVConfig":
        """``"taew2_1"`` (the public Wan 2.1 weights; also ``"taehv"``) or ``"tiny"`` (tests, embedded default)."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        key = name.lower().replace("-", "_").replace(".", "_")
        if key in ("taew2_1", "taehv", "default"):
            return cls()
        if key == "tiny":
            return cls(encoder_width=16, decoder_widths=(32, 16, 16, 16))
        raise ValueError(f"unknown TAEHV preset {name!r}; expected 'taew2_1' or 'tiny'")

    def replace(self, **changes) -> "TAEHVConfig":
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------------- blocks
def _conv(n_in: int, n_out: int, *, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # keep channels-last activations channels-last through the reshapes of TPool/TGrow
    if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): ``tanh(x / 3) * 3``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block that also sees its own input one time step earlier.

    ``forward(x, past)``: x, past (M, n_in, H, W) (M = frames, each row's ``past`` is the previous frame's ``x``)
    -> (M, n_out, H, W).  The time bookkeeping (building ``past``) is done by :func:`run_layers`.
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(),
                                  _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TPool(nn.Module):
    """Temporal s-to-1 pooling: ``forward(x)`` (N*T, C, H, W) with T % s == 0 -> (N*T/s, C, H, W)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, c, h, w = x.shape
        fmt = _memory_format(x)
        # rows t*s .. t*s+s-1 are consecutive: merging them into the channel dim puts the earliest first
        x = x.reshape(m // self.stride, self.stride * c, h, w).contiguous(memory_format=fmt)
        return self.conv(x)


class TGrow(nn.Module):
    """Temporal 1-to-s growth: ``forward(x)`` (N*T, C, H, W) -> (N*T*s, C, H, W), channel group k -> frame t*s+k."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = _memory_format(x)
        y = self.conv(x)
        if self.stride == 1:
            return y
        m, _, h, w = y.shape
        return y.reshape(m * self.stride, -1, h, w).contiguous(memory_format=fmt)


def _past(x: torch.Tensor, n: int, t: int, first: Optional[torch.Tensor]) -> torch.Tensor:
    """For x (n*t, C, H, W) (sample-major), the previous frame of every row: ``first[b]`` (zeros if None) for
    t = 0, else row - 1."""
    if first is None:
        first = x.new_zeros((n,) + tuple(x.shape[1:])).contiguous(memory_format=_memory_format(x))
    pieces = []
    for b in range(n):
        pieces.append(first[b: b + 1])
        if t > 1:
            pieces.append(x[b * t: b * t + t - 1])
    return torch.cat(pieces, dim=0)


def run_layers(layers: nn.Sequential, x: torch.Tensor, n: int, t: int,
               state: Optional[list[torch.Tensor]] = None) -> tuple[torch.Tensor, int]:
    """Run an encoder/decoder layer list on ``x`` (n*t, C, H, W), frames sample-major (row = b*t + i).

    ``state``: one tensor (n, C_k, H_k, W_k) per MemBlock, the block's input at the frame before ``x[0]``; read
    as the first ``past`` and overwritten in place with the block's last input (so the stream's state tensors
    keep their storage).  ``None``: zeros (the start of a clip), nothing kept.  Returns (output, frames per
    sample)."""
    k = 0
    for layer in layers:
        if isinstance(layer, MemBlock):
            first = None if state is None else state[k]
            past = _past(x, n, t, first)
            if state is not None:
                state[k].copy_(x[t - 1:: t].detach())
            x = layer(x, past)
            k += 1
        elif isinstance(layer, TPool):
            if t % layer.stride:
                raise ValueError(f"TPool needs a multiple of {layer.stride} frames per sample, got {t}")
            x = layer(x)
            t //= layer.stride
        elif isinstance(layer, TGrow):
            x = layer(x)
            t *= layer.stride
        else:
            x = layer(x)
    return x, t


# ------------------------------------------------------------------------------------------------- network
class TAEHV(nn.Module):
    """TAEHV tiny video autoencoder with the public checkpoint's module tree.

    ``decode_video(latents)``: (N, T, C_lat, h, w) raw latents -> (N, 4T - 3, 3, 8h, 8w) pixels in [0, 1] (8 =
    the spatial factor of the public weights; see ``TAEHVConfig.spatial_upscale``).
    ``encode_video(frames)``: (N, T, 3, H, W) pixels in [0, 1], T = 4k or 1 + 4k -> (N, k or 1 + k, C_lat, H/8,
    W/8) raw latents.  ``stream()``: a fresh :class:`~lipforcing.decoders.streaming.TAEHVStreamDecoder` on raw
    latents, so the model can also be plugged into a Wan VAE with ``vae.set_decoder(model)``.
    """

    def __init__(self, config: TAEHVConfig | str | None = None):
        super().__init__()
        if config is None:
            config = TAEHVConfig()
        elif isinstance(config, str):
            config = TAEHVConfig.from_name(config)
        elif not isinstance(config, TAEHVConfig):
            raise TypeError(f"config must be a TAEHVConfig, a preset name or None, got {type(config).__name__}")
        self.config = config
        c, e = config.latent_channels, config.encoder_width
        enc: list[nn.Module] = [_conv(3, e), nn.ReLU()]
        for s, down in zip(config.encoder_time_strides, config.spatial_upscale[::-1]):
            enc += [TPool(e, s), _conv(e, e, stride=2 if down else 1, bias=False), MemBlock(e, e), MemBlock(e, e),
                    MemBlock(e, e)]
        enc.append(_conv(e, c))
        self.encoder = nn.Sequential(*enc)

        w = config.decoder_widths
        dec: list[nn.Module] = [Clamp(), _conv(c, w[0]), nn.ReLU(), MemBlock(w[0], w[0]), MemBlock(w[0], w[0]),
                                MemBlock(w[0], w[0])]
        for i, s in enumerate(config.decoder_time_strides):
            up = nn.Upsample(scale_factor=2) if config.spatial_upscale[i] else nn.Identity()
            dec += [up, TGrow(w[i], s), _conv(w[i], w[i + 1], bias=False)]
            if i < 2:
                dec += [MemBlock(w[i + 1], w[i + 1]) for _ in range(3)]
            else:
                dec.append(nn.ReLU())
        dec.append(_conv(w[3], 3))
        self.decoder = nn.Sequential(*dec)

    # ------------------------------------------------------------------------------------------- properties
    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    def decoder_memblocks(self) -> list[MemBlock]:
        return [m for m in self.decoder if isinstance(m, MemBlock)]

    def decoder_state_shapes(self, n: int, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """Shapes of the streaming decoder's state (one frame per MemBlock) for n streams of h x w latents."""
        shapes, scale = [], 1
        for layer in self.decoder:
            if isinstance(layer, nn.Upsample):
                scale *= 2
            elif isinstance(layer, MemBlock):
                shapes.append((n, layer.conv[0].in_channels // 2, h * scale, w * scale))
        return shapes

    def decode_macs_per_latent(self, h: int, w: int) -> int:
        """Multiply-accumulates of the decoder for one latent frame of h x w (4 output frames)."""
        macs, scale, frames = 0, 1, 1
        for layer in self.decoder:
            if isinstance(layer, nn.Upsample):
                scale *= 2
                continue
            convs = [layer] if isinstance(layer, nn.Conv2d) else [m for m in layer.modules()
                                                                   if isinstance(m, nn.Conv2d)]
            for conv in convs:
                k = conv.kernel_size[0] * conv.kernel_size[1]
                macs += conv.in_channels * conv.out_channels * k * (h * scale) * (w * scale) * frames
            if isinstance(layer, TGrow):
                frames *= layer.stride
        return macs

    # ------------------------------------------------------------------------------------------- decode
    def _check_latents(self, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.dim() != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"latents must be (N, T, {self.latent_channels}, h, w) raw latents, got shape "
                             f"{tuple(latents.shape)}")
        if not latents.is_floating_point():
            raise TypeError(f"latents must be floating point, got {latents.dtype}")
        if min(latents.shape[0], latents.shape[1], latents.shape[3], latents.shape[4]) == 0:
            raise ValueError(f"latents must be non-empty, got shape {tuple(latents.shape)}")

    def decode_video(self, latents: torch.Tensor, *, parallel: bool = True, clamp: bool = True) -> torch.Tensor:
        """Decode a whole clip: latents (N, T, C_lat, h, w) *raw* (not mean/std normalised) -> frames
        (N, 4T - 3, 3, 8h, 8w) in [0, 1] in the model's dtype.

        ``parallel=True`` runs every frame of a layer as one batch (each MemBlock's memory is its input shifted
        by one frame); ``parallel=False`` feeds one latent at a time through the streaming decoder.  Both give
        the same frames (bit-equal in fp32 with a batch-invariant convolution, e.g. PyTorch's own CPU
        convolution with oneDNN and NNPACK off; within float rounding otherwise).  ``clamp=False`` (parallel only)
        skips the final clamp to [0, 1] (for training losses, whose gradient the clamp would cut)."""
        self._check_latents(latents)
        n, t, c, h, w = latents.shape
        if not parallel:
            from lipforcing.decoders.streaming import TAEHVStreamDecoder

            if latents.device != self.device:
                raise ValueError(f"latents are on {latents.device} but the model is on {self.device}")
            dec = TAEHVStreamDecoder(self, normalize=False, latents_per_step=1)
            dec._prepare(n, h, w, latents.device)
            return dec._decode_unit(latents.to(self.dtype))
        x = latents.to(self.dtype).reshape(n * t, c, h, w)
        if _memory_format(self.decoder[1].weight) == torch.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y, t_out = run_layers(self.decoder, x, n, t)
        if clamp:
            y = y.clamp(0, 1)
        y = y.reshape(n, t_out, 3, y.shape[-2], y.shape[-1])
        return y[:, self.config.frames_to_trim:]

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode a clip: frames (N, T, 3, H, W) in [0, 1], H and W multiples of the spatial factor s (8), T = 4k
        (-> k latents) or 1 + 4k (frame 0 is repeated 3 times first, mirroring the 3 frames the decoder drops ->
        1 + k latents).  Returns raw latents (N, T', C_lat, H/s, W/s).  (The engine encodes with the Wan VAE;
        this is here so the whole checkpoint is usable.)"""
        if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[2] != 3:
            got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ValueError(f"frames must be (N, T, 3, H, W) in [0, 1], got {got}")
        n, t, _, h, w = frames.shape
        f, sf = self.config.temporal_factor, self.config.spatial_factor
        if h % sf or w % sf or h == 0 or w == 0:
            raise ValueError(f"frames height and width must be positive multiples of {sf}, got {h}x{w}")
        if t == 0 or t % f not in (0, 1):
            raise ValueError(f"frames must have 4k or 1 + 4k frames (k >= 1 for 4k), got {t}")
        x = frames.to(self.dtype)
        if t % f == 1:
            x = torch.cat([x[:, :1].expand(n, f - 1, 3, h, w), x], dim=1)
            t += f - 1
        y, t_out = run_layers(self.encoder, x.reshape(n * t, 3, h, w), n, t)
        return y.reshape(n, t_out, *y.shape[1:])

    def stream(self):
        """A fresh streaming decoder on *raw* latents with [-1, 1] output (the Wan VAE's ``LatentDecoder``
        interface, for ``vae.set_decoder(model)``)."""
        from lipforcing.decoders.streaming import TAEHVStreamDecoder

        return TAEHVStreamDecoder(self, normalize=False)

    def extra_repr(self) -> str:
        c = self.config
        return (f"latent_channels={c.latent_channels}, encoder_width={c.encoder_width}, "
                f"decoder_widths={c.decoder_widths}, spatial_upscale={c.spatial_upscale}")
