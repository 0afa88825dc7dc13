"""The TAEHV network: the public checkpoint's tree (128 tensors, 11,315,539 parameters), decode/encode against a
plain frame-by-frame float64 reference, causality, parallel decode equal to one latent at a time, MAC count."""
from __future__ import annotations

import pytest
import torch

from lipforcing.decoders import TAEHV, TAEHVConfig
from tests.decoders.reference import exact_conv, reference_decode, reference_encode


def test_full_architecture_matches_the_public_checkpoint(full_taehv):
    sd = full_taehv.state_dict()
    assert len(sd) == 128
    count = lambda prefix: sum(v.numel() for k, v in sd.items() if k.startswith(prefix))  # noqa: E731
    assert count("encoder.") == 1_470_928
    assert count("decoder.") == 9_844_611
    assert count("") == 11_315_539
    expected = {
        "decoder.7.conv.weight": (256, 256, 1, 1), "decoder.1.weight": (256, 16, 3, 3), "decoder.1.bias": (256,),
        "decoder.3.conv.0.weight": (256, 512, 3, 3), "decoder.5.conv.4.bias": (256,),
        "decoder.8.weight": (128, 256, 3, 3), "decoder.9.conv.0.weight": (128, 256, 3, 3),
        "decoder.13.conv.weight": (256, 128, 1, 1), "decoder.14.weight": (64, 128, 3, 3),
        "decoder.17.conv.2.weight": (64, 64, 3, 3), "decoder.19.conv.weight": (128, 64, 1, 1),
        "decoder.20.weight": (64, 64, 3, 3), "decoder.22.weight": (3, 64, 3, 3), "decoder.22.bias": (3,),
        "encoder.0.weight": (64, 3, 3, 3), "encoder.2.conv.weight": (64, 128, 1, 1),
        "encoder.3.weight": (64, 64, 3, 3), "encoder.4.conv.0.weight": (64, 128, 3, 3),
        "encoder.7.conv.weight": (64, 128, 1, 1), "encoder.12.conv.weight": (64, 64, 1, 1),
        "encoder.13.weight": (64, 64, 3, 3), "encoder.16.conv.4.weight": (64, 64, 3, 3),
        "encoder.17.weight": (16, 64, 3, 3), "encoder.17.bias": (16,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    # convs without bias in the public model
    for k in ("decoder.8.bias", "decoder.14.bias", "decoder.20.bias", "encoder.3.bias", "decoder.7.conv.bias"):
        assert k not in sd
    assert not any(".skip." in k for k in sd)           # every MemBlock has n_in == n_out


def test_config_presets_and_errors():
    assert TAEHVConfig.from_name("taew2_1") == TAEHVConfig()
    tiny = TAEHVConfig.from_name("tiny")
    assert tiny.latent_channels == 16 and tiny.frames_to_trim == 3
    with pytest.raises(ValueError, match="unknown TAEHV preset"):
        TAEHVConfig.from_name("taesd")
    with pytest.raises(ValueError, match="decoder_widths must have 4"):
        TAEHVConfig(decoder_widths=(8, 8, 8))
    with pytest.raises(ValueError, match=r"decoder_widths\[1\] must be a positive int"):
        TAEHVConfig(decoder_widths=(8, 0, 8, 8))
    with pytest.raises(TypeError, match="config must be"):
        TAEHV(3)


@pytest.mark.parametrize("n,t,h,w", [(2, 1, 3, 5), (1, 4, 4, 4), (2, 3, 5, 2)])
def test_decode_matches_reference(tiny_taehv, n, t, h, w):
    z = torch.randn(n, t, 16, h, w) * 2
    out = tiny_taehv.decode_video(z)
    ref = reference_decode(tiny_taehv, z)
    assert out.shape == (n, 4 * t - 3, 3, 8 * h, 8 * w) == ref.shape
    assert 0.1 < ((out > 0) & (out < 1)).float().mean()      # the comparison is not all clamped pixels
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_full_architecture_decode_matches_reference(full_taehv):
    z = torch.randn(1, 2, 16, 3, 2) * 2
    torch.testing.assert_close(full_taehv.decode_video(z).double(), reference_decode(full_taehv, z),
                               atol=5e-5, rtol=1e-4)


def test_encode_matches_reference(tiny_taehv):
    x = torch.rand(2, 8, 3, 24, 16)
    out = tiny_taehv.encode_video(x)
    assert out.shape == (2, 2, 16, 3, 2)
    torch.testing.assert_close(out.double(), reference_encode(tiny_taehv, x), atol=2e-5, rtol=1e-4)
    # 1 + 4k frames: frame 0 is repeated 3 times first (mirrors the 3 frames the decoder drops)
    y = torch.rand(1, 5, 3, 16, 8)
    padded = torch.cat([y[:, :1].expand(1, 3, 3, 16, 8), y], dim=1)
    assert torch.equal(tiny_taehv.encode_video(y), tiny_taehv.encode_video(padded))
    with pytest.raises(ValueError, match="4k or 1 \\+ 4k"):
        tiny_taehv.encode_video(torch.rand(1, 6, 3, 16, 8))
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_taehv.encode_video(torch.rand(1, 4, 3, 12, 8))


def test_decode_is_causal(tiny_taehv):
    z = torch.randn(1, 5, 16, 3, 3)
    base = tiny_taehv.decode_video(z)
    t = 3
    z2 = z.clone()
    z2[:, t] += torch.randn_like(z2[:, t])
    moved = tiny_taehv.decode_video(z2)
    first = 1 + 4 * (t - 1)                     # frames of latents 0 .. t-1
    assert torch.equal(moved[:, :first], base[:, :first])
    assert not torch.equal(moved[:, first:], base[:, first:])


@pytest.mark.parametrize("preset", ["tiny", "full"])
def test_parallel_equals_one_latent_at_a_time(tiny_taehv, full_taehv, preset):
    model, shape = (tiny_taehv, (2, 6, 16, 5, 3)) if preset == "tiny" else (full_taehv, (1, 3, 16, 2, 3))
    z = torch.randn(shape)
    with exact_conv():
        par = model.decode_video(z)
        seq = model.decode_video(z, parallel=False)
    assert par.shape == (shape[0], 4 * shape[1] - 3, 3, 8 * shape[3], 8 * shape[4])
    assert torch.equal(par, seq)
    # with oneDNN (the default CPU convolution) they agree to float rounding
    torch.testing.assert_close(model.decode_video(z, parallel=False), par, atol=1e-5, rtol=1e-5)


def test_decode_errors(tiny_taehv):
    with pytest.raises(ValueError, match=r"\(N, T, 16, h, w\)"):
        tiny_taehv.decode_video(torch.randn(1, 16, 2, 3, 3))
    with pytest.raises(TypeError, match="floating point"):
        tiny_taehv.decode_video(torch.zeros(1, 2, 16, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-empty"):
        tiny_taehv.decode_video(torch.randn(1, 0, 16, 3, 3))


def test_mac_count_matches_the_convolutions_run(tiny_taehv):
    counted = []

    def hook(mod, inp, out):
        k = mod.kernel_size[0] * mod.kernel_size[1]
        counted.append(out.numel() * mod.in_channels * k // mod.groups)

    handles = [m.register_forward_hook(hook) for m in tiny_taehv.decoder.modules()
               if isinstance(m, torch.nn.Conv2d)]
    try:
        tiny_taehv.decode_video(torch.randn(1, 3, 16, 4, 5))
    finally:
        for h in handles:
            h.remove()
    assert sum(counted) == 3 * tiny_taehv.decode_macs_per_latent(4, 5)
    # the real architecture at 512x512: about 174 GMAC per latent frame (43 GMAC per output frame)
    assert 170e9 < TAEHV(TAEHVConfig()).decode_macs_per_latent(64, 64) < 180e9


def test_fewer_spatial_upsamples(tiny_taehv):
    cfg = TAEHVConfig.for_spatial_factor(4, encoder_width=8, decoder_widths=(16, 8, 8, 8))
    assert cfg.spatial_upscale == (False, True, True) and cfg.spatial_factor == 4
    from tests.decoders.reference import randomize_

    model = randomize_(TAEHV(cfg)).eval().requires_grad_(False)
    assert set(model.state_dict()) == set(tiny_taehv.state_dict())        # same key names
    z = torch.randn(1, 3, 16, 3, 5)
    out = model.decode_video(z)
    assert out.shape == (1, 9, 3, 12, 20)
    torch.testing.assert_close(out.double(), reference_decode(model, z), atol=2e-5, rtol=1e-4)
    assert model.encode_video(torch.rand(1, 8, 3, 12, 20)).shape == (1, 2, 16, 3, 5)
    with pytest.raises(ValueError, match="spatial factors 1, 2, 4 and 8"):
        TAEHVConfig.for_spatial_factor(16)
    with pytest.raises(ValueError, match="spatial_upscale must be 3 bools"):
        TAEHVConfig(spatial_upscale=(1, 1, 1))
