"""Diffusers-format Wan2.1 transformers (``WanTransformer3DModel``): detection, config and key conversion, loading.

A diffusers transformer is a folder holding ``config.json`` (``"_class_name": "WanTransformer3DModel"``) and
``diffusion_pytorch_model.safetensors`` (or shards + ``diffusion_pytorch_model.safetensors.index.json``), e.g. the
``transformer/`` folder of the ``Wan2.1-T2V-*-Diffusers`` releases.  ``diffusers`` itself is *not* needed to load
one: this module reads the config and the tensors and renames the keys to Wan2.1's native names.

Key mapping (checked against diffusers 0.42 ``transformer_wan.py``; every tensor keeps its shape)::

    diffusers                                         Wan2.1 native / lipforcing
    patch_embedding.{weight,bias}                     patch_embedding.*           (in-channels zero-padded to in_dim)
    condition_embedder.time_embedder.linear_1/2       time_embedding.0/2
    condition_embedder.time_proj                      time_projection.1
    condition_embedder.text_embedder.linear_1/2       text_embedding.0/2
    blocks.N.attn1.to_q/to_k/to_v/to_out.0            blocks.N.self_attn.q/k/v/o
    blocks.N.attn1.norm_q/norm_k                      blocks.N.self_attn.norm_q/norm_k
    blocks.N.attn2.*                                  blocks.N.cross_attn.*       (same sub-names)
    blocks.N.attn1.to_qkv / attn2.to_kv (fused)       split into q, k, v / k, v
    blocks.N.norm2 (affine, before cross-attention)   blocks.N.norm3
    blocks.N.ffn.net.0.proj / ffn.net.2               blocks.N.ffn.0 / ffn.2
    blocks.N.scale_shift_table (1, 6, dim)            blocks.N.modulation
    scale_shift_table (1, 2, dim)                     head.modulation
    proj_out                                          head.head

diffusers' ``norm1`` / ``norm3`` / ``norm_out`` have no parameters (Wan's ``norm1`` / ``norm2`` / ``head.norm``) and
its RoPE tables are non-persistent buffers, so neither appears in a checkpoint.  The numerics are the same as Wan's:
sinusoidal timestep embedding ``[cos, sin]`` (diffusers ``flip_sin_to_cos=True``, shift 0), RMSNorm on q/k over the
full width, adjacent-pair 3-D RoPE with the (d - 4(d//6), 2(d//6), 2(d//6)) split, modulation order (shift, scale,
gate) x 2, head (shift, scale).  ``qk_norm`` in the config is not read by diffusers' attention (it always builds
the RMSNorms), so it is ignored here too.

Not supported (a clear error): image-conditioned variants (``image_dim`` / ``added_kv_proj_dim`` /
``pos_embed_seq_len``: I2V, FLF2V) and ``cross_attn_norm=False`` (our block always has the affine LayerNorm).

The lip-sync model has ``in_dim`` 65 input channels (16 noisy + 49 conditioning) and audio modules: a plain
16-channel T2V checkpoint gets zero weights for the extra input channels and zero-initialised audio modules (norm
scales one), so its output is exactly the T2V model's until those are trained.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from lipforcing.config import ModelConfig
from lipforcing.model.loading import CheckpointError, _listing

logger = logging.getLogger("lipforcing")

DIFFUSERS_CLASS = "WanTransformer3DModel"
WEIGHTS_NAME = "diffusion_pytorch_model"
_UNSUPPORTED_FIELDS = {
    "image_dim": "image-conditioned (I2V/FLF2V) models: CLIP image embedder",
    "added_kv_proj_dim": "image-conditioned (I2V/FLF2V) models: added image K/V projections",
    "pos_embed_seq_len": "FLF2V models: image position embedding",
}


# ---------------------------------------------------------------------------------------------------- detection
def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _is_wan_transformer_config(cfg: dict | None) -> bool:
    return cfg is not None and cfg.get("_class_name") == DIFFUSERS_CLASS


def _resolve(path) -> tuple[Path, Path | None]:
    """(config.json, weights file or None) for a diffusers transformer folder, a pipeline folder (its
    ``transformer/`` subfolder), or a weights file with ``config.json`` beside it.  Raises FileNotFoundError."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        if not (p / "config.json").exists() and (p / "transformer" / "config.json").exists():
            p = p / "transformer"  # a whole diffusers pipeline folder
        return p / "config.json", _weights_in(p)
    return p.parent / "config.json", p


