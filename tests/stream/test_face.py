"""Face helpers: the procedural mouth mask, its latent channel, ping-pong indexing, reading a reference video."""
import numpy as np
import pytest
import torch

from lipforcing import face
from lipforcing.media import MediaError, read_video


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


def test_read_video_roundtrip(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "ref.mkv"
    frames = np.zeros((6, 16, 16, 3), np.uint8)
    for i in range(6):
        frames[i] = 30 * i + 20
    with av.open(str(path), "w") as c:
        st = c.add_stream("ffv1", rate=25)
        st.width, st.height, st.pix_fmt = 16, 16, "bgr0"
        for f in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    got, fps = read_video(path)
    assert fps == 25
    assert got.shape == (6, 16, 16, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, frames)                       # ffv1 in bgr0 is lossless
    assert read_video(path, max_frames=2)[0].shape[0] == 2
    with pytest.raises(MediaError, match="no such file"):
        read_video(tmp_path / "missing.mp4")


def test_session_from_video_path(tmp_path, engine):
    av = pytest.importorskip("av")
    path = tmp_path / "ref.mkv"
    with av.open(str(path), "w") as c:
        st = c.add_stream("ffv1", rate=25)
        st.width, st.height, st.pix_fmt = 16, 16, "bgr0"
        for i in range(3):
            f = np.full((16, 16, 3), 60 * i, np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    s = engine.session(str(path))
    assert tuple(s.reference.shape) == (3, 16, 16, 3)
    s.close()
