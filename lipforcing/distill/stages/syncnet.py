"""``lipforcing train --stage syncnet``: a :class:`~lipforcing.distill.syncnet_small.SmallSyncNet` trained on the
procedural world, contrastively with offset negatives.

Per clip (``frames`` video frames of one world person speaking): ``windows`` lip windows v (frames v .. v + 4) are
scored against the audio windows at offsets o = -K .. K frames (MFCC frames 4(v + o) .. 4(v + o) + 19, the pairing
of ``sync_confidence``); logits are the negative Euclidean distances, the loss the cross-entropy with the aligned
window (o = 0) as the class, K = ``max_offset``.  So the distances that LSE-D / LSE-C read are what is trained.
Metrics: ``loss`` and ``acc`` (the aligned window is the nearest).  The exported ``syncnet.safetensors`` carries
its config and loads with :func:`~lipforcing.distill.syncnet_small.load_syncnet` (the sf stage's
``reward.syncnet_path`` and ``lipforcing eval`` accept it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lipforcing.distill.errors import TrainConfigError
from lipforcing.distill.stages.base import Stage, StageConfig, check_int

__all__ = ["SyncNetStageConfig", "SyncNetStage", "syncnet_pairs"]


@dataclass
class SyncNetStageConfig(StageConfig):
    stage: str = "syncnet"
    lr: float = 5e-4
    weight_decay: float = 1e-4
    frame_size: int = 48
    width: int = 32
    embed_dim: int = 128
    lower_half: bool = True
    size: int = 64           # world crop size
    frames: int = 50
    windows: int = 8
    max_offset: int = 6
    speech: str = "auto"
    batch_size: int = 4
    output_dir: str = "runs/syncnet"

    def __post_init__(self):
        super().__post_init__()
        for name, lo in (("frame_size", 16), ("width", 4), ("embed_dim", 1), ("size", 16), ("windows", 1),
                         ("max_offset", 1)):
            check_int(name, getattr(self, name), minimum=lo)
        if self.frames < 2 * self.max_offset + 6 + self.windows:
            raise TrainConfigError(f"frames must be >= 2 * max_offset + 6 + windows "
                                   f"({2 * self.max_offset + 6 + self.windows}), got {self.frames!r}")
        if self.speech not in ("auto", "espeak", "synthetic"):
            raise TrainConfigError(f"speech must be 'auto', 'espeak' or 'synthetic', got {self.speech!r}")


def syncnet_pairs(net, frames_u8: torch.Tensor, audio: torch.Tensor, starts, max_offset: int):
    """Lip windows at ``starts`` and, for each, the audio windows at offsets -K..K.

    Returns (lip (V, 3, 5, S, S), aud (V, 2K + 1, 1, 13, 20)) ready for ``forward_lip`` / ``forward_aud``."""
    from lipforcing.distill.mfcc_frontend import mfcc
    from lipforcing.distill.syncnet import MFCC_PER_FRAME, MFCC_WINDOW, SYNCNET_WINDOW, _prep_frames

    video = _prep_frames(frames_u8, "cpu", torch.float32, True, net)           # (3, T, S, S)
    cc = mfcc(audio.double() * 32768.0, 16000, dtype=torch.float32)             # (13, M)
    lips, auds = [], []
    for v in starts:
        lips.append(video[:, v:v + SYNCNET_WINDOW])
        ws = []
        for o in range(-max_offset, max_offset + 1):
            a = MFCC_PER_FRAME * (v + o)
            ws.append(cc[None, :, a:a + MFCC_WINDOW])
        auds.append(torch.stack(ws))
    return torch.stack(lips), torch.stack(auds)


class SyncNetStage(Stage):
    name = "syncnet"
    Config = SyncNetStageConfig

    def build(self) -> None:
        from lipforcing.distill.syncnet_small import SmallSyncNet

        c = self.cfg
        self.net = SmallSyncNet(c.frame_size, c.width, c.embed_dim, c.lower_half).to(self.device)
        self.models = {"syncnet": (self.net, self.optimizer(self.net))}

    def step(self, k: int) -> dict:
        from lipforcing.world import make_clip

        c = self.cfg
        K = c.max_offset
        lips, auds = [], []
        for b in range(c.batch_size):
            seed = self.seed_of(k, "clip", b)
            clip = make_clip(seed, c.frames, size=c.size, speech=c.speech, reference=False)
            g = self.generator(k, "windows", b)
            hi = c.frames - 5 - K                       # last start whose +K audio window exists
            starts = (K + torch.randperm(hi - K, generator=g)[:c.windows]).tolist()
            lp, au = syncnet_pairs(self.net, torch.from_numpy(clip.frames), torch.from_numpy(clip.audio), starts, K)
            lips.append(lp)
            auds.append(au)
        lip = torch.cat(lips).to(self.device)                                  # (N, 3, 5, S, S)
        aud = torch.cat(auds).to(self.device)                                  # (N, 2K+1, 1, 13, 20)
        N = lip.shape[0]
        le = self.net.forward_lip(lip)                                         # (N, E)
        ae = self.net.forward_aud(aud.flatten(0, 1)).view(N, 2 * K + 1, -1)   # (N, 2K+1, E)
        dist = (le[:, None] - ae).pow(2).sum(-1).add(1e-8).sqrt()
        target = torch.full((N,), K, dtype=torch.long, device=self.device)
        loss = F.cross_entropy(-dist, target)
        gnorm = self.clip_and_step("syncnet", loss)
        dist = dist.detach()
        acc = float((dist.argmin(1) == K).float().mean())
        return {"loss": loss.item(), "acc": acc, "grad_norm": gnorm,
                "dist_pos": float(dist[:, K].mean()), "dist_neg": float(dist.mean())}

    def weight_metadata(self, name: str) -> dict:
        from lipforcing.distill.syncnet_small import SYNCNET_CONFIG_METADATA_KEY

        return {SYNCNET_CONFIG_METADATA_KEY: json.dumps(self.net.config()), "stage": "syncnet"}
