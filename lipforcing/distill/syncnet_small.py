"""A SyncNet with configurable input size and width, small enough to train on a CPU (the world's SyncNet).

:class:`SmallSyncNet` keeps SyncNet v2's interface (``forward_aud`` on (B, 1, 13, 20) MFCC windows,
``forward_lip`` on (B, 3, 5, S, S) BGR frame windows in [0, 255], the four ``netcnnaud`` / ``netfcaud`` /
``netcnnlip`` / ``netfclip`` stacks), so :func:`~lipforcing.distill.syncnet.sync_confidence` (LSE-C / LSE-D) and
the SyncNet reward use it unchanged.  With ``lower_half=True`` (default) it sees the lower half of the aligned
face, resized to ``frame_size``.  Its weight file carries its config in the metadata (``syncnet_config``);
:func:`load_syncnet` reads either kind.

Sizes (width w): audio 1 -> w -> 2w -> 4w convolutions (3 x 3, the last two strided) and global average pooling;
lips a 5-frame 3-D convolution (5 x 5 x 5, stride 2 in space) then 2w -> 4w strided 2-D convolutions and global
pooling to a 3 x 3 grid (the mouth's position survives); each followed by Linear(., 4w) - ReLU - Linear(4w,
embed_dim).  Defaults (48 px, w = 32, 128-d): about 0.4 M parameters.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from lipforcing.distill.syncnet import MFCC_WINDOW, SYNCNET_WINDOW, SyncNet

__all__ = ["SmallSyncNet", "load_syncnet", "SYNCNET_CONFIG_METADATA_KEY"]

SYNCNET_CONFIG_METADATA_KEY = "syncnet_config"


def _block(conv, bn):
    return [conv, bn, nn.ReLU(inplace=True)]


class SmallSyncNet(SyncNet):
    """See the module docstring.  ``frame_size`` >= 16, ``width`` >= 4, ``embed_dim`` >= 1."""

    def __init__(self, frame_size: int = 48, width: int = 32, embed_dim: int = 128, lower_half: bool = True):
        nn.Module.__init__(self)
        for name, v, lo in (("frame_size", frame_size, 16), ("width", width, 4), ("embed_dim", embed_dim, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        self.frame_size, self.width, self.embed_dim, self.lower_half = frame_size, width, embed_dim, bool(lower_half)
        w = width
        c2, b2, c3, b3 = nn.Conv2d, nn.BatchNorm2d, nn.Conv3d, nn.BatchNorm3d
        self.netcnnaud = nn.Sequential(
            *_block(c2(1, w, 3, padding=1), b2(w)),
            *_block(c2(w, 2 * w, 3, stride=(1, 2), padding=1), b2(2 * w)),
            *_block(c2(2 * w, 4 * w, 3, stride=2, padding=1), b2(4 * w)),
            nn.AdaptiveAvgPool2d(1))                                    # (4w, 1, 1)
        self.netcnnlip = nn.Sequential(
            *_block(c3(3, w, (SYNCNET_WINDOW, 5, 5), stride=(1, 2, 2), padding=(0, 2, 2)), b3(w)),
            *_block(c3(w, 2 * w, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), b3(2 * w)),
            *_block(c3(2 * w, 4 * w, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), b3(4 * w)),
            nn.AdaptiveAvgPool3d((1, 3, 3)))                            # (4w, 1, 3, 3): keeps where the mouth is
        self.netfcaud = nn.Sequential(nn.Linear(4 * w, 4 * w), nn.ReLU(), nn.Linear(4 * w, embed_dim))
        self.netfclip = nn.Sequential(nn.Linear(36 * w, 4 * w), nn.ReLU(), nn.Linear(4 * w, embed_dim))

    def config(self) -> dict:
        return {"frame_size": self.frame_size, "width": self.width, "embed_dim": self.embed_dim,
                "lower_half": self.lower_half}

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        S = self.frame_size
        if x.dim() != 5 or tuple(x.shape[1:]) != (3, SYNCNET_WINDOW, S, S):
            raise ValueError(f"forward_lip expects frame windows (B, 3, {SYNCNET_WINDOW}, {S}, {S}) (BGR, 0..255), "
                             f"got {tuple(x.shape)}")
        return self.netfclip(self.netcnnlip(x / 127.5 - 1.0).flatten(1))

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 13, MFCC_WINDOW):
            raise ValueError(f"forward_aud expects MFCC windows (B, 1, 13, {MFCC_WINDOW}), got {tuple(x.shape)}")
        return self.netfcaud(self.netcnnaud(x / 10.0).flatten(1))


def load_syncnet(path, *, map_location="cpu") -> SyncNet:
    """A SyncNet from a weight file: a :class:`SmallSyncNet` when its safetensors metadata has
    ``syncnet_config``, else SyncNet v2 (:meth:`SyncNet.from_file`).  In eval mode."""
    path = os.fspath(path)
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, "pt") as h:
            meta = h.metadata() or {}
        if SYNCNET_CONFIG_METADATA_KEY in meta:
            from safetensors.torch import load_file

            net = SmallSyncNet(**json.loads(meta[SYNCNET_CONFIG_METADATA_KEY]))
            net.load_state_dict(load_file(path, device=str(map_location)))
            return net.eval()
    return SyncNet.from_file(path, map_location=map_location)
