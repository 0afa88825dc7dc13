"""The WebSocket protocol of ``lipforcing serve``: message parsing and frame encoding, no networking.

Client -> server
  text  ``{"type": "start", "sample_rate": 16000, "audio_format": "s16le" | "f32le", "video_format": "jpeg" | "rgb",
        "jpeg_quality": 85, "seed": 0, "avatar": "<id>"}``  or, instead of ``avatar``, ``"reference": {...}``
        with one of ``{"video": <base64 file>}`` (any container PyAV reads), ``{"image": <base64 png/jpeg>}`` or
        ``{"rgb": <base64>, "width": W, "height": H, "frames": N}`` (raw uint8 RGB, frame after frame).
  binary  mono PCM in the declared format and rate (little endian), any number of bytes that is a whole number of
        samples (2 per s16le sample, 4 per f32le), any number of messages.
  text  ``{"type": "end_of_speech"}``, ``{"type": "interrupt"}``, ``{"type": "close"}``.

Server -> client
  text  ``{"type": "started", "session": id, "width": W, "height": H, "fps": 25, "sample_rate": 16000,
        "samples_per_frame": 640, "video_format": ..., "audio_format": ...}``
  binary  one frame per message: ``b"LFF1"``, a uint32 little-endian header length, a JSON header
        ``{"index", "pts", "chunk_id", "width", "height", "video_format", "image_bytes", "audio_format",
        "audio_bytes"}``, the image (JPEG file or H*W*3 RGB bytes), then the 640 audio samples at 16 kHz the frame
        covers, in the session's audio format.
  text  ``{"type": "interrupted"}`` (no frame of the interrupted audio follows it), ``{"type": "closed"}``,
        ``{"type": "error", "code": ..., "message": ...}`` (a bad message is answered by an error; the connection
        stays usable).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import re
import struct

import numpy as np

__all__ = ["ProtocolError", "StartRequest", "parse_control", "parse_start", "decode_pcm", "encode_frame",
           "decode_frame", "FRAME_MAGIC"]

FRAME_MAGIC = b"LFF1"
AUDIO_FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
VIDEO_FORMATS = ("jpeg", "rgb")
CONTROL_TYPES = ("start", "end_of_speech", "interrupt", "close")
_AVATAR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_REFERENCE_FRAMES = 2000


class ProtocolError(ValueError):
    """A message the server refuses; ``code`` is a short machine-readable name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def to_message(self) -> str:
        return json.dumps({"type": "error", "code": self.code, "message": str(self)})


class StartRequest:
    """A parsed ``start`` message."""

    def __init__(self, *, sample_rate: int, audio_format: str, video_format: str, jpeg_quality: int, seed: int,
                 avatar: str | None, reference: np.ndarray | None):
        self.sample_rate, self.audio_format, self.video_format = sample_rate, audio_format, video_format
        self.jpeg_quality, self.seed, self.avatar, self.reference = jpeg_quality, seed, avatar, reference


def parse_control(text: str) -> dict:
    """A text message -> its JSON object, with a known ``type``."""
    try:
        msg = json.loads(text)
    except ValueError as exc:
        raise ProtocolError("bad_json", f"text messages must be JSON objects: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_json", f"text messages must be JSON objects, got {type(msg).__name__}")
    kind = msg.get("type")
    if kind not in CONTROL_TYPES:
        raise ProtocolError("unknown_type", f"'type' must be one of {', '.join(CONTROL_TYPES)}; got {kind!r}")
    return msg


