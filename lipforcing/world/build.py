"""The data builder: world clips -> the latent files :class:`lipforcing.distill.LatentFileDataset` reads.

For each clip (identity, speech, motion drawn from the clip's seed; ``split`` picks training or held-out people
and speech) it stores, with the paper's conditioning (DESIGN.md section 2):

  latents         (16, F, h, w)   the VAE latents of the target clip (normalised)
  ref_latent      (16, 1, h, w)   latent frame 0 of the reference sequence
  mask            (1, F, h, w)    the latent mouth mask (1 = generate), :func:`lipforcing.face.latent_mask`
  masked_latents  (16, F, h, w)   latents of the target with the mouth region blanked (pixels * keep-mask)
  ref_sequence    (16, F, h, w)   latents of the reference sequence: the same person, head motion and blinks,
                                  with a mouth driven by *unrelated* speech (no lip-sync shortcut to copy)
  audio           (T, audio_dim)  per-video-frame audio features of the engine's front end (the built-in log-mel
                                  front end for small ``audio_dim``, as ``Engine.load`` picks it)
  text            (L, text_dim)   the fixed prompt embedding (also ``meta/text.safetensors``)
  waveform        (T * 640,)      the 16 kHz speech, aligned with frame 0 (the SyncNet reward)
  mouth           (T, 2)          ground truth: [opening, spread] per video frame (for evaluation)

T = 1 + 4 (F - 1) video frames.  Files are written atomically, named ``clip-<index>.safetensors``; an existing
file is kept (re-running a build resumes it).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

__all__ = ["build_latent_dataset", "prompt_embedding", "encode_clip", "encode_sample"]

log = logging.getLogger("lipforcing.world")


def prompt_embedding(text_dim: int, length: int = 16, seed: int = 1) -> torch.Tensor:
    """The world's fixed prompt embedding (L, text_dim): a seeded random stand-in for UMT5("a person talking")."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(length, text_dim, generator=g)


def _audio_features(audio: np.ndarray, audio_dim: int) -> torch.Tensor:
    from lipforcing.audio import MelFeatures

    if audio_dim % 2 or audio_dim > 512:
        raise ValueError(f"the built-in mel front end needs an even audio_dim <= 512, got {audio_dim}")
    return MelFeatures(n_mels=audio_dim // 2).frames(torch.from_numpy(audio)).float()


@torch.no_grad()
def encode_sample(vae, frames: np.ndarray, ref_frames: np.ndarray, audio: np.ndarray, model_config,
                  text: torch.Tensor) -> dict:
    """The conditioning the models train on, for one clip (CPU tensors): ``latents`` (of ``frames``),
    ``masked_latents`` (``frames`` with the mouth region blanked), ``ref_sequence`` / ``ref_latent`` (of
    ``ref_frames``), ``mask``, ``audio`` (per-frame features of ``audio``, 16 kHz aligned with frame 0), ``text``.

    frames, ref_frames : (T, H, W, 3) uint8, T = 1 + 4k.  The data builder passes the target clip as ``frames``;
    at inference (the eval's teacher rows) the target is unknown and the input video is passed as both, which is
    what the engine's streaming conditioning does."""
    from lipforcing import face

    T, H, W = frames.shape[:3]

    def video(x):
        return torch.from_numpy(x).permute(3, 0, 1, 2)[None].float().to(vae.device) / 127.5 - 1.0

    gen = face.mouth_mask(H, W)
    keep = face.keep_mask(gen).to(vae.device)
    tgt = video(frames)
    lat = vae.encode(torch.cat([tgt, tgt * keep, video(ref_frames)]), normalize=True).float().cpu()
    F_, h, w = lat.shape[2:]
    mask = face.latent_mask(gen, (h, w))[None, None].expand(1, F_, h, w).contiguous()
    return {"latents": lat[0], "masked_latents": lat[1], "ref_sequence": lat[2], "ref_latent": lat[2][:, :1].clone(),
            "mask": mask, "audio": _audio_features(audio, model_config.audio_dim)[:T].contiguous(),
            "text": text.clone()}


def encode_clip(vae, clip, model_config, text: torch.Tensor) -> dict:
    """One world clip -> the sample dict of the module docstring (CPU tensors): :func:`encode_sample` of the clip
    (target ``clip.frames``) plus its waveform and true mouth track."""
    return {**encode_sample(vae, clip.frames, clip.ref_frames, clip.audio, model_config, text),
            "waveform": torch.from_numpy(clip.audio.copy()), "mouth": torch.from_numpy(clip.mouth.as_array())}


def build_latent_dataset(out_dir, vae, *, num_clips: int, frames: int = 21, size: int = 64, split: str = "train",
                         seed: int = 0, model_config=None, speech: str = "auto", progress=None) -> list[Path]:
    """Render ``num_clips`` world clips of ``frames`` video frames (1 + 4k) at ``size`` px, encode them with
    ``vae`` (a :class:`lipforcing.vae.WanVAE`) and write them under ``out_dir``.  Returns the files.

    model_config : the DiT's :class:`~lipforcing.config.ModelConfig` (audio_dim, text_dim; default tiny).
    progress : optional callable ``(done, total)``."""
    from lipforcing.config import ModelConfig
    from lipforcing.distill.checkpoint import save_tensors
    from lipforcing.world.clip import make_clip

    for name, v in (("num_clips", num_clips), ("frames", frames), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    tf, sf = vae.temporal_factor, vae.spatial_factor
    if (frames - 1) % tf:
        raise ValueError(f"frames must be 1 + {tf} k for this VAE, got {frames}")
    if size % (sf * 2):
        raise ValueError(f"size must be a multiple of {sf * 2} (VAE factor x patch 2), got {size}")
    mcfg = model_config or ModelConfig.from_name("tiny")
    if vae.z_dim != mcfg.out_dim:
        raise ValueError(f"the VAE has {vae.z_dim} latent channels, the model expects {mcfg.out_dim}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = prompt_embedding(mcfg.text_dim)
    (out / "meta").mkdir(exist_ok=True)
    save_tensors({"text": text[None]}, out / "meta" / "text.safetensors")     # Engine.load(text=...)
    (out / "meta" / "dataset.json").write_text(json.dumps({"num_clips": num_clips, "frames": frames, "size": size,
                                                  "split": split, "seed": seed, "speech": speech,
                                                  "audio_dim": mcfg.audio_dim, "text_dim": mcfg.text_dim}, indent=1))
    vae = vae.eval()
    files = []
    for i in range(num_clips):
        f = out / f"clip-{i:06d}.safetensors"
        files.append(f)
        if not f.is_file():
            clip = make_clip(seed * 1_000_003 + i, frames, size=size, split=split, speech=speech)
            save_tensors(encode_clip(vae, clip, mcfg, text), f,
                         {"identity": clip.identity.seed, "voice": clip.utterance.voice, "split": split})
        if progress is not None:
            progress(i + 1, num_clips)
    return files
