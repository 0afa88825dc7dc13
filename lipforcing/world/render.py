"""Rendering of the procedural world: identity + head pose + blink + mouth shape -> an aligned face crop.

Every shape is an ellipse in *face coordinates* (the crop's unit square, face centre at (0.5, ``face_cy``)),
mapped to pixels through the frame's head pose (shift, tilt, scale).  Edges are anti-aliased: each pixel's
coverage is ``clip(0.5 - d, 0, 1)`` with ``d`` the ellipse's approximate signed distance in pixels, so small
crops (64 x 64) still show a smoothly varying mouth.  Layers, back to front: background gradient, long hair,
face (radially shaded), hair on top, brows, eyes (white, iris, pupil; lids close with the blink), nose shadow,
lips, the dark mouth opening, upper teeth (a band 0.4 x the opening's height, so the dark area grows
monotonically with the opening).

The mouth: lip half-width ``mouth_rx * (1 + 0.35 (spread - 0.5)) * (1 - 0.12 opening)``, opening half-height
``0.065 * opening`` (relative to the crop), lips 0.014 thick around it.
"""
from __future__ import annotations

import numpy as np

from lipforcing.world.identity import Identity
from lipforcing.world.motion import HeadMotion
from lipforcing.world.mouth import MouthTrack

__all__ = ["render_frames", "mouth_boxes", "mouth_geometry"]

_MOUTH_DARK = np.array([55.0, 15.0, 25.0])
_TEETH = np.array([236.0, 234.0, 226.0])


def mouth_geometry(identity: Identity, opening: float, spread: float) -> tuple[float, float, float]:
    """(half width of the lips, half height of the opening, lip thickness) in crop units."""
    rx = identity.mouth_rx * (1 + 0.35 * (spread - 0.5)) * (1 - 0.12 * opening)
    return rx, 0.065 * opening, 0.014


class _Canvas:
    """One frame being drawn: pixel centres mapped into face coordinates through the head pose."""

    def __init__(self, size: tuple[int, int], identity: Identity, dx: float, dy: float, tilt: float, scale: float):
        h, w = size
        self.h, self.w = h, w
        py = (np.arange(h)[:, None] + 0.5) / h
        px = (np.arange(w)[None, :] + 0.5) / w
        cx, cy = 0.5 + dx, identity.face_cy + dy
        c, s = np.cos(tilt), np.sin(tilt)
        rx, ry = px - cx, py - cy
        # inverse pose: rotate by -tilt and unscale, so shapes are defined around the un-posed face centre (0.5, cy0)
        self.u = (c * rx + s * ry) / scale + 0.5
        self.v = (-s * rx + c * ry) / scale + identity.face_cy
        self.pix = scale * min(h, w)            # pixels per face unit
        self.img = np.zeros((h, w, 3))

    def coverage(self, cx, cy, rx, ry) -> np.ndarray:
        r = np.hypot((self.u - cx) / rx, (self.v - cy) / ry)
        d = (r - 1.0) * min(rx, ry) * self.pix
        return np.clip(0.5 - d, 0.0, 1.0)

    def paint(self, alpha: np.ndarray, color) -> None:
        a = alpha[..., None]
        self.img = self.img * (1 - a) + np.asarray(color, float) * a


