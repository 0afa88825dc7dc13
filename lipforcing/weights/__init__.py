"""Weight bundles: the model ``Engine.load()`` uses when it is given no checkpoint.

A bundle is a folder holding ``manifest.json`` and the files it lists: ``student.safetensors`` (the causal student,
Wan-native keys), ``vae.safetensors`` (its VAE), ``text.safetensors`` (the prompt embedding, one tensor
(1, L, text_dim)) and, optionally, ``decoder.safetensors`` (a TAEHV streaming decoder for the VAE's latents, public
``taew2_1`` key names, its :class:`~lipforcing.decoders.TAEHVConfig` in the safetensors metadata as
:func:`~lipforcing.decoders.save_decoder` writes it; ``Engine.load`` decodes with it unless ``decoder="wan"``).
The audio front end is the built-in log-mel one (:class:`lipforcing.audio.MelFeatures`): the manifest records its
parameters and the features of a fixed probe signal, so a front end that computes something else than what the
student was trained on is an error, not a silent mismatch.

The embedded default is the bundle in this package's ``default/`` folder (shipping it is dropping the files written
by :func:`write_default` there).  ``LIPFORCING_DEFAULT_WEIGHTS=<folder>`` points at another bundle instead, and
``LIPFORCING_DEFAULT_WEIGHTS=none`` turns the default off (``Engine.load()`` then draws random tiny weights).

manifest.json (``format`` 1)::

    {"format": 1, "name": str, "resolution": [H, W], "model": ModelConfig fields, "vae": VAEConfig fields,
     "audio": {"kind": "mel", "n_mels", "fmin", "fmax", "eps", "sample_rate", "samples_per_frame", "window",
               "hop", "lookahead_samples", "probe_mean": [audio_dim floats]},
     "files": {"student" | "vae" | "text" [| "decoder"]: {"path": file name, "sha256": hex, "bytes": int,
                                                          "dtype": str}},
     "decoder": TAEHVConfig fields (only with a decoder file: latent_channels = vae z_dim, 2 ** sum(spatial_upscale)
                = the VAE's spatial factor),
     "produced_by": {"commands": [str], "commit": str, "lipforcing_version": str},
     "eval": {...free-form numbers...}, "notes": str}

Reading a bundle (:func:`read_manifest`) checks every field, that each listed file exists and has the recorded
sha256, the audio front end and that the decoder (if any) fits the VAE; loading a part checks its tensors against
the recorded configs.  Every problem is a :class:`WeightsError` naming the file.  Bundles without a decoder are
unchanged (the format-1 bundles written before decoders could be shipped); a lipforcing older than the decoder part
refuses a bundle with one ("'files' must list exactly ...").
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from lipforcing._weights import CheckpointError

__all__ = ["WeightsError", "Manifest", "FORMAT", "ENV_VAR", "DEFAULT_FOLDER", "MANIFEST", "default_manifest",
           "read_manifest", "write_default", "mel_params", "OPTIONAL_PARTS"]

FORMAT = 1
ENV_VAR = "LIPFORCING_DEFAULT_WEIGHTS"
DEFAULT_FOLDER = Path(__file__).resolve().parent / "default"
MANIFEST = "manifest.json"
PARTS = ("student", "vae", "text")             # every bundle has these
OPTIONAL_PARTS = ("decoder",)                  # and may have these
_FILE_NAMES = {"student": "student.safetensors", "vae": "vae.safetensors", "text": "text.safetensors",
               "decoder": "decoder.safetensors"}
_DISABLED = ("none", "off", "random")
_PROBE_SECONDS = 0.2            # 5 video frames of the probe chirp
_PROBE_ATOL, _PROBE_RTOL = 1e-3, 1e-4
_DTYPE_NAMES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp32": torch.float32, "float32": torch.float32}


class WeightsError(CheckpointError):
    """A weight bundle is unusable: manifest missing or invalid, a listed file missing, changed (sha256) or not
    matching the recorded configs.  The message names the file."""


# ---------------------------------------------------------------------------------------------------- audio
def _probe_pcm() -> torch.Tensor:
    """A fixed test signal: a 100 -> 1300 Hz linear chirp plus a 3 kHz tone (exact formula, no RNG)."""
    from lipforcing.audio.pcm import SAMPLE_RATE

    t = torch.arange(int(_PROBE_SECONDS * SAMPLE_RATE), dtype=torch.float64) / SAMPLE_RATE
    x = 0.5 * torch.sin(2 * math.pi * (100 * t + 3000 * t ** 2)) + 0.1 * torch.sin(2 * math.pi * 3000 * t)
    return x.float()


def _probe_mean(params: Mapping) -> list[float]:
    """Per-feature mean over the probe's frames, computed by the front end ``params`` describe."""
    from lipforcing.audio import MelFeatures

    fe = MelFeatures(n_mels=int(params["n_mels"]), fmin=float(params["fmin"]), fmax=float(params["fmax"]),
                     eps=float(params["eps"]))
    return [round(float(v), 6) for v in fe.frames(_probe_pcm()).double().mean(0)]


