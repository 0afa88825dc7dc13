"""Evaluation on the procedural world: lip sync (pixel mouth opening vs loudness, SyncNet LSE-C/LSE-D), fidelity
(mouth PSNR/SSIM vs ground truth, the rest vs the reference), reference-mouth copying, silence, stability and speed,
of streaming students and the bidirectional teacher (:mod:`lipforcing.eval.teacher`), always next to the controls
(ground truth, the VAE round trip, the unchanged reference, shuffled audio, silence, an untrained model)."""
from __future__ import annotations

from lipforcing._lazy import lazy_attributes

_LAZY = {
    "EvalConfig": "lipforcing.eval.runner",
    "evaluate": "lipforcing.eval.runner",
    "write_report": "lipforcing.eval.runner",
    "held_out_clips": "lipforcing.eval.runner",
    "run_engine": "lipforcing.eval.runner",
    "run_system": "lipforcing.eval.runner",
    "vae_roundtrip": "lipforcing.eval.runner",
    "row_order": "lipforcing.eval.runner",
    "TeacherSystem": "lipforcing.eval.teacher",
    "windowed_correlation": "lipforcing.eval.metrics",
    "mouth_opening_estimate": "lipforcing.eval.metrics",
    "psnr": "lipforcing.eval.metrics",
    "ssim": "lipforcing.eval.metrics",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(globals(), _LAZY)
