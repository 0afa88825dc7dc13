"""Loading and saving TAEHV checkpoints with the public key names (``taew2_1.pth`` / ``taew2_1.safetensors``).

``.pth`` / ``.pt`` files are read only through ``torch.load(weights_only=True)``; ``.safetensors`` through
safetensors.  The widths are read off the weight shapes (so the public ``taew2_1`` file and the ``tiny`` checkpoints
written by ``lipforcing train --stage decoder`` both load), then every key and shape is checked against the
network built from them.  Files that are not TAEHV checkpoints (a Wan VAE, a DiT, a truncated file, wrong shapes,
NaN/inf weights) raise :class:`~lipforcing._weights.CheckpointError` (a ``ValueError``) naming the file and what is
wrong; the file is opened by :mod:`lipforcing._weights`, the project's one safe weight-file reader.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import torch

from lipforcing._weights import CheckpointError, check_finite, read_safetensors, read_torch_file, regular_file
from lipforcing.decoders.taehv import TAEHV, TAEHVConfig

__all__ = ["load_decoder", "save_decoder", "read_checkpoint", "infer_config", "config_metadata"]

CONFIG_METADATA_KEY = "taehv_config"     # safetensors metadata: the TAEHVConfig as JSON (spatial_upscale is not
                                         # visible in the weights)

_WHAT = "decoder checkpoint"             # how the shared reader's messages name the file
_LIST_CAP = 8
_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# (key, dim) -> which width it gives; every one must be present in a TAEHV checkpoint
_WIDTH_KEYS = {
    "latent_channels": ("decoder.1.weight", 1),
    "encoder_width": ("encoder.0.weight", 0),
    "w0": ("decoder.1.weight", 0),
    "w1": ("decoder.8.weight", 0),
    "w2": ("decoder.14.weight", 0),
    "w3": ("decoder.20.weight", 0),
}


def _listing(keys) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - _LIST_CAP} more)" if len(keys) > _LIST_CAP else ""
    return ", ".join(keys[:_LIST_CAP]) + more


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a ``.safetensors`` or ``.pth``/``.pt`` file (on the CPU) and the safetensors metadata
    (empty for ``.pth``), with errors naming the file.

    The file itself is opened by :mod:`lipforcing._weights` (missing -> ``FileNotFoundError``; a folder, FIFO,
    empty, truncated or pickled-object file -> :class:`CheckpointError`); this adds the suffix rule and unwraps a
    ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper."""
    path = os.fspath(path)
    regular_file(path, _WHAT)
    lower = path.lower()
    if lower.endswith(".safetensors"):
        return read_safetensors(path, _WHAT)
    if not lower.endswith(_TORCH_SUFFIXES):
        raise CheckpointError(f"{_WHAT} {path}: unsupported file type; expected .safetensors or .pth/.pt")
    sd = read_torch_file(path, _WHAT)
    if isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = sd.get("state_dict", sd.get("model"))
        if isinstance(inner, Mapping):
            sd = inner
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{_WHAT} {path} does not hold a state dict (got {type(sd).__name__})")
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{_WHAT} {path}: entries that are not tensors: {_listing(map(str, not_tensors))}")
    return dict(sd), {}


def _kind_hint(sd: Mapping[str, torch.Tensor]) -> str:
    keys = set(sd)
    if {"conv1.weight", "conv2.weight"} & keys or any(k.startswith(("encoder.downsamples.", "decoder.upsamples.",
                                                                       "encoder.conv1.", "decoder.head."))
                                                      for k in keys):
        return " It looks like a Wan VAE checkpoint: load it with lipforcing.load_vae."
    if any(k.startswith(("patch_embedding.", "blocks.", "model.diffusion_model.")) for k in keys):
        return " It looks like a diffusion model (DiT) checkpoint: load it with lipforcing.load_model."
    if any(k.startswith(("post_quant_conv.", "quant_conv.")) for k in keys):
        return " It looks like a diffusers VAE: load it with lipforcing.load_vae."
    return ""


