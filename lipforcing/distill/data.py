"""Training data for distillation: precomputed latent clips, and a synthetic stand-in for tests.

One sample (a dict of CPU tensors, the interface every dataset here returns)::

    latents   (16, F, H, W)        clean video latents (Wan VAE, normalised) -- the DF target / clip shape
    y         (in_dim - 16, F, H, W) conditioning channels: reference latent (16, repeated over F), mouth mask
                                   (1, 1 = generate), mouth-masked video latents (16), reference-sequence latents (16)
    audio     (F, 4, audio_dim)    wav2vec features of the 4 video frames each latent covers (AudioPack layout)
    text      (Lt, text_dim)       prompt embedding (UMT5)
    neg_text  (Lt, text_dim)       optional: the empty-prompt embedding (CFG negative); default zeros
    waveform  (L,)                 optional: 16 kHz mono audio aligned with video frame 0 (SyncNet reward)

Files for :class:`LatentFileDataset` (``.safetensors`` or ``.pt`` read with ``torch.load(weights_only=True)``)
hold those keys; instead of ``y`` they may hold its parts ``ref_latent`` (16, H, W) or (16, F, H, W), ``mask``
((H, W), (F, H, W) or (1, F, H, W)), ``masked_latents`` (16, F, H, W) and ``ref_sequence`` (16, F, H, W), and
instead of grouped ``audio`` the per-video-frame features ``audio`` (1 + 4(F-1), audio_dim).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from lipforcing._weights import read_weight_file
from lipforcing.config import ModelConfig

SAMPLE_KEYS = ("latents", "y", "audio", "text", "neg_text", "waveform")
SAMPLES_PER_VIDEO_FRAME = 640  # 16 kHz / 25 fps


class SyntheticLatentDataset(torch.utils.data.Dataset):
    """Random clips with the shapes of ``config`` (deterministic per index and seed), for tests and smoke runs.

    The conditioning channels are built like the real ones (reference latent = latent frame 0, a mouth mask over
    the lower half, masked latents, reference sequence = the latents), so the task is learnable."""

    def __init__(self, config: ModelConfig, *, num_samples: int = 8, frames: int = 6, height: int = 8,
                 width: int = 8, text_len: int = 8, seed: int = 0, waveform: bool = True):
        for name, v in (("num_samples", num_samples), ("frames", frames), ("height", height), ("width", width),
                        ("text_len", text_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if config.in_dim - config.out_dim != 49:
            raise ValueError(f"the synthetic conditioning has 49 channels; config.in_dim - out_dim = "
                             f"{config.in_dim - config.out_dim}")
        self.config, self.num_samples = config, num_samples
        self.frames, self.height, self.width, self.text_len = frames, height, width, text_len
        self.seed, self.waveform = seed, waveform

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        c = self.config
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        F, H, W = self.frames, self.height, self.width
        # smooth-ish latents: low-resolution noise upsampled, so neighbouring frames are related
        lo = torch.randn(c.out_dim, F, max(1, H // 2), max(1, W // 2), generator=g)
        latents = torch.nn.functional.interpolate(lo[None], size=(F, H, W), mode="trilinear",
                                                  align_corners=False)[0]
        mask = torch.zeros(1, F, H, W)
        mask[..., H // 2:, :] = 1.0
        y = torch.cat([latents[:, :1].expand(-1, F, -1, -1), mask, latents * (1 - mask), latents], dim=0)
        sample = {"latents": latents, "y": y,
                  "audio": torch.randn(F, 4, c.audio_dim, generator=g),
                  "text": torch.randn(self.text_len, c.text_dim, generator=g),
                  "neg_text": torch.zeros(self.text_len, c.text_dim)}
        if self.waveform:
            n = (1 + 4 * (F - 1)) * SAMPLES_PER_VIDEO_FRAME
            sample["waveform"] = 0.1 * torch.randn(n, generator=g)
        return sample


class LatentFileDataset(torch.utils.data.Dataset):
    """Precomputed clips: one ``.safetensors`` / ``.pt`` file per sample (see the module docstring).

    root : a directory (every ``*.safetensors`` / ``*.pt`` in it, sorted) or a list of files.
    config : the model config (checks in_dim / audio_dim / text_dim)."""

    def __init__(self, root, config: ModelConfig):
        if isinstance(root, (list, tuple)):
            files = [Path(p) for p in root]
        else:
            root = Path(root)
            if not root.exists():
                raise FileNotFoundError(f"dataset path {str(root)!r} does not exist")
            files = ([root] if root.is_file() else
                     sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".pt", ".pth")))
        if not files:
            raise FileNotFoundError(f"no .safetensors / .pt files in {str(root)!r}")
        self.files, self.config = files, config

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        # the shared safe reader: errors name the file (truncated, corrupt, pickled objects, not a regular file)
        raw, _ = read_weight_file(path, "latent sample")
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a dict of tensors, got {type(raw).__name__}")
        return normalize_sample(raw, self.config, name=str(path))


def normalize_sample(raw: dict, config: ModelConfig, *, name: str = "sample") -> dict:
    """Turn a stored sample (either layout of the module docstring) into the canonical dict, with checks."""
    c = config
    if "latents" not in raw:
        raise KeyError(f"{name}: missing 'latents' (16, F, H, W); keys: {sorted(raw)}")
    lat = raw["latents"].float()
    if lat.dim() != 4 or lat.shape[0] != c.out_dim:
        raise ValueError(f"{name}: latents must be ({c.out_dim}, F, H, W), got {tuple(lat.shape)}")
    _, F, H, W = lat.shape
    if "y" in raw:
        y = raw["y"].float()
    else:
        missing = [k for k in ("ref_latent", "mask", "masked_latents", "ref_sequence") if k not in raw]
        if missing:
            raise KeyError(f"{name}: needs 'y' or all of ref_latent, mask, masked_latents, ref_sequence; "
                           f"missing {missing}")
        ref = raw["ref_latent"].float()
        if ref.dim() == 3:
            ref = ref[:, None]
        ref = ref.expand(-1, F, -1, -1) if ref.shape[1] == 1 else ref
        mask = raw["mask"].float()
        while mask.dim() < 4:
            mask = mask[None]
        mask = mask.expand(1, F, H, W)
        y = torch.cat([ref, mask, raw["masked_latents"].float(), raw["ref_sequence"].float()], dim=0)
    if tuple(y.shape) != (c.in_dim - c.out_dim, F, H, W):
        raise ValueError(f"{name}: conditioning y must be ({c.in_dim - c.out_dim}, {F}, {H}, {W}), "
                         f"got {tuple(y.shape)}")
    out = {"latents": lat, "y": y}
    if "audio" in raw and raw["audio"] is not None:
        a = raw["audio"].float()
        if a.dim() == 2:
            from lipforcing.model.audio import group_audio_frames

            a = group_audio_frames(a[None])[0]
        if tuple(a.shape) != (F, 4, c.audio_dim):
            raise ValueError(f"{name}: audio must be ({F}, 4, {c.audio_dim}) or (1 + 4*{F - 1}, {c.audio_dim}), "
                             f"got {tuple(raw['audio'].shape)}")
        out["audio"] = a
    if "text" not in raw:
        raise KeyError(f"{name}: missing 'text' (Lt, {c.text_dim}) prompt embedding")
    text = raw["text"].float()
    if text.dim() == 3 and text.shape[0] == 1:
        text = text[0]
    if text.dim() != 2 or text.shape[1] != c.text_dim:
        raise ValueError(f"{name}: text must be (Lt, {c.text_dim}), got {tuple(raw['text'].shape)}")
    out["text"] = text
    neg = raw.get("neg_text")
    if neg is not None:
        neg = neg.float()
        out["neg_text"] = neg[0] if neg.dim() == 3 else neg
    if raw.get("waveform") is not None:
        out["waveform"] = raw["waveform"].float().flatten()
    return out


def collate(samples: Sequence[dict]) -> dict:
    """Stack samples into a batch (text padded with zeros to the longest; a missing neg_text becomes zeros)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    out = {}
    Lt = max(s["text"].shape[0] for s in samples)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0, 0, Lt - t.shape[0]))

    out["latents"] = torch.stack([s["latents"] for s in samples])
    out["y"] = torch.stack([s["y"] for s in samples])
    out["text"] = torch.stack([pad(s["text"]) for s in samples])
    out["neg_text"] = torch.stack([pad(s.get("neg_text", torch.zeros_like(s["text"]))) for s in samples])
    if all("audio" in s for s in samples):
        out["audio"] = torch.stack([s["audio"] for s in samples])
    if all("waveform" in s for s in samples):
        n = min(s["waveform"].shape[0] for s in samples)
        out["waveform"] = torch.stack([s["waveform"][:n] for s in samples])
    return out


def batch_condition(batch: dict, device=None):
    """(latents (B, 16, F, H, W), Condition) on ``device`` from a collated batch."""
    from lipforcing.model.teacher import Condition

    def mv(t):
        return None if t is None else t.to(device)

    return mv(batch["latents"]), Condition(y=mv(batch["y"]), context=mv(batch["text"]), audio=mv(batch.get("audio")),
                                           neg_context=mv(batch.get("neg_text")))