def mel_params(n_mels: int, *, fmin: float = 0.0, fmax: float = 8000.0, eps: float = 1e-6) -> dict:
    """The manifest's ``audio`` entry for ``MelFeatures(n_mels, fmin=, fmax=, eps=)`` (the probe included)."""
    from lipforcing.audio import MelFeatures
    from lipforcing.audio import mel
    from lipforcing.audio.pcm import SAMPLE_RATE, SAMPLES_PER_FRAME

    MelFeatures(n_mels=n_mels, fmin=fmin, fmax=fmax, eps=eps)          # validates the values
    p = {"kind": "mel", "n_mels": int(n_mels), "fmin": float(fmin), "fmax": float(fmax), "eps": float(eps),
         "sample_rate": SAMPLE_RATE, "samples_per_frame": SAMPLES_PER_FRAME, "window": mel._WIN, "hop": mel._HOP,
         "lookahead_samples": MelFeatures.lookahead_samples}
    p["probe_mean"] = _probe_mean(p)
    return p


def _check_audio(audio, model_config, source: Path) -> dict:
    """The manifest's audio entry against this lipforcing's built-in front end; returns it."""
    if not isinstance(audio, Mapping) or audio.get("kind") != "mel":
        kind = audio.get("kind") if isinstance(audio, Mapping) else type(audio).__name__
        raise WeightsError(f"{source}: 'audio' must describe the built-in log-mel front end (kind 'mel'), got "
                           f"{kind!r}; no other front end can be shipped in a bundle yet")
    need = ("n_mels", "fmin", "fmax", "eps", "sample_rate", "samples_per_frame", "window", "hop",
            "lookahead_samples", "probe_mean")
    missing = [k for k in need if k not in audio]
    if missing:
        raise WeightsError(f"{source}: the audio entry lacks {missing}")
    try:
        here = mel_params(audio["n_mels"], fmin=audio["fmin"], fmax=audio["fmax"], eps=audio["eps"])
    except (TypeError, ValueError, KeyError) as exc:
        raise WeightsError(f"{source}: invalid audio front end parameters: {exc}") from None
    diff = [f"{k} {audio[k]!r} (this lipforcing: {here[k]!r})" for k in need[4:-1] if audio[k] != here[k]]
    if diff:
        raise WeightsError(f"{source}: the student was trained with a mel front end framed differently from this "
                           f"lipforcing's: " + ", ".join(diff))
    if 2 * here["n_mels"] != model_config.audio_dim:
        raise WeightsError(f"{source}: the mel front end gives 2 * n_mels = {2 * here['n_mels']} features but the "
                           f"model's audio_dim is {model_config.audio_dim}")
    try:
        rec = torch.tensor(audio["probe_mean"], dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        rec = None
    now = torch.tensor(here["probe_mean"], dtype=torch.float64)
    if rec is None or rec.shape != now.shape or not torch.allclose(rec, now, rtol=_PROBE_RTOL, atol=_PROBE_ATOL):
        worst = float((rec - now).abs().max()) if rec is not None and rec.shape == now.shape else float("nan")
        raise WeightsError(f"{source}: this lipforcing's mel front end computes different features from the one "
                           f"the student was trained with (probe signal: max difference {worst:.3g}); the built-in "
                           "front end changed since the bundle was written")
    return dict(audio)


# ---------------------------------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A validated bundle (see the module docstring).  ``folder``: where it lives; ``model`` / ``vae_config``:
    the recorded configs; ``resolution`` (H, W); ``audio``: the mel front end's parameters; ``files``: part ->
    {path, sha256, bytes, dtype}; ``produced_by``, ``eval``: free-form provenance and numbers;
    ``decoder_config``: the bundled TAEHV decoder's :class:`~lipforcing.decoders.TAEHVConfig`, or None when the
    bundle has no decoder."""

    folder: Path
    name: str
    resolution: tuple[int, int]
    model: object                     # ModelConfig
    vae_config: object                # VAEConfig
    audio: dict
    files: dict
    produced_by: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    notes: str = ""
    decoder_config: object = None     # TAEHVConfig or None

    @property
    def has_decoder(self) -> bool:
        return "decoder" in self.files

    def path(self, part: str) -> Path:
        return self.folder / self.files[part]["path"]

    def describe(self) -> str:
        h, w = self.resolution
        dec = ", TAEHV decoder" if self.has_decoder else ""
        return (f"{self.name!r} from {self.folder} ({h}x{w}, {self.model.num_layers} blocks, dim {self.model.dim}"
                f"{dec})")

    # ---- loading the parts (each checks its tensors against the recorded config; errors name the file)
    def load_student(self, *, device=None, dtype=None):
        from lipforcing.model import load_model

        p = self.path("student")
        try:
            return load_model(p, config=self.model, causal=True, device=device, dtype=dtype)
        except (CheckpointError, ValueError, KeyError) as exc:
            raise WeightsError(f"{p} does not hold the student the manifest describes: {exc}") from None

    def load_vae(self, *, device=None, dtype=None):
        from lipforcing.vae import load_vae

        p = self.path("vae")
        try:
            return load_vae(p, config=self.vae_config, device=device, dtype=dtype)
        except (CheckpointError, ValueError, KeyError) as exc:
            raise WeightsError(f"{p} does not hold the VAE the manifest describes: {exc}") from None

    def load_decoder(self, *, device=None, dtype=None):
        """The bundled TAEHV decoder (eval mode, no gradients), or None when the bundle has none.  Its tensors are
        checked against the manifest's ``decoder`` config (and the config in the file's metadata must be that
        one); every problem is a :class:`WeightsError` naming the file."""
        if not self.has_decoder:
            return None
        from lipforcing.decoders import load_decoder
        from lipforcing.decoders.loading import CONFIG_METADATA_KEY

        p = self.path("decoder")
        try:
            from safetensors import safe_open

            with safe_open(os.fspath(p), framework="pt") as f:
                meta = f.metadata() or {}
            if CONFIG_METADATA_KEY in meta:
                stored = json.loads(meta[CONFIG_METADATA_KEY])
                want = self.decoder_config.to_dict()
                if _jsonable(stored) != _jsonable(want):
                    raise CheckpointError(f"its metadata records the config {stored}, the manifest {want}")
            return load_decoder(p, config=self.decoder_config, device=device, dtype=dtype)
        except (CheckpointError, ValueError, KeyError, TypeError, OSError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{p} does not hold the TAEHV decoder the manifest describes: {exc}") from None

    def load_text(self) -> torch.Tensor:
        from lipforcing.engine.engine import _load_text

        p = self.path("text")
        try:
            return _load_text(p, self.model.text_dim)
        except (CheckpointError, ValueError, TypeError) as exc:
            raise WeightsError(f"{p}: not the (1, L, text_dim={self.model.text_dim}) prompt embedding the model "
                               f"needs: {exc}") from None

    def audio_features(self, *, device=None):
        from lipforcing.audio import MelFeatures

        a = self.audio
        return MelFeatures(n_mels=a["n_mels"], fmin=a["fmin"], fmax=a["fmax"], eps=a["eps"], device=device)


def _jsonable(obj):
    """``obj`` as JSON gives it back (tuples -> lists), for comparing configs."""
    return json.loads(json.dumps(obj))


def _decoder_config(entry, src):
    """The manifest's ``decoder`` entry -> TAEHVConfig (WeightsError naming ``src`` otherwise)."""
    from lipforcing.decoders import TAEHVConfig

    fields = ("latent_channels", "encoder_width", "decoder_widths", "spatial_upscale")
    if not isinstance(entry, Mapping) or sorted(entry) != sorted(fields):
        got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
        raise WeightsError(f"{src}: 'decoder' must hold the TAEHVConfig fields {list(fields)}, got {got}")
    try:
        if not all(isinstance(entry[k], list) for k in ("decoder_widths", "spatial_upscale")):
            raise ValueError("decoder_widths and spatial_upscale must be lists")
        return TAEHVConfig(**{k: entry[k] for k in fields})
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{src}: invalid decoder config: {exc}") from None


