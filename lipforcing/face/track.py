"""Tracking: choose one face, follow it from frame to frame, and smooth its alignment transform over time.

Per frame (``FaceTracker.update``):

1. While the face is tracked, its landmarks are found in the ROI predicted from the previous frame's landmarks (no
   detection).  A face-presence score below 0.5, or a scene cut (mean absolute difference of 32x32 grey thumbnails
   above ``scene_cut``), ends the track.
2. Without a track the detector runs.  Candidates are confirmed by the landmark model (presence >= 0.5).  After a
   loss, the candidate overlapping the last known box best (IoU >= ``min_iou``) is the same face; otherwise (first
   frame, scene cut, the face moved away) the choice rule picks one: ``box`` (the candidate overlapping that box
   most), ``face_index`` (0 = largest), default the largest.
3. The frame -> template similarity is smoothed with a One-Euro filter (a low-pass whose cut-off rises with speed:
   still faces do not jitter, moving faces do not lag), applied to the inverse similarity's four numbers
   (a, b: scale x rotation; tx, ty: where the template origin lands), speeds measured in face sizes per second.
   A new track (first frame, loss, scene cut) restarts the filter.

A face whose detection box is smaller than ``min_face`` pixels is treated as absent; if that is the only kind of
face a clip has, :func:`track_clip` says so with the minimum size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lipforcing.face import align, detect, landmarks

__all__ = ["FaceError", "FaceTracker", "FaceTrack", "track_clip", "OneEuro", "MIN_FACE", "scene_changed"]

MIN_FACE = 48
"""Smallest face (detection box side, pixels) that is aligned; smaller ones are treated as absent."""
PRESENCE = 0.5
_STILL = (0.02, 0.03, 0.02)      # ROI changes below these (position / size fractions, radians) are ignored


class FaceError(ValueError):
    """A clip the face stage cannot use (no face, faces too small); one line: what is wrong and what to do."""


class OneEuro:
    """One-Euro filter (Casiez et al. 2012) on a vector: cut-off = min_cutoff + beta * |speed|.

    ``scale`` normalises values before the speed is measured (here: face size in pixels), so ``beta`` is in
    1 / (face sizes per second)."""

    def __init__(self, fps: float, min_cutoff: float = 1.0, beta: float = 20.0, d_cutoff: float = 4.0):
        self.fps, self.min_cutoff, self.beta, self.d_cutoff = float(fps), min_cutoff, beta, d_cutoff
        self.x = self.dx = None

    def _alpha(self, cutoff: float) -> float:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau * self.fps)

    def reset(self) -> None:
        self.x = self.dx = None

    def __call__(self, x: np.ndarray, scale: float = 1.0) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.x is None:
            self.x, self.dx = x.copy(), np.zeros_like(x)
            return x.copy()
        dx = (x - self.x) * self.fps / max(scale, 1e-9)
        a_d = self._alpha(self.d_cutoff)
        self.dx = a_d * dx + (1 - a_d) * self.dx
        a = self._alpha(self.min_cutoff + self.beta * float(np.abs(self.dx).max()))
        self.x = a * x + (1 - a) * self.x
        return self.x.copy()


def _close(a, b, pos: float, size: float, angle: float) -> bool:
    """Whether ROI ``a`` is within ``pos`` (fraction of b's size) / ``size`` (relative) / ``angle`` (rad) of ``b``."""
    off = math.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1])
    turn = abs((a.angle - b.angle + math.pi) % (2 * math.pi) - math.pi)
    return off <= pos * b.size and abs(a.size / b.size - 1) <= size and turn <= angle


def _thumb(image: np.ndarray) -> np.ndarray:
    from lipforcing.face._nets import cv2_module
    cv2 = cv2_module()
    small = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA)     # shrink first: cheap on big frames
    return small.astype(np.float32).mean(-1)


def scene_changed(prev_thumb, thumb, threshold: float) -> bool:
    """True when two 32x32 grey thumbnails differ by more than ``threshold`` (mean absolute, 0..255)."""
    return prev_thumb is not None and float(np.abs(thumb - prev_thumb).mean()) > threshold


