"""Face detection: MediaPipe's BlazeFace short-range model, decoded here (anchors, boxes, keypoints, weighted NMS).

The network sees a 128x128 RGB image in [-1, 1] and predicts, for each of 896 fixed anchors, a score logit and 16
numbers: box centre offset (dx, dy) and size (w, h), then 6 keypoints (x, y), all in 128-pixel units relative to
the anchor centre.  The anchors (SSD layout, ``fixed_anchor_size``) are the cell centres of a 16x16 grid with 2
anchors per cell (stride 8) followed by an 8x8 grid with 6 per cell (stride 16): 512 + 384 = 896.

The image is letterboxed (aspect kept, padded) to 128x128.  Faces that are small in a wide frame (a 200-pixel face
in 1280x720 becomes 20 pixels) are found by also running the model on overlapping square tiles (side = the
frame's short side, then half of it when nothing was found); all hits are merged by weighted NMS.

Keypoints, in the subject's terms: 0 right eye, 1 left eye, 2 nose tip, 3 mouth centre, 4 right ear tragion,
5 left ear tragion (the subject's right eye is on the image's left).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lipforcing.face import _nets

__all__ = ["Detection", "detect_faces", "anchors", "decode", "weighted_nms", "box_iou"]

INPUT = 128
MIN_SCORE = 0.5
NMS_IOU = 0.3


@dataclass(frozen=True)
class Detection:
    """One detected face in image pixels: ``box`` (x0, y0, x1, y1), ``score`` in (0, 1), ``keypoints`` (6, 2)."""
    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


def anchors() -> np.ndarray:
    """The 896 anchor centres (x, y) in [0, 1] units of the 128x128 input, in the network's output order."""
    out = []
    for stride, per_cell in ((8, 2), (16, 6)):
        n = INPUT // stride
        c = (np.arange(n) + 0.5) / n
        yy, xx = np.meshgrid(c, c, indexing="ij")
        cell = np.stack([xx.ravel(), yy.ravel()], 1)
        out.append(np.repeat(cell, per_cell, axis=0))
    return np.concatenate(out).astype(np.float32)


_ANCHORS = anchors()


def decode(regressors: np.ndarray, logits: np.ndarray, min_score: float = MIN_SCORE):
    """(896, 16) regressors and (896,) logits -> (boxes (K, 4) x0 y0 x1 y1, scores (K,), keypoints (K, 6, 2)) in
    [0, 1] input units, for the anchors whose sigmoid score reaches ``min_score``."""
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -100.0, 100.0)))
    keep = scores >= min_score
    r = regressors[keep].astype(np.float64) / INPUT
    a = _ANCHORS[keep].astype(np.float64)
    cx, cy = r[:, 0] + a[:, 0], r[:, 1] + a[:, 1]
    w, h = r[:, 2], r[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    kps = r[:, 4:16].reshape(-1, 6, 2) + a[:, None, :]
    return boxes, scores[keep], kps


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, kps: np.ndarray, iou: float = NMS_IOU):
    """MediaPipe's weighted non-maximum suppression: take the best remaining detection, average it with every
    detection overlapping it by more than ``iou`` (weights = scores), drop those, repeat.  Returns lists."""
    order = list(np.argsort(-scores, kind="stable"))
    out = []
    while order:
        best = order[0]
        group = [j for j in order if box_iou(boxes[best], boxes[j]) > iou]
        w = scores[group][:, None]
        out.append(((boxes[group] * w).sum(0) / w.sum(), float(scores[best]),
                    (kps[group] * w[:, :, None]).sum(0) / w.sum()))
        order = [j for j in order if j not in group]
    return out


def _view(image: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """The square (x0, y0, side) of ``image`` (parts outside it black) resized to the 128x128 input, in [-1, 1]."""
    cv2 = _nets.cv2_module()
    H, W = image.shape[:2]
    s = INPUT / side
    canvas = np.zeros((INPUT, INPUT, 3), np.uint8)
    ax0, ay0, ax1, ay1 = max(x0, 0), max(y0, 0), min(x0 + side, W), min(y0 + side, H)   # the part inside
    u0, v0 = int(round((ax0 - x0) * s)), int(round((ay0 - y0) * s))
    u1, v1 = min(int(round((ax1 - x0) * s)), INPUT), min(int(round((ay1 - y0) * s)), INPUT)
    if u1 > u0 and v1 > v0:
        # area averaging when shrinking (a 1280-pixel frame onto 128 pixels must not alias)
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        canvas[v0:v1, u0:u1] = cv2.resize(image[ay0:ay1, ax0:ax1], (u1 - u0, v1 - v0), interpolation=interp)
    return canvas.astype(np.float32) / 127.5 - 1.0


def _run_views(image: np.ndarray, views: list[tuple[int, int, int]]):
    """Run the detector on square views (x0, y0, side) of ``image`` (letterboxed when the view leaves the image);
    returns boxes/scores/keypoints in image pixels."""
    boxes, scores, kps = [], [], []
    for x0, y0, side in views:
        # one view per call: OpenCV's TFLite importer does not keep the batch axis of these outputs apart
        reg, cls = _nets.run(_nets.DETECTOR, _view(image, x0, y0, side)[None], ["regressors", "classificators"])
        b, sc, k = decode(reg.reshape(-1, 16), cls.reshape(-1))
        boxes.append(b * side + np.array([x0, y0, x0, y0]))
        kps.append(k * side + np.array([x0, y0]))
        scores.append(sc)
    return np.concatenate(boxes), np.concatenate(scores), np.concatenate(kps)


def _tiles(H: int, W: int, side: int) -> list[tuple[int, int, int]]:
    """Overlapping square tiles of ``side`` covering the frame (stride side / 2, last tile flush with the edge)."""
    def starts(n):
        if n <= side:
            return [(n - side) // 2]
        step = max(side // 2, 1)
        s = list(range(0, n - side, step))
        return s + [n - side]
    return [(x, y, side) for y in starts(H) for x in starts(W)]


def detect_faces(image: np.ndarray, *, min_score: float = MIN_SCORE) -> list[Detection]:
    """All faces in an (H, W, 3) uint8 RGB image, largest first.

    Runs the whole (letterboxed) frame plus square tiles of the short side when the frame is not square, and
    tiles of half the short side when that found nothing.  Faces smaller than about 1/10 of the short side may be
    missed.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    H, W = image.shape[:2]
    long_side, short = max(H, W), min(H, W)
    views = [((W - long_side) // 2, (H - long_side) // 2, long_side)]
    if long_side > short * 1.2:
        views += _tiles(H, W, short)
    boxes, scores, kps = _run_views(image, views)
    if len(scores) == 0 and short >= 2 * INPUT:
        boxes, scores, kps = _run_views(image, _tiles(H, W, short // 2))
    dets = [Detection(tuple(float(v) for v in b), s, k.astype(np.float32))
            for b, s, k in weighted_nms(boxes, scores, kps)]
    return sorted(dets, key=lambda d: -d.area)