def _check_decoder_fits(dcfg, vae_config, where) -> None:
    """A TAEHV decoder (its config) must decode the VAE's latents: same channels, same spatial factor."""
    if dcfg.latent_channels != vae_config.z_dim:
        raise WeightsError(f"{where}: the TAEHV decoder takes {dcfg.latent_channels} latent channels but the VAE has "
                           f"z_dim {vae_config.z_dim}; it cannot decode this bundle's latents")
    if dcfg.spatial_factor != vae_config.spatial_factor:
        raise WeightsError(f"{where}: the TAEHV decoder upsamples {dcfg.spatial_factor}x (spatial_upscale "
                           f"{list(dcfg.spatial_upscale)}) but the VAE's latents are {vae_config.spatial_factor}x "
                           "smaller than the frames")


def read_manifest(folder, *, verify: bool = True) -> Manifest:
    """Read and validate ``folder/manifest.json``; ``verify``: also check each listed file's size and sha256."""
    from lipforcing.config import ModelConfig
    from lipforcing.engine.engine import parse_resolution
    from lipforcing.model.loading import check_config_limits
    from lipforcing.vae import VAEConfig

    folder = Path(os.fspath(folder))
    src = folder / MANIFEST
    if not src.is_file():
        raise WeightsError(f"no weight bundle at {folder}: {MANIFEST} is missing")
    try:
        data = json.loads(src.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{src} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{src} must hold a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise WeightsError(f"{src}: format {data.get('format')!r} is not supported (this lipforcing reads format "
                           f"{FORMAT})")
    missing = [k for k in ("resolution", "model", "vae", "audio", "files") if k not in data]
    if missing:
        raise WeightsError(f"{src}: missing entries {missing}")
    try:
        check_config_limits(data["model"])
        model = ModelConfig.from_dict(data["model"])
    except (CheckpointError, TypeError, ValueError, AttributeError, KeyError) as exc:
        raise WeightsError(f"{src}: invalid model config: {exc}") from None
    try:
        vae_config = VAEConfig.from_dict(data["vae"])
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise WeightsError(f"{src}: invalid VAE config: {exc}") from None
    if vae_config.z_dim != model.out_dim:
        raise WeightsError(f"{src}: the VAE has z_dim {vae_config.z_dim} but the model predicts {model.out_dim} "
                           "latent channels")
    try:
        res = data["resolution"]
        resolution = parse_resolution(tuple(res) if isinstance(res, list) else res, 0)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{src}: invalid resolution: {exc}") from None
    step = vae_config.spatial_factor * model.patch_size[1]
    if resolution[0] % step or resolution[1] % step:
        raise WeightsError(f"{src}: resolution {resolution} is not a multiple of {step} (VAE factor x patch)")
    files = data["files"]
    if not isinstance(files, dict) or sorted(set(files) - set(OPTIONAL_PARTS)) != sorted(PARTS):
        got = sorted(files) if isinstance(files, dict) else type(files).__name__
        raise WeightsError(f"{src}: 'files' must list exactly {list(PARTS)} (and optionally {list(OPTIONAL_PARTS)}), "
                           f"got {got}")
    for part, entry in files.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("path"), str)
              and re.fullmatch(r"[A-Za-z0-9_.-]+", entry["path"]) is not None and not entry["path"].startswith(".")
              and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]))
        if not ok:
            raise WeightsError(f"{src}: files.{part} must be {{'path': a file name in the bundle folder, 'sha256': "
                               f"64 hex digits, ...}}, got {entry!r}")
        p = folder / entry["path"]
        if not p.is_file():
            raise WeightsError(f"{p}: missing (listed as the {part} file in {src})")
        if verify:
            size = p.stat().st_size
            if isinstance(entry.get("bytes"), int) and entry["bytes"] != size:
                raise WeightsError(f"{p}: {size} bytes, but {src} records {entry['bytes']} (changed or truncated)")
            digest = _sha256(p)
            if digest != entry["sha256"]:
                raise WeightsError(f"{p}: sha256 {digest} does not match {src} ({entry['sha256']}); the file was "
                                   "changed or corrupted (write the bundle again with lipforcing.weights."
                                   "write_default)")
    decoder_config = None
    if "decoder" in files or "decoder" in data:
        if "decoder" not in files:
            raise WeightsError(f"{src}: a 'decoder' config but no decoder file in 'files'")
        if "decoder" not in data:
            raise WeightsError(f"{src}: files.decoder is listed but the 'decoder' config entry is missing")
        decoder_config = _decoder_config(data["decoder"], src)
        _check_decoder_fits(decoder_config, vae_config, folder / files["decoder"]["path"])
    audio = _check_audio(data["audio"], model, src)
    extra = {k: data.get(k) or {} for k in ("produced_by", "eval")}
    for k, v in extra.items():
        if not isinstance(v, dict):
            raise WeightsError(f"{src}: '{k}' must be a JSON object, got {type(v).__name__}")
    return Manifest(folder=folder, name=str(data.get("name", folder.name)), resolution=resolution, model=model,
                    vae_config=vae_config, audio=audio, files={k: dict(v) for k, v in files.items()},
                    produced_by=extra["produced_by"], eval=extra["eval"], notes=str(data.get("notes", "")),
                    decoder_config=decoder_config)


