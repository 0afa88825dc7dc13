"""World clips: one person speaking, with the ground truth that training and evaluation need.

:func:`make_clip` renders ``num_frames`` frames of identity ``identity_seed`` speaking an utterance, and the
**reference sequence** of the paper's conditioning: the same person with the same head motion and blinks, but a
mouth driven by a different, unrelated utterance (so a model cannot learn to copy the reference's mouth).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lipforcing.world.identity import Identity, identity_split, sample_identity
from lipforcing.world.motion import HeadMotion, blinks, head_motion
from lipforcing.world.mouth import SAMPLES_PER_FRAME, MouthTrack, mouth_track
from lipforcing.world.render import mouth_boxes, render_frames
from lipforcing.world.speech import Utterance, sample_utterance

__all__ = ["WorldClip", "make_clip", "render_speaking"]


@dataclass
class WorldClip:
    """frames (F, H, W, 3) uint8 speaking ``audio`` ((F * 640,) float32, 16 kHz, aligned with frame 0);
    ``mouth`` its ground-truth shape; ``ref_frames`` / ``ref_mouth`` the reference sequence (same person and
    motion, unrelated mouth); ``boxes`` (F, 4) the mouth box [top, bottom, left, right) per frame."""

    frames: np.ndarray
    audio: np.ndarray
    mouth: MouthTrack
    ref_frames: np.ndarray
    ref_mouth: MouthTrack
    boxes: np.ndarray
    identity: Identity
    utterance: Utterance
    motion: HeadMotion
    blink: np.ndarray


def render_speaking(identity: Identity, audio: np.ndarray, num_frames: int, *, motion: HeadMotion,
                    blink: np.ndarray, size=64) -> tuple[np.ndarray, MouthTrack]:
    """Frames of ``identity`` saying ``audio`` (the mouth from :func:`~lipforcing.world.mouth.mouth_track`)."""
    mouth = mouth_track(audio, num_frames)
    return render_frames(identity, mouth, motion, blink, size), mouth


def make_clip(seed: int, num_frames: int, *, size=64, split: str = "train", identity_seed: int | None = None,
              speech: str = "auto", audio: np.ndarray | None = None, motion_strength: float = 1.0,
              reference: bool = True) -> WorldClip:
    """A clip of the world (deterministic in ``seed``).

    identity_seed : the person (default: drawn from ``seed`` within ``split``; it must belong to ``split``).
    speech : ``"auto"``, ``"espeak"`` or ``"synthetic"`` (see :func:`~lipforcing.world.speech.sample_utterance`).
    audio : optional 16 kHz float audio to speak instead (silence, shuffled audio, ...); cut or zero-padded to
        ``num_frames * 640`` samples.
    reference : render the reference sequence too (``False``: ``ref_frames`` is None, ``ref_mouth`` closed).
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    rng = np.random.default_rng([int(seed), 0xC1])
    if identity_seed is None:
        identity_seed = int(rng.integers(0, 10_000))
        while identity_split(identity_seed) != split:
            identity_seed += 1
    elif identity_split(identity_seed) != split:
        raise ValueError(f"identity_seed {identity_seed} is in the {identity_split(identity_seed)!r} split, "
                         f"not {split!r}")
    ident = sample_identity(identity_seed)
    seconds = num_frames * SAMPLES_PER_FRAME / 16000
    if audio is None:
        utt = sample_utterance(int(seed), seconds=seconds, split=split, source=speech)
    else:
        a = np.zeros(num_frames * SAMPLES_PER_FRAME, np.float32)
        src = np.asarray(audio, np.float32).ravel()[:len(a)]
        a[:len(src)] = src
        utt = Utterance(a, "", "given", "given")
    motion = head_motion(num_frames, int(seed), strength=motion_strength)
    blink = blinks(num_frames, int(seed))
    frames, mouth = render_speaking(ident, utt.samples, num_frames, motion=motion, blink=blink, size=size)
    ref_frames, ref_mouth = None, MouthTrack.closed(num_frames)
    if reference:
        ref_utt = sample_utterance(int(seed) + 7_919_000, seconds=seconds, split=split, source=speech)
        ref_frames, ref_mouth = render_speaking(ident, ref_utt.samples, num_frames, motion=motion, blink=blink,
                                                size=size)
    return WorldClip(frames, utt.samples, mouth, ref_frames, ref_mouth,
                     mouth_boxes(ident, motion, size, num_frames), ident, utt, motion, blink)