def infer_config(sd: Mapping[str, torch.Tensor], path: str = "<state dict>",
                 metadata: Mapping[str, str] | None = None) -> TAEHVConfig:
    """The :class:`TAEHVConfig` whose network has these weights' widths (checked fully by :func:`load_decoder`);
    ``spatial_upscale`` from the metadata :func:`save_decoder` writes, else all stages (8x, like taew2_1)."""
    missing = [key for key, _ in _WIDTH_KEYS.values() if key not in sd]
    if missing:
        raise CheckpointError(f"{path!r} is not a TAEHV checkpoint: missing {_listing(set(missing))} "
                              f"({len(sd)} tensors, e.g. {_listing(list(sd)[:3]) or 'none'}).{_kind_hint(sd)}")
    bad = [k for k, _ in _WIDTH_KEYS.values() if sd[k].dim() != 4]
    if bad:
        raise CheckpointError(f"{path!r} is not a TAEHV checkpoint: {_listing(set(bad))} must be 4-D conv "
                              "weights, got " + ", ".join(f"{k} {tuple(sd[k].shape)}" for k in sorted(set(bad))))
    size = {name: int(sd[key].shape[dim]) for name, (key, dim) in _WIDTH_KEYS.items()}
    ups = (True, True, True)
    if metadata and CONFIG_METADATA_KEY in metadata:
        try:
            ups = tuple(json.loads(metadata[CONFIG_METADATA_KEY])["spatial_upscale"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path!r}: unreadable {CONFIG_METADATA_KEY} metadata ({exc})") from None
    try:
        return TAEHVConfig(latent_channels=size["latent_channels"], encoder_width=size["encoder_width"],
                           decoder_widths=(size["w0"], size["w1"], size["w2"], size["w3"]), spatial_upscale=ups)
    except ValueError as exc:
        raise CheckpointError(f"{path!r}: {exc}") from None


def load_decoder(path: str | os.PathLike, *, config: TAEHVConfig | str | None = None, device=None, dtype=None,
                 channels_last: bool = False) -> TAEHV:
    """Load a TAEHV checkpoint (``taew2_1.pth`` or ``taew2_1.safetensors``, public key names unchanged).

    config : widths to build (a :class:`TAEHVConfig` or preset name); default: read off the weight shapes (and
        ``spatial_upscale`` off the metadata of files written by :func:`save_decoder` / the training stage).
    device, dtype : where and in which dtype to place the model (default CPU, float32; the public file stores
        fp16, which is upcast).  channels_last : channels-last weights (faster convolutions on a GPU).
    Returns the model in eval mode without gradients.  Raises CheckpointError (a ValueError) naming the file for
    anything that is not a TAEHV checkpoint of that configuration (missing, unexpected or mis-shaped tensors are
    listed; NaN/inf weights refused); FileNotFoundError for a missing file.
    """
    path = os.fspath(path)
    sd, meta = read_checkpoint(path)
    if config is None:
        config = infer_config(sd, path, meta)
    with torch.device("meta"):
        model = TAEHV(config)               # a TAEHVConfig or a preset name (TypeError otherwise)
    config = model.config
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = set(want) - set(sd)
    unexpected = set(sd) - set(want)
    shapes = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
        if shapes:
            parts.append("wrong shapes: " + ", ".join(f"{k} {tuple(sd[k].shape)} (expected {want[k]})"
                                                      for k in shapes[:_LIST_CAP]))
        raise CheckpointError(f"{path!r} does not match the TAEHV architecture ({config}): " + "; ".join(parts)
                              + "." + _kind_hint(sd))
    not_float = sorted(k for k, v in sd.items() if not v.is_floating_point())
    if not_float:
        raise CheckpointError(f"{path!r}: TAEHV weights must be floating point; {_listing(not_float)} are not")
    check_finite(sd, path, _WHAT)      # a NaN weight turns every frame black
    model = model.to_empty(device=device if device is not None else "cpu")
    model.load_state_dict(sd, strict=True)
    model = model.to(dtype=dtype if dtype is not None else torch.float32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)


def save_decoder(model: TAEHV, path: str | os.PathLike) -> None:
    """Write ``model``'s weights with the public key names: ``.safetensors`` (with the config in its metadata) or
    ``.pth`` (a plain state dict via ``torch.save``, like the public file; only 8x models round-trip there)."""
    if not isinstance(model, TAEHV):
        raise TypeError(f"model must be a TAEHV, got {type(model).__name__}")
    path = os.fspath(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, path, metadata=config_metadata(model.config))
    elif path.lower().endswith(_TORCH_SUFFIXES):
        torch.save(sd, path)
    else:
        raise ValueError(f"path must end in .safetensors or .pth/.pt, got {path!r}")


def config_metadata(config: TAEHVConfig) -> dict[str, str]:
    """The safetensors metadata that lets :func:`load_decoder` rebuild ``config`` exactly."""
    return {CONFIG_METADATA_KEY: json.dumps(config.to_dict())}