def default_manifest(folder=None) -> Manifest | None:
    """The bundle ``Engine.load()`` uses without a checkpoint: ``folder`` if given, else ``$LIPFORCING_DEFAULT_WEIGHTS``
    (``none`` / ``off``: no default), else this package's ``default/`` folder.  None when the package folder holds
    no ``manifest.json`` (nothing shipped) or the default is turned off; an explicitly named folder without a valid
    bundle is a :class:`WeightsError`."""
    if folder is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env.lower() in _DISABLED:
            return None
        if env:
            p = Path(env).expanduser()
            if not (p / MANIFEST).is_file():
                raise WeightsError(f"{ENV_VAR}={env}: no {MANIFEST} there (expected a bundle folder written by "
                                   "lipforcing.weights.write_default, or 'none' for no default)")
            return read_manifest(p)
        if not (DEFAULT_FOLDER / MANIFEST).is_file():
            return None
        return read_manifest(DEFAULT_FOLDER)
    return read_manifest(folder)


# ---------------------------------------------------------------------------------------------------- writing
def _git_commit() -> str:
    """The commit of the checkout this package runs from (``+dirty`` with uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, got {dtype!r}")
        return _DTYPE_NAMES[dtype.lower()]
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be fp16, bf16 or fp32, got {dtype!r}")
    return dtype


def _save(sd: dict, path: Path, metadata: dict, what: str) -> None:
    from safetensors.torch import save_file

    from lipforcing._weights import nonfinite_tensors

    bad = nonfinite_tensors(sd)
    if bad:    # e.g. a weight beyond fp16's range
        raise WeightsError(f"{what}: {len(bad)} tensor(s) are not finite in the storage dtype ({bad[:5]}); store it "
                           "in a wider dtype (dtype='fp32')")
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, os.fspath(path), metadata=metadata)
    os.chmod(path, 0o644)      # safetensors creates 0600 files: package data must be readable by every user


_FLAT_LIST = re.compile(r"\[\s*((?:[-+.\deE]+|true|false|null)(?:,\s*(?:[-+.\deE]+|true|false|null))*)\s*\]")


def _dumps(obj) -> str:
    """Indented JSON with lists of numbers kept on one line (the configs' stats, the audio probe)."""
    return _FLAT_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
                          json.dumps(obj, indent=1)) + "\n"


