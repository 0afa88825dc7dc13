"""SyncNet v2 (the network behind the LSE-C / LSE-D lip-sync metrics) and the Lip Forcing sync reward.

``SyncNet`` has the layer layout of the public SyncNet v2 model (joonson/syncnet_python, ``syncnet_v2.model``):
four ``nn.Sequential`` stacks whose state-dict keys are ``netcnnaud.*``, ``netfcaud.*``, ``netcnnlip.*`` and
``netfclip.*``, so those weights load unchanged when a user has them (nothing is downloaded here).

  audio:  MFCC window (B, 1, 13, 20) -> conv stack -> (B, 512) -> fc -> (B, embed_dim)
  video:  5 frames (B, 3, 5, 224, 224), BGR, float in [0, 255] -> conv3d stack -> (B, 512) -> fc -> (B, embed_dim)

``sync_confidence`` is syncnet_python's evaluation (``SyncNetInstance.evaluate``) on already aligned face frames:
video frame v and MFCC frames 4v .. 4v + 19 form the v-th pair (25 fps video, 100 Hz MFCC), embeddings are
compared at audio offsets -vshift .. vshift, the mean distance per offset gives LSE-D (its minimum) and LSE-C
(median - minimum); ``sync_reward_weight`` turns the confidence into the per-sample DMD weight exp(beta * c).
``sync_embeddings`` (one clip -> window embeddings) and ``score_embeddings`` / ``offset_distances`` (embeddings ->
scores) are the two halves of ``sync_confidence``, for callers that want both offset-averaging modes or the
embeddings themselves.  Differences from syncnet_python: no face detection / cropping (frames must already be
aligned faces) and bilinear resizing in torch instead of cv2.
"""
from __future__ import annotations

import os
import pickle
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lipforcing.distill.mfcc_frontend import mfcc as _mfcc

SYNCNET_FRAME_SIZE = 224
SYNCNET_WINDOW = 5            # video frames per lip window
MFCC_PER_FRAME = 4            # 100 Hz MFCC / 25 fps video
MFCC_WINDOW = 20              # MFCC frames per audio window (= 5 video frames)
SAMPLES_PER_FRAME = 640


def _conv_bn_relu(conv: nn.Module, bn: nn.Module, inplace: bool = True) -> list:
    return [conv, bn, nn.ReLU(inplace=inplace)]


