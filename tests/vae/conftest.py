"""Shared fixtures of the VAE tests: a tiny random Wan-style VAE and random clips in [-1, 1]."""
from __future__ import annotations

import pytest
import torch

from lipforcing.vae import VAEConfig, WanVAE


def randomize_(module: torch.nn.Module, gain: float = 1.0) -> torch.nn.Module:
    """Random weights everywhere (also where Wan/diffusers initialise to zeros or ones, e.g. the attention
    output projection and the RMS-norm gains), so every parameter influences the output."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) * gain / fan_in ** 0.5)
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return module


@pytest.fixture(scope="module")
def tiny_vae() -> WanVAE:
    return randomize_(WanVAE(VAEConfig.from_name("tiny"))).eval()


def clip(b: int, t: int, h: int = 32, w: int = 32) -> torch.Tensor:
    """A smooth-ish random clip in [-1, 1] (B, 3, T, H, W)."""
    return torch.rand(b, 3, t, h, w) * 2 - 1


@pytest.fixture
def make_clip():
    return clip


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    # The tensors here are tiny: one intra-op thread is as fast and avoids spin-waiting threads on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