def _weights_path(path, name: str) -> Path:
    """A weight file from a file path, a checkpoint folder or a run folder (its ``latest`` checkpoint)."""
    from lipforcing.distill.checkpoint import resolve_checkpoint

    p = Path(os.fspath(path))
    if p.is_dir():
        p = resolve_checkpoint(p)
        p = p / name if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no {name} there (expected the file, a checkpoint folder or a run folder)")
    return p


def write_default(folder, *, student, vae, text, resolution, audio=None, name: str = "default",
                  commands=(), commit: str | None = None, evaluation: Mapping | None = None, notes: str = "",
                  dtype="fp16", overwrite: bool = False, decoder=None) -> Manifest:
    """Write a weight bundle to ``folder`` (shipping the default = ``folder`` is ``lipforcing/weights/default``).

    student : the causal student (a ``CausalLipSyncDiT``) or its weights: a file, or an sf/df checkpoint or run
        folder (its ``student.safetensors``; a run folder's ``latest`` checkpoint).
    vae : a ``WanVAE`` or its weights: a file, or a vae stage checkpoint or run folder (its ``vae.safetensors``; the
        config recorded in the file's metadata is used).
    text : the prompt embedding (L, text_dim) / (1, L, text_dim) tensor, or its file.
    resolution : face-crop size the student was trained at (int or (H, W)).
    audio : the mel front end's parameters (a dict for :func:`mel_params`: ``n_mels``, ``fmin``, ``fmax``,
        ``eps``); default ``MelFeatures(audio_dim // 2)``, as the world data builder uses.
    commands, commit : how the weights were produced (commit default: this checkout's HEAD).
    evaluation : free-form numbers (the manifest's ``eval``, e.g. ``lipforcing eval``'s table).
    dtype : storage dtype of the student, VAE and decoder weights (fp16 default; the text embedding stays fp32).
    overwrite : replace an existing bundle in ``folder`` (a ``decoder.safetensors`` left from it goes when the new
        bundle has no decoder).
    decoder : optional TAEHV streaming decoder shipped with the bundle (``Engine.load`` then decodes with it unless
        ``decoder="wan"``): a ``TAEHV`` model or its weights, a file (``.safetensors`` written by ``save_decoder`` /
        the decoder stage, or ``taew2_1.pth``) or a decoder-stage checkpoint or run folder (its
        ``decoder.safetensors``).  It must decode the VAE's latents: latent channels = the VAE's z_dim and spatial
        upscale = the VAE's spatial factor (:class:`WeightsError` naming the file otherwise).

    Returns the bundle as :func:`read_manifest` reads it back (so a written bundle is always a valid one)."""
    from lipforcing.engine.engine import _load_text, parse_resolution
    from lipforcing.model import load_model
    from lipforcing.model.loading import CONFIG_METADATA_KEY
    from lipforcing.model.student import CausalLipSyncDiT
    from lipforcing.vae import VAEConfig, WanVAE, load_vae
    from lipforcing import __version__

    folder = Path(os.fspath(folder))
    store = _as_dtype(dtype)
    if (folder / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{folder / MANIFEST} exists; pass overwrite=True to replace the bundle")
    sources = {}
    if isinstance(student, (str, os.PathLike)):
        sources["student"] = str(_weights_path(student, "student.safetensors"))
        student = load_model(sources["student"], causal=True)
    if not isinstance(student, CausalLipSyncDiT):
        raise TypeError(f"student must be the causal student (CausalLipSyncDiT) or its weights file, got "
                        f"{type(student).__name__}")
    cfg = student.config
    vae_meta = {}
    if isinstance(vae, (str, os.PathLike)):
        from lipforcing._weights import read_safetensors

        vae = sources["vae"] = str(_weights_path(vae, "vae.safetensors"))
        vcfg = None
        if os.fspath(vae).endswith(".safetensors"):
            _, vae_meta = read_safetensors(vae, "VAE checkpoint")
            if "vae_config" in vae_meta:
                vcfg = VAEConfig.from_dict(json.loads(vae_meta["vae_config"]))
        vae = load_vae(vae, config=vcfg)
    if not isinstance(vae, WanVAE):
        raise TypeError(f"vae must be a WanVAE or its weights file, got {type(vae).__name__}")
    if vae.z_dim != cfg.out_dim:
        raise ValueError(f"the VAE has z_dim {vae.z_dim} but the student predicts {cfg.out_dim} channels")
    if isinstance(text, (str, os.PathLike)):
        sources["text"] = str(text)
    ctx = _load_text(text, cfg.text_dim).float()
    res = parse_resolution(resolution, 0)
    step = vae.spatial_factor * cfg.patch_size[1]
    if res[0] % step or res[1] % step:
        raise ValueError(f"resolution {res} must be a multiple of {step} (VAE factor x patch)")
    if audio is None:
        if cfg.audio_dim % 2:
            raise ValueError(f"the model's audio_dim {cfg.audio_dim} is odd: the mel front end gives 2 * n_mels")
        audio = {"n_mels": cfg.audio_dim // 2}
    if not isinstance(audio, Mapping):
        raise TypeError(f"audio must be a dict of MelFeatures parameters (n_mels, fmin, fmax, eps), got "
                        f"{type(audio).__name__}")
    audio_entry = mel_params(**{k: audio[k] for k in audio if k in ("n_mels", "fmin", "fmax", "eps")})
    if 2 * audio_entry["n_mels"] != cfg.audio_dim:
        raise ValueError(f"n_mels {audio_entry['n_mels']} gives {2 * audio_entry['n_mels']} features, the student "
                         f"takes audio_dim {cfg.audio_dim}")
    if decoder is not None:
        from lipforcing.decoders import TAEHV, load_decoder

        if isinstance(decoder, (str, os.PathLike)):
            decoder = sources["decoder"] = str(_weights_path(decoder, _FILE_NAMES["decoder"]))
            decoder = load_decoder(decoder)          # CheckpointError naming the file for anything not a TAEHV
        if not isinstance(decoder, TAEHV):
            raise TypeError(f"decoder must be a TAEHV model or its weights file, got {type(decoder).__name__}")
        _check_decoder_fits(decoder.config, vae.config, sources.get("decoder", folder / _FILE_NAMES["decoder"]))

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    sd = {k: v.to(store) for k, v in student.state_dict().items()}
    _save(sd, folder / _FILE_NAMES["student"], {CONFIG_METADATA_KEY: json.dumps(cfg.to_dict())}, "student")
    files["student"] = str(store).replace("torch.", "")
    sd = {k: v.to(store) if v.is_floating_point() else v for k, v in vae.state_dict().items()}
    meta = {k: v for k, v in vae_meta.items() if isinstance(v, str)}
    meta["vae_config"] = json.dumps(vae.config.to_dict())
    _save(sd, folder / _FILE_NAMES["vae"], meta, "vae")
    files["vae"] = files["student"]
    _save({"text": ctx}, folder / _FILE_NAMES["text"], {}, "text")
    files["text"] = "float32"
    if decoder is not None:
        from lipforcing.decoders.loading import config_metadata

        sd = {k: v.to(store) for k, v in decoder.state_dict().items()}
        _save(sd, folder / _FILE_NAMES["decoder"], config_metadata(decoder.config), "decoder")
        files["decoder"] = files["student"]
    entries = {}
    for part, dt in files.items():
        p = folder / _FILE_NAMES[part]
        entries[part] = {"path": p.name, "sha256": _sha256(p), "bytes": p.stat().st_size, "dtype": dt}
    manifest = {
        "format": FORMAT, "name": str(name), "resolution": list(res), "model": cfg.to_dict(),
        "vae": vae.config.to_dict(), "audio": audio_entry, "files": entries,
        **({"decoder": decoder.config.to_dict()} if decoder is not None else {}),
        "produced_by": {"commands": [str(c) for c in commands], "sources": sources,
                        "commit": commit if commit is not None else _git_commit(),
                        "lipforcing_version": __version__},
        "eval": dict(evaluation or {}), "notes": str(notes)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(_dumps(manifest))
    os.replace(tmp, folder / MANIFEST)           # the manifest appears last, whole
    stale = folder / _FILE_NAMES["decoder"]
    if decoder is None and stale.exists():       # from the bundle this one replaced
        stale.unlink()
    return read_manifest(folder)
