"""Loading Wan2.1 VAE weights: the official checkpoint and diffusers ``AutoencoderKLWan`` folders.

Accepted ``path``:

* the official ``Wan2.1_VAE.pth`` (read with ``torch.load(weights_only=True)``) or the same state dict saved as
  ``.safetensors``.  The network's dimensions are read off the weight shapes unless ``config`` is given;
* a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, possibly sharded with an
  ``.index.json``, or ``diffusion_pytorch_model.bin``), or one of its weight files with the ``config.json`` next
  to it.  Dimensions come from ``config.json`` (``base_dim``, ``z_dim``, ``dim_mult``, ``num_res_blocks``,
  ``attn_scales``, ``temperal_downsample``, ``latents_mean``, ``latents_std``); diffusers key names are mapped to
  Wan's.

An explicit ``config`` (a :class:`VAEConfig` or a preset name) overrides what the files say.  Weights that do not
fit the configuration (missing, unexpected or mis-shaped keys) raise one ValueError listing them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn

from lipforcing._weights import CheckpointError, check_finite, read_weight_file
from lipforcing.vae.config import VAEConfig
from lipforcing.vae.model import WanVAE

__all__ = ["load_vae", "diffusers_key_map", "infer_config", "vae_state_dict_from_diffusers", "check_state_dict"]

_LIST_CAP = 12
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


# ------------------------------------------------------------------------------------------------ key mapping
def _diffusers_module_map(config: VAEConfig) -> dict[str, str]:
    """Our module path -> diffusers module path, for every module that owns parameters."""
    if config.attn_scales:
        raise ValueError("diffusers' AutoencoderKLWan has no decoder attention for attn_scales; only "
                         f"attn_scales=() can be mapped, got {config.attn_scales}")
    m: dict[str, str] = {"conv1": "quant_conv", "conv2": "post_quant_conv"}

    def resblock(ours: str, theirs: str) -> None:
        m[f"{ours}.residual.0"] = f"{theirs}.norm1"
        m[f"{ours}.residual.2"] = f"{theirs}.conv1"
        m[f"{ours}.residual.3"] = f"{theirs}.norm2"
        m[f"{ours}.residual.6"] = f"{theirs}.conv2"
        m[f"{ours}.shortcut"] = f"{theirs}.conv_shortcut"

    for side in ("encoder", "decoder"):
        m[f"{side}.conv1"] = f"{side}.conv_in"
        m[f"{side}.head.0"] = f"{side}.norm_out"
        m[f"{side}.head.2"] = f"{side}.conv_out"
        resblock(f"{side}.middle.0", f"{side}.mid_block.resnets.0")
        resblock(f"{side}.middle.2", f"{side}.mid_block.resnets.1")
        for leaf in ("norm", "to_qkv", "proj"):
            m[f"{side}.middle.1.{leaf}"] = f"{side}.mid_block.attentions.0.{leaf}"

    # encoder: diffusers keeps the same flat list (down_blocks.N == downsamples.N)
    n = 0
    for i in range(len(config.dim_mult)):
        for _ in range(config.num_res_blocks):
            resblock(f"encoder.downsamples.{n}", f"encoder.down_blocks.{n}")
            n += 1
        if i != len(config.dim_mult) - 1:
            for leaf in ("resample.1", "time_conv"):
                m[f"encoder.downsamples.{n}.{leaf}"] = f"encoder.down_blocks.{n}.{leaf}"
            n += 1
    # decoder: our flat list is grouped per stage in diffusers (up_blocks.i.resnets.j, up_blocks.i.upsamplers.0)
    n = 0
    for i in range(len(config.dim_mult)):
        for j in range(config.num_res_blocks + 1):
            resblock(f"decoder.upsamples.{n}", f"decoder.up_blocks.{i}.resnets.{j}")
            n += 1
        if i != len(config.dim_mult) - 1:
            for leaf in ("resample.1", "time_conv"):
                m[f"decoder.upsamples.{n}.{leaf}"] = f"decoder.up_blocks.{i}.upsamplers.0.{leaf}"
            n += 1
    return m


def diffusers_key_map(config: VAEConfig) -> dict[str, str]:
    """Diffusers parameter name -> our (official Wan) name, for a model of this config."""
    modules = _diffusers_module_map(config)
    with torch.device("meta"):
        model = WanVAE(config)
    out = {}
    for key in model.state_dict():
        prefix, leaf = key.rsplit(".", 1)
        if prefix not in modules:
            raise AssertionError(f"no diffusers name for {key}")      # internal invariant
        out[f"{modules[prefix]}.{leaf}"] = key
    return out


def vae_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKLWan`` state dict to Wan's names; keys it cannot map keep their name (so
    the key check reports them as unexpected)."""
    mapping = diffusers_key_map(config)
    return {mapping.get(k, k): v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------ config inference
def _idx_keys(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[int, set]:
    out: dict[int, set] = {}
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)$")
    for k in sd:
        mt = pat.match(k)
        if mt:
            out.setdefault(int(mt.group(1)), set()).add(mt.group(2))
    return out


def infer_config(sd: Mapping[str, torch.Tensor]) -> VAEConfig:
    """Read a :class:`VAEConfig` off an official-format (Wan key names) state dict's keys and shapes.

    The latent statistics are Wan2.1's when ``z_dim == 16`` (they are not stored in the checkpoint).
    """
    def pick(*options):
        # the first key present decides (so one missing tensor still leaves the key check to report it)
        for key, fn in options:
            if key in sd:
                return fn(sd[key].shape)
        raise KeyError(options[0][0])

    try:
        dim = pick(("encoder.conv1.weight", lambda s: s[0]), ("encoder.conv1.bias", lambda s: s[0]),
                   ("decoder.head.2.weight", lambda s: s[1]))
        z_dim = pick(("conv2.weight", lambda s: s[0]), ("conv2.bias", lambda s: s[0]),
                     ("conv1.weight", lambda s: s[0] // 2), ("decoder.conv1.weight", lambda s: s[1]))
        layers = _idx_keys(sd, "encoder.downsamples")
        stages: list[list[str]] = [[]]
        widths: list[int] = []
        temporal: list[bool] = []
        attn_scales: list[float] = []
        for n in sorted(layers):
            leaves = layers[n]
            if any(leaf.startswith("residual.") for leaf in leaves):
                stages[-1].append("res")
                if len(widths) < len(stages):
                    widths.append(pick((f"encoder.downsamples.{n}.residual.2.weight", lambda s: s[0]),
                                       (f"encoder.downsamples.{n}.residual.2.bias", lambda s: s[0]),
                                       (f"encoder.downsamples.{n}.residual.6.weight", lambda s: s[0])))
            elif any(leaf.startswith("to_qkv") for leaf in leaves):
                scale = 1.0 / 2 ** (len(stages) - 1)
                if scale not in attn_scales:
                    attn_scales.append(scale)
            elif any(leaf.startswith("resample.") for leaf in leaves):
                temporal.append(any(leaf.startswith("time_conv.") for leaf in leaves))
                stages.append([])
        num_res_blocks = len(stages[0])
        dim_mult = tuple(w // dim for w in widths)
    except (KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"cannot read the VAE dimensions from this state dict (missing {e}); it does not look "
                         "like a Wan2.1 VAE checkpoint. Pass config=VAEConfig(...) to load it anyway") from None
    if num_res_blocks < 1 or len(dim_mult) != len(stages) or any(len(s) != num_res_blocks for s in stages):
        raise ValueError(f"cannot read the VAE dimensions from this state dict (stages {[len(s) for s in stages]} "
                         f"residual blocks, widths {widths}); pass config=VAEConfig(...)")
    return VAEConfig(dim=dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
                     attn_scales=tuple(attn_scales), temporal_downsample=tuple(temporal))


# --------------------------------------------------------------------------------------------------- files
def _load_file(path: Path) -> dict[str, torch.Tensor]:
    """One weight file through the shared safe reader (errors name the file; NaN/inf weights refused)."""
    obj, _ = read_weight_file(path, "VAE checkpoint")
    # accept {"state_dict": {...}} / {"model": {...}} wrappers around the plain state dict
    while isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model", "module") \
            and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a dict of tensors)")
    check_finite(obj, path, "VAE checkpoint")
    return obj


# Largest sizes accepted from a config.json (Wan2.1's VAE: base_dim 96, z_dim 16, 4 stages, 2 blocks each): a
# broken or hostile file must not build a huge network.
_CONFIG_LIMITS = {"base_dim": 4096, "dim": 4096, "z_dim": 1024, "num_res_blocks": 16}
_MAX_STAGES = 8


def _check_limits(fields: dict, source) -> None:
    over = [f"{k} = {fields[k]} (limit {lim})" for k, lim in _CONFIG_LIMITS.items()
            if isinstance(fields.get(k), (int, float)) and not isinstance(fields.get(k), bool) and fields[k] > lim]
    mult = fields.get("dim_mult")
    if isinstance(mult, (list, tuple)):
        if len(mult) > _MAX_STAGES:
            over.append(f"{len(mult)} stages in dim_mult (limit {_MAX_STAGES})")
        over += [f"dim_mult entry {m} (limit 64)" for m in mult if isinstance(m, (int, float)) and m > 64]
    if over:
        raise CheckpointError(f"VAE config {source} is out of bounds: " + ", ".join(over))


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _diffusers_weights(folder: Path) -> list[Path]:
    stem = "diffusion_pytorch_model"
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"safetensors index {index} has no 'weight_map' object")
        return [folder / f for f in sorted(set(map(str, weight_map.values())))]
    for name in (f"{stem}.safetensors", f"{stem}.bin"):
        if (folder / name).is_file():
            return [folder / name]
    shards = sorted(folder.glob(f"{stem}*.safetensors"))
    if shards:
        return shards
    raise FileNotFoundError(f"{folder} has a config.json but no {stem}*.safetensors (or .bin) weights")


def _is_diffusers_keys(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("quant_conv.", "post_quant_conv.", "encoder.conv_in.", "decoder.conv_in."))
               for k in sd)


def _capped(keys) -> str:
    keys = sorted(keys)
    s = ", ".join(keys[:_LIST_CAP])
    return s + (f", ... ({len(keys) - _LIST_CAP} more)" if len(keys) > _LIST_CAP else "")


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str, config: VAEConfig) -> None:
    """Raise one ValueError naming the missing, unexpected and mis-shaped keys of ``sd`` for ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in expected
              if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = [f"the weights in {source} do not match the VAE config "
                 f"(dim={config.dim}, z_dim={config.z_dim}, dim_mult={config.dim_mult}, "
                 f"num_res_blocks={config.num_res_blocks}, temporal_downsample={config.temporal_downsample}):"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_capped(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_capped(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_capped(shapes)}")
        raise ValueError("\n  ".join(parts))


def _resolve_config(config) -> Optional[VAEConfig]:
    if config is None or isinstance(config, VAEConfig):
        return config
    if isinstance(config, str):
        return VAEConfig.from_name(config)
    if isinstance(config, Mapping):
        return VAEConfig.from_dict(config)
    raise TypeError(f"config must be a VAEConfig, a preset name, a dict or None, got {type(config).__name__}")


def load_vae(path, *, config=None, device=None, dtype=None) -> WanVAE:
    """Load a Wan2.1 VAE (official checkpoint or diffusers folder; see the module docstring).

    path: a ``.pth``/``.pt``/``.safetensors`` file, a diffusers folder, or a weight file inside one.
    config: :class:`VAEConfig`, preset name, dict, or ``None`` (read from ``config.json`` or from the weights).
    device, dtype: where and in which floating dtype to put the weights (default: CPU, float32).
    Returns the :class:`WanVAE` in eval mode with ``requires_grad`` off.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    cfg = _resolve_config(config)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no VAE checkpoint at {p}")

    folder_cfg_path: Optional[Path] = None
    if p.is_dir():
        if (p / "config.json").is_file():
            folder_cfg_path = p / "config.json"
            files = _diffusers_weights(p)
        else:
            files = sorted(f for f in p.iterdir() if f.suffix in _WEIGHT_SUFFIXES)
            if len(files) != 1:
                raise FileNotFoundError(f"{p} has no config.json and {len(files)} weight files "
                                        f"({', '.join(f.name for f in files) or 'none'}); pass the file itself")
    else:
        if p.suffix not in _WEIGHT_SUFFIXES:
            raise ValueError(f"unsupported checkpoint file {p.name}; expected one of {_WEIGHT_SUFFIXES}")
        files = [p]
        if (p.parent / "config.json").is_file():
            folder_cfg_path = p.parent / "config.json"

    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(_load_file(f))
    source = str(p)
    if _is_diffusers_keys(sd):
        if cfg is None:
            if folder_cfg_path is None:
                raise ValueError(f"{p} holds diffusers-format VAE weights but there is no config.json next to "
                                 "them; pass config=VAEConfig(...)")
            try:
                fields = _read_json(folder_cfg_path, "VAE config")
                _check_limits(fields, folder_cfg_path)
                cfg = VAEConfig.from_dict(fields)
            except CheckpointError:
                raise
            except (ValueError, TypeError) as exc:
                raise CheckpointError(f"VAE config {folder_cfg_path} is invalid: {exc}") from None
            source = f"{p} (config {folder_cfg_path})"
        sd = vae_state_dict_from_diffusers(sd, cfg)
    elif cfg is None:
        cfg = infer_config(sd)

    with torch.device("meta"):
        model = WanVAE(cfg)
    check_state_dict(model, sd, source=source, config=cfg)
    target = dtype or torch.float32
    sd = {k: v.to(target) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model._init_stats()                           # the statistics buffers were built on the meta device
    model = model.to(device=device, dtype=target)
    return model.eval().requires_grad_(False)
