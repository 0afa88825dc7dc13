"""The engine with the TAEHV decoder: frame accounting unchanged (one frame per 640 samples, same indices, pts,
chunk ids and audio as with the Wan VAE), frames equal to decoding the same latents with TAEHV, loading by path,
clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lipforcing
from lipforcing.decoders import TAEHV, TAEHVStreamDecoder, save_decoder
from lipforcing.vae.streaming import StreamDecoder, StreamingDecoder
from tests.stream.helpers import RES, SMALL_VAE, drain, reference_frames, small_config, speech

P = 640


def _engine(decoder=None):
    return lipforcing.Engine.load(model=small_config(), vae=SMALL_VAE, resolution=RES, seed=3, backend="reference",
                                  decoder=decoder)


def _run(engine, ref, pcm, sizes):
    s = engine.session(ref, seed=1)
    out, i, k = [], 0, 0
    while i < len(pcm):
        n = sizes[k % len(sizes)]
        s.push_audio(pcm[i:i + n])
        i, k = i + n, k + 1
        out += drain(s)
    s.end_of_speech()
    out += drain(s)
    s.close()
    return out


def test_frame_accounting_does_not_depend_on_the_decoder():
    wan, taehv = _engine(), _engine("taehv")
    assert wan.decoder_name == "wan-vae" and taehv.decoder_name == "taehv"
    assert isinstance(wan.stream_decoder(), StreamDecoder)
    assert isinstance(taehv.stream_decoder(), TAEHVStreamDecoder)
    assert isinstance(taehv.stream_decoder(), StreamingDecoder)
    ref = reference_frames(3)
    pcm = speech(P * 27 + 101, seed=4)           # 2 chunks + a partial one + a partial frame
    a = _run(wan, ref, pcm, [len(pcm)])
    b = _run(taehv, ref, pcm, [160, 999, 640])
    assert len(a) == len(b) == 28               # one frame per 640 samples, the partial one included
    for fa, fb in zip(a, b):
        assert (fa.index, fa.pts, fa.chunk_id) == (fb.index, fb.pts, fb.chunk_id)
        np.testing.assert_array_equal(fa.audio, fb.audio)
        assert fb.image.shape == fa.image.shape == (RES, RES, 3) and fb.image.dtype == np.uint8
    assert [f.index for f in b] == list(range(28)) and b[5].pts == 5 / 25
    # the decoder really changed the pictures (the test could fail)
    assert any(not np.array_equal(fa.image, fb.image) for fa, fb in zip(a, b))
    # and the TAEHV frames do not depend on how the audio was split
    c = _run(taehv, ref, pcm, [len(pcm)])
    for fb, fc in zip(b, c):
        np.testing.assert_array_equal(fb.image, fc.image)


def test_decoder_from_a_checkpoint_path(tmp_path):
    model = TAEHV("tiny")
    path = tmp_path / "tiny_decoder.safetensors"
    save_decoder(model, path)
    engine = _engine(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(engine.decoder.state_dict()[k], v)
    z = torch.randn(1, 16, 3, RES // 8, RES // 8)
    want = TAEHVStreamDecoder(model, latents_mean=engine.vae.config.latents_mean,
                              latents_std=engine.vae.config.latents_std).decode(z)
    assert torch.equal(engine.stream_decoder().decode(z), want)


def test_decoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="decoder 'nope.pth': no such file"):
        _engine("nope.pth")
    with pytest.raises(TypeError, match="decoder must be None, 'wan', 'taehv'"):
        _engine(3)
    other = TAEHV(TAEHV("tiny").config.replace(latent_channels=4))
    with pytest.raises(ValueError, match="4 latent channels but the VAE has z_dim=16"):
        _engine(other)
    assert _engine("wan").decoder is None


def test_engine_maps_dit_latents_to_raw_with_its_own_vae_statistics():
    """TAEHV takes raw latents: the engine's stream decoder must undo the DiT normalisation with the statistics of
    *its* VAE (here non-Wan ones, drawn fresh), i.e. equal TAEHV on z * std + mean computed here."""
    from lipforcing.vae import VAEConfig
    from tests.decoders.reference import exact_conv, randomize_

    mean = tuple(float(v) for v in torch.randn(16))
    std = tuple(float(v) for v in torch.rand(16) * 2 + 0.5)
    vae = VAEConfig(dim=2, z_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1, latents_mean=mean, latents_std=std)
    model = randomize_(TAEHV("tiny")).eval().requires_grad_(False)
    engine = lipforcing.Engine.load(model=small_config(), vae=vae, resolution=RES, seed=3, backend="reference",
                                    decoder=model)
    z = torch.randn(1, 16, 5, RES // 8, RES // 8)                  # DiT (normalised) latents
    raw = z * torch.tensor(std).view(1, -1, 1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1, 1)
    with exact_conv():
        dec = engine.stream_decoder()
        got = torch.cat([dec.decode(z[:, :, :3]), dec.decode(z[:, :, 3:])], dim=2)
        want = model.decode_video(raw.transpose(1, 2)).transpose(1, 2) * 2 - 1
        as_if_raw = model.decode_video(z.transpose(1, 2)).transpose(1, 2) * 2 - 1
    assert got.shape == (1, 3, 17, RES, RES)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)      # z / (1/std) vs z * std: last-bit rounding
    assert (got - as_if_raw).abs().max() > 1e-2                      # the mapping is not a no-op here
