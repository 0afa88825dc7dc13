"""Input validation of the VAE: clear errors, and streams stay usable after one."""
from __future__ import annotations

import pytest
import torch

from lipforcing.vae import VAEConfig, WanVAE


@pytest.fixture(scope="module")
def vae():
    return WanVAE(VAEConfig(dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)).eval()


def _x(t=5, c=3, h=16, w=16, b=1):
    return torch.rand(b, c, t, h, w) * 2 - 1


@pytest.mark.parametrize("video, exc, match", [
    (_x(t=4), ValueError, r"1 \+ 4m frames"),
    (_x(t=6), ValueError, r"1 \+ 4m frames"),
    (_x(c=4), ValueError, "3 \\(RGB\\) channels"),
    (_x(h=12), ValueError, "multiples of 8"),
    (_x()[0], ValueError, "5-D"),
    (((_x() + 1) * 127.5).to(torch.uint8), TypeError, "x / 127.5 - 1"),
    ((_x() + 1) * 127.5, ValueError, r"\[-1, 1\]"),
    (_x().index_fill_(2, torch.tensor([2]), float("nan")), ValueError, r"\[-1, 1\]"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_encode_rejects_bad_video(vae, video, exc, match):
    with pytest.raises(exc, match=match):
        vae.encode(video)


def test_range_check_can_be_disabled(vae):
    vae.check_inputs = False
    try:
        out = vae.encode(_x() * 1.5)
    finally:
        vae.check_inputs = True
    assert out.shape == (1, 16, 2, 2, 2)


@pytest.mark.parametrize("latents, exc, match", [
    (torch.randn(1, 4, 2, 2, 2), ValueError, "z_dim = 16 channels"),
    (torch.randn(1, 16, 0, 2, 2), ValueError, "at least one frame"),
    (torch.randn(16, 2, 2, 2), ValueError, "5-D"),
    (torch.zeros(1, 16, 2, 2, 2, dtype=torch.int32), TypeError, "floating-point"),
])
def test_decode_rejects_bad_latents(vae, latents, exc, match):
    with pytest.raises(exc, match=match):
        vae.decode(latents)


def test_stream_errors_leave_the_stream_usable(vae):
    x = _x(t=13)
    with torch.inference_mode():
        whole = vae.encode(x)
        enc = vae.stream_encoder()
        with pytest.raises(ValueError, match="1 \\+ 4m"):
            enc.encode(x[:, :, :4])                       # first piece must be 1 + 4m
        a = enc.encode(x[:, :, :5])
        with pytest.raises(ValueError, match="multiple of 4"):
            enc.encode(x[:, :, 5:10])                     # later pieces: 4m
        with pytest.raises(ValueError, match="must stay those of the first call"):
            enc.encode(_x(t=4, b=2))
        with pytest.raises(ValueError, match="must stay those of the first call"):
            enc.encode(_x(t=4, h=24))
        with pytest.raises(ValueError, match=r"\[-1, 1\]"):
            enc.encode(x[:, :, 5:9] * 3)
        b = enc.encode(x[:, :, 5:])
    assert torch.equal(torch.cat([a, b], 2), whole)

    z = torch.randn(1, 16, 4, 2, 2)
    with torch.inference_mode():
        full = vae.decode(z)
        dec = vae.stream_decoder()
        p = dec.decode(z[:, :, :2])
        with pytest.raises(ValueError, match="must stay those of the first call"):
            dec.decode(torch.randn(1, 16, 1, 3, 2))
        q = dec.decode(z[:, :, 2:])
    assert torch.equal(torch.cat([p, q], 2), full)


def test_bad_arguments(vae):
    with pytest.raises(ValueError, match="frames_per_step"):
        vae.stream_encoder(frames_per_step=6)
    with pytest.raises(ValueError, match="latents_per_step"):
        vae.stream_decoder(latents_per_step=0)
    with pytest.raises(TypeError, match="config"):
        WanVAE(config=3)
    with pytest.raises(ValueError, match="unknown VAE preset"):
        VAEConfig.from_name("huge")
    with pytest.raises(ValueError, match="temporal_downsample"):
        VAEConfig(temporal_downsample=(True,))
    with pytest.raises(ValueError, match="latents_mean"):
        VAEConfig(z_dim=4, latents_mean=(0.0,) * 16)
    with pytest.raises(ValueError, match="is_residual"):
        VAEConfig.from_dict({"base_dim": 8, "is_residual": True})
    assert VAEConfig(z_dim=4).latents_std == (1.0,) * 4      # non-Wan latent size: identity statistics
    assert VAEConfig.from_dict({"base_dim": 8, "temperal_downsample": [False, True, True]}).dim == 8
