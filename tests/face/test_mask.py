"""The procedural mouth mask, its latent channel, user mask images, ping-pong indexing."""
import numpy as np
import pytest
import torch

from lipforcing import face


def test_mouth_mask_shape_and_area():
    m = face.mouth_mask(512, 512)
    assert m.shape == (512, 512) and m.dtype == torch.bool
    frac = m.float().mean().item()
    assert 0.36 < frac < 0.45                         # LatentSync's mask.png: about 41 % of the crop
    assert not m[:256].any()                          # upper face kept
    assert m[400, 256] and not m[400, 2] and not m[511, 0]   # lower middle generated, corners kept
    assert torch.equal(m, m.flip(1))                  # left-right symmetric
    assert face.mouth_mask(16, 32).shape == (16, 32)
    with pytest.raises(ValueError, match="top"):
        face.mouth_mask(16, 16, top=1.5)
    with pytest.raises(ValueError, match="height"):
        face.mouth_mask(0, 16)


def test_keep_and_latent_mask():
    m = face.mouth_mask(64, 64)
    keep = face.keep_mask(m)
    assert keep.dtype == torch.float32 and torch.equal(keep, (~m).float())
    lat = face.latent_mask(m, (8, 8))
    assert lat.shape == (8, 8) and set(lat.unique().tolist()) <= {0.0, 1.0}
    # oracle: the mean of each 8x8 block of the keep-mask, thresholded (bilinear 8x downsampling of a
    # piecewise-constant mask samples near block centres, so it agrees except on boundary blocks)
    block = keep.reshape(8, 8, 8, 8).mean(dim=(1, 3))
    agree = ((block > 0.5).float() == 1 - lat).float().mean().item()
    assert agree >= 0.85
    assert lat[:4].sum() == 0 and lat[6, 3:5].eq(1).all()
    # a float mask with 1 = generate gives the same result
    assert torch.equal(face.latent_mask(m.float(), (8, 8)), lat)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_pingpong_index(n):
    seq = [face.pingpong_index(i, n) for i in range(4 * n + 3)]
    if n == 1:
        assert set(seq) == {0}
        return
    forward = list(range(n))
    backward = list(range(n - 2, 0, -1))
    expected = (forward + backward) * 8
    assert seq == expected[:len(seq)]
    assert all(abs(a - b) == 1 for a, b in zip(seq, seq[1:]))      # never jumps or repeats a frame


def test_load_mask_image_and_arrays(tmp_path):
    """LatentSync's convention (white = keep) from a PNG, a uint8 array and a float array; resized to the crop."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng()
    keep = np.full((256, 256), 255, np.uint8)
    top = int(rng.integers(100, 160))
    keep[top:, 40:216] = 0                                     # black = regenerate
    path = tmp_path / "mask.png"
    cv2.imwrite(str(path), keep)
    gen = face.load_mask(path, (64, 64))
    assert gen.shape == (64, 64) and gen.dtype == torch.bool
    want = torch.nn.functional.interpolate(torch.from_numpy(keep / 255.0)[None, None].float(), size=(64, 64),
                                           mode="area")[0, 0] < 0.5
    assert torch.equal(gen, want)
    assert torch.equal(face.load_mask(keep, (64, 64)), gen)
    assert torch.equal(face.load_mask(np.stack([keep] * 3, -1), (64, 64)), gen)     # colour image
    assert torch.equal(face.load_mask(keep / 255.0, (64, 64)), gen)
    assert torch.equal(face.load_mask(keep, (256, 256)), torch.from_numpy(keep == 0))


def test_load_mask_errors(tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ValueError, match="cannot decode it as an image"):
        face.load_mask(bad, (64, 64))
    with pytest.raises(ValueError, match="no such file"):
        face.load_mask(tmp_path / "missing.png", (64, 64))
    with pytest.raises(ValueError, match=r"is 300x200 pixels .* crop is 64x64"):
        face.load_mask(np.zeros((200, 300), np.uint8), (64, 64))
    with pytest.raises(ValueError, match="at least 16x16"):
        face.load_mask(np.zeros((8, 8), np.uint8), (64, 64))
    with pytest.raises(ValueError, match="white everywhere"):
        face.load_mask(np.full((64, 64), 255, np.uint8), (64, 64))
    with pytest.raises(TypeError, match="image path or an array"):
        face.load_mask(3, (64, 64))
