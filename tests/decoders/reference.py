"""Helpers of the TAEHV decoder tests: random weights, a plain frame-by-frame float64 reference written from the
architecture description (the oracle), and a batch-invariant convolution switch."""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from lipforcing.decoders import TAEHV
from lipforcing.decoders.taehv import Clamp, MemBlock, TGrow, TPool


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights with unit-ish gain everywhere (biases too), so every tensor influences the output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) * (2.0 / p[0].numel()) ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
        if isinstance(model, TAEHV):
            # Activations grow through the residual MemBlocks: scale the last conv so the output pixels have a
            # spread of about 0.25 around 0.5, i.e. mostly inside (0, 1) where the final clamp hides nothing.
            from lipforcing.decoders.taehv import run_layers

            last = model.decoder[-1]
            probe, _ = run_layers(model.decoder[:-1], 2 * torch.randn(2, 16, 3, 3, dtype=last.weight.dtype), 1, 2)
            spread = F.conv2d(probe, last.weight, padding=1).std()
            last.weight.mul_(0.25 / spread)
            last.bias.copy_(0.5 + 0.05 * torch.randn_like(last.bias))
    return model


@contextlib.contextmanager
def exact_conv():
    """PyTorch's own CPU convolution (im2col + GEMM per image): results do not depend on the batch size.
    oneDNN (and NNPACK, used from batch 16) pick algorithms by batch size, which may change the last bits between
    batch 1 and batch n."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN.*")
        with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
            yield


# ------------------------------------------------------------------------------ plain reference (the oracle)
def _conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                    stride=conv.stride, padding=conv.padding)


def _memblock(block: MemBlock, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    h = _conv(block.conv[0], torch.cat([x, past], dim=1)).relu()
    h = _conv(block.conv[2], h).relu()
    h = _conv(block.conv[4], h)
    skip = x if isinstance(block.skip, torch.nn.Identity) else _conv(block.skip, x)
    return (h + skip).relu()


def reference_run(layers, frames: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run a layer list frame by frame in float64 with explicit memories: ``frames`` is a list over time of
    (N, C, H, W) tensors; returns the output frames in time order."""
    for layer in layers:
        if isinstance(layer, MemBlock):
            out, past = [], torch.zeros_like(frames[0])
            for x in frames:
                out.append(_memblock(layer, x, past))
                past = x
            frames = out
        elif isinstance(layer, TPool):
            s = layer.stride
            frames = [_conv(layer.conv, torch.cat(frames[i: i + s], dim=1)) for i in range(0, len(frames), s)]
        elif isinstance(layer, TGrow):
            s = layer.stride
            grown = []
            for x in frames:
                y = _conv(layer.conv, x)
                grown += list(y.chunk(s, dim=1))      # channel group k -> the k-th new frame
            frames = grown
        elif isinstance(layer, Clamp):
            frames = [torch.tanh(x.double() / 3) * 3 for x in frames]
        elif isinstance(layer, torch.nn.Conv2d):
            frames = [_conv(layer, x) for x in frames]
        elif isinstance(layer, torch.nn.ReLU):
            frames = [x.relu() for x in frames]
        elif isinstance(layer, torch.nn.Identity):
            pass
        elif isinstance(layer, torch.nn.Upsample):
            frames = [x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) for x in frames]
        else:
            raise AssertionError(f"unexpected layer {layer}")
    return frames


def reference_decode(model: TAEHV, latents: torch.Tensor) -> torch.Tensor:
    """latents (N, T, C, h, w) raw -> (N, 4T - 3, 3, 8h, 8w) in [0, 1], float64."""
    frames = reference_run(model.decoder, list(latents.double().unbind(1)))
    return torch.stack(frames, dim=1).clamp(0, 1)[:, 3:]


def reference_encode(model: TAEHV, frames: torch.Tensor) -> torch.Tensor:
    """frames (N, 4k, 3, H, W) -> (N, k, C, H/8, W/8), float64."""
    return torch.stack(reference_run(model.encoder, list(frames.double().unbind(1))), dim=1)
