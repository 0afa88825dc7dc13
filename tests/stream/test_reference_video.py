"""Reading a reference video: PyAV round trip, and a session opened from a video path (moved from test_face.py)."""
import numpy as np
import pytest

from lipforcing.media import MediaError, read_video


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