class SyncNet(nn.Module):
    """SyncNet v2, state-dict compatible with ``syncnet_v2.model``.

    Args:
        embed_dim: size of the audio and lip embeddings (1024 in the public model).
    Inputs / outputs:
        ``forward_aud(mfcc)``: (B, 1, 13, 20) float MFCC windows -> (B, embed_dim).
        ``forward_lip(frames)``: (B, 3, 5, 224, 224) float, BGR channel order, values in [0, 255] -> (B, embed_dim).
        ``forward(mfcc, frames)``: both, as a tuple (audio, lip).
    The module is built in training mode like any ``nn.Module``; ``from_file`` returns it in eval mode, and
    ``sync_confidence`` always evaluates in eval mode (BatchNorm running statistics) without gradient.
    """

    def __init__(self, embed_dim: int = 1024):
        super().__init__()
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be an int >= 1, got {embed_dim!r}")
        self.embed_dim = embed_dim
        c2, bn2 = nn.Conv2d, nn.BatchNorm2d
        # audio: (1, 13, 20) -> (64, 13, 20) -> (192, 11, 9) -> 384 -> 256 -> (256, 5, 4) -> (512, 1, 1)
        self.netcnnaud = nn.Sequential(
            *_conv_bn_relu(c2(1, 64, (3, 3), stride=(1, 1), padding=(1, 1)), bn2(64)),
            nn.MaxPool2d((1, 1), stride=(1, 1)),
            *_conv_bn_relu(c2(64, 192, (3, 3), stride=(1, 1), padding=(1, 1)), bn2(192)),
            nn.MaxPool2d((3, 3), stride=(1, 2)),
            *_conv_bn_relu(c2(192, 384, (3, 3), padding=(1, 1)), bn2(384)),
            *_conv_bn_relu(c2(384, 256, (3, 3), padding=(1, 1)), bn2(256)),
            *_conv_bn_relu(c2(256, 256, (3, 3), padding=(1, 1)), bn2(256)),
            nn.MaxPool2d((3, 3), stride=(2, 2)),
            *_conv_bn_relu(c2(256, 512, (5, 4), padding=(0, 0)), bn2(512), inplace=False),
        )
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))
        c3, bn3 = nn.Conv3d, nn.BatchNorm3d
        # video: (3, 5, 224, 224) -> (96, 1, 109, 109) -> pool 54 -> (256, 1, 26, 26) -> pool 13 -> 13 -> pool 6
        #        -> (512, 1, 1, 1)
        self.netcnnlip = nn.Sequential(
            *_conv_bn_relu(c3(3, 96, (5, 7, 7), stride=(1, 2, 2), padding=0), bn3(96)),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2)),
            *_conv_bn_relu(c3(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), bn3(256)),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            *_conv_bn_relu(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), bn3(256)),
            *_conv_bn_relu(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), bn3(256)),
            *_conv_bn_relu(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), bn3(256)),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2)),
            *_conv_bn_relu(c3(256, 512, (1, 6, 6), padding=0), bn3(512)),
        )

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 13, MFCC_WINDOW):
            raise ValueError(f"forward_aud expects MFCC windows (B, 1, 13, {MFCC_WINDOW}), got {tuple(x.shape)}")
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        S = SYNCNET_FRAME_SIZE
        if x.dim() != 5 or tuple(x.shape[1:]) != (3, SYNCNET_WINDOW, S, S):
            raise ValueError(f"forward_lip expects frame windows (B, 3, {SYNCNET_WINDOW}, {S}, {S}) (BGR, 0..255), "
                             f"got {tuple(x.shape)}")
        return self.netfclip(self.netcnnlip(x).flatten(1))

    def forward(self, mfcc: torch.Tensor, frames: torch.Tensor):
        return self.forward_aud(mfcc), self.forward_lip(frames)

    @classmethod
    def from_file(cls, path, *, map_location="cpu") -> "SyncNet":
        """Load SyncNet v2 weights (e.g. ``syncnet_v2.model``) from a state-dict file, in eval mode.

        ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``,
        so a checkpoint that is a whole pickled module (or any other pickled object) is refused.  A dict wrapping
        the weights under ``state_dict`` / ``model`` and key prefixes ``module.`` / ``__S__.`` are accepted.
        BatchNorm ``num_batches_tracked`` buffers may be missing (files saved by old PyTorch); any other missing
        or unexpected key is an error.  ``embed_dim`` is read from the weights.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SyncNet weights not found: {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path, device=str(map_location))
        else:
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(
                    f"{path!r} is not a plain state dict: torch.load(weights_only=True) refused it (it most likely "
                    "holds a whole pickled nn.Module, whose loading would run arbitrary code). If you trust the "
                    "file, convert it once with torch.save(torch.load(path, weights_only=False).state_dict(), "
                    "new_path) and load new_path.") from e
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path!r} must hold a state dict (name -> tensor), got {type(state).__name__}")
        clean = {}
        for k, v in state.items():
            for prefix in ("module.", "__S__."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
            clean[k] = v
        if "netfcaud.3.weight" not in clean:
            raise ValueError(f"{path!r} does not look like SyncNet v2 weights: no 'netfcaud.3.weight' key "
                             f"(first keys: {list(clean)[:5]})")
        net = cls(embed_dim=int(clean["netfcaud.3.weight"].shape[0]))
        missing, unexpected = net.load_state_dict(clean, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"{path!r}: state dict does not match SyncNet v2: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        return net.eval()


# ---------------------------------------------------------------------------------------------------------------
# evaluation: LSE-C / LSE-D


class SyncScore(NamedTuple):
    """Result of :func:`sync_confidence`; each field has shape () for one clip or (B,) for a batch.

    confidence: LSE-C, median - min of the mean distances over offsets (higher = more confident sync).
    distance:   LSE-D, the minimum mean distance (lower = better).
    offset:     int64, the audio-video offset in frames at the minimum, in syncnet_python's sign convention:
                ``offset = d > 0`` when the video lags the audio by d frames (the mouth moves d frames after the
                sound).
    mean_dists: (..., 2 * vshift + 1) float, the mean distance for audio offsets -vshift .. vshift
                (index k pairs video window i with audio window i + k - vshift).
    """

    confidence: torch.Tensor
    distance: torch.Tensor
    offset: torch.Tensor
    mean_dists: torch.Tensor


def offset_distances(lip: torch.Tensor, aud: torch.Tensor, vshift: int, *, padding: str = "zeros") -> torch.Tensor:
    """Mean embedding distance per audio offset: (N, D), (N, D) -> (2 * vshift + 1,).

    ``padding="zeros"`` (syncnet_python's ``calc_pdist``): the audio embeddings are padded with ``vshift`` zero
    vectors on each side and every video window i is compared with padded audio i + k, so every offset averages N
    distances.  ``padding="overlap"`` (the LipForcing reward scorer): only the N - |k - vshift| pairs that exist
    are averaged.  Distances are ``F.pairwise_distance`` (L2 of the difference plus 1e-6).
    """
    if lip.shape != aud.shape or lip.dim() != 2:
        raise ValueError(f"lip and aud embeddings must both be (N, D), got {tuple(lip.shape)} and {tuple(aud.shape)}")
    n = lip.shape[0]
    K = 2 * vshift + 1
    if padding == "zeros":
        audp = F.pad(aud, (0, 0, vshift, vshift))                       # (N + 2 vshift, D)
        win = audp.unfold(0, K, 1).transpose(1, 2)                      # (N, K, D): row i = audp[i : i + K]
        return F.pairwise_distance(lip[:, None, :].expand_as(win), win).mean(dim=0)
    if padding == "overlap":
        if n <= vshift:
            raise ValueError(f"padding='overlap' needs more windows ({n}) than vshift ({vshift})")
        out = []
        for s in range(-vshift, vshift + 1):
            lo, hi = max(0, -s), min(n, n - s)
            out.append(F.pairwise_distance(lip[lo:hi], aud[lo + s:hi + s]).mean())
        return torch.stack(out)
    raise ValueError(f"padding must be 'zeros' or 'overlap', got {padding!r}")


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach()
    raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def _prep_frames(frames: torch.Tensor, device, dtype, rgb: bool, net=None) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, S, S) float in [0, 255], BGR order; S = the network's ``frame_size`` (224 for
    SyncNet v2); networks with ``lower_half = True`` see only the lower half of the face (the mouth)."""
    x = frames.to(device).permute(0, 3, 1, 2).to(dtype)                 # (T, 3, H, W)
    if getattr(net, "lower_half", False):
        x = x[:, :, x.shape[2] // 2:]
    S = getattr(net, "frame_size", SYNCNET_FRAME_SIZE)
    if x.shape[-2:] != (S, S):
        x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
    if rgb:
        x = x.flip(1)                                                   # RGB -> BGR (cv2 order)
    return x.transpose(0, 1)


@torch.no_grad()
def _embed_one(net: SyncNet, frames: torch.Tensor, audio: torch.Tensor, batch_size: int, rgb: bool):
    dev = next(net.parameters()).device
    dt = next(net.parameters()).dtype
    T = frames.shape[0]
    m = min(T, audio.shape[0] // SAMPLES_PER_FRAME)
    n = m - SYNCNET_WINDOW       # syncnet_python: range(0, min_length - 5)
    if n < 1:
        raise ValueError(f"need at least {SYNCNET_WINDOW + 1} video frames and {SYNCNET_WINDOW + 1} * "
                         f"{SAMPLES_PER_FRAME} audio samples, got {T} frames and {audio.shape[0]} samples")
    if audio.dtype == torch.int16:
        a = audio.to(torch.float64)
    else:
        a = audio.to(torch.float64) * 32768.0   # float audio in [-1, 1] -> the int16 scale SyncNet was trained on
    cc = _mfcc(a, 16000, dtype=torch.float32).to(dev, dt)                # (13, M)
    need = MFCC_PER_FRAME * (n - 1) + MFCC_WINDOW
    if cc.shape[1] < need:
        raise AssertionError(f"MFCC has {cc.shape[1]} frames, need {need}")
    video = _prep_frames(frames[:n + SYNCNET_WINDOW - 1], dev, dt, rgb, net)  # (3, T', S, S)
    lip, aud = [], []
    for i in range(0, n, batch_size):
        idx = range(i, min(n, i + batch_size))
        lip.append(net.forward_lip(torch.stack([video[:, v:v + SYNCNET_WINDOW] for v in idx])).float())
        aud.append(net.forward_aud(torch.stack(
            [cc[None, :, MFCC_PER_FRAME * v:MFCC_PER_FRAME * v + MFCC_WINDOW] for v in idx])).float())
    return torch.cat(lip), torch.cat(aud)


def _check_inputs(syncnet, frames, audio, channels):
    if not isinstance(syncnet, SyncNet):
        raise TypeError(f"syncnet must be a lipforcing.distill.SyncNet, got {type(syncnet).__name__}")
    if channels not in ("rgb", "bgr"):
        raise ValueError(f"channels must be 'rgb' or 'bgr', got {channels!r}")
    fr = _as_tensor(frames, "frames")
    au = _as_tensor(audio, "audio")
    if fr.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8 (0..255), got {fr.dtype}")
    if fr.dim() not in (4, 5) or fr.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) or (B, T, H, W, 3), got {tuple(fr.shape)}")
    batched = fr.dim() == 5
    if au.dim() != (2 if batched else 1) or (batched and au.shape[0] != fr.shape[0]):
        raise ValueError(f"audio must be {'(B, L) with B = ' + str(fr.shape[0]) if batched else '(L,)'} to match "
                         f"frames {tuple(fr.shape)}, got {tuple(au.shape)}")
    if not (au.dtype == torch.int16 or au.is_floating_point()):
        raise TypeError(f"audio must be int16 or float, got {au.dtype}")
    if au.is_floating_point() and au.numel() and not bool(torch.isfinite(au).all()):
        raise ValueError("audio contains non-finite values (NaN or inf)")
    return (fr, au, True) if batched else (fr[None], au[None], False)


def sync_embeddings(syncnet: SyncNet, frames, audio, *, batch_size: int = 20, channels: str = "rgb"):
    """SyncNet embeddings of the lip and audio windows of one clip, as syncnet_python forms them.

    Args: as :func:`sync_confidence` (one clip: frames (T, H, W, 3) uint8, audio (L,)).
    Returns:
        (lip, aud), each (N, embed_dim) float32 on the network's device, N = min(T, L // 640) - 5; window v is
        video frames v .. v + 4 and MFCC frames 4v .. 4v + 19.  No gradient; evaluated in eval mode.
    """
    fr, au, batched = _check_inputs(syncnet, frames, audio, channels)
    if batched:
        raise ValueError(f"sync_embeddings takes one clip (T, H, W, 3), got frames {tuple(fr.shape)}")
    was_training = syncnet.training
    syncnet.eval()
    try:
        return _embed_one(syncnet, fr[0], au[0], batch_size, channels == "rgb")
    finally:
        syncnet.train(was_training)


def score_embeddings(lip: torch.Tensor, aud: torch.Tensor, *, vshift: int = 15, padding: str = "zeros") -> SyncScore:
    """LSE-C / LSE-D / offset from one clip's window embeddings (see :func:`sync_confidence`)."""
    if isinstance(vshift, bool) or not isinstance(vshift, int) or vshift < 0:
        raise ValueError(f"vshift must be an int >= 0, got {vshift!r}")
    md = offset_distances(lip, aud, vshift, padding=padding)
    minval, minidx = torch.min(md, 0)
    return SyncScore(torch.median(md) - minval, minval, vshift - minidx, md)


def sync_confidence(syncnet: SyncNet, frames, audio, *, vshift: int = 15, batch_size: int = 20,
                    padding: str = "zeros", channels: str = "rgb") -> SyncScore:
    """LSE-C / LSE-D of aligned face frames against 16 kHz audio, as syncnet_python evaluates them.

    Args:
        syncnet: a :class:`SyncNet` (evaluated in eval mode without gradient; its mode is restored afterwards).
        frames: (T, H, W, 3) or (B, T, H, W, 3) uint8 (numpy or torch), 25 fps face crops (the whole aligned face
            is used; resized bilinearly to 224 x 224 when needed).
        audio: (L,) or (B, L) 16 kHz mono, aligned with frame 0: int16 (used as is, like syncnet_python's wav
            reader) or float in [-1, 1] (scaled by 32768).
        vshift: offsets -vshift .. vshift frames are searched (15 in the paper's reward).
        batch_size: windows per SyncNet call (memory only).
        padding: "zeros" (syncnet_python) or "overlap" (the LipForcing reward scorer); see ``offset_distances``.
        channels: "rgb" (frames are RGB, converted to SyncNet's BGR) or "bgr".
    Uses min(T, L // 640) frames and that many - 5 windows, like syncnet_python: video window v = frames
    v .. v + 4, audio window v = MFCC frames 4v .. 4v + 19 (see :func:`sync_embeddings`).
    Returns:
        :class:`SyncScore` (confidence = LSE-C, distance = LSE-D, offset, mean_dists), float32 / int64 on CPU.
    """
    if isinstance(vshift, bool) or not isinstance(vshift, int) or vshift < 0:
        raise ValueError(f"vshift must be an int >= 0, got {vshift!r}")
    if padding not in ("zeros", "overlap"):
        raise ValueError(f"padding must be 'zeros' or 'overlap', got {padding!r}")
    fr, au, batched = _check_inputs(syncnet, frames, audio, channels)
    was_training = syncnet.training
    syncnet.eval()
    try:
        res = [score_embeddings(*_embed_one(syncnet, f, a, batch_size, channels == "rgb"), vshift=vshift,
                                padding=padding) for f, a in zip(fr, au)]
    finally:
        syncnet.train(was_training)
    score = SyncScore(*(torch.stack([getattr(r, k).cpu() for r in res]) for k in SyncScore._fields))
    score = SyncScore(score.confidence.float(), score.distance.float(), score.offset.long(), score.mean_dists.float())
    return score if batched else SyncScore(*(t[0] for t in score))


def sync_reward_weight(confidence, beta: float = 2.0) -> torch.Tensor:
    """Per-sample weight of the DMD loss: exp(beta * confidence), detached (no gradient flows through SyncNet).

    ``confidence``: LSE-C value(s) (float or tensor of any shape, e.g. ``sync_confidence(...).confidence``).
    No centring or clamping (the paper's "per_sample" mode); with LSE-C around 7 the weight is about e^14.
    """
    c = confidence.detach() if isinstance(confidence, torch.Tensor) else torch.as_tensor(confidence)
    if not c.is_floating_point():
        c = c.to(torch.float32)
    return torch.exp(float(beta) * c).detach()
