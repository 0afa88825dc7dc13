"""The procedural talking-face world: synthetic people whose mouths follow the speech by a known rule, so every
stage of the recipe can be trained and evaluated against ground truth without downloaded data.

Modules (one responsibility each): :mod:`~lipforcing.world.identity` (who), :mod:`~lipforcing.world.motion`
(head sway, blinks), :mod:`~lipforcing.world.mouth` (speech -> mouth shape), :mod:`~lipforcing.world.speech`
(espeak-ng and synthetic speech, train/held-out splits), :mod:`~lipforcing.world.render` (drawing),
:mod:`~lipforcing.world.clip` (a clip with its reference sequence and ground truth) and
:mod:`~lipforcing.world.build` (clips -> VAE latent files for training).
"""
from __future__ import annotations

from lipforcing._lazy import lazy_attributes

_LAZY = {
    "Identity": "lipforcing.world.identity",
    "sample_identity": "lipforcing.world.identity",
    "identity_split": "lipforcing.world.identity",
    "identity_seeds": "lipforcing.world.identity",
    "head_motion": "lipforcing.world.motion",
    "blinks": "lipforcing.world.motion",
    "MouthTrack": "lipforcing.world.mouth",
    "mouth_track": "lipforcing.world.mouth",
    "LEAD_SECONDS": "lipforcing.world.mouth",
    "render_frames": "lipforcing.world.render",
    "mouth_boxes": "lipforcing.world.render",
    "Utterance": "lipforcing.world.speech",
    "espeak_available": "lipforcing.world.speech",
    "sample_utterance": "lipforcing.world.speech",
    "WorldClip": "lipforcing.world.clip",
    "make_clip": "lipforcing.world.clip",
    "build_latent_dataset": "lipforcing.world.build",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(globals(), _LAZY)