def _draw(identity: Identity, size, pose, closure: float, opening: float, spread: float) -> np.ndarray:
    idn = identity
    cv = _Canvas(size, idn, *pose)
    cy0 = idn.face_cy
    t = np.clip(cv.v, 0, 1)[..., None]
    cv.img = np.array(idn.bg_top) * (1 - t) + np.array(idn.bg_bottom) * t
    hair = np.array(idn.hair)
    if idn.hair_style == "long":
        cv.paint(cv.coverage(0.5, cy0 + 0.02, idn.face_rx + 0.07, idn.face_ry + 0.05) * (cv.v > cy0 - 0.3), hair)
    face = cv.coverage(0.5, cy0, idn.face_rx, idn.face_ry)
    shade = 1.0 - 0.22 * np.clip(np.hypot((cv.u - 0.5) / idn.face_rx, (cv.v - cy0) / idn.face_ry), 0, 1) ** 3
    skin = np.array(idn.skin)
    cv.img = cv.img * (1 - face[..., None]) + (skin * shade[..., None]) * face[..., None]
    if idn.hair_style != "bald":
        depth = {"cap": 0.13, "long": 0.14, "short": 0.1}[idn.hair_style]
        top = cv.coverage(0.5, cy0 - 0.12, idn.face_rx + 0.04, idn.face_ry * 0.75)
        cv.paint(top * np.clip((cy0 - depth - cv.v) * cv.pix + 0.5, 0, 1), hair)
    for side in (-1, 1):
        ex, ey = 0.5 + side * idn.eye_dx, cy0 - 0.08
        brow = cv.coverage(ex, ey - idn.brow_lift, 0.065, 0.014)
        cv.paint(brow * (cv.v < ey - idn.brow_lift + 0.004), hair * 0.8)
        erx, ery = 0.062 * idn.eye_size, 0.034 * idn.eye_size
        open_ry = max(ery * (1.0 - closure), 1e-3)
        eye = cv.coverage(ex, ey, erx, open_ry)
        cv.paint(eye, (245, 245, 240))
        cv.paint(cv.coverage(ex, ey, 0.027 * idn.eye_size, 0.027 * idn.eye_size) * eye, idn.iris)
        cv.paint(cv.coverage(ex, ey, 0.012 * idn.eye_size, 0.012 * idn.eye_size) * eye, (15, 15, 20))
        if closure > 0.05:
            cv.paint(cv.coverage(ex, ey, erx, 0.004) * closure, skin * 0.55)     # lash line of the closed lid
    cv.paint(cv.coverage(0.5 + 0.012, cy0 + 0.06, 0.026, 0.06) * (cv.u > 0.5), skin * 0.8)       # nose shadow
    mx, my = 0.5, cy0 + idn.mouth_y
    rx, oh, lip = mouth_geometry(idn, opening, spread)
    cv.paint(cv.coverage(mx, my, rx + 0.01, oh + lip), idn.lip)
    if oh > 1e-4:
        inner = cv.coverage(mx, my, rx * 0.88, oh)
        cv.paint(inner, _MOUTH_DARK)
        teeth = cv.coverage(mx, my - oh, rx * 0.6, 0.4 * oh) * inner       # scales with the opening, so the
        cv.paint(teeth, _TEETH)                                              # dark area grows monotonically
    return cv.img


def render_frames(identity: Identity, mouth: MouthTrack, motion: HeadMotion, blink: np.ndarray,
                  size: int | tuple[int, int] = 64) -> np.ndarray:
    """Frames of one person: (F, H, W, 3) uint8 RGB, F = ``len(mouth)`` (``motion`` and ``blink`` per frame)."""
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16x16, got {h}x{w}")
    n = len(mouth)
    if len(motion.dx) < n or len(blink) < n:
        raise ValueError(f"motion ({len(motion.dx)}) and blink ({len(blink)}) must cover the {n} mouth frames")
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        pose = (motion.dx[i], motion.dy[i], motion.tilt[i], motion.scale[i])
        img = _draw(identity, (h, w), pose, float(blink[i]), float(mouth.opening[i]), float(mouth.spread[i]))
        out[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return out


def mouth_boxes(identity: Identity, motion: HeadMotion, size: int | tuple[int, int], num_frames: int) -> np.ndarray:
    """Per-frame pixel box around the (fully open) mouth: (F, 4) int64 [top, bottom, left, right), for
    measurements on rendered or generated frames."""
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    boxes = np.empty((num_frames, 4), np.int64)
    for i in range(num_frames):
        s, c, sn = motion.scale[i], np.cos(motion.tilt[i]), np.sin(motion.tilt[i])
        du, dv = 0.0, identity.mouth_y                         # mouth centre relative to the face centre
        cx = 0.5 + motion.dx[i] + s * (c * du - sn * dv)
        cy = identity.face_cy + motion.dy[i] + s * (sn * du + c * dv)
        hw, hh = s * identity.mouth_rx * 1.05, s * 0.075
        boxes[i] = (max(0, int(np.floor((cy - hh) * h))), min(h, int(np.ceil((cy + hh) * h))),
                    max(0, int(np.floor((cx - hw) * w))), min(w, int(np.ceil((cx + hw) * w))))
    return boxes
