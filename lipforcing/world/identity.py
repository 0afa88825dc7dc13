"""Identities of the procedural world: the fixed look of one synthetic person.

An :class:`Identity` is a pure function of its integer ``seed`` (:func:`sample_identity`): face shape, skin tone,
hair colour and style, eye colour and spacing, brows, lip colour, mouth size and a two-colour background.  Seeds
are split into a training and a held-out set by :func:`identity_split` (every tenth seed is held out), so an
evaluation never sees a face the models were trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Identity", "sample_identity", "identity_split", "identity_seeds", "HAIR_STYLES"]

HAIR_STYLES = ("cap", "long", "short", "bald")
_HELD_OUT_EVERY = 10          # seeds s with s % 10 == 9 are the held-out identities

# skin tones (RGB) spanning light to dark; one is picked and jittered per identity
_SKIN = np.array([[241, 200, 170], [224, 178, 148], [198, 150, 115], [160, 110, 80], [110, 75, 55], [80, 55, 40]],
                 float)
_HAIR = np.array([[30, 22, 18], [70, 45, 30], [120, 80, 45], [200, 160, 90], [150, 60, 30], [130, 130, 130]], float)
_IRIS = np.array([[60, 100, 150], [70, 50, 30], [60, 110, 70], [40, 30, 25]], float)


@dataclass(frozen=True)
class Identity:
    """The look of one synthetic person.  Colours are RGB floats in [0, 255]; geometry is in units of the crop
    (0..1), for a face centred at (0.5, ``face_cy``) of the aligned crop."""

    seed: int
    skin: tuple
    hair: tuple
    hair_style: str
    iris: tuple
    lip: tuple
    bg_top: tuple
    bg_bottom: tuple
    face_rx: float          # face ellipse semi-axes
    face_ry: float
    face_cy: float
    eye_dx: float           # half distance between the eyes
    eye_size: float
    brow_lift: float
    mouth_y: float          # mouth centre below the face centre
    mouth_rx: float         # half width of the closed lips

    @property
    def split(self) -> str:
        return identity_split(self.seed)


def identity_split(seed: int) -> str:
    """``"eval"`` for the held-out identities (seed % 10 == 9), ``"train"`` for the others."""
    return "eval" if int(seed) % _HELD_OUT_EVERY == _HELD_OUT_EVERY - 1 else "train"


def identity_seeds(split: str, count: int, *, start: int = 0) -> list[int]:
    """The first ``count`` identity seeds >= ``start`` of a split (``"train"`` or ``"eval"``)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    out, s = [], int(start)
    while len(out) < count:
        if identity_split(s) == split:
            out.append(s)
        s += 1
    return out


def sample_identity(seed: int) -> Identity:
    """The identity of ``seed`` (deterministic: the same seed always gives the same person)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    rng = np.random.default_rng([int(seed), 0x1D])

    def jitter(base, amount):
        return tuple(float(v) for v in np.clip(base * rng.uniform(1 - amount, 1 + amount, 3), 0, 255))

    skin = jitter(_SKIN[rng.integers(len(_SKIN))], 0.06)
    hue = rng.uniform(0, 1, 3)
    bg_top = tuple(float(v) for v in 30 + 120 * hue)
    bg_bottom = tuple(float(v) for v in np.clip(np.array(bg_top) * rng.uniform(0.5, 1.5) + 20, 0, 255))
    lip = tuple(float(v) for v in np.clip(np.array(skin) * np.array([0.75, 0.42, 0.45]) * rng.uniform(0.85, 1.1),
                                          0, 255))
    return Identity(
        seed=int(seed), skin=skin, hair=jitter(_HAIR[rng.integers(len(_HAIR))], 0.1),
        hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))], iris=jitter(_IRIS[rng.integers(len(_IRIS))], 0.1),
        lip=lip, bg_top=bg_top, bg_bottom=bg_bottom,
        face_rx=float(rng.uniform(0.27, 0.33)), face_ry=float(rng.uniform(0.36, 0.42)),
        face_cy=float(rng.uniform(0.5, 0.54)), eye_dx=float(rng.uniform(0.105, 0.135)),
        eye_size=float(rng.uniform(0.85, 1.15)), brow_lift=float(rng.uniform(0.06, 0.085)),
        mouth_y=float(rng.uniform(0.19, 0.22)), mouth_rx=float(rng.uniform(0.085, 0.11)),
    )
