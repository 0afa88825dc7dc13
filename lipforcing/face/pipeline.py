"""FacePipeline: full frames -> aligned crops + transforms (for the model), generated crops -> full frames.

::

    fp = FacePipeline((512, 512), device="cuda")
    track = fp.track(frames)                 # (N, H, W, 3) uint8 -> FaceTrack (detection, landmarks, smoothing)
    crops = fp.crops(frames, track)          # (N, 512, 512, 3) uint8 torch on the device
    out = fp.paste(frames[i], generated[i], track, i)   # (H, W, 3) uint8 torch; frames without a face unchanged

Detection and landmarks run on the CPU (OpenCV); the crop warp and the paste-back run in torch on ``device``.
"""
from __future__ import annotations

import numpy as np
import torch

from lipforcing.face import align, paste
from lipforcing.face.mask import load_mask, mouth_mask
from lipforcing.face.track import MIN_FACE, FaceTrack, FaceTracker, track_clip

__all__ = ["FacePipeline"]


class FacePipeline:
    """The face stage of the engine.

    resolution : (H, W) of the model's crop.  device : where warps and blends run.  mask : the generate-mask
    (H, W) bool tensor (True = mouth), a mask image path/array in LatentSync's convention (white = keep), or None
    for :func:`~lipforcing.face.mask.mouth_mask`.  region : ``"mouth"`` (composite only the masked region, the
    default) or ``"face"`` (the whole crop).  face_index, box, min_face, fps, smoothing : see
    :class:`~lipforcing.face.track.FaceTracker`.
    """

    def __init__(self, resolution=(512, 512), *, device="cpu", mask=None, region: str = "mouth",
                 face_index: int | None = None, box=None, min_face: int = MIN_FACE, fps: float = 25.0,
                 smoothing: bool = True):
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.device = torch.device(device)
        if region not in paste.REGIONS:
            raise ValueError(f"region must be one of {paste.REGIONS}, got {region!r}")
        if mask is None:
            gen = mouth_mask(*self.resolution)
        elif isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 2:
            if tuple(mask.shape) != self.resolution:
                raise ValueError(f"mask must be {self.resolution} (the crop), got {tuple(mask.shape)}")
            gen = mask.cpu()
        else:
            gen = load_mask(mask, self.resolution)
        self.generate_mask = gen
        self.region = region
        self.weight = paste.blend_weight(gen if region == "mouth" else torch.ones_like(gen)).to(self.device)
        self.tracker = FaceTracker(self.resolution, fps=fps, face_index=face_index, box=box, min_face=min_face,
                                   smoothing=smoothing)

    def track(self, frames) -> FaceTrack:
        """Detect, follow and align the face in every frame of (N, H, W, 3) uint8 (numpy or torch)."""
        arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"frames must be (N, H, W, 3) uint8 RGB, got {arr.dtype} {arr.shape}")
        return track_clip(arr, self.tracker)

    def crops(self, frames, track: FaceTrack, *, batch: int = 16) -> torch.Tensor:
        """The aligned crops (N, h, w, 3) uint8 on the device (cut in batches of ``batch`` frames)."""
        frames = torch.as_tensor(frames)
        out = []
        for i in range(0, len(frames), batch):
            f = frames[i:i + batch].to(self.device, non_blocking=True)
            out.append(align.warp_to_crop(f, track.matrices[i:i + batch], self.resolution))
        return torch.cat(out)

    def paste(self, frame, crop: torch.Tensor, track: FaceTrack, index: int) -> torch.Tensor:
        """Frame ``index`` of the tracked clip with ``crop`` (h, w, 3) composited back: (H, W, 3) uint8 on the
        device.  A frame without a face comes back unchanged."""
        frame = torch.as_tensor(frame).to(self.device)
        if not track.found[index]:
            return frame.clone()
        return paste.paste_back(frame, crop.to(self.device), track.matrices[index], self.weight)
