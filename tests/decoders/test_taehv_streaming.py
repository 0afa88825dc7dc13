"""TAEHVStreamDecoder: any split of the latents gives the whole-clip decode, 9-then-12 frames per 3-latent chunk,
flush/reset, fixed-size state kept in place, the shared stream-decoder interface with the Wan VAE."""
from __future__ import annotations

import pytest
import torch

from lipforcing.decoders import TAEHV, TAEHVStreamDecoder
from lipforcing.vae import VAEConfig, WanVAE
from lipforcing.vae.config import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
from lipforcing.vae.streaming import StreamingDecoder
from tests.decoders.reference import exact_conv


def _denormalize(z: torch.Tensor) -> torch.Tensor:
    view = (1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_LATENTS_STD).view(view)
    return z / (1.0 / std) + torch.tensor(WAN21_LATENTS_MEAN).view(view)


@pytest.mark.parametrize("sizes", [[3, 3, 3], [1, 1, 1, 1, 1, 1, 1], [2, 5, 2], [7]])
@pytest.mark.parametrize("latents_per_step", [None, 1, 2])
def test_any_split_equals_the_whole_clip(tiny_taehv, sizes, latents_per_step):
    b, h, w = 2, 3, 5
    z = torch.randn(b, 16, sum(sizes), h, w)          # DiT space (normalised)
    with exact_conv():
        whole = tiny_taehv.decode_video(_denormalize(z).transpose(1, 2)).transpose(1, 2) * 2 - 1
        dec = TAEHVStreamDecoder(tiny_taehv, latents_per_step=latents_per_step)
        parts = [dec.decode(p) for p in torch.split(z, sizes, dim=2)]
    assert [p.shape[2] for p in parts] == [4 * s - 3 if i == 0 else 4 * s for i, s in enumerate(sizes)]
    assert all(p.shape[:2] == (b, 3) and p.shape[3:] == (8 * h, 8 * w) for p in parts)
    assert torch.equal(torch.cat(parts, dim=2), whole)
    assert dec.latents_in == sum(sizes) and dec.frames_out == 4 * sum(sizes) - 3
    out = torch.cat(parts, dim=2)
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 0.1


def test_chunks_give_9_then_12_frames_and_flush(tiny_taehv):
    dec = TAEHVStreamDecoder(tiny_taehv, normalize=False)
    z = torch.randn(1, 16, 12, 4, 4)
    counts = [dec.decode(z[:, :, i: i + 3]).shape[2] for i in range(0, 12, 3)]
    assert counts == [9, 12, 12, 12]
    tail = dec.flush()
    assert tail.shape == (1, 3, 0, 32, 32)
    # after flush a new clip starts: same frames as a fresh decoder, 9 frames again
    again = dec.decode(z[:, :, 3:6])
    fresh = TAEHVStreamDecoder(tiny_taehv, normalize=False).decode(z[:, :, 3:6])
    assert again.shape[2] == 9 and torch.equal(again, fresh)
    assert TAEHVStreamDecoder(tiny_taehv).flush().shape == (0, 3, 0, 0, 0)


def test_reset_forgets_the_clip(tiny_taehv):
    dec = TAEHVStreamDecoder(tiny_taehv, normalize=False)
    z = torch.randn(1, 16, 4, 2, 3)
    first = dec.decode(z)
    dec.decode(torch.randn(1, 16, 2, 2, 3))
    dec.reset()
    assert torch.equal(dec.decode(z), first)
    # a new size is allowed after reset, not in the middle of a clip
    dec.reset()
    dec.decode(torch.randn(2, 16, 1, 3, 3))
    with pytest.raises(ValueError, match="must stay those of the first call.*reset"):
        dec.decode(torch.randn(2, 16, 1, 3, 4))


def test_state_is_fixed_size_and_kept_in_place(tiny_taehv):
    dec = TAEHVStreamDecoder(tiny_taehv, normalize=False)
    dec.decode(torch.randn(1, 16, 3, 4, 5))
    ptrs = [s.data_ptr() for s in dec.state]
    shapes = tiny_taehv.decoder_state_shapes(1, 4, 5)
    assert [tuple(s.shape) for s in dec.state] == shapes and len(shapes) == 9
    for _ in range(3):
        dec.decode(torch.randn(1, 16, 3, 4, 5))
    assert [s.data_ptr() for s in dec.state] == ptrs
    assert all(s.abs().sum() > 0 for s in dec.state)
    dec.reset()
    assert [s.data_ptr() for s in dec.state] == ptrs and all(s.abs().sum() == 0 for s in dec.state)
    assert dec.state_numel == sum(a * b * c * d for a, b, c, d in shapes)
    # the real architecture at 512x512 (64x64 latents): about 22 M values per stream
    full = TAEHV().decoder_state_shapes(1, 64, 64)
    assert sum(a * b * c * d for a, b, c, d in full) == 3 * (256 * 64 ** 2 + 128 * 128 ** 2 + 64 * 256 ** 2) \
        == 22_020_096


