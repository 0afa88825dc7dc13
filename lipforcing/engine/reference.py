"""A session's reference video: aligned crops as they are, or full frames with the face track for the face stage.

:func:`prepare_reference` turns what ``engine.session(reference)`` gets into a :class:`Reference`:

* frames at the engine's crop size (or ``aligned=True``): taken as aligned face crops, as before (no face stage);
* frames of any other size (or ``aligned=False``): the face is detected, tracked and aligned once
  (:class:`lipforcing.face.FacePipeline`); each chunk then cuts its crops from the full frames (stage
  ``face_align``) and composites the generated crops back into them (stage ``paste_back``), on the engine's device;
* a video path: decoded with PyAV, then as above;
* a file written by :meth:`Engine.prepare <lipforcing.engine.Engine.prepare>` (:func:`save_reference`): the face
  track (transforms, found flags, boxes) is read back instead of recomputed; the frames come from the source video
  it names (checked by size and modification time) or, for a reference given as an array, from the file itself.
  VAE latents are not stored: the chunk step encodes each chunk's reference frames with the session's streaming
  encoder, whose state depends on where an utterance starts in the ping-pong order.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Reference", "FaceReference", "prepare_reference", "save_reference", "load_reference",
           "is_reference_file"]

FORMAT = "lipforcing.reference/1"


@dataclass
class FaceReference:
    """The face stage of a full-frame reference: its :class:`~lipforcing.face.FaceTrack` and the
    :class:`~lipforcing.face.FacePipeline` that cuts crops and pastes them back."""
    track: object
    pipeline: object

    def crops(self, frames: torch.Tensor, idx) -> torch.Tensor:
        """frames (n, H, W, 3) uint8 (reference frames ``idx``) -> their aligned crops (n, h, w, 3) uint8 on the
        pipeline's device."""
        from lipforcing.face.align import warp_to_crop

        mats = self.track.matrices[np.asarray(idx)]
        return warp_to_crop(frames.to(self.pipeline.device, non_blocking=True), mats, self.pipeline.resolution)

    def paste(self, frames: torch.Tensor, crops: np.ndarray, idx) -> list[np.ndarray]:
        """Composite generated crops (n, h, w, 3) uint8 into reference frames ``idx`` -> n (H, W, 3) uint8 numpy
        arrays (new ones; the reference is not modified); frames without a face come back unchanged."""
        out = []
        gen = torch.from_numpy(np.ascontiguousarray(crops))
        for k, i in enumerate(np.asarray(idx).tolist()):
            out.append(self.pipeline.paste(frames[k], gen[k], self.track, i).cpu().numpy())
        return out


@dataclass
class Reference:
    """frames : (N, H, W, 3) uint8 CPU tensor (pinned on CUDA engines): the crops themselves when ``face`` is
    None, else the full frames.  face : :class:`FaceReference` or None.  source : the video path, if any."""
    frames: torch.Tensor
    face: FaceReference | None = None
    source: str | None = None

    @property
    def aligned(self) -> bool:
        return self.face is None


