"""Media helpers for the ``lipforcing`` command: read/write video and audio with PyAV, and synthetic test media.

Reading
    :func:`read_video` -> (frames (N, H, W, 3) uint8 RGB, fps);  :func:`read_audio` -> (float32 mono, sample rate)
    from any file FFmpeg can open (wav, mp3, m4a, the audio track of a video).
Writing
    :class:`VideoWriter`: RGB frames (H.264, yuv420p) plus, optionally, 16 kHz mono audio (AAC) into an mp4, written
    as ``<name>.partial.mp4`` beside the target and renamed to it only when complete (an interrupted run never
    leaves a truncated file under the target name); :func:`check_not_input`: an output path that is an input
    under another name (symlink, hard link, ``..``) is refused;
    :func:`write_wav`: 16-bit PCM wav (standard library only).
Synthetic media (for ``lipforcing demo`` / ``profile`` and the tests)
    :func:`synthetic_speech`: formant-synthesised voiced syllables with pauses (speech-like spectrum and rhythm);
    :func:`synthetic_face_clip`: a procedurally drawn face (oval, hair, eyes, brows, nose, mouth) whose mouth opens
    with a given per-frame loudness and whose head sways slightly.

Every problem with a file raises :class:`MediaError` (a ValueError) with a one-line message saying what is wrong
and how to fix it; the command line prints it without a traceback.
"""
from __future__ import annotations

import logging
import os
import struct
import wave
from fractions import Fraction

import numpy as np

from lipforcing.audio.pcm import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, check_amplitude

logger = logging.getLogger("lipforcing")

__all__ = ["MediaError", "read_video", "read_audio", "write_wav", "VideoWriter", "check_output_file", "check_not_input",
           "partial_path",
           "synthetic_speech", "synthetic_face_clip", "frame_loudness"]


class MediaError(ValueError):
    """A media file that cannot be used; the message is one line: what is wrong and how to fix it."""


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MediaError("reading and writing video needs PyAV: pip install av  (or pip install 'lipforcing[media]')") \
            from e
    return av


