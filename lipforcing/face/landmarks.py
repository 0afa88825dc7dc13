"""Face landmarks: MediaPipe's 468-point Face Mesh model on a rotated square region of the frame.

The region of interest (ROI) is a square of side ``size`` centred at ``center``, rotated by ``angle`` (radians,
counter-clockwise in the image as seen; 0 = upright) so that the eyes are level in the model's input.  It is
warped to 192x192 (RGB in [0, 1]); the model returns 468 (x, y, z) points in input pixels and a face-presence
logit.  Points are mapped back to frame pixels (z is scaled like x and kept relative).

ROIs follow MediaPipe's rules: from a detection, the box centre, 1.5x the box's larger side, the angle of the
line right eye -> left eye (keypoints 0 -> 1); from the previous frame's landmarks (tracking), the landmarks'
bounding box, 1.5x its larger side, the angle of the line between the outer eye corners (points 33 -> 263).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lipforcing.face import _nets

__all__ = ["Roi", "roi_from_detection", "roi_from_landmarks", "roi_matrix", "face_landmarks", "NUM_LANDMARKS"]

INPUT = 192
NUM_LANDMARKS = 468
SCALE = 1.5
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263


@dataclass(frozen=True)
class Roi:
    """A rotated square in frame pixels: centre (x, y), side length, angle (radians)."""
    center: tuple[float, float]
    size: float
    angle: float


def _eye_angle(right_eye, left_eye) -> float:
    # image y points down: a level face has right_eye -> left_eye pointing along +x
    return float(np.arctan2(left_eye[1] - right_eye[1], left_eye[0] - right_eye[0]))


def roi_from_detection(det) -> Roi:
    """ROI for a :class:`~lipforcing.face.detect.Detection`."""
    x0, y0, x1, y1 = det.box
    return Roi(((x0 + x1) / 2, (y0 + y1) / 2), SCALE * max(x1 - x0, y1 - y0),
               _eye_angle(det.keypoints[0], det.keypoints[1]))


def roi_from_landmarks(points: np.ndarray) -> Roi:
    """ROI for the next frame from this frame's (468, 2|3) landmarks: their bounding box in the eye-level
    rotated frame, 1.5x its larger side."""
    p = np.asarray(points, np.float64)[:, :2]
    a = _eye_angle(p[RIGHT_EYE_OUTER], p[LEFT_EYE_OUTER])
    c, s = np.cos(a), np.sin(a)
    rot = np.array([[c, s], [-s, c]])              # frame -> eye-level axes
    q = p @ rot.T
    lo, hi = q.min(0), q.max(0)
    centre = ((lo + hi) / 2) @ rot                 # back to frame axes
    return Roi((float(centre[0]), float(centre[1])), SCALE * float((hi - lo).max()), a)


def roi_matrix(roi: Roi, out: int = INPUT) -> np.ndarray:
    """(2, 3) affine mapping frame pixels to the ``out`` x ``out`` model input of ``roi`` (pixel centres at
    integer coordinates, as ``cv2.warpAffine``)."""
    s = out / roi.size
    c, si = np.cos(roi.angle), np.sin(roi.angle)
    # rotate by -angle about the centre, scale, move the centre to the middle of the input
    A = s * np.array([[c, si], [-si, c]])
    t = np.array([(out - 1) / 2, (out - 1) / 2]) - A @ np.asarray(roi.center, np.float64)
    return np.concatenate([A, t[:, None]], 1)


def face_landmarks(image: np.ndarray, roi: Roi) -> tuple[np.ndarray, float]:
    """Landmarks of the face inside ``roi`` of an (H, W, 3) uint8 RGB image.

    Returns (points (468, 3) float32 in frame pixels, presence in [0, 1]); a presence below 0.5 means the ROI holds
    no face (the points are then meaningless).
    """
    cv2 = _nets.cv2_module()
    M = roi_matrix(roi)
    crop = cv2.warpAffine(image, M, (INPUT, INPUT), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))
    pts, flag = _nets.run(_nets.LANDMARKER, (crop.astype(np.float32) / 255.0)[None], ["conv2d_21", "conv2d_31"])
    pts = pts.reshape(NUM_LANDMARKS, 3).astype(np.float64)
    presence = float(1.0 / (1.0 + np.exp(-np.clip(flag.reshape(-1)[0], -100, 100))))
    A, t = M[:, :2], M[:, 2]
    Ainv = np.linalg.inv(A)
    xy = (pts[:, :2] - t) @ Ainv.T
    z = pts[:, 2:] / (INPUT / roi.size)
    return np.concatenate([xy, z], 1).astype(np.float32), presence
