"""Helpers for the streaming-engine tests."""
import numpy as np

import lipforcing
from lipforcing.vae import VAEConfig

RES = 16          # smallest face crop the pipeline takes: 2x2 latents, 1 token per latent frame


def small_config():
    """The tiny preset with 2 blocks (keeps one streaming chunk around 0.1 s on a CPU core)."""
    return lipforcing.ModelConfig.from_name("tiny").replace(num_layers=2)


SMALL_VAE = VAEConfig(dim=2, z_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1)


def reference_frames(n: int, res: int = RES, seed: int = 0) -> np.ndarray:
    """n random face crops (N, res, res, 3) uint8."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, res, res, 3), dtype=np.uint8)


def speech(n: int, seed: int = 0) -> np.ndarray:
    """n samples of speech-like float32 audio (never all zeros)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000.0
    x = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(n)
    return x.astype(np.float32)


def drain(session):
    return list(session.frames(block=True))


def assert_same_frames(a, b):
    assert len(a) == len(b), (len(a), len(b))
    for fa, fb in zip(a, b):
        assert (fa.index, fa.pts, fa.chunk_id) == (fb.index, fb.pts, fb.chunk_id)
        np.testing.assert_array_equal(fa.image, fb.image)
        np.testing.assert_array_equal(fa.audio, fb.audio)


# The ops' "auto" backend picks the Triton interpreter for CPU tensors when TRITON_INTERPRET=1 (which
# tests/conftest.py sets without a GPU); the engine tests pin the plain PyTorch reference, which is what they test.
BACKEND = "reference"