def _weights_in(folder: Path) -> Path | None:
    """The weights of a diffusers folder: the sharded index, else the single file (safetensors first)."""
    for name in (f"{WEIGHTS_NAME}.safetensors.index.json", f"{WEIGHTS_NAME}.safetensors", f"{WEIGHTS_NAME}.bin"):
        if (folder / name).exists():
            return folder / name
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1 and not indexes:
        return files[0]
    return None


def is_diffusers_transformer(path) -> bool:
    """True when ``path`` is a diffusers ``WanTransformer3DModel``: a folder with a ``config.json`` of that class
    (or a pipeline folder whose ``transformer/`` is one), or a ``.safetensors`` / index-json / ``.bin`` file with
    such a ``config.json`` beside it.  Never raises (a missing path, a list of paths -> False).

    A folder whose config says WanTransformer3DModel counts even if its weights are missing or broken, so that
    :func:`load` reports what is wrong with it."""
    if isinstance(path, (list, tuple)):
        return False
    try:
        p = Path(os.fspath(path))
        if not p.exists():
            return False
        cfg_path, _ = _resolve(p)
        if p.is_file():
            name = p.name.lower()
            if not (name.endswith((".safetensors", ".safetensors.index.json", ".bin"))):
                return False
        return _is_wan_transformer_config(_read_json(cfg_path))
    except (OSError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------------- config
def config_from_diffusers(cfg: Mapping, **overrides) -> ModelConfig:
    """A :class:`ModelConfig` from a diffusers ``WanTransformer3DModel`` config dict.

    dim = num_attention_heads * attention_head_dim; ffn_dim, num_layers, text_dim, freq_dim, eps, patch_size
    copied; out_dim = out_channels (or in_channels when null); in_dim = max(in_channels, 65) -- a 16-channel T2V
    checkpoint still gives the 65-channel lip-sync model (extra channels zero-weighted at load time).  The audio
    and student fields keep the ModelConfig defaults.  ``overrides`` replace any ModelConfig field (e.g.
    ``audio_injection="cross_attn"``, ``chunk_frames=...``); the dims the weights fix (dim, num_heads, ffn_dim,
    num_layers, text_dim, freq_dim, out_dim, patch_size) may only be restated, not changed, and ``in_dim`` may not
    be below the checkpoint's ``in_channels``.

    Raises ValueError for a config of another class, missing fields, or an unsupported variant (I2V, FLF2V,
    ``cross_attn_norm=False``)."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"cfg must be a dict (a diffusers config.json), got {type(cfg).__name__}")
    cls = cfg.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise ValueError(f"expected a diffusers {DIFFUSERS_CLASS} config, got _class_name {cls!r}")
    # diffusers' defaults for fields a hand-written config may omit
    d = dict(patch_size=[1, 2, 2], in_channels=16, out_channels=16, freq_dim=256, cross_attn_norm=True, eps=1e-6)
    d.update({k: v for k, v in cfg.items() if not k.startswith("_")})
    need = ["num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "text_dim"]
    absent = [k for k in need if k not in d]
    if absent:
        raise ValueError(f"diffusers {DIFFUSERS_CLASS} config lacks {absent} (needed to size the model)")
    bad = [f"{k}={d[k]!r} ({why})" for k, why in _UNSUPPORTED_FIELDS.items() if d.get(k) is not None]
    if bad:
        raise ValueError("unsupported diffusers Wan variant: " + "; ".join(bad)
                         + ". lipforcing loads the text-to-video transformer (image_dim, added_kv_proj_dim and "
                           "pos_embed_seq_len null)")
    if not d.get("cross_attn_norm", True):
        raise ValueError("unsupported diffusers Wan config: cross_attn_norm=False (the Wan2.1 block has an affine "
                         "LayerNorm before the cross-attention; every released Wan2.1 checkpoint sets it True)")
    in_channels = int(d["in_channels"])
    out_channels = d.get("out_channels") or in_channels
    fixed = dict(dim=int(d["num_attention_heads"]) * int(d["attention_head_dim"]),
                 num_heads=int(d["num_attention_heads"]), ffn_dim=int(d["ffn_dim"]), num_layers=int(d["num_layers"]),
                 text_dim=int(d["text_dim"]), freq_dim=int(d["freq_dim"]), out_dim=int(out_channels),
                 patch_size=tuple(int(p) for p in d["patch_size"]))
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown ModelConfig fields in overrides: {unknown}")
    clash = [f"{k}: checkpoint {fixed[k]!r}, override {overrides[k]!r}" for k in fixed
             if k in overrides and _norm(overrides[k]) != _norm(fixed[k])]
    if clash:
        raise ValueError("overrides contradict the dims fixed by the diffusers config/weights: " + "; ".join(clash))
    kw = {**fixed, "in_dim": max(in_channels, ModelConfig.__dataclass_fields__["in_dim"].default),
          "eps": float(d["eps"])}
    kw.update({k: v for k, v in overrides.items() if k not in fixed})
    if kw["in_dim"] < in_channels:
        raise ValueError(f"in_dim={kw['in_dim']} is below the checkpoint's in_channels={in_channels}")
    return ModelConfig(**kw)


def _norm(v):
    return tuple(v) if isinstance(v, list) else v


# ---------------------------------------------------------------------------------------------------- key mapping
_TOP = {
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "proj_out.": "head.head.",
    "patch_embedding.": "patch_embedding.",
}
_ATTN = {"to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "o.", "norm_q.": "norm_q.", "norm_k.": "norm_k."}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def diffusers_to_native_key(key: str) -> str | None:
    """The Wan-native name of one diffusers key, or None if it has no counterpart (fused projections are
    handled separately by :func:`convert_diffusers_state_dict`)."""
    if key == "scale_shift_table":
        return "head.modulation"
    for src, dst in _TOP.items():
        if key.startswith(src):
            return dst + key[len(src):]
    m = _BLOCK.match(key)
    if m is None:
        return None
    n, rest = m.groups()
    pre = f"blocks.{n}."
    if rest == "scale_shift_table":
        return pre + "modulation"
    for attn, ours in (("attn1.", "self_attn."), ("attn2.", "cross_attn.")):
        if rest.startswith(attn):
            sub = rest[len(attn):]
            for src, dst in _ATTN.items():
                if sub.startswith(src):
                    return pre + ours + dst + sub[len(src):]
            return None
    if rest.startswith("norm2."):
        return pre + "norm3." + rest[len("norm2."):]
    if rest.startswith("ffn.net.0.proj."):
        return pre + "ffn.0." + rest[len("ffn.net.0.proj."):]
    if rest.startswith("ffn.net.2."):
        return pre + "ffn.2." + rest[len("ffn.net.2."):]
    return None


def native_to_diffusers_key(key: str) -> str | None:
    """The diffusers name of one of our (Wan-native) keys, or None (audio modules have no diffusers name)."""
    if key == "head.modulation":
        return "scale_shift_table"
    for src, dst in _TOP.items():
        if key.startswith(dst):
            return src + key[len(dst):]
    m = _BLOCK.match(key)
    if m is None:
        return None
    n, rest = m.groups()
    pre = f"blocks.{n}."
    if rest == "modulation":
        return pre + "scale_shift_table"
    for attn, ours in (("attn1.", "self_attn."), ("attn2.", "cross_attn.")):
        if rest.startswith(ours):
            sub = rest[len(ours):]
            for src, dst in _ATTN.items():
                if sub.startswith(dst):
                    return pre + attn + src + sub[len(dst):]
            return None
    for src, dst in (("norm2.", "norm3."), ("ffn.net.0.proj.", "ffn.0."), ("ffn.net.2.", "ffn.2.")):
        if rest.startswith(dst):
            return pre + src + rest[len(dst):]
    return None


_FUSED = re.compile(r"^blocks\.(\d+)\.(attn1\.to_qkv|attn2\.to_kv)\.(weight|bias)$")


def _is_audio_key(k: str) -> bool:
    return (k.startswith("audio_proj.") or k.startswith("audio_cond_projs.")
            or re.match(r"^blocks\.\d+\.cross_attn\.(k_audio|v_audio|norm_k_audio)\.", k) is not None)


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    from lipforcing.model import build_model

    model = build_model(config, causal=False, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_diffusers_state_dict(sd: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``WanTransformer3DModel`` state dict to the full state dict of our model for ``config``.

    sd : diffusers keys -> tensors (any dtype; not modified).
    config : the target :class:`ModelConfig` (e.g. from :func:`config_from_diffusers`).

    Returns a new dict with exactly the keys of ``build_model(config, ...)`` (teacher and student share them):
    renamed tensors (same storage, except split fused projections and the padded patch embedding);
    ``patch_embedding.weight`` zero-padded from the checkpoint's input channels to ``config.in_dim`` (new channels
    after the checkpoint's, matching ``x = [noisy | conditioning]``); the audio modules, which no diffusers Wan
    checkpoint has, zero-initialised (norm scales one), so audio has no effect until trained.  New tensors use the
    dtype of ``patch_embedding.weight``.

    Raises ``CheckpointError`` (a ValueError) listing every unknown / missing / mis-shaped key at once, with the
    diffusers name next to ours."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    err = CheckpointError
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown = []
    fused_keys = []
    for k, v in sd.items():
        if _FUSED.match(k):
            fused_keys.append(k)
            continue
        native = diffusers_to_native_key(k)
        if native is None:
            unknown.append(k)
            continue
        if native in out:
            raise err(f"diffusers keys {origin[native]!r} and {k!r} both map to {native!r}")
        out[native] = v
        origin[native] = k
    # fused projections (``fuse_qkv_projections``): split, unless the unfused copies are saved too
    for k in fused_keys:
        v = sd[k]
        n, which, kind = _FUSED.match(k).groups()
        names = ("q", "k", "v") if which.endswith("qkv") else ("k", "v")
        part = "self_attn" if which.startswith("attn1") else "cross_attn"
        if v.shape[0] % len(names):
            unknown.append(f"{k} {tuple(v.shape)} (fused projection not divisible by {len(names)})")
            continue
        for name, piece in zip(names, v.chunk(len(names), dim=0)):
            target = f"blocks.{n}.{part}.{name}.{kind}"
            if target not in out:
                out[target] = piece
                origin[target] = k

    expected = _expected_shapes(config)
    pe = out.get("patch_embedding.weight")
    dtype = pe.dtype if pe is not None and pe.dtype.is_floating_point else torch.float32
    if pe is not None and pe.dim() == 5 and pe.shape[1] < config.in_dim:
        pad = pe.new_zeros(pe.shape[0], config.in_dim - pe.shape[1], *pe.shape[2:])
        logger.info("lipforcing: expanding the diffusers patch_embedding from %d to %d input channels (new channels "
                    "zero)", pe.shape[1], config.in_dim)
        out["patch_embedding.weight"] = torch.cat([pe, pad], dim=1)

    missing = sorted(f"{k} (diffusers {native_to_diffusers_key(k)})" for k in set(expected) - set(out)
                     if not _is_audio_key(k))
    audio_given = sorted(k for k in out if _is_audio_key(k))
    extra = sorted(f"{k} (from {origin[k]})" for k in set(out) - set(expected))
    shapes = sorted(f"{origin[k]} -> {k}: checkpoint {tuple(out[k].shape)} vs model {expected[k]}"
                    for k in set(out) & set(expected) if tuple(out[k].shape) != expected[k])
    if unknown or missing or extra or shapes:
        c = config
        raise err(
            f"diffusers {DIFFUSERS_CLASS} weights do not match the model (dim {c.dim} = {c.num_heads} heads x "
            f"{c.head_dim}, ffn {c.ffn_dim}, {c.num_layers} layers, text_dim {c.text_dim}, freq_dim {c.freq_dim}, "
            f"in_dim {c.in_dim}, out_dim {c.out_dim}); is config.json the one these weights were saved with?"
            + _listing("unknown diffusers keys (unsupported variant or not a Wan transformer)", sorted(unknown))
            + _listing("missing (our name)", missing) + _listing("unexpected (our name)", extra)
            + _listing("shape mismatches", shapes))
    absent_audio = sorted(k for k in expected if _is_audio_key(k) and k not in out)
    if absent_audio and not audio_given:
        logger.info("lipforcing: the diffusers checkpoint has no audio modules; they are zero-initialised (audio has "
                    "no effect until trained)")
    for k in absent_audio:
        ones = k.endswith("norm_out.weight") or k.endswith("norm_k_audio.weight")
        out[k] = (torch.ones if ones else torch.zeros)(expected[k], dtype=dtype)
    return {k: out[k] for k in expected}


# ---------------------------------------------------------------------------------------------------- loading
def read_diffusers_config(path) -> dict:
    """The ``config.json`` dict of a diffusers transformer folder or weights file (see
    :func:`is_diffusers_transformer`)."""
    cfg_path, _ = _resolve(path)
    cfg = _read_json(cfg_path)
    if cfg is None:
        raise CheckpointError(f"{cfg_path} is missing or not a JSON object")
    if not _is_wan_transformer_config(cfg):
        raise CheckpointError(f"{cfg_path} is not a diffusers {DIFFUSERS_CLASS} config "
                           f"(_class_name {cfg.get('_class_name')!r})")
    return cfg


def load(path, *, config: ModelConfig | str | None = None, **overrides) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read a diffusers Wan transformer into ``(state dict with our key names, ModelConfig)`` on the CPU.

    path : a diffusers transformer folder, a pipeline folder (its ``transformer/``), or the weights file (single
        safetensors, ``*.safetensors.index.json`` with its shards, or ``.bin`` through
        ``torch.load(weights_only=True)``) with ``config.json`` beside it.
    config : None -> :func:`config_from_diffusers` (with ``overrides``); a ModelConfig or preset name -> used as
        given after checking it agrees with ``config.json`` (dims, heads).

    The state dict is complete for the model of the returned config (patch embedding expanded, audio modules
    zero-initialised); tensors keep the checkpoint dtype.  Errors: FileNotFoundError, ``CheckpointError``."""
    from lipforcing.model.loading import check_config_limits, read_state_dict

    err = CheckpointError
    cfg_path, weights = _resolve(path)
    dcfg = read_diffusers_config(path)
    if weights is None:
        raise err(f"{cfg_path.parent} has a {DIFFUSERS_CLASS} config.json but no weights "
                  f"({WEIGHTS_NAME}.safetensors or {WEIGHTS_NAME}.safetensors.index.json)")
    try:
        derived = config_from_diffusers(dcfg, **overrides)
        check_config_limits(derived)   # bounded sizes: the key check below builds the model on the meta device
    except ValueError as exc:   # CheckpointError included
        raise err(f"{cfg_path}: {exc}") from None
    if config is not None:
        if overrides:
            raise TypeError("pass either config= or ModelConfig overrides, not both")
        if isinstance(config, str):
            config = ModelConfig.from_name(config)
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, a preset name or None, got {type(config).__name__}")
        keys = ("dim", "num_heads", "ffn_dim", "num_layers", "text_dim", "freq_dim", "out_dim", "patch_size")
        clash = [f"{k}: config.json {getattr(derived, k)!r}, given {getattr(config, k)!r}" for k in keys
                 if getattr(config, k) != getattr(derived, k)]
        if int(dcfg.get("in_channels", 16)) > config.in_dim:
            clash.append(f"in_dim: config.json in_channels {dcfg.get('in_channels')}, given {config.in_dim}")
        if clash:
            raise err(f"the given config does not match {cfg_path}:\n  " + "\n  ".join(clash))
        derived = config
    raw, _ = read_state_dict(weights)
    return convert_diffusers_state_dict(raw, derived), derived


def load_diffusers_transformer(path, *, config: ModelConfig | str | None = None, causal: bool = True, device=None,
                               dtype: torch.dtype | None = None, **overrides):
    """Build our network (the causal student when ``causal``, else the bidirectional teacher) from a diffusers
    Wan transformer (see :func:`load`).  ``dtype`` default: the checkpoint's; ``device`` default CPU.  The model is
    built on the meta device and takes the checkpoint tensors directly (no random init).  Like ``build_model``,
    the model is returned in training mode (call ``.eval()`` for inference)."""
    from lipforcing.model import build_model

    sd, cfg = load(path, config=config, **overrides)
    if dtype is None:
        dtype = sd["patch_embedding.weight"].dtype
    model = build_model(cfg, causal=causal, device="meta", dtype=dtype)
    dev = torch.device("cpu" if device is None else device)
    full = {k: v.to(device=dev, dtype=dtype, copy=True).contiguous() for k, v in sd.items()}
    model.load_state_dict(full, strict=True, assign=True)
    return model
