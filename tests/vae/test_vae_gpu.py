"""GPU checks of the VAE (skipped without CUDA): streaming stays bit-equal on the GPU, and CUDA matches the CPU."""
from __future__ import annotations

import pytest
import torch

from lipforcing.vae import VAEConfig, WanVAE
from tests.vae.conftest import randomize_

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["tiny", "wan2.1"])
def test_stream_equals_whole_clip_on_gpu(preset, dtype):
    vae = randomize_(WanVAE(VAEConfig.from_name(preset))).eval().to("cuda", dtype)
    size = 64 if preset == "wan2.1" else 32
    x = torch.rand(1, 3, 21, size, size, device="cuda") * 2 - 1
    with torch.inference_mode():
        z = vae.encode(x)
        enc = vae.stream_encoder()
        zs = torch.cat([enc.encode(x[:, :, :9]), enc.encode(x[:, :, 9:])], 2)
        y = vae.decode(z)
        dec = vae.stream_decoder()
        ys = torch.cat([dec.decode(z[:, :, :3]), dec.decode(z[:, :, 3:])], 2)
    assert z.dtype == dtype and z.shape == (1, 16, 6, size // 8, size // 8)
    assert torch.equal(zs, z) and torch.equal(ys, y)
    assert torch.isfinite(z).all() and y.std() > 0.01


def test_gpu_matches_cpu():
    vae = randomize_(WanVAE("tiny")).eval()
    x = torch.rand(2, 3, 13, 32, 24) * 2 - 1
    z = torch.randn(2, 16, 4, 4, 3)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            ref_z, ref_x = vae.encode(x), vae.decode(z)
            vae.cuda()
            got_z, got_x = vae.encode(x.cuda()).cpu(), vae.decode(z.cuda()).cpu()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(got_z, ref_z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-4, atol=1e-4)
