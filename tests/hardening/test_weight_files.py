"""The shared weight-file reader (lipforcing._weights) as every loader sees it: the latent-sample dataset of the
trainer gets the same named, safe errors as load_model / load_vae (tested in tests/model and tests/vae)."""
import os

import pytest
import torch
from safetensors.torch import save_file

from lipforcing._weights import CheckpointError, read_torch_file, read_weight_file, regular_file
from lipforcing.config import ModelConfig
from lipforcing.distill.data import LatentFileDataset


def _sample():
    c = ModelConfig.from_name("tiny")
    return {"latents": torch.randn(16, 3, 4, 4), "y": torch.randn(c.in_dim - 16, 3, 4, 4),
            "text": torch.randn(5, c.text_dim)}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_latent_dataset_unreadable_files_name_the_file(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    save_file(_sample(), good) if suffix == ".safetensors" else torch.save(_sample(), good)
    data = good.read_bytes()
    (tmp_path / f"bad{suffix}").write_bytes(data[: len(data) // 2])
    ds = LatentFileDataset([tmp_path / f"bad{suffix}", good], ModelConfig.from_name("tiny"))
    with pytest.raises(CheckpointError, match=r"latent sample .*bad\.(pt|safetensors) is not a readable") as info:
        ds[0]
    assert "weights_only" not in str(info.value)
    assert ds[1]["latents"].shape == (16, 3, 4, 4)


def test_latent_dataset_pickled_object_is_refused(tmp_path):
    torch.save({"latents": torch.zeros(1), "extra": torch.nn.Identity()}, tmp_path / "evil.pt")
    ds = LatentFileDataset([tmp_path / "evil.pt"], ModelConfig.from_name("tiny"))
    with pytest.raises(CheckpointError, match=r"refusing to load latent sample .*evil.pt") as info:
        ds[0]
    assert "weights_only=False" not in str(info.value)


def test_regular_file_rules(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        regular_file(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        regular_file(tmp_path)
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match="is a FIFO"):
        read_torch_file(tmp_path / "fifo.pt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        read_weight_file(tmp_path / "empty.safetensors")
    real = tmp_path / "real.pt"
    torch.save({"a": torch.arange(3)}, real)
    (tmp_path / "link.pt").symlink_to(real)
    assert torch.equal(read_weight_file(tmp_path / "link.pt")[0]["a"], torch.arange(3))   # symlinks are followed
