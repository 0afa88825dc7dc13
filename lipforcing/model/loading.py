"""Checkpoint loading and saving for the lip-sync DiT.

Formats
    * safetensors: one file, or shards with an index json (``*.safetensors.index.json``, ``weight_map``), or a
      directory holding either;
    * ``.pt`` / ``.pth`` / ``.bin``: only through ``torch.load(weights_only=True)`` (pickled objects are refused);
    * a list of paths: their state dicts are merged in order (e.g. Wan2.1 base shards, then an OmniAvatar
      LoRA + audio-module file).

Keys: Wan2.1 native names (``patch_embedding``, ``text_embedding.0``, ``blocks.N.self_attn.q``, ...) plus
OmniAvatar's ``audio_proj.*`` and ``audio_cond_projs.N``, loaded without renaming.  Wrapper prefixes (``module.``,
``model.``, ``_orig_mod.``, ``base_model.model.``, ...) and PEFT's ``.base_layer`` are stripped.

Conversions
    * LoRA (``<m>.lora_A[.default].weight`` / ``lora_B``, or ``lora_down`` / ``lora_up`` with ``<m>.alpha``) is
      merged into ``<m>.weight``: ``W += (alpha / r) * B @ A`` in float32.
    * A plain 16-channel Wan T2V ``patch_embedding`` is expanded to ``in_dim`` (65) input channels; the new
      (conditioning) channels get zero weights, so they contribute nothing until trained.
    * A checkpoint without any audio module (plain Wan) gets zero-initialised audio modules (audio contributes
      nothing until trained); a *partial* set of audio keys is an error.

The model is built on the meta device and materialised from the checkpoint tensors (``load_state_dict(...,
assign=True)``): no random initialisation, no second full-size copy.  Missing, unexpected or mis-shaped keys
give one :class:`CheckpointError` that lists them (a capped list).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from lipforcing._weights import CheckpointError, check_finite, read_safetensors, read_torch_file, regular_file
from lipforcing.config import PRESETS, VIDEO_FRAMES_PER_LATENT, ModelConfig

logger = logging.getLogger("lipforcing")

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.", "base_model.", "model.diffusion_model.",
                     "diffusion_model.", "model.", "dit.", "net.")
_MAX_LISTED = 12
CONFIG_METADATA_KEY = "lipforcing_config"


# Largest sizes accepted from a config read out of a file (metadata or config.json): generous bounds (the 14B
# preset is dim 5120, ffn 13824, 40 layers) that keep a hostile or broken file from building a model for minutes.
CONFIG_LIMITS = {"dim": 1 << 15, "ffn_dim": 1 << 17, "num_heads": 1024, "num_layers": 1024, "in_dim": 4096,
                 "out_dim": 4096, "text_dim": 1 << 15, "freq_dim": 1 << 14, "audio_dim": 1 << 17,
                 "audio_token_dim": 1 << 12}


# ---------------------------------------------------------------------------------------------------- reading
def _listing(title: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def _load_pickle(path: Path) -> dict:
    """``torch.load(weights_only=True)`` through the shared safe reader; pickled objects are refused."""
    return _unwrap(read_torch_file(path), path)


def _unwrap(obj, path: Path) -> dict:
    """A state dict from a torch.load result: the dict itself or a 'state_dict' / 'model' / 'module' / 'ema'
    entry of it."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, Mapping):
            for key in ("state_dict", "model", "module", "net", "generator", "ema"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
        else:
            break
    if isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        raise CheckpointError(f"{path} does not hold a flat tensor state dict; non-tensor entries: "
                              f"{bad[:_MAX_LISTED]}")
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")


def _load_safetensors(path: Path) -> tuple[dict, dict]:
    return read_safetensors(path)


def _load_index(index: Path) -> tuple[dict, dict]:
    regular_file(index, "safetensors index")
    try:
        data = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"safetensors index {index} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise CheckpointError(f"{index} is not a safetensors index (no 'weight_map')")
    sd, meta = {}, {}
    shards = sorted(set(data["weight_map"].values()))
    missing = [s for s in shards if not (index.parent / s).exists()]
    if missing:
        raise CheckpointError(f"{index} names shards that do not exist: {missing[:_MAX_LISTED]}")
    for shard in shards:
        part, m = _load_safetensors(index.parent / shard)
        sd.update(part)
        meta.update(m)
    absent = sorted(set(data["weight_map"]) - set(sd))
    if absent:
        raise CheckpointError(f"{index}: keys listed in the index are absent from their shards"
                              + _listing("absent", absent))
    return sd, meta


def read_state_dict(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read one checkpoint (file or directory, see the module docstring) into (state dict on CPU, metadata).

    Unreadable files (truncated, corrupt, empty, not a regular file) raise :class:`CheckpointError` naming the
    file; NaN/inf values are refused, naming the tensors."""
    sd, meta = _read_state_dict(path)
    check_finite(sd, os.fspath(path))
    ints = [k for k, v in sd.items() if not (v.is_floating_point() or v.is_complex())]
    if ints:                              # every DiT weight is floating point: an integer file is not a model file
        raise CheckpointError(f"checkpoint {os.fspath(path)} holds non-floating-point tensors "
                              f"({sd[ints[0]].dtype})" + _listing("of them", ints))
    return sd, meta


def _read_state_dict(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.exists():
            try:
                cls = json.loads(cfg.read_text()).get("_class_name", "")
            except json.JSONDecodeError:
                cls = ""
            if cls.startswith("Wan") and cls != "WanModel":  # WanModel: the official (native-key) Wan2.1 folder
                raise CheckpointError(f"{p} is a diffusers-format folder ({cls}); load it with load_model")
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return _load_index(indexes[0])
        if len(indexes) > 1:
            raise CheckpointError(f"{p} holds several safetensors indexes {[i.name for i in indexes]}; pass one")
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return _load_safetensors(files[0])
        if len(files) > 1:
            raise CheckpointError(f"{p} holds several .safetensors files but no index json; pass them as a list")
        files = [f for s in PICKLE_SUFFIXES for f in sorted(p.glob("*" + s))]
        if len(files) == 1:
            return _load_pickle(files[0]), {}
        raise CheckpointError(f"{p} holds no single checkpoint file (.safetensors, a *.safetensors.index.json, or "
                              f"one of {PICKLE_SUFFIXES})")
    name = p.name.lower()
    if name.endswith(".safetensors.index.json"):
        return _load_index(p)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return _load_safetensors(p)
    if name.endswith(PICKLE_SUFFIXES):
        return _load_pickle(p), {}
    raise CheckpointError(f"unknown checkpoint format {p.name!r}: expected .safetensors, *.safetensors.index.json, "
                          f"or {PICKLE_SUFFIXES}")


# ---------------------------------------------------------------------------------------------------- key handling
def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``, PEFT's ``base_model.model.``) and
    PEFT's ``.base_layer`` from every key."""
    out = {}
    for k, v in sd.items():
        key = k
        changed = True
        while changed:
            changed = False
            for pre in _WRAPPER_PREFIXES:
                if key.startswith(pre):
                    key = key[len(pre):]
                    changed = True
        key = key.replace(".base_layer.", ".")
        if key in out:
            raise CheckpointError(f"two checkpoint keys map to {key!r} after removing wrapper prefixes")
        out[key] = v
    return out


_LORA_A = re.compile(r"^(?P<m>.+)\.(?:lora_A|lora_down)(?:\.default)?\.weight$")
_LORA_B = re.compile(r"^(?P<m>.+)\.(?:lora_B|lora_up)(?:\.default)?\.weight$")
_LORA_ALPHA = re.compile(r"^(?P<m>.+)\.(?:alpha|lora_alpha)$")


def merge_lora(sd: dict[str, torch.Tensor], *, lora_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Merge LoRA pairs into their base weights: ``W += (alpha / r) * B @ A`` (float32 math, W's dtype kept).

    ``alpha`` comes from ``<m>.alpha`` in the checkpoint, else from ``lora_alpha``; with neither, an error.
    Returns a new dict without LoRA keys."""
    downs, ups, alphas, rest = {}, {}, {}, {}
    for k, v in sd.items():
        if (m := _LORA_A.match(k)):
            downs[m["m"]] = v
        elif (m := _LORA_B.match(k)):
            ups[m["m"]] = v
        elif (m := _LORA_ALPHA.match(k)) and v.numel() == 1:
            alphas[m["m"]] = float(v.float().item())
            if not math.isfinite(alphas[m["m"]]):
                raise CheckpointError(f"LoRA alpha {k} is {alphas[m['m']]}; it must be a finite number")
        else:
            rest[k] = v
    if not downs and not ups:
        return rest
    unpaired = sorted(set(downs) ^ set(ups))
    no_base = sorted(m + ".weight" for m in downs if m + ".weight" not in rest)
    if unpaired or no_base:
        raise CheckpointError("cannot merge LoRA" + _listing("LoRA modules with only one of A/B", unpaired)
                              + _listing("LoRA modules whose base weight is not in the checkpoint(s) (pass the base "
                                         "checkpoint first in a list of paths)", no_base))
    if lora_alpha is not None and (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float))
                                   or not math.isfinite(lora_alpha)):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    rank0 = sorted(m for m, a in downs.items() if a.dim() == 2 and (a.shape[0] == 0 or ups[m].shape[-1] == 0))
    if rank0:
        raise CheckpointError("LoRA rank 0 (an empty A/B pair) cannot be merged" + _listing("modules", rank0))
    missing_alpha = [m for m in downs if m not in alphas]
    if missing_alpha and lora_alpha is None:
        raise CheckpointError(f"the LoRA checkpoint has no alpha for {len(missing_alpha)} modules (e.g. "
                              f"{missing_alpha[0]}); pass lora_alpha= (OmniAvatar: rank 128, alpha 64)")
    bad = []
    for m, a in downs.items():
        b = ups[m]
        w = rest[m + ".weight"]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != tuple(w.shape):
            bad.append(f"{m}: A {tuple(a.shape)}, B {tuple(b.shape)}, W {tuple(w.shape)}")
            continue
        alpha = alphas.get(m, lora_alpha)
        rest[m + ".weight"] = (w.float() + (alpha / r) * (b.float() @ a.float())).to(w.dtype)
    if bad:
        raise CheckpointError("LoRA shapes do not fit their base weights" + _listing("modules", bad))
    return rest


def expand_patch_embedding(sd: dict[str, torch.Tensor], in_dim: int) -> dict[str, torch.Tensor]:
    """Zero-pad ``patch_embedding.weight`` (dim, C, 1, 2, 2) to ``in_dim`` input channels when C < in_dim (the
    new channels come after the checkpoint's, matching ``x = [noisy | conditioning]``)."""
    w = sd.get("patch_embedding.weight")
    if w is None or w.dim() != 5 or w.shape[1] >= in_dim:
        return sd
    pad = w.new_zeros(w.shape[0], in_dim - w.shape[1], *w.shape[2:])
    logger.info("lipforcing: expanding patch_embedding from %d to %d input channels (new channels zero)",
                w.shape[1], in_dim)
    out = dict(sd)
    out["patch_embedding.weight"] = torch.cat([w, pad], dim=1)
    return out


def _is_audio_key(k: str) -> bool:
    return (k.startswith("audio_proj.") or k.startswith("audio_cond_projs.")
            or re.match(r"^blocks\.\d+\.cross_attn\.(k_audio|v_audio|norm_k_audio)\.", k) is not None)


# ---------------------------------------------------------------------------------------------------- config
def infer_config(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> ModelConfig:
    """A ModelConfig for a state dict: from the metadata written by :func:`save_model` if present, else from the
    tensor shapes (num_heads: the preset of the same dim, else head_dim 128)."""
    if metadata and CONFIG_METADATA_KEY in metadata:
        try:
            fields = json.loads(metadata[CONFIG_METADATA_KEY])
            check_config_limits(fields)
            config = ModelConfig.from_dict(fields)
        except CheckpointError:
            raise
        except (ValueError, TypeError, AttributeError) as exc:   # JSONDecodeError is a ValueError
            raise CheckpointError(f"the model config in the checkpoint metadata ({CONFIG_METADATA_KEY!r}) is "
                                  f"invalid: {exc}") from None
        check_config_matches(config, sd)
        return config
    need = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "blocks.0.ffn.0.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError("cannot infer the model config from this checkpoint (pass config=)"
                              + _listing("missing keys", missing))
    pe = sd["patch_embedding.weight"]
    dim = pe.shape[0]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k)))
    preset = next((c for c in PRESETS.values() if c.dim == dim), None)
    heads = preset.num_heads if preset is not None else max(1, dim // 128)
    kw = dict(dim=dim, ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_heads=heads, num_layers=layers,
              in_dim=max(pe.shape[1], 65), patch_size=tuple(pe.shape[2:]), text_dim=sd["text_embedding.0.weight"].shape[1],
              freq_dim=sd["time_embedding.0.weight"].shape[1])
    if "head.head.weight" in sd:
        kw["out_dim"] = sd["head.head.weight"].shape[0] // (pe.shape[2] * pe.shape[3] * pe.shape[4])
    if "audio_proj.proj.weight" in sd:
        proj = sd["audio_proj.proj.weight"]
        token_dim = sd["audio_proj.norm_out.weight"].shape[0] if "audio_proj.norm_out.weight" in sd else 32
        kw.update(audio_dim=proj.shape[1] // VIDEO_FRAMES_PER_LATENT, audio_token_dim=token_dim)
        if "blocks.0.cross_attn.k_audio.weight" in sd:
            kw.update(audio_injection="cross_attn", audio_window=proj.shape[0] // token_dim)
    elif preset is not None:
        kw.update(audio_dim=preset.audio_dim)
    return ModelConfig(**kw)


def check_config_limits(fields) -> None:
    """Refuse a config (a ModelConfig or its dict) read from a file whose sizes exceed :data:`CONFIG_LIMITS`."""
    if isinstance(fields, ModelConfig):
        fields = fields.to_dict()
    if not isinstance(fields, Mapping):
        raise CheckpointError(f"the model config read from the checkpoint must be a JSON object, got "
                              f"{type(fields).__name__}")
    over = [f"{k} = {fields[k]} (limit {lim})" for k, lim in CONFIG_LIMITS.items()
            if isinstance(fields.get(k), (int, float)) and not isinstance(fields.get(k), bool) and fields[k] > lim]
    if over:
        raise CheckpointError("the model config read from the checkpoint is out of bounds: " + ", ".join(over))


def _block_count(sd: Mapping[str, torch.Tensor]) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))}
    return 1 + max(ids) if ids else 0


def check_config_matches(config: ModelConfig, sd: Mapping[str, torch.Tensor]) -> None:
    """Check a config read from a file against the tensors actually present (block count, widths) before any
    model is built, so a wrong or hostile config fails at once instead of building a huge model."""
    sd = strip_prefixes(sd)
    problems = []
    if _block_count(sd) != config.num_layers:
        problems.append(f"num_layers {config.num_layers}, but the tensors hold {_block_count(sd)} blocks")
    for key, dim, field in (("patch_embedding.weight", 0, "dim"), ("blocks.0.ffn.0.weight", 0, "ffn_dim"),
                            ("text_embedding.0.weight", 1, "text_dim"), ("time_embedding.0.weight", 1, "freq_dim")):
        v = sd.get(key)
        if v is not None and v.dim() > dim and v.shape[dim] != getattr(config, field):
            problems.append(f"{field} {getattr(config, field)}, but {key} has shape {tuple(v.shape)}")
    if problems:
        raise CheckpointError("the model config saved in the checkpoint does not match its tensors: "
                              + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------- load / save
def prepare_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], *, lora_alpha: float | None = None,
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Convert a raw checkpoint state dict to exactly the model's keys and shapes, or raise one CheckpointError.

    Steps: strip wrapper prefixes, merge LoRA, expand the patch embedding, zero-fill absent audio modules (only
    when the checkpoint has none at all), then check missing / unexpected / shape-mismatched keys."""
    config: ModelConfig = model.config
    sd = merge_lora(strip_prefixes(sd), lora_alpha=lora_alpha)
    sd = expand_patch_embedding(sd, config.in_dim)
    expected = {k: v for k, v in model.state_dict().items()}
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in sd):
        raise CheckpointError("this looks like a diffusers-format Wan checkpoint (keys like condition_embedder.*, "
                              "blocks.N.attn1.*); only Wan-native key names are supported by this loader")
    missing = sorted(set(expected) - set(sd))
    audio_missing = [k for k in missing if _is_audio_key(k)]
    if audio_missing and not any(_is_audio_key(k) for k in sd):
        logger.warning("lipforcing: the checkpoint has no audio modules; they are zero-initialised (audio has no "
                       "effect until trained)")
        for k in audio_missing:
            ref = expected[k]
            # LayerNorm / RMSNorm scales are ones, everything else zero
            ones = k.endswith("norm_out.weight") or k.endswith("norm_k_audio.weight")
            sd[k] = torch.ones(ref.shape, dtype=dtype or torch.float32) if ones else torch.zeros(
                ref.shape, dtype=dtype or torch.float32)
        missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        c = config
        raise CheckpointError(
            f"checkpoint does not match the model (dim {c.dim}, {c.num_layers} layers, in_dim {c.in_dim}, audio "
            f"{c.audio_injection!r})" + _listing("missing keys", missing) + _listing("unexpected keys", unexpected)
            + _listing("shape mismatches", shapes))
    return {k: sd[k] for k in expected}


def load_model(path, *, config: ModelConfig | str | None = None, causal: bool = True, device=None,
               dtype: torch.dtype | None = None, lora_alpha: float | None = None):
    """Load a checkpoint into the student (``causal=True``) or the bidirectional teacher / critic.

    Parameters
    ----------
    path : file, directory, or a list of them (state dicts merged in order; see the module docstring).  A
        diffusers ``WanTransformer3DModel`` folder (or its weights with ``config.json`` beside them) is handed to
        :func:`lipforcing.model.diffusers_format.load_diffusers_transformer`.
    config : ModelConfig or preset name; default: the config saved by :func:`save_model`, else inferred from
        the tensor shapes.
    causal : build the causal student (True) or the bidirectional model (False).
    device : where the parameters live (default CPU).  dtype : parameter dtype (default: the checkpoint's
        ``patch_embedding.weight`` dtype).
    lora_alpha : LoRA alpha for checkpoints that do not store it (OmniAvatar: 64 for rank 128).
    """
    from lipforcing.model import build_model, diffusers_format

    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    if not paths:
        raise ValueError("path must name at least one checkpoint")
    sd, meta = {}, {}
    for p in paths:
        if diffusers_format.is_diffusers_transformer(p):
            # diffusers WanTransformer3DModel: converted to Wan-native keys, checked against its config.json (the
            # config is derived from it when none is given); later paths (e.g. an OmniAvatar LoRA) merge on top
            part, config = diffusers_format.load(p, config=config)
            m = {}
        else:
            part, m = read_state_dict(p)
        sd.update(part)
        meta.update(m)
    if isinstance(config, str):
        config = ModelConfig.from_name(config)
    if config is None:
        config = infer_config(strip_prefixes(sd), meta)
    if dtype is None:
        ref = strip_prefixes(sd).get("patch_embedding.weight")
        dtype = ref.dtype if ref is not None and ref.dtype.is_floating_point else torch.float32
    model = build_model(config, causal=causal, device="meta", dtype=dtype)
    full = prepare_state_dict(model, sd, lora_alpha=lora_alpha, dtype=dtype)
    device = torch.device("cpu" if device is None else device)
    # the checkpoint tensors become the parameters (moved / cast only where needed; no random init, no extra copy)
    full = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in full.items()}
    model.load_state_dict(full, strict=True, assign=True)
    return model


def save_model(model: torch.nn.Module, path, *, metadata: Mapping[str, str] | None = None) -> None:
    """Save the parameters with Wan-native key names to a safetensors file (the config goes into the metadata,
    so :func:`load_model` needs no ``config=``)."""
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    meta[CONFIG_METADATA_KEY] = json.dumps(model.config.to_dict())
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.fspath(path), metadata=meta)
