"""Generated media for the command-line tests."""
import numpy as np

from lipforcing.media import VideoWriter, synthetic_face_clip, synthetic_speech, write_wav


def make_video(path, frames: int, size: int, *, fps: int = 25, audio: np.ndarray | None = None, seed: int = 0):
    """An mp4 of a synthetic face clip (size x size), optionally with a 16 kHz audio track."""
    clip = synthetic_face_clip(frames, size, seed=seed)
    with VideoWriter(path, width=size, height=size, fps=fps, sample_rate=None if audio is None else 16000) as w:
        for f in clip:
            w.write(f)
        if audio is not None:
            w.write_audio(audio)
    return clip


def make_wav(path, seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    pcm = synthetic_speech(seconds, rate, seed=seed)
    write_wav(path, pcm, rate)
    return pcm