def is_reference_file(path) -> bool:
    """True when ``path`` is a file written by :func:`save_reference` (a safetensors file with our format tag)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            n = int.from_bytes(head, "little")
            if not 2 <= n <= 100_000_000:
                return False
            meta = json.loads(f.read(n)).get("__metadata__", {})
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _pipeline(engine, *, face_index=None, box=None, region="mouth"):
    from lipforcing.face import FacePipeline

    return FacePipeline(engine.resolution, device=engine.device, mask=engine.mouth_mask, region=region,
                        face_index=face_index, box=box)


def prepare_reference(engine, reference, *, aligned: bool | None = None, face_index: int | None = None, box=None,
                      region: str = "mouth") -> Reference:
    """What ``engine.session`` / ``engine.prepare`` do with their ``reference`` (see the module docstring).
    Raises :class:`lipforcing.face.FaceError` (a ValueError) when full frames have no usable face."""
    if isinstance(reference, Reference):
        return reference
    if aligned not in (None, True, False):
        raise TypeError(f"aligned must be None (decide by size), True or False, got {aligned!r}")
    source = None
    if isinstance(reference, (str, os.PathLike)):
        source = os.path.abspath(os.fspath(reference))
        if os.path.isfile(source) and is_reference_file(source):
            return load_reference(engine, source, region=region)
    frames = engine._reference_frames(reference, aligned=False)
    same = tuple(frames.shape[1:3]) == tuple(engine.resolution)
    if aligned is True and not same:
        H, W = engine.resolution
        raise ValueError(f"aligned=True but the reference frames are {frames.shape[2]}x{frames.shape[1]}, not "
                         f"{W}x{H} (this engine's crop size); pass aligned=None to detect and align the face")
    if aligned is True or (aligned is None and same):
        return Reference(frames, None, source)
    from lipforcing.face import FaceError

    fp = _pipeline(engine, face_index=face_index, box=box, region=region)
    try:
        track = fp.track(frames)
    except FaceError as e:
        H, W = engine.resolution
        raise FaceError(f"{e} (frames of exactly {W}x{H}, this engine's crop size, are taken as aligned face crops "
                        "as they are)") from None
    return Reference(frames, FaceReference(track, fp), source)


def save_reference(ref: Reference, path) -> None:
    """Write the face track of a prepared full-frame reference (and its frames when it has no source video) to
    ``path`` (safetensors)."""
    from safetensors.torch import save_file

    if ref.face is None:
        raise ValueError("this reference is aligned crops (no face track to save); prepare full frames or a video")
    t = ref.face.track
    tensors = {"matrices": torch.from_numpy(np.ascontiguousarray(t.matrices)),
               "found": torch.from_numpy(t.found.astype(np.uint8)),
               "boxes": torch.from_numpy(np.ascontiguousarray(t.boxes))}
    meta = {"format": FORMAT, "resolution": json.dumps(list(t.resolution)),
            "frame_size": json.dumps(list(t.frame_size)), "frames": str(len(t)),
            "region": ref.face.pipeline.region}
    if ref.source is not None:
        st = os.stat(ref.source)
        meta.update(source=ref.source, source_bytes=str(st.st_size), source_mtime_ns=str(st.st_mtime_ns))
    else:
        tensors["frames"] = ref.frames.contiguous()
    save_file(tensors, os.fspath(path), metadata=meta)


def load_reference(engine, path, *, region: str | None = None) -> Reference:
    """Read a file written by :func:`save_reference` for ``engine`` (same crop size); no detection runs."""
    from safetensors import safe_open

    from lipforcing.face.track import FaceTrack

    path = os.fspath(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    res = tuple(json.loads(meta["resolution"]))
    if res != tuple(engine.resolution):
        raise ValueError(f"{path}: prepared for {res[0]}x{res[1]} crops but this engine uses "
                         f"{engine.resolution[0]}x{engine.resolution[1]}; prepare it again with this engine")
    if "frames" in t:
        frames = engine._reference_frames(t["frames"], aligned=False)
        source = None
    else:
        source = meta["source"]
        if not os.path.isfile(source):
            raise ValueError(f"{path}: its source video {source} is gone; prepare the reference again")
        st = os.stat(source)
        if str(st.st_size) != meta["source_bytes"] or str(st.st_mtime_ns) != meta["source_mtime_ns"]:
            raise ValueError(f"{path}: its source video {source} changed since it was prepared; prepare it again")
        frames = engine._reference_frames(source, aligned=False)
    n = int(meta["frames"])
    if frames.shape[0] != n or list(frames.shape[1:3]) != json.loads(meta["frame_size"]):
        raise ValueError(f"{path}: expected {n} frames of {meta['frame_size']}, the video has {frames.shape[0]} of "
                         f"{list(frames.shape[1:3])}; prepare the reference again")
    track = FaceTrack(t["matrices"].numpy().astype(np.float64), t["found"].numpy().astype(bool),
                      t["boxes"].numpy().astype(np.float64), res, tuple(frames.shape[1:3]))
    fp = _pipeline(engine, region=region or meta.get("region", "mouth"))
    return Reference(frames, FaceReference(track, fp), source)
