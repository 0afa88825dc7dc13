"""Dataset interface for precomputed latents (.safetensors / .pt) and the synthetic stand-in."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lipforcing import ModelConfig
from lipforcing.distill.data import LatentFileDataset, SyntheticLatentDataset, collate

CFG = ModelConfig.from_name("tiny")


def _parts(F=3, H=4, W=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(16, F, H, W, generator=g), "ref_latent": torch.randn(16, H, W, generator=g),
            "mask": (torch.rand(H, W, generator=g) > 0.5).float(),
            "masked_latents": torch.randn(16, F, H, W, generator=g),
            "ref_sequence": torch.randn(16, F, H, W, generator=g),
            "audio": torch.randn(1 + 4 * (F - 1), CFG.audio_dim, generator=g),
            "text": torch.randn(6, CFG.text_dim, generator=g), "waveform": torch.randn(9 * 640, generator=g)}


def test_file_dataset_builds_y_and_groups_audio(tmp_path):
    raw = _parts()
    save_file(raw, str(tmp_path / "a.safetensors"))
    y = torch.randn(49, 3, 4, 4)
    torch.save({"latents": raw["latents"], "y": y, "audio": torch.randn(3, 4, CFG.audio_dim),
                "text": torch.randn(1, 4, CFG.text_dim)}, tmp_path / "b.pt")
    ds = LatentFileDataset(tmp_path, CFG)
    assert len(ds) == 2
    a = ds[0]
    assert a["y"].shape == (49, 3, 4, 4)
    assert torch.equal(a["y"][:16, 2], raw["ref_latent"])                  # reference latent repeated over F
    assert torch.equal(a["y"][16, 1], raw["mask"])
    assert torch.equal(a["y"][17:33], raw["masked_latents"]) and torch.equal(a["y"][33:], raw["ref_sequence"])
    assert a["audio"].shape == (3, 4, CFG.audio_dim)
    assert torch.equal(a["audio"][0, 0], raw["audio"][0]) and torch.equal(a["audio"][1], raw["audio"][1:5])
    b = ds[1]
    assert torch.equal(b["y"], y) and b["text"].shape == (4, CFG.text_dim)
    batch = collate([a, b])
    assert batch["text"].shape == (2, 6, CFG.text_dim) and torch.equal(batch["text"][1, 4:], torch.zeros(2, 32))
    assert batch["neg_text"].abs().sum() == 0 and "waveform" not in batch


def test_file_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        LatentFileDataset(tmp_path / "nope", CFG)
    raw = _parts()
    del raw["mask"]
    save_file(raw, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match="mask"):
        LatentFileDataset(tmp_path, CFG)[0]


def test_synthetic_dataset_is_deterministic():
    ds = SyntheticLatentDataset(CFG, num_samples=3, frames=6, height=4, width=4, seed=1)
    a, b = ds[2], SyntheticLatentDataset(CFG, num_samples=3, frames=6, height=4, width=4, seed=1)[2]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(ds[0]["latents"], ds[1]["latents"])
    assert a["waveform"].shape == ((1 + 4 * 5) * 640,)
    with pytest.raises(IndexError):
        ds[3]


def test_trainer_reads_file_data(tmp_path):
    from lipforcing.distill.trainer import TrainConfig, Trainer

    for i in range(2):
        save_file(_parts(seed=i), str(tmp_path / f"{i}.safetensors"))
    tr = Trainer(TrainConfig(stage="df", iterations=1, output_dir=str(tmp_path / "run"), resume=False,
                             data={"kind": "files", "path": str(tmp_path)}, attn_backend="reference", log_every=0))
    assert len(tr.dataset) == 2
    assert "df_loss" in tr.train()[0]
