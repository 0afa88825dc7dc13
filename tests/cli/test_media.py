"""lipforcing.media: synthetic media, PyAV/wav round trips and file errors."""
import numpy as np
import pytest

from lipforcing.media import (MediaError, VideoWriter, frame_loudness, read_audio, read_video, synthetic_face_clip,
                              synthetic_speech, write_wav)


def test_synthetic_speech_is_speech_like(_fresh_random_inputs):
    x = synthetic_speech(3.0, 16000, seed=_fresh_random_inputs)
    assert x.dtype == np.float32 and x.shape == (48000,)
    assert 0.3 < np.abs(x).max() <= 0.5 + 1e-6
    loud = frame_loudness(x, 75)
    assert (loud < 0.05).mean() > 0.1 and (loud > 0.3).mean() > 0.3       # pauses and voiced stretches
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / 16000)
    assert spec[(f > 80) & (f < 4000)].sum() > 0.9 * spec.sum()            # energy in the speech band


def test_face_clip_mouth_follows_openness(_fresh_random_inputs):
    clip = synthetic_face_clip(2, 64, mouth_open=[0.0, 1.0], seed=_fresh_random_inputs)
    assert clip.shape == (2, 64, 64, 3) and clip.dtype == np.uint8
    mouth = (slice(40, 60), slice(20, 44))
    dark = [(c[mouth].astype(int).sum(-1) < 200).sum() for c in clip]
    assert dark[1] > dark[0]                                                 # an open mouth shows its dark inside
    with pytest.raises(ValueError, match="mouth_open"):
        synthetic_face_clip(3, 32, mouth_open=[0.0, 1.0])


def test_wav_round_trip(tmp_path, _fresh_random_inputs):
    x = synthetic_speech(0.5, 22050, seed=_fresh_random_inputs)
    write_wav(tmp_path / "a.wav", x, 22050)
    y, rate = read_audio(tmp_path / "a.wav")
    assert rate == 22050 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1.0 / 32768 + 1e-7)


def test_video_round_trip(tmp_path, _fresh_random_inputs):
    clip = synthetic_face_clip(10, 48, seed=_fresh_random_inputs)
    with VideoWriter(tmp_path / "v.mp4", width=48, height=48, fps=25, sample_rate=None) as w:
        for f in clip:
            w.write(f)
    frames, fps = read_video(tmp_path / "v.mp4")
    assert frames.shape == clip.shape and fps == 25.0
    assert np.abs(frames.astype(int) - clip.astype(int)).mean() < 6          # lossy H.264 at crf 18


def test_file_errors(tmp_path):
    with pytest.raises(MediaError, match="no such file"):
        read_video(tmp_path / "none.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(MediaError, match="cannot decode"):
        read_video(tmp_path / "junk.mp4")
    with pytest.raises(MediaError, match="cannot decode"):
        read_audio(tmp_path / "junk.mp4")
    with pytest.raises(ValueError, match="even"):
        VideoWriter(tmp_path / "odd.mp4", width=33, height=32)


def test_video_writer_refuses_unusable_paths_up_front(tmp_path, _fresh_random_inputs):
    rng = np.random.default_rng(_fresh_random_inputs)
    size = 2 * int(rng.integers(4, 17))
    for name, needle in (("out.gif", "must be an .mp4"), ("out.wav", "must be an .mp4"), ("out.nosuchformat", "must be an .mp4"),
                         ("n" * 300 + ".mp4", "cannot create the output file")):
        with pytest.raises(MediaError, match=needle):
            VideoWriter(tmp_path / name, width=size, height=size)
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(MediaError, match="is a folder"):
        VideoWriter(tmp_path / "folder.mp4", width=size, height=size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.mp4"]    # no empty files left behind
    with VideoWriter(tmp_path / "ok.mp4", width=size, height=size, sample_rate=None) as w:   # still works
        w.write(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    assert read_video(tmp_path / "ok.mp4")[0].shape == (1, size, size, 3)


def test_folder_instead_of_audio_file_message(tmp_path):
    with pytest.raises(MediaError, match="path of an audio file"):
        read_audio(tmp_path)
    with pytest.raises(MediaError, match="path of a video file"):
        read_video(tmp_path)