def _int_field(msg: dict, name: str, default: int, lo: int, hi: int) -> int:
    v = msg.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProtocolError("bad_start", f"'{name}' must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def parse_start(msg: dict) -> StartRequest:
    """Validate a ``start`` message and decode its reference (not yet checked against the engine)."""
    from lipforcing.audio.pcm import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE

    unknown = set(msg) - {"type", "sample_rate", "audio_format", "video_format", "jpeg_quality", "seed", "avatar",
                          "reference"}
    if unknown:
        raise ProtocolError("bad_start", f"unknown field(s) in start: {', '.join(sorted(unknown))}")
    rate = _int_field(msg, "sample_rate", 16000, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
    audio_format = msg.get("audio_format", "s16le")
    if audio_format not in AUDIO_FORMATS:
        raise ProtocolError("bad_start", f"'audio_format' must be one of {', '.join(AUDIO_FORMATS)}, got "
                                         f"{audio_format!r}")
    video_format = msg.get("video_format", "jpeg")
    if video_format not in VIDEO_FORMATS:
        raise ProtocolError("bad_start", f"'video_format' must be one of {', '.join(VIDEO_FORMATS)}, got "
                                         f"{video_format!r}")
    quality = _int_field(msg, "jpeg_quality", 85, 1, 100)
    seed = _int_field(msg, "seed", 0, 0, (1 << 63) - 1)
    avatar, ref = msg.get("avatar"), msg.get("reference")
    if (avatar is None) == (ref is None):
        raise ProtocolError("bad_start", "give exactly one of 'avatar' (a prepared avatar id) and 'reference' "
                                         "(an uploaded video, image or raw RGB frames)")
    if avatar is not None and (not isinstance(avatar, str) or not _AVATAR_ID.match(avatar)):
        raise ProtocolError("bad_start", f"'avatar' must be an id of letters, digits, '_', '.', '-', got {avatar!r}")
    frames = None if ref is None else decode_reference(ref)
    return StartRequest(sample_rate=rate, audio_format=audio_format, video_format=video_format,
                        jpeg_quality=quality, seed=seed, avatar=avatar, reference=frames)


def _b64(value, what: str) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError("bad_reference", f"reference '{what}' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("bad_reference", f"reference '{what}' is not valid base64") from None


def decode_reference(ref) -> np.ndarray:
    """The ``reference`` object of a start message -> (N, H, W, 3) uint8 frames."""
    if not isinstance(ref, dict) or len({"video", "image", "rgb"} & set(ref)) != 1:
        raise ProtocolError("bad_reference", "'reference' must be an object with one of 'video', 'image' or 'rgb'")
    if "rgb" in ref:
        data = _b64(ref["rgb"], "rgb")
        dims = [ref.get(k) for k in ("frames", "height", "width")]
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise ProtocolError("bad_reference", "raw 'rgb' needs positive integer 'frames', 'height' and 'width'")
        n, h, w = dims
        if n > MAX_REFERENCE_FRAMES:
            raise ProtocolError("bad_reference", f"at most {MAX_REFERENCE_FRAMES} reference frames, got {n}")
        if len(data) != n * h * w * 3:
            raise ProtocolError("bad_reference", f"raw 'rgb' has {len(data)} bytes; frames x height x width x 3 = "
                                                 f"{n * h * w * 3}")
        return np.frombuffer(data, np.uint8).reshape(n, h, w, 3).copy()
    if "image" in ref:
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(_b64(ref["image"], "image"))).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ProtocolError("bad_reference", f"reference 'image' is not a readable image: {exc}") from None
        return np.asarray(img, dtype=np.uint8)[None].copy()
    import os
    import tempfile

    from lipforcing.media import MediaError, read_video

    data = _b64(ref["video"], "video")
    fd, path = tempfile.mkstemp(suffix=".video")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        frames, _ = read_video(path, max_frames=MAX_REFERENCE_FRAMES)
    except MediaError as exc:
        raise ProtocolError("bad_reference", f"reference 'video' cannot be decoded: {exc}") from None
    finally:
        os.unlink(path)
    return frames


def decode_pcm(data: bytes, audio_format: str) -> np.ndarray:
    """A binary audio message -> 1-D int16 or float32 samples."""
    dt = AUDIO_FORMATS[audio_format]
    if len(data) % dt.itemsize:
        raise ProtocolError("bad_audio", f"{audio_format} audio messages must hold whole samples ({dt.itemsize} "
                                         f"bytes each); got {len(data)} bytes")
    pcm = np.frombuffer(data, dt).astype(dt.newbyteorder("="))
    if pcm.dtype.kind == "f" and not np.isfinite(pcm).all():
        raise ProtocolError("bad_audio", "f32le audio contains NaN or inf")
    return pcm


def encode_frame(frame, *, video_format: str, audio_format: str, jpeg_quality: int = 85) -> bytes:
    """One :class:`~lipforcing.engine.Frame` -> one binary message (see the module docstring)."""
    h, w = frame.image.shape[:2]
    if video_format == "jpeg":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(frame.image).save(buf, format="JPEG", quality=jpeg_quality)
        image = buf.getvalue()
    else:
        image = np.ascontiguousarray(frame.image).tobytes()
    if audio_format == "s16le":
        from lipforcing.audio.pcm import float_to_int16      # here: decoding clients need no torch

        audio = float_to_int16(frame.audio).astype("<i2", copy=False).tobytes()
    else:
        audio = frame.audio.astype("<f4").tobytes()
    header = json.dumps({"index": frame.index, "pts": frame.pts, "chunk_id": frame.chunk_id, "width": w,
                         "height": h, "video_format": video_format, "image_bytes": len(image),
                         "audio_format": audio_format, "audio_bytes": len(audio)}).encode()
    return FRAME_MAGIC + struct.pack("<I", len(header)) + header + image + audio


def decode_frame(data: bytes) -> tuple[dict, np.ndarray, np.ndarray]:
    """A frame message -> (header, image (H, W, 3) uint8, audio (640,) int16 or float32): the client's side."""
    if data[:4] != FRAME_MAGIC:
        raise ValueError("not a lipforcing frame message (no LFF1 magic)")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + n])
    start = 8 + n
    image = data[start:start + header["image_bytes"]]
    audio = data[start + header["image_bytes"]:start + header["image_bytes"] + header["audio_bytes"]]
    if header["video_format"] == "jpeg":
        from PIL import Image

        img = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    else:
        img = np.frombuffer(image, np.uint8).reshape(header["height"], header["width"], 3)
    return header, img, np.frombuffer(audio, AUDIO_FORMATS[header["audio_format"]])
