"""Official-format (Wan key names) checkpoints: round trips, config inference, clear errors."""
from __future__ import annotations

import pytest
import torch

from lipforcing.vae import VAEConfig, WanVAE, infer_config, load_vae
from tests.vae.conftest import randomize_

import lipforcing


@pytest.fixture(scope="module")
def small_vae():
    return randomize_(WanVAE(VAEConfig(dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1))).eval()


def _same_outputs(a: WanVAE, b: WanVAE) -> None:
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = torch.randn(1, 16, 2, 2, 2)
    with torch.inference_mode():
        assert torch.equal(a.encode(x), b.encode(x))
        assert torch.equal(a.decode(z), b.decode(z))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_format_round_trip(small_vae, tmp_path, suffix):
    path = tmp_path / f"vae{suffix}"
    sd = small_vae.state_dict()
    assert "conv1.weight" in sd and "encoder.downsamples.0.residual.2.weight" in sd
    assert not any("latents_" in k for k in sd)                # statistics are not checkpoint content
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = lipforcing.load_vae(path)                        # the package-level name
    assert loaded.config == small_vae.config                  # dimensions read off the weights
    _same_outputs(loaded, small_vae)
    again = load_vae(path, config=small_vae.config)          # explicit config
    _same_outputs(again, small_vae)
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pt")   # a common wrapper
    _same_outputs(load_vae(tmp_path / "wrapped.pt"), small_vae)


def test_dtype_and_device(small_vae, tmp_path):
    torch.save(small_vae.state_dict(), tmp_path / "v.pth")
    vae = load_vae(tmp_path / "v.pth", dtype=torch.bfloat16, device="cpu")
    assert vae.dtype == torch.bfloat16 and vae.latents_mean.dtype == torch.bfloat16
    out = vae.encode(torch.rand(1, 3, 1, 16, 16) * 2 - 1)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 16, 1, 2, 2)
    with pytest.raises(TypeError, match="dtype"):
        load_vae(tmp_path / "v.pth", dtype=torch.int8)


def test_infer_config_of_the_released_model():
    with torch.device("meta"):
        sd = WanVAE(VAEConfig.from_name("wan2.1")).state_dict()
        attn = WanVAE(VAEConfig(dim=4, attn_scales=(0.5,))).state_dict()
    assert infer_config(sd) == VAEConfig()
    assert infer_config(attn).attn_scales == (0.5,)


def test_mismatched_weights_give_one_clear_error(small_vae, tmp_path):
    sd = dict(small_vae.state_dict())
    sd.pop("conv2.weight")
    sd["decoder.bogus.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_vae(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "1 missing key(s): conv2.weight" in msg and "1 unexpected key(s): decoder.bogus.weight" in msg

    torch.save(small_vae.state_dict(), tmp_path / "ok.pth")
    with pytest.raises(ValueError) as err:
        load_vae(tmp_path / "ok.pth", config="wan2.1")           # the released dims, not these weights
    msg = str(err.value)
    assert "shape mismatch" in msg and "dim=96" in msg and "more)" in msg

    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not look like a Wan2.1 VAE"):
        load_vae(tmp_path / "other.pth")


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="weight files"):
        load_vae(tmp_path)                                       # empty folder
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported checkpoint file"):
        load_vae(tmp_path / "notes.txt")
    with pytest.raises(TypeError, match="path"):
        load_vae(3)
