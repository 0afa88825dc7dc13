"""Parity with diffusers' independent implementation of the Wan2.1 VAE (``AutoencoderKLWan``), and loading of
diffusers folders and official-format checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from lipforcing.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, VAEConfig, WanVAE, load_vae

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

from tests.vae.conftest import randomize_  # noqa: E402

TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def reference():
    """A tiny random AutoencoderKLWan (diffusers), saved with save_pretrained."""
    return randomize_(AutoencoderKLWan(**TINY), gain=0.7).eval()


@pytest.fixture(scope="module")
def diffusers_dir(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("wan_vae_diffusers")
    reference.save_pretrained(path)
    return path


def _check_parity(ours: WanVAE, ref, b=2, t=13, h=32, w=40):
    x = torch.rand(b, 3, t, h, w) * 2 - 1
    with torch.no_grad():
        mu_ref = ref.encode(x).latent_dist.mean
        mu = ours.encode(x, normalize=False)
        z = mu_ref + 0.5 * torch.randn_like(mu_ref)
        x_ref = ref.decode(z).sample
        x_ours = ours.decode(z, normalize=False)
    assert mu.shape == mu_ref.shape == (b, 16, 1 + (t - 1) // 4, h // 8, w // 8)
    assert x_ours.shape == x_ref.shape == (b, 3, t, h, w)
    assert _rel(mu, mu_ref) < 1e-4
    assert _rel(x_ours, x_ref) < 1e-4
    # the decoded clip must not be saturated / constant, or the comparison would be weak
    assert (x_ref.abs() < 0.99).float().mean() > 0.5 and x_ref.std() > 0.05
    return x, mu_ref


def test_matches_diffusers_after_save_pretrained(reference, diffusers_dir):
    ours = load_vae(diffusers_dir)
    assert ours.config == VAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
    assert ours.dtype == torch.float32 and not any(p.requires_grad for p in ours.parameters())
    x, mu_ref = _check_parity(ours, reference)
    # normalize=True is (mu - latents_mean) / latents_std with the statistics of the folder's config.json
    cfg = reference.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), (mu_ref - mean) / std, rtol=1e-4, atol=1e-4)


def test_loads_weight_file_with_config_beside_it(reference, diffusers_dir):
    ours = load_vae(diffusers_dir / "diffusion_pytorch_model.safetensors")
    _check_parity(ours, reference, b=1, t=5, h=16, w=24)


def test_official_format_checkpoint_matches_diffusers(tmp_path):
    """An official-format (Wan key names) .pth built with diffusers' own official->diffusers converter (which
    hard-codes Wan2.1's layout of 2 residual blocks per stage, hence this narrower, deeper model)."""
    reference = randomize_(AutoencoderKLWan(**{**TINY, "base_dim": 4, "num_res_blocks": 2}), gain=0.7).eval()
    config = VAEConfig(dim=4, num_res_blocks=2)
    with torch.device("meta"):
        skeleton = WanVAE(config)
    names = list(skeleton.state_dict())
    # diffusers' converter maps official names to diffusers names; invert it on the official key list
    to_diffusers = convert_wan_vae_to_diffusers({k: k for k in names})
    ref_sd = reference.state_dict()
    assert set(to_diffusers) == set(ref_sd)
    official = {wan_key: ref_sd[d_key].clone() for d_key, wan_key in to_diffusers.items()}
    torch.save(official, tmp_path / "Wan2.1_VAE.pth")
    ours = load_vae(tmp_path / "Wan2.1_VAE.pth")           # dims read off the weights
    assert ours.config == config
    _check_parity(ours, reference, b=1, t=9, h=24, w=16)


def test_full_size_structure_matches_official_and_diffusers():
    """The wan2.1 config has the official module tree: diffusers' converter of official checkpoints turns our
    key names exactly into AutoencoderKLWan's, with the same shapes (127M parameters)."""
    with torch.device("meta"):
        ours = WanVAE(VAEConfig.from_name("wan2.1"))
        ref = AutoencoderKLWan()
    sd = ours.state_dict()
    converted = convert_wan_vae_to_diffusers(dict(sd))
    ref_sd = ref.state_dict()
    assert set(converted) == set(ref_sd)
    assert all(tuple(converted[k].shape) == tuple(ref_sd[k].shape) for k in ref_sd)
    assert 126_000_000 < sum(v.numel() for v in sd.values()) < 128_000_000
    # Wan2.1's latent statistics: the same numbers as diffusers' defaults
    assert VAEConfig().latents_mean == pytest.approx(ref.config.latents_mean)
    assert WAN21_LATENTS_STD == pytest.approx(ref.config.latents_std)
    assert len(WAN21_LATENTS_MEAN) == 16


def test_config_that_does_not_match_the_weights(reference, diffusers_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(diffusers_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_res_blocks"] = 2                       # the weights have 1 residual block per stage
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        load_vae(bad)
    msg = str(err.value)
    assert "config.json" in msg and "missing key(s)" in msg and "num_res_blocks=2" in msg
    assert msg.count("\n") <= 4 and "more)" in msg          # one error, lists capped

    cfg["num_res_blocks"] = 1
    cfg["base_dim"] = 16                            # wrong widths
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_vae(bad)

    cfg["base_dim"] = 8
    cfg["is_residual"] = True                       # Wan2.2 VAE: not this network
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="is_residual"):
        load_vae(bad)


def test_extra_and_missing_diffusers_keys(reference, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in reference.state_dict().items()}
    del sd["decoder.conv_out.bias"]
    sd["decoder.extra_layer.weight"] = torch.randn(3)
    (tmp_path / "config.json").write_text(json.dumps(dict(reference.config)))
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_vae(tmp_path)
    msg = str(err.value)
    assert "1 missing key(s): decoder.head.2.bias" in msg
    assert "1 unexpected key(s): decoder.extra_layer.weight" in msg