def test_state_updates_do_not_track_gradients(tiny_taehv):
    model = tiny_taehv.requires_grad_(True)
    dec = TAEHVStreamDecoder(model, normalize=False)
    out = dec.decode(torch.randn(1, 16, 2, 2, 2))
    assert out.requires_grad and not any(s.requires_grad for s in dec.state)


def test_plugs_into_the_wan_vae_and_shares_its_interface(tiny_taehv):
    vae = WanVAE(VAEConfig.from_name("tiny")).eval()
    z = torch.randn(1, 16, 6, 3, 4)
    with exact_conv():
        ours = TAEHVStreamDecoder(tiny_taehv, latents_mean=vae.config.latents_mean,
                                  latents_std=vae.config.latents_std)
        want = torch.cat([ours.decode(z[:, :, :3]), ours.decode(z[:, :, 3:])], dim=2)
        vae.set_decoder(tiny_taehv)
        wan = vae.stream_decoder()
        got = torch.cat([wan.decode(z[:, :, :3]), wan.decode(z[:, :, 3:])], dim=2)
    assert torch.equal(got, want)
    for dec in (ours, wan):
        assert isinstance(dec, StreamingDecoder)
        tail = dec.flush()
        assert tail.shape == (1, 3, 0, 24, 32)
        assert dec.decode(z[:, :, :3]).shape[2] == 9           # flushed: a new clip


def test_stream_errors(tiny_taehv):
    dec = TAEHVStreamDecoder(tiny_taehv)
    with pytest.raises(TypeError, match="latents must be a torch.Tensor"):
        dec.decode([1.0])
    with pytest.raises(ValueError, match=r"latents must be \(B, 16, n, h, w\)"):
        dec.decode(torch.randn(1, 3, 16, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        dec.decode(torch.ones(1, 16, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least one frame"):
        dec.decode(torch.randn(1, 16, 0, 4, 4))
    with pytest.raises(ValueError, match="latents_per_step"):
        TAEHVStreamDecoder(tiny_taehv, latents_per_step=0)
    with pytest.raises(TypeError, match="model must be a TAEHV"):
        TAEHVStreamDecoder(object())
    with pytest.raises(ValueError, match="latents_std must have 16"):
        TAEHVStreamDecoder(tiny_taehv, latents_std=(1.0,) * 4)
    other = TAEHV(TAEHV("tiny").config.replace(latent_channels=4))
    with pytest.raises(ValueError, match="needs latents_mean and latents_std for 4"):
        TAEHVStreamDecoder(other)
    assert TAEHVStreamDecoder(other, normalize=False).decode(torch.randn(1, 4, 1, 2, 2)).shape == (1, 3, 1, 16, 16)


def test_channels_last_on_the_cpu(tiny_taehv, tmp_path):
    """Channels-last weights (what the engine uses on a GPU): streaming equals parallel bit for bit, the state stays
    channels-last and in place, and the frames match the NCHW model to float rounding."""
    from lipforcing.decoders import load_decoder, save_decoder

    save_decoder(tiny_taehv, tmp_path / "d.safetensors")
    cl = load_decoder(tmp_path / "d.safetensors", channels_last=True)
    assert cl.decoder[1].weight.is_contiguous(memory_format=torch.channels_last)
    z = torch.randn(2, 16, 7, 3, 5)
    with exact_conv():
        whole = cl.decode_video(z.transpose(1, 2)).transpose(1, 2) * 2 - 1
        plain = tiny_taehv.decode_video(z.transpose(1, 2)).transpose(1, 2) * 2 - 1
        dec = TAEHVStreamDecoder(cl, normalize=False)
        parts = [dec.decode(z[:, :, :3])]
        ptrs = [s.data_ptr() for s in dec.state]
        parts += [dec.decode(p) for p in torch.split(z[:, :, 3:], [2, 2], dim=2)]
    assert all(s.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous() for s in dec.state)
    assert [s.data_ptr() for s in dec.state] == ptrs
    assert torch.equal(torch.cat(parts, dim=2), whole)
    torch.testing.assert_close(whole, plain, atol=2e-5, rtol=1e-4)
