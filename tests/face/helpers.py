"""Test pictures for the face stage without downloads: the astronaut photo (scikit-image, public domain) and the
procedural face, placed into large frames with a known similarity (position, scale, rotation)."""
from __future__ import annotations

import secrets

import numpy as np

from lipforcing.media import synthetic_face_clip

cv2 = __import__("pytest").importorskip("cv2")


def fresh_rng():
    """A generator with a fresh seed (returned too, so a failure can be replayed)."""
    seed = secrets.randbits(32)
    return np.random.default_rng(seed), seed


def astronaut() -> np.ndarray:
    """The 512x512 astronaut photo, cropped around the head (face about 95 px wide, centre near (225, 130))."""
    skimage_data = __import__("pytest").importorskip("skimage.data")
    return np.ascontiguousarray(skimage_data.astronaut()[20:260, 105:345])


def procedural_face(size: int = 240) -> np.ndarray:
    return synthetic_face_clip(1, size, seed=3)[0]


def background(height: int, width: int, rng) -> np.ndarray:
    """A smooth random colour gradient with mild noise (no faces in it)."""
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    c0, c1, c2 = (rng.uniform(40, 200, 3) for _ in range(3))
    img = c0 + (c1 - c0) * x + (c2 - c0) * y + rng.normal(0, 2.0, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def placement(src_shape, centre, scale: float, angle_deg: float) -> np.ndarray:
    """(2, 3) affine, source pixels -> frame pixels: rotate by ``angle_deg`` and scale about the source centre,
    which lands on ``centre`` (continuous coordinates, pixel centres at +0.5)."""
    h, w = src_shape[:2]
    a = np.deg2rad(angle_deg)
    R = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    t = np.asarray(centre, float) - R @ np.array([w / 2, h / 2])
    return np.concatenate([R, t[:, None]], 1)


def render(src: np.ndarray, bg: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Draw ``src`` into a copy of ``bg`` with the source -> frame affine ``G`` (continuous coordinates)."""
    H, W = bg.shape[:2]
    # cv2 uses pixel-centre coordinates: x_cv = x - 0.5 on both sides
    Gc = G.copy()
    Gc[:, 2] += G[:, :2] @ np.array([0.5, 0.5]) - 0.5
    out = bg.copy()
    face = cv2.warpAffine(src, Gc, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    cover = cv2.warpAffine(np.full(src.shape[:2], 255, np.uint8), Gc, (W, H), flags=cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT) > 0
    out[cover] = face[cover]
    return out


def clip(src, size, n, rng, *, start, end, scale=(1.0, 1.0), angle=(0.0, 0.0)):
    """``n`` frames of ``size`` (H, W) with ``src`` moving linearly from ``start`` to ``end`` (centres), scale and
    angle interpolated.  Returns (frames (n, H, W, 3) uint8, placements (n, 2, 3), the background)."""
    bg = background(*size, rng)
    frames, Gs = [], []
    for i in range(n):
        f = i / max(n - 1, 1)
        c = (1 - f) * np.asarray(start, float) + f * np.asarray(end, float)
        G = placement(src.shape, c, scale[0] + f * (scale[1] - scale[0]), angle[0] + f * (angle[1] - angle[0]))
        frames.append(render(src, bg, G))
        Gs.append(G)
    return np.stack(frames), np.stack(Gs), bg


def compose(M: np.ndarray, G: np.ndarray) -> np.ndarray:
    """M o G for (2, 3) affines."""
    return np.concatenate([M[:, :2] @ G[:, :2], (M[:, :2] @ G[:, 2] + M[:, 2])[:, None]], 1)


def corner_points(h: int, w: int) -> np.ndarray:
    return np.array([[0, 0], [w, 0], [0, h], [w, h], [w / 2, h / 2]], float)


def apply(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ M[:, :2].T + M[:, 2]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
