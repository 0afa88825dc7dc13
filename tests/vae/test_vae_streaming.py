"""Streaming encode/decode of the Wan-style VAE: bit-equal to whole clips, causal, constant memory."""
from __future__ import annotations

import pytest
import torch

from lipforcing.vae import VAEConfig, WanVAE


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == x.shape[2]
    return list(torch.split(x, sizes, dim=2))


@pytest.mark.parametrize("sizes", [[9, 12, 12], [1, 4, 4, 4, 4, 4, 4, 4, 4], [33], [5, 28]])
@pytest.mark.parametrize("normalize", [True, False])
def test_stream_encode_equals_whole_clip(tiny_vae, make_clip, sizes, normalize):
    x = make_clip(2, sum(sizes), 32, 24)
    with torch.inference_mode():
        whole = tiny_vae.encode(x, normalize=normalize)
        enc = tiny_vae.stream_encoder(normalize=normalize)
        parts = [enc.encode(p) for p in _split(x, sizes)]
    assert whole.shape == (2, 16, 1 + (sum(sizes) - 1) // 4, 4, 3)
    assert [p.shape[2] for p in parts] == [(s - 1) // 4 + 1 if i == 0 else s // 4 for i, s in enumerate(sizes)]
    assert torch.equal(torch.cat(parts, dim=2), whole)
    assert enc.frames_in == sum(sizes) and enc.latents_out == whole.shape[2]


@pytest.mark.parametrize("sizes", [[3, 3, 3], [1, 1, 1, 1, 1, 1, 1, 1, 1], [9], [2, 5, 2]])
@pytest.mark.parametrize("normalize", [True, False])
def test_stream_decode_equals_whole_clip(tiny_vae, sizes, normalize):
    z = torch.randn(2, 16, sum(sizes), 3, 4)
    with torch.inference_mode():
        whole = tiny_vae.decode(z, normalize=normalize)
        dec = tiny_vae.stream_decoder(normalize=normalize)
        parts = [dec.decode(p) for p in _split(z, sizes)]
    assert whole.shape == (2, 3, 1 + 4 * (sum(sizes) - 1), 24, 32)
    assert [p.shape[2] for p in parts] == [1 + 4 * (s - 1) if i == 0 else 4 * s for i, s in enumerate(sizes)]
    assert torch.equal(torch.cat(parts, dim=2), whole)
    assert whole.abs().max() <= 1.0
    # not degenerate: the test would not notice a constant output
    assert whole.std() > 0.05 and (whole.abs() < 1).float().mean() > 0.5


def test_streaming_is_causal(tiny_vae, make_clip):
    """Changing the future does not change what was already emitted (encode and decode)."""
    x = make_clip(1, 21)
    y = x.clone()
    y[:, :, 13:] = make_clip(1, 8)
    z = torch.randn(1, 16, 6, 4, 4)
    w = z.clone()
    w[:, :, 4:] = torch.randn(1, 16, 2, 4, 4)
    with torch.inference_mode():
        zx, zy = tiny_vae.encode(x), tiny_vae.encode(y)
        dz, dw = tiny_vae.decode(z), tiny_vae.decode(w)
    assert torch.equal(zx[:, :, :4], zy[:, :, :4])          # latents 0..3 cover frames 0..12
    assert not torch.allclose(zx[:, :, 4:], zy[:, :, 4:])
    assert torch.equal(dz[:, :, :13], dw[:, :, :13])        # frames 0..12 come from latents 0..3
    assert not torch.allclose(dz[:, :, 13:], dw[:, :, 13:])


def test_bigger_steps_match_canonical(tiny_vae, make_clip):
    """Fewer, larger internal calls compute the same function (up to float rounding); streaming with the same
    step is still bit-equal to the whole clip when calls are multiples of the step."""
    x = make_clip(1, 25)
    z = torch.randn(1, 16, 7, 4, 4)
    with torch.inference_mode():
        ref_z, ref_x = tiny_vae.encode(x), tiny_vae.decode(z)
        big_z = tiny_vae.encode(x, frames_per_step=12)
        big_x = tiny_vae.decode(z, latents_per_step=3)
        enc = tiny_vae.stream_encoder(frames_per_step=12)
        s_z = torch.cat([enc.encode(x[:, :, :13]), enc.encode(x[:, :, 13:])], 2)
        dec = tiny_vae.stream_decoder(latents_per_step=3)
        s_x = torch.cat([dec.decode(z[:, :, :3]), dec.decode(z[:, :, 3:6]), dec.decode(z[:, :, 6:])], 2)
    torch.testing.assert_close(big_z, ref_z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(big_x, ref_x, rtol=1e-4, atol=1e-5)
    assert torch.equal(s_z, big_z) and torch.equal(s_x, big_x)


def test_one_shot_full_sequence_matches(tiny_vae, make_clip):
    """Running the network once over the whole sequence (no caches: plain causal padding, the first frame passing
    the temporal resamplers) equals Wan's chunked computation up to rounding."""
    x = make_clip(1, 17)
    with torch.inference_mode():
        ref = tiny_vae.encode(x, normalize=False)
        one = tiny_vae.conv1(tiny_vae.encoder(x))[:, :16]
        z = torch.randn(1, 16, 5, 4, 4)
        ref_x = tiny_vae.decode(z, normalize=False)
        one_x = tiny_vae.decoder(tiny_vae.conv2(z)).clamp(-1, 1)
    torch.testing.assert_close(one, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one_x, ref_x, rtol=1e-4, atol=1e-5)


def _state_bytes(state: dict) -> tuple[int, int]:
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors)


def test_stream_memory_is_constant(tiny_vae, make_clip):
    enc = tiny_vae.stream_encoder()
    dec = tiny_vae.stream_decoder()
    seen_e, seen_d = [], []
    with torch.inference_mode():
        z = enc.encode(make_clip(1, 1, 16, 16))
        dec.decode(z)
        for _ in range(25):
            z = enc.encode(make_clip(1, 4, 16, 16))
            dec.decode(z)
            seen_e.append(_state_bytes(enc.state))
            seen_d.append(_state_bytes(dec.impl.state))
    assert len(set(seen_e[1:])) == 1 and len(set(seen_d[1:])) == 1
    assert seen_e[-1][1] > 0 and seen_d[-1][1] > 0
    assert enc.frames_in == 101 and dec.frames_out == 101


def test_reset_starts_a_new_clip(tiny_vae, make_clip):
    x = make_clip(1, 9)
    enc = tiny_vae.stream_encoder()
    with torch.inference_mode():
        a = enc.encode(x)
        enc.encode(make_clip(1, 4))
        enc.reset()
        b = enc.encode(x)
    assert torch.equal(a, b)


def test_encode_is_differentiable(make_clip):
    vae = WanVAE(VAEConfig(dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1))
    x = make_clip(1, 5, 16, 16).requires_grad_(True)
    vae.decode(vae.encode(x)).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert vae.encoder.conv1.weight.grad is not None and vae.decoder.head[2].weight.grad is not None


class _NearestDecoder:
    """A stand-in 'fast decoder': first 3 latent channels, repeated 4x in time (1x for the very first latent)
    and 8x in space; follows the LatentDecoder interface."""

    def __init__(self, frames_first=1):
        self.frames_first = frames_first

    def stream(self):
        outer = self

        class _S:
            started = False

            def decode(self, z):
                x = torch.tanh(z[:, :3]).repeat_interleave(8, -1).repeat_interleave(8, -2)
                x = x.repeat_interleave(4, 2)
                if not self.started:
                    x = x[:, :, 4 - outer.frames_first:]
                    self.started = True
                return x

        return _S()


def test_pluggable_decoder(make_clip):
    vae = WanVAE("tiny").eval()
    z = torch.randn(1, 16, 4, 2, 3)
    with torch.inference_mode():
        wan = vae.decode(z)
        vae.set_decoder(_NearestDecoder())
        fast = vae.decode(z, normalize=False)
        dec = vae.stream_decoder(normalize=False)
        parts = torch.cat([dec.decode(z[:, :, :1]), dec.decode(z[:, :, 1:])], 2)
        assert fast.shape == (1, 3, 13, 16, 24)
        assert torch.equal(fast[:, :, 0], torch.tanh(z[:, :3, 0]).repeat_interleave(8, -1).repeat_interleave(8, -2))
        assert torch.equal(parts, fast)
        vae.set_decoder(_NearestDecoder(frames_first=2))      # breaks the 1 + 4k contract
        with pytest.raises(RuntimeError, match="expected"):
            vae.decode(z)
        vae.set_decoder(None)
        assert torch.equal(vae.decode(z), wan)
    with pytest.raises(TypeError, match="stream"):
        vae.set_decoder(object())
