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


# --- hardening (issue 13): unreadable / unsafe / non-finite VAE files name the file ---------------------------

def _vae_file(tmp_path, vae, name="vae.pth"):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    path = tmp_path / name
    save_file(sd, str(path)) if name.endswith(".safetensors") else torch.save(sd, path)
    return path


@pytest.mark.parametrize("name", ["vae.pth", "vae.safetensors"])
def test_load_vae_truncated_or_empty_file_names_it(vae, tmp_path, name):
    from lipforcing import load_vae

    good = _vae_file(tmp_path, vae, name)
    data = good.read_bytes()
    for cut in (len(data) // 3, 16, 0):
        bad = tmp_path / f"cut{cut}_{name}"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError) as info:
            load_vae(bad)
        msg = str(info.value)
        assert str(bad) in msg and ("empty" in msg or "truncated" in msg), msg
        assert "weights_only" not in msg, msg


def test_load_vae_pickled_object_is_refused_without_suggesting_unsafe_loading(tmp_path):
    from lipforcing import load_vae

    torch.save(torch.nn.Conv2d(3, 4, 3), tmp_path / "Wan2.1_VAE.pth")   # a module object, not a state dict
    with pytest.raises(ValueError, match=r"refusing to load VAE checkpoint .*Wan2.1_VAE.pth") as info:
        load_vae(tmp_path / "Wan2.1_VAE.pth")
    assert "weights_only=False" not in str(info.value)


def test_load_vae_fifo_is_refused(tmp_path):
    import os

    from lipforcing import load_vae

    os.mkfifo(tmp_path / "vae.pth")
    with pytest.raises(ValueError, match="is a FIFO"):
        load_vae(tmp_path / "vae.pth")


def test_load_vae_non_finite_weights_are_refused(vae, tmp_path):
    from lipforcing import load_vae

    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    name = sorted(k for k, v in sd.items() if v.is_floating_point() and v.dim() > 1)[0]
    sd[name].view(-1)[int(torch.randint(0, sd[name].numel(), ()))] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=rf"NaN or inf values in 1 tensor\(s\): {name}"):
        load_vae(tmp_path / "nan.pth")


def test_load_vae_config_json_out_of_bounds_or_garbage(vae, tmp_path):
    import json

    from lipforcing import load_vae

    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"base_dim": 96, "z_dim": 16, "num_res_blocks": 10 ** 6,
                                                    "dim_mult": [1, 2, 4, 4]}))
    from safetensors.torch import save_file

    save_file({"quant_conv.weight": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))  # diffusers keys
    with pytest.raises(ValueError, match=r"num_res_blocks = 1000000 \(limit 16\)"):
        load_vae(folder)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"config.json is not readable JSON"):
        load_vae(folder)
