"""load_decoder / save_decoder: the public key names round-trip (.pth and .safetensors, fp16 files upcast), widths
read off the shapes, and files that are not TAEHV checkpoints are refused with errors naming the file."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import lipforcing
from lipforcing._weights import CheckpointError
from lipforcing.decoders import TAEHV, TAEHVConfig, load_decoder, save_decoder
from lipforcing.vae import VAEConfig, WanVAE
from tests.decoders.reference import randomize_


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_full_checkpoint_round_trip(full_taehv, tmp_path, suffix):
    path = tmp_path / f"taew2_1{suffix}"
    save_decoder(full_taehv, path)
    if suffix == ".pth":
        raw = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        raw = load_file(path)
    assert set(raw) == set(full_taehv.state_dict()) and len(raw) == 128
    loaded = lipforcing.load_decoder(path)
    assert loaded.config == full_taehv.config and not loaded.training
    for k, v in full_taehv.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    z = torch.randn(1, 2, 16, 2, 2)
    assert torch.equal(loaded.decode_video(z), full_taehv.decode_video(z))


def test_fp16_file_and_tiny_widths_are_read_off_the_shapes(tmp_path):
    model = randomize_(TAEHV("tiny"))
    path = tmp_path / "tiny_fp16.safetensors"
    save_file({k: v.half() for k, v in model.state_dict().items()}, str(path))
    loaded = load_decoder(path)
    assert loaded.config == model.config and loaded.dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k
    assert load_decoder(path, dtype=torch.float16).dtype == torch.float16
    # the spatial factor is not in the weights: save_decoder keeps it in the safetensors metadata
    four = TAEHV(TAEHVConfig.for_spatial_factor(4, encoder_width=8, decoder_widths=(8, 8, 8, 8)))
    save_decoder(four, tmp_path / "four.safetensors")
    assert load_decoder(tmp_path / "four.safetensors").config == four.config
    # a nested {"state_dict": ...} .pth loads too
    torch.save({"state_dict": model.state_dict()}, tmp_path / "nested.pth")
    assert load_decoder(tmp_path / "nested.pth").config == model.config


class _Opaque:
    pass


def _tiny_sd():
    return {k: v.clone() for k, v in randomize_(TAEHV("tiny")).state_dict().items()}


def test_a_wan_vae_file_is_refused(tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(WanVAE(VAEConfig.from_name("tiny")).state_dict(), path)
    with pytest.raises(ValueError, match=r"Wan2\.1_VAE\.pth.*not a TAEHV checkpoint.*Wan VAE.*load_vae"):
        load_decoder(path)
    dit = tmp_path / "student.safetensors"
    save_file({"patch_embedding.weight": torch.randn(4, 4), "blocks.0.ffn.0.weight": torch.randn(4, 4)}, str(dit))
    with pytest.raises(ValueError, match=r"student\.safetensors.*not a TAEHV.*load_model"):
        load_decoder(dit)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_truncated_file_is_refused(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    save_decoder(TAEHV("tiny"), good)
    data = good.read_bytes()
    bad = tmp_path / f"truncated{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"decoder checkpoint .*truncated\{suffix} is not a readable"):
        load_decoder(bad)


def test_wrong_shapes_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = _tiny_sd()
    sd["decoder.7.conv.weight"] = torch.randn(32, 32, 3, 3)
    sd.pop("decoder.22.bias")
    sd["decoder.23.weight"] = torch.randn(3)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError) as info:
        load_decoder(path)
    msg = str(info.value)
    assert "broken.safetensors" in msg and "does not match the TAEHV architecture" in msg
    assert "decoder.7.conv.weight (32, 32, 3, 3) (expected (32, 32, 1, 1))" in msg
    assert "missing 1: decoder.22.bias" in msg and "unexpected 1: decoder.23.weight" in msg
    # an explicit config that does not fit the file
    save_decoder(TAEHV("tiny"), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match=r"tiny\.pth.*wrong shapes: decoder\.1\.bias"):
        load_decoder(tmp_path / "tiny.pth", config="taew2_1")


def test_other_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_decoder(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match=r"decoder checkpoint .* is a directory"):
        load_decoder(tmp_path)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.npz.*unsupported file type"):
        load_decoder(odd)
    pickled = tmp_path / "object.pth"
    torch.save({"decoder.1.weight": torch.randn(2), "meta": _Opaque()}, pickled)   # refused by weights_only
    with pytest.raises(ValueError, match=r"object\.pth.*pickled Python objects"):
        load_decoder(pickled)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pth is empty"):
        load_decoder(empty)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.pth")                  # would block open() forever if it were read
        with pytest.raises(CheckpointError, match=r"pipe\.pth is a FIFO"):
            load_decoder(tmp_path / "pipe.pth")
    sd = _tiny_sd()
    sd["decoder.8.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"nan\.pth.*NaN or inf.*decoder\.8\.weight"):
        load_decoder(tmp_path / "nan.pth")
    with pytest.raises(ValueError, match="must end in .safetensors or .pth"):
        save_decoder(TAEHV("tiny"), tmp_path / "x.bin2")


def test_public_style_fp16_pth_counts_and_loads(full_taehv, tmp_path):
    """A random full-size checkpoint written like the public taew2_1.pth (a plain fp16 state dict, torch.save):
    counted from the file itself, then loaded unchanged."""
    path = tmp_path / "taew2_1.pth"
    torch.save({k: v.half() for k, v in full_taehv.state_dict().items()}, path)
    raw = torch.load(path, weights_only=True)
    assert len(raw) == 128 and all(v.dtype == torch.float16 for v in raw.values())
    count = lambda prefix: sum(v.numel() for k, v in raw.items() if k.startswith(prefix))  # noqa: E731
    assert (count(""), count("encoder."), count("decoder.")) == (11_315_539, 1_470_928, 9_844_611)
    assert tuple(raw["decoder.7.conv.weight"].shape) == (256, 256, 1, 1)
    assert 22.5e6 < os.path.getsize(path) < 22.8e6                    # "22.6 MB in fp16"
    loaded = load_decoder(path)
    assert loaded.config == TAEHVConfig() and loaded.dtype == torch.float32
    for k, v in raw.items():
        assert torch.equal(loaded.state_dict()[k], v.float()), k
    z = torch.randn(1, 2, 16, 2, 2)
    rounded = TAEHV()
    rounded.load_state_dict({k: v.float() for k, v in raw.items()})     # (full_taehv is shared: not cast)
    assert torch.equal(loaded.decode_video(z), rounded.eval().decode_video(z))