@dataclass
class FaceTrack:
    """Per-frame result of tracking a clip of N frames.

    matrices (N, 2, 3) float64 frame -> crop (smoothed); found (N,) bool (False: no usable face in that frame, its
    matrix is borrowed from the nearest frame that has one, and paste-back leaves the frame untouched);
    boxes (N, 4) float64 detection-style boxes (x0, y0, x1, y1) of the face, NaN where not found;
    resolution (H, W) of the crops; frame_size (H, W) of the frames.
    """
    matrices: np.ndarray
    found: np.ndarray
    boxes: np.ndarray
    resolution: tuple[int, int]
    frame_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.found)


class FaceTracker:
    """Follow one face through a stream of frames (see the module docstring).

    resolution : (H, W) of the aligned crop.  fps : frame rate (for the smoothing filter).  face_index : pick the
    n-th largest face instead of the largest.  box : (x0, y0, x1, y1) pick the face overlapping it most.
    min_face : smallest face side in pixels.  scene_cut : thumbnail difference (0..255) that ends a track.
    smoothing : False turns the filter off.
    """

    def __init__(self, resolution=(512, 512), *, fps: float = 25.0, face_index: int | None = None, box=None,
                 min_face: int = MIN_FACE, min_iou: float = 0.3, scene_cut: float = 40.0, smoothing: bool = True):
        if face_index is not None and (isinstance(face_index, bool) or not isinstance(face_index, int)
                                       or face_index < 0):
            raise ValueError(f"face_index must be an int >= 0 (0 = largest face), got {face_index!r}")
        if box is not None:
            box = tuple(float(v) for v in box)
            if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box!r}")
        if face_index is not None and box is not None:
            raise ValueError("give face_index or box, not both")
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.face_index, self.box, self.min_face = face_index, box, int(min_face)
        self.min_iou, self.scene_cut, self.smoothing = float(min_iou), float(scene_cut), bool(smoothing)
        self.filter = OneEuro(fps)
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new clip)."""
        self._points = None          # landmarks of the tracked face in the previous frame
        self._roi = None             # the ROI they were found in
        self._last_box = None        # last box the face was seen in (kept across losses for re-identification)
        self._thumb = None
        self.filter.reset()
        self.too_small = 0           # frames whose only faces were below min_face (for the error message)
        self.largest_too_small = None

    def _confirm(self, image, det):
        got = self._settle(image, landmarks.roi_from_detection(det))
        if got is None:
            return None
        self._candidate_rois[id(det)] = got[1]
        return got[0]

    def _pick(self, image, dets):
        """Choose among detections: same face as before (IoU), else the rule. Returns (det, landmarks) or None."""
        big = [d for d in dets if min(d.width, d.height) >= self.min_face]
        if not big and dets:
            # only faces below the minimum: remember the largest real one for the error message, confirmed the
            # way a large face is (landmark presence AND a landmark ROI that settles on the detection), so a false
            # detection in texture or noise is not reported as a small face (presence alone reached 0.5 on about
            # 1 in 300 random-noise clips)
            for d in dets[:3]:
                if self._settle(image, landmarks.roi_from_detection(d)) is not None:
                    side = min(d.width, d.height)
                    self.largest_too_small = max(side, self.largest_too_small or 0.0)
                    self.too_small += 1
                    break
        confirmed = []
        self._candidate_rois = {}
        for d in big:
            pts = self._confirm(image, d)
            if pts is not None:
                confirmed.append((d, pts))
        if not confirmed:
            return None
        if self._last_box is not None:
            iou = [detect.box_iou(self._last_box, d.box) for d, _ in confirmed]
            j = int(np.argmax(iou))
            if iou[j] >= self.min_iou:
                return confirmed[j]
        if self.box is not None:
            iou = [detect.box_iou(self.box, d.box) for d, _ in confirmed]
            j = int(np.argmax(iou))
            return confirmed[j] if iou[j] > 0 else None
        k = self.face_index or 0
        return confirmed[k] if k < len(confirmed) else None

    def _settle(self, image, roi):
        """Landmarks in ``roi``, re-centring the ROI on them until it stops moving (at most twice more).
        Returns (points, roi used) or None when there is no face or the ROI does not settle."""
        for attempt in range(3):
            pts, presence = landmarks.face_landmarks(image, roi)
            if presence < PRESENCE:
                return None
            new = landmarks.roi_from_landmarks(pts)
            if _close(new, roi, *_STILL):
                return pts, roi
            if attempt == 2:
                return (pts, roi) if _close(new, roi, 0.05, 0.1, 0.1) else None
            roi = new

    def _follow(self, image):
        """Landmarks of the tracked face: the ROI predicted from the previous frame's points, kept unchanged while
        the prediction stays within 2 % (position, size) and 0.02 rad of it, so a still face sees the same
        model input framing every frame (the landmark model's own jitter then stays below 0.1 px)."""
        roi = landmarks.roi_from_landmarks(self._points)
        if self._roi is not None and _close(roi, self._roi, *_STILL):
            roi = self._roi
        got = self._settle(image, roi)
        if got is None:
            return None
        self._roi = got[1]
        return got[0]

    def update(self, image: np.ndarray):
        """Track one (H, W, 3) uint8 RGB frame.  Returns (matrix (2, 3) frame -> crop, box) or None (no face)."""
        thumb = _thumb(image)
        cut = scene_changed(self._thumb, thumb, self.scene_cut)
        self._thumb = thumb
        if cut:
            self._points, self._last_box = None, None
            self.filter.reset()
        pts = None
        if self._points is not None:
            pts = self._follow(image)
        if pts is None:
            self.filter.reset()
            picked = self._pick(image, detect.detect_faces(image))
            if picked is None:
                self._points = None
                return None
            pts = picked[1]
            self._roi = self._candidate_rois[id(picked[0])]
        lo, hi = pts[:, :2].min(0), pts[:, :2].max(0)
        box = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
        if min(hi - lo) < self.min_face * 0.8:                  # the face shrank below the minimum while tracked
            self._points = None
            self.filter.reset()
            return None
        self._points, self._last_box = pts, box
        sim = align.fit_similarity(align.anchors_from_landmarks(pts), align.TEMPLATE)
        if self.smoothing:
            inv = align.invert(sim)                             # template -> frame: [[a, -b, tx], [b, a, ty]]
            a, b, tx, ty = inv[0, 0], inv[1, 0], inv[0, 2], inv[1, 2]
            face = math.hypot(a, b) * align.BOX[0]              # face width in pixels
            a, b, tx, ty = self.filter(np.array([a * align.BOX[0], b * align.BOX[0], tx, ty]), scale=face)
            a, b = a / align.BOX[0], b / align.BOX[0]
            sim = align.invert(np.array([[a, -b, tx], [b, a, ty]]))
        return align.similarity_to_crop(sim, self.resolution), box


def track_clip(frames: np.ndarray, tracker: FaceTracker) -> FaceTrack:
    """Run ``tracker`` over a clip (N, H, W, 3) uint8 and fill the frames without a face with the nearest found
    frame's transform.  Raises :class:`FaceError` when no frame has a usable face."""
    tracker.reset()
    n = len(frames)
    mats = np.full((n, 2, 3), np.nan)
    boxes = np.full((n, 4), np.nan)
    found = np.zeros(n, bool)
    for i in range(n):
        r = tracker.update(frames[i])
        if r is not None:
            mats[i], boxes[i], found[i] = r[0], r[1], True
    if not found.any():
        H, W = frames.shape[1:3]
        if tracker.too_small:
            raise FaceError(f"the face is too small to align: {tracker.largest_too_small:.0f} px, need at least "
                            f"{tracker.min_face} px (face box side) in the {W}x{H} frames; use a higher-resolution "
                            "or closer-cropped video")
        raise FaceError(f"no face found in any of the {n} frames ({W}x{H}); give a video with a visible, roughly "
                        "frontal face (at least about a tenth of the frame's short side)")
    idx = np.flatnonzero(found)
    pos = np.clip(np.searchsorted(idx, np.arange(n)), 1, max(len(idx) - 1, 1))
    before, after = idx[pos - 1], idx[np.minimum(pos, len(idx) - 1)]
    nearest = np.where(np.abs(np.arange(n) - before) <= np.abs(after - np.arange(n)), before, after)
    mats[~found] = mats[nearest[~found]]
    return FaceTrack(mats, found, boxes, tracker.resolution, tuple(frames.shape[1:3]))
