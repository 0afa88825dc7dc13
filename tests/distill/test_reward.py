"""SyncNet reward glue: decode -> uint8 frames -> SyncNet LSE-C -> exp(beta * c) per sample, no gradient."""
from __future__ import annotations

import math

import pytest
import torch

from lipforcing.distill.reward import LatentRGBDecoder, SyncReward, video_to_frames


def test_video_to_frames_layout_and_range():
    v = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 2, 5).clone()
    v[:, 1] = 0.5
    f = video_to_frames(v)
    assert f.shape == (1, 4, 2, 5, 3) and f.dtype == torch.uint8
    assert f[0, :, 0, 0, 0].tolist() == [0, 128, 255, 255]      # clamp, (x + 1) * 127.5 rounded
    assert f[0, 0, 0, 0, 1].item() == 191                         # channel 1 -> last axis position 1
    with pytest.raises(ValueError, match="video"):
        video_to_frames(torch.zeros(1, 4, 2, 2, 2))


def test_latent_rgb_decoder_frame_count():
    out = LatentRGBDecoder(scale=2)(torch.randn(2, 16, 3, 4, 5))
    assert out.shape == (2, 3, 1 + 4 * 2, 8, 10) and out.abs().max() <= 1


def test_reward_weight_is_exp_beta_syncnet_confidence():
    from lipforcing.distill.syncnet import SyncNet, sync_confidence

    torch.manual_seed(0)
    net = SyncNet().eval()
    dec = LatentRGBDecoder(scale=8)
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, 16, 4, 4, 4, generator=g, requires_grad=True)     # 13 video frames of 32 x 32
    wav = 0.1 * torch.randn(2, 13 * 640, generator=g)
    reward = SyncReward(dec, net, beta=2.0, vshift=2, padding="overlap")
    w, c = reward(lat, wav)
    assert not w.requires_grad and not c.requires_grad
    assert all(not p.requires_grad for p in net.parameters())
    # independent path: decode, convert by hand, score with SyncNet's own evaluation
    with torch.no_grad():
        video = dec(lat)
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    ref = sync_confidence(net, frames, wav, vshift=2, padding="overlap").confidence
    torch.testing.assert_close(c, ref)
    torch.testing.assert_close(w, torch.exp(2.0 * ref))
    assert c[0] != c[1]


def test_reward_with_stub_confidence_and_weighted_loss():
    from lipforcing.distill.losses import weighted_mean

    seen = {}

    def conf_fn(frames, wav):
        seen["frames"], seen["wav"] = frames, wav
        return torch.tensor([0.5, -1.0, 2.0])

    reward = SyncReward(LatentRGBDecoder(scale=1), confidence_fn=conf_fn, beta=2.0)
    w, c = reward(torch.randn(3, 16, 2, 2, 2), torch.zeros(3, 3200))
    assert seen["frames"].shape == (3, 5, 2, 2, 3) and seen["frames"].dtype == torch.uint8
    torch.testing.assert_close(w, torch.tensor([math.e, math.exp(-2.0), math.exp(4.0)]))
    L = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    total = weighted_mean(L, w)
    torch.testing.assert_close(total, (w * L.detach()).mean())
    with pytest.raises(ValueError, match="syncnet or a confidence_fn"):
        SyncReward(LatentRGBDecoder())
    with pytest.raises(ValueError, match="waveform"):
        reward(torch.randn(3, 16, 2, 2, 2), torch.zeros(2, 3200))