def _check_file(path, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(f"{path}: no such file (check the {what} path)")
    if not os.path.isfile(path):
        raise MediaError(f"{path}: is not a file (give the path of {'an' if what[0] in 'aeiou' else 'a'} {what} "
                         "file)")
    return path


# ------------------------------------------------------------------------------------------------------ reading
def read_video(path, *, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode the first video stream of ``path``.

    Returns (frames, fps): frames (N, H, W, 3) uint8 RGB, fps the stream's average frame rate (25.0 when the
    container does not say).  ``max_frames`` stops decoding early.  Raises :class:`MediaError` for a missing file,
    a file FFmpeg cannot open, a file without a video stream or without decodable frames.
    """
    path = _check_file(path, "video")
    av = _av()
    frames = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: has no video stream (give a video of aligned face crops, e.g. an mp4)")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.base_rate or stream.guessed_rate
            fps = float(rate) if rate else 25.0
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except MediaError:
        raise
    except av.error.FFmpegError as e:   # not a media file, truncated, unknown codec, ...
        raise MediaError(f"{path}: cannot decode it as a video ({_ffmpeg_reason(e)}); give an mp4/mov/mkv/webm file "
                         "(re-encode with: ffmpeg -i in -c:v libx264 out.mp4)") from e
    if not frames:
        raise MediaError(f"{path}: the video stream has no decodable frames (re-encode it, e.g. "
                         "ffmpeg -i in -c:v libx264 out.mp4)")
    return np.stack(frames), fps


def read_audio(path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of ``path`` (wav, flac, mp3, m4a, or a video's audio track).

    Returns (samples, sample_rate): float32 mono in [-1, 1] (multi-channel audio is averaged), the file's own
    rate (resampling to 16 kHz is the session's job).  Raises :class:`MediaError` for a missing or unreadable
    file, no audio stream, no samples, NaN/inf or float samples beyond +-1e4 (``MAX_FLOAT_AMPLITUDE``), or a rate
    outside [8 kHz, 192 kHz].  A wav file shorter than its header announces (truncated) is used as far as it goes,
    with a warning on the ``lipforcing`` logger.
    """
    path = _check_file(path, "audio")
    av = _av()
    parts = []
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: has no audio stream (give a wav file of the speech, 16 kHz mono preferred)")
            stream = container.streams.audio[0]
            rate = int(stream.rate or stream.codec_context.sample_rate or 0)
            _check_rate(rate, path)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except MediaError:
        raise
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: cannot decode it as audio ({_ffmpeg_reason(e)}); give a wav file (convert with: "
                         "ffmpeg -i in -ac 1 -ar 16000 out.wav)") from e
    samples = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    if samples.size == 0:
        raise MediaError(f"{path}: the audio stream has no samples")
    if not np.isfinite(samples).all():
        raise MediaError(f"{path}: the audio contains NaN or inf samples")
    try:
        check_amplitude(samples, "the audio")
    except ValueError as e:
        raise MediaError(f"{path}: {e}") from None
    missing = wav_truncation(path)
    if missing:
        logger.warning("%s: the wav file is truncated: its header announces %s of audio, the file holds %s; "
                       "using what is there", path, _seconds(missing[0], rate), _seconds(missing[1], rate))
    return samples, rate


def _seconds(frames: int, rate: int) -> str:
    return f"{frames / rate:.2f} s" if rate else f"{frames} samples"


def wav_truncation(path) -> tuple[int, int] | None:
    """(announced, present) sample frames when ``path`` is a RIFF/WAVE file whose data chunk is shorter than its
    header says; None for complete files, other formats, or streamed wavs that leave the size unset."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            size = os.fstat(fh.fileno()).st_size
            block_align = 0
            while True:
                chunk = fh.read(8)
                if len(chunk) < 8:
                    return None
                cid, clen = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"fmt ":
                    fmt = fh.read(min(clen, 16))
                    if len(fmt) >= 14:
                        block_align = struct.unpack("<H", fmt[12:14])[0]
                    fh.seek(clen - len(fmt) + (clen & 1), os.SEEK_CUR)
                elif cid == b"data":
                    present = size - fh.tell()
                    if clen in (0, 0xFFFFFFFF) or present >= clen or not block_align:
                        return None   # complete, or a streamed wav with an unknown length
                    return clen // block_align, present // block_align
                else:
                    fh.seek(clen + (clen & 1), os.SEEK_CUR)
    except OSError:
        return None


def _check_rate(rate: int, path: str) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise MediaError(f"{path}: sample rate {rate} Hz is not supported (need {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} "
                         "Hz; convert with: ffmpeg -i in -ac 1 -ar 16000 out.wav)")


def _ffmpeg_reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return " ".join(str(msg).split())[:120]


# ------------------------------------------------------------------------------------------------------ writing
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv")


def check_output_file(path, *, keep: bool = False) -> None:
    """Raise :class:`MediaError` unless ``path`` names a video file (.mp4/.mov/.mkv) that can be created (or
    overwritten); a file this creates is removed again unless ``keep``.  For the commands' cheap checks, before
    any work is done."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MediaError(f"{path}: is a folder (give the path of an .mp4 file to write)")
    if not path.lower().endswith(VIDEO_EXTENSIONS):
        raise MediaError(f"{path}: the output must be an .mp4 (or .mov/.mkv) file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MediaError(f"{path}: the folder {folder} does not exist (create it or choose another -o path)")
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise MediaError(f"{path}: cannot create the output file ({e.strerror}); choose another path") from e
    if not existed and not keep:
        os.remove(path)


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file: the same inode on the same device when both exist (symlinks and
    hard links included), else the same resolved path."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_not_input(output, inputs: dict) -> None:
    """Raise :class:`MediaError` when ``output`` (or the partial file written beside it) is one of ``inputs``
    (``{option name: path or None}``) under any name: writing it would destroy the input."""
    out = os.fspath(output)
    for name, path in inputs.items():
        if path is None:
            continue
        path = os.fspath(path)
        for target in (out, partial_path(out)):
            if _same_file(target, path):
                how = "" if os.path.realpath(target) == os.path.realpath(path) and not os.path.islink(target) \
                    else " (through a symlink or hard link)"
                raise MediaError(f"{out}: the output would overwrite the input {name} {path}{how}; choose another "
                                 "-o path")


def partial_path(path) -> str:
    """Where :class:`VideoWriter` writes until it is closed: ``out.mp4`` -> ``out.partial.mp4`` (same folder)."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.partial{ext}"


def write_wav(path, samples: np.ndarray, sample_rate: int = 16000) -> None:
    """Write mono float samples in [-1, 1] (clipped) or int16 as a 16-bit PCM wav."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"samples must be 1-D mono, got shape {x.shape}")
    if x.dtype != np.int16:
        x = (np.clip(x.astype(np.float64), -1.0, 32767 / 32768) * 32768.0).round().astype(np.int16)
    with wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(x.astype("<i2").tobytes())


class VideoWriter:
    """Write RGB frames (H.264, yuv420p, constant frame rate) and optional mono audio (AAC) to an mp4.

    ::

        with VideoWriter("out.mp4", width=512, height=512, fps=25, sample_rate=16000) as w:
            w.write(image, audio=pcm_640)   # (H, W, 3) uint8; audio (n,) float32 (any n, kept in order)

    Width and height must be even (yuv420p).  Audio is written as given, sample after sample, from time 0.

    The frames go to :func:`partial_path` (``out.partial.mp4``) in the target folder; :meth:`close` finishes the
    file and renames it to ``path`` (atomically replacing an older one).  Leaving the ``with`` block with an
    exception (Ctrl-C included) or calling :meth:`abort` instead finishes the partial file and keeps it (a
    playable mp4 of the frames written so far) or removes it when it has no frame; ``path`` is never touched.
    """

    def __init__(self, path, *, width: int, height: int, fps: int = 25, sample_rate: int | None = 16000,
                 crf: int = 18):
        if width % 2 or height % 2 or width < 2 or height < 2:
            raise ValueError(f"video width and height must be even and >= 2 (H.264 yuv420p), got {width}x{height}")
        av = _av()
        path = os.fspath(path)
        check_output_file(path)
        self.path = path
        self.partial_path = partial = partial_path(path)
        created = not os.path.exists(partial)
        check_output_file(partial, keep=True)    # FFmpeg opens the file only at the first frame
        self.width, self.height = int(width), int(height)
        self._c = None
        try:
            self._c = av.open(partial, "w")
            self._v = self._c.add_stream("libx264", rate=Fraction(int(fps), 1))
        except (av.error.FFmpegError, ValueError) as e:   # ValueError: unknown extension, or no H.264 in a .gif/.wav
            if self._c is not None:
                self._c.close()
            if created and os.path.isfile(partial):
                os.remove(partial)
            raise MediaError(f"{path}: cannot write H.264 video there ({_ffmpeg_reason(e)}); use an .mp4 path") \
                from e
        self._v.width, self._v.height, self._v.pix_fmt = self.width, self.height, "yuv420p"
        self._v.options = {"crf": str(int(crf)), "preset": "veryfast"}
        self._a = None
        if sample_rate is not None:
            self._a = self._c.add_stream("aac", rate=int(sample_rate), layout="mono")
        self.sample_rate = sample_rate
        self.frames = 0
        self.samples = 0

    def write(self, image: np.ndarray, audio: np.ndarray | None = None) -> None:
        av = _av()
        image = np.ascontiguousarray(image)
        if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
            raise ValueError(f"image must be ({self.height}, {self.width}, 3) uint8, got {image.dtype} {image.shape}")
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = self.frames
        self._c.mux(self._v.encode(frame))
        self.frames += 1
        if audio is not None:
            self.write_audio(audio)

    def write_audio(self, audio: np.ndarray) -> None:
        if self._a is None:
            raise ValueError("this writer was opened without audio (sample_rate=None)")
        av = _av()
        a = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).reshape(1, -1))
        if a.shape[1] == 0:
            return
        frame = av.AudioFrame.from_ndarray(a, format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self.samples
        self._c.mux(self._a.encode(frame))
        self.samples += a.shape[1]

    def _finish(self) -> None:
        c, self._c = self._c, None
        try:
            c.mux(self._v.encode())
            if self._a is not None:
                c.mux(self._a.encode())
        finally:
            c.close()

    def close(self) -> None:
        """Finish the file and move it to ``path`` (idempotent; nothing after :meth:`abort`)."""
        if self._c is None:
            return
        self._finish()
        os.replace(self.partial_path, self.path)

    def abort(self) -> str | None:
        """Finish what was written as ``partial_path`` and keep it (returned), or remove it when it holds no frame
        (None is returned).  ``path`` is left as it was."""
        if self._c is not None:
            try:
                self._finish()
            except Exception:          # an encoder that cannot flush: the frames so far are still kept
                pass
        if self.frames and os.path.isfile(self.partial_path):
            return self.partial_path
        if os.path.isfile(self.partial_path):
            os.remove(self.partial_path)
        return None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------- synthetic media
# Formants (F1, F2, F3 in Hz) of five vowels of an adult voice; the syllables cycle through them.
_VOWELS = np.array([[730, 1090, 2440],    # a
                    [530, 1840, 2480],    # e
                    [270, 2290, 3010],    # i
                    [570, 840, 2410],     # o
                    [300, 870, 2240]])    # u
_BANDWIDTHS = np.array([90.0, 110.0, 170.0])


def synthetic_speech(seconds: float, sample_rate: int = 16000, *, seed: int = 0) -> np.ndarray:
    """A speech-like test signal: words of 1-4 voiced syllables separated by pauses.

    Each syllable is a harmonic series on a gliding pitch (f0 about 110-190 Hz with declination), shaped by three
    vowel formants (resonance peaks) and a smooth attack/decay envelope, with a short noise burst as a consonant
    onset.  Returns float32 mono samples in about [-0.5, 0.5], ``round(seconds * sample_rate)`` of them.
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    out = np.zeros(n, np.float64)
    pos = int(0.12 * sample_rate)                 # a little silence before the first word
    while pos < n:
        for _ in range(int(rng.integers(1, 5))):  # syllables of one word
            length = int(rng.uniform(0.12, 0.26) * sample_rate)
            if pos + length > n:
                break
            out[pos:pos + length] += _syllable(length, sample_rate, rng)
            pos += length + int(rng.uniform(0.0, 0.04) * sample_rate)
        pos += int(rng.uniform(0.15, 0.45) * sample_rate)   # pause between words
    peak = np.abs(out).max()
    if peak > 0:
        out *= 0.5 / peak
    return out.astype(np.float32)


def _syllable(length: int, sr: int, rng) -> np.ndarray:
    t = np.arange(length) / sr
    f0 = rng.uniform(120, 190) * (1 - 0.25 * t / t[-1]) * (1 + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = _VOWELS[rng.integers(len(_VOWELS))] * rng.uniform(0.92, 1.08)
    k = np.arange(1, int(4000 / f0.min()) + 1)                        # harmonics below 4 kHz
    # harmonic amplitudes: sum of resonance peaks (|H(f)| of a 2-pole resonator) over a -6 dB/octave source
    f = np.outer(f0, k)                                               # (length, harmonics)
    gain = np.zeros_like(f)
    for fc, bw in zip(formants, _BANDWIDTHS):
        gain += 1.0 / np.sqrt(1.0 + ((f - fc) / (bw / 2)) ** 2)
    gain /= k
    voiced = (gain * np.sin(np.outer(phase, k))).sum(1)
    env = np.minimum(1.0, t / 0.03) * np.minimum(1.0, (t[-1] - t) / 0.06)   # attack 30 ms, release 60 ms
    burst = np.zeros(length)
    nb = min(length, int(0.025 * sr))
    burst[:nb] = rng.standard_normal(nb) * np.linspace(1, 0, nb) * 0.3 * np.abs(voiced).max()
    return voiced * env ** 1.5 + burst


def frame_loudness(samples: np.ndarray, num_frames: int, samples_per_frame: int = 640) -> np.ndarray:
    """RMS of each video frame's samples, scaled to [0, 1] by the loudest frame: (num_frames,) float32."""
    x = np.zeros(num_frames * samples_per_frame, np.float32)
    m = min(len(samples), len(x))
    x[:m] = samples[:m]
    rms = np.sqrt((x.reshape(num_frames, samples_per_frame) ** 2).mean(1))
    return (rms / max(float(rms.max()), 1e-9)).astype(np.float32)


def synthetic_face_clip(num_frames: int, size: int | tuple[int, int] = 512, *, mouth_open=None,
                        seed: int = 0) -> np.ndarray:
    """A procedurally drawn aligned face crop per frame: (num_frames, H, W, 3) uint8 RGB.

    An oval face on a soft background gradient, with hair, eyes (white, iris, pupil, with blinks), eyebrows, a
    nose shadow and a mouth.  ``mouth_open``: (num_frames,) openness in [0, 1] (e.g. :func:`frame_loudness` of
    the speech) drives the mouth; default: closed.  The head sways by a few pixels so frames differ.
    """
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    if num_frames < 1 or h < 8 or w < 8:
        raise ValueError(f"need num_frames >= 1 and a size of at least 8x8, got {num_frames} frames of {h}x{w}")
    rng = np.random.default_rng(seed)
    openness = np.zeros(num_frames) if mouth_open is None else np.clip(np.asarray(mouth_open, float), 0, 1)
    if openness.shape != (num_frames,):
        raise ValueError(f"mouth_open must have shape ({num_frames},), got {openness.shape}")
    skin = np.array([224, 178, 148]) * rng.uniform(0.8, 1.05)
    hair = np.array([70, 45, 30]) * rng.uniform(0.6, 1.4)
    iris = np.array([60, 100, 150]) * rng.uniform(0.5, 1.2)
    y = (np.arange(h)[:, None] + 0.5) / h
    x = (np.arange(w)[None, :] + 0.5) / w
    bg = np.broadcast_to(np.array([40.0, 60.0, 90.0]) * (1 - y[..., None]) + np.array([90.0, 110.0, 140.0])
                         * y[..., None], (h, w, 3))
    blink_at = set(rng.integers(0, num_frames, size=max(1, num_frames // 60)).tolist())
    clip = np.empty((num_frames, h, w, 3), np.uint8)

    def ellipse(cx, cy, rx, ry):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0

    for i in range(num_frames):
        dx = 0.015 * np.sin(2 * np.pi * i / 75.0)
        dy = 0.008 * np.sin(2 * np.pi * i / 50.0)
        img = np.array(bg)
        cx, cy = 0.5 + dx, 0.52 + dy
        img[ellipse(cx, cy - 0.13, 0.36, 0.36) & (y < cy - 0.05)] = hair           # hair cap
        face = ellipse(cx, cy, 0.30, 0.40)
        shade = (1.0 - 0.25 * np.clip(np.hypot((x - cx) / 0.30, (y - cy) / 0.40), 0, 1) ** 3)[..., None]
        img = np.where(face[..., None], skin * shade, img)
        for side in (-1, 1):
            ex, ey = cx + side * 0.12, cy - 0.08
            img[ellipse(ex, ey - 0.07, 0.07, 0.018) & (y < ey - 0.06)] = hair * 0.8    # eyebrow
            if i in blink_at:
                img[ellipse(ex, ey, 0.065, 0.006)] = skin * 0.55
            else:
                img[ellipse(ex, ey, 0.065, 0.035)] = (245, 245, 240)
                img[ellipse(ex + 0.3 * dx, ey, 0.028, 0.028)] = iris
                img[ellipse(ex + 0.3 * dx, ey, 0.012, 0.012)] = (15, 15, 20)
        img[ellipse(cx, cy + 0.06, 0.03, 0.06) & (x > cx)] = skin * 0.78              # nose shadow
        mx, my = cx, cy + 0.21
        o = openness[i]
        img[ellipse(mx, my, 0.10 - 0.02 * o, 0.012 + 0.07 * o)] = (150, 60, 65)       # lips
        img[ellipse(mx, my, 0.085 - 0.02 * o, 0.004 + 0.06 * o)] = (60, 15, 25)       # mouth opening
        if o > 0.3:
            img[ellipse(mx, my - 0.04 * o, 0.06, 0.012) & (y < my - 0.03 * o)] = (235, 235, 230)   # teeth
        clip[i] = np.clip(img, 0, 255).astype(np.uint8)
    return clip
