"""The stages of ``lipforcing train``, by name: a registry, so a new stage is one module plus one entry.

Each entry maps a name to ``(module, config class name, runner class name, help)``; the classes are imported on
first use.  ``df`` and ``sf`` (the student stages) run in :class:`lipforcing.distill.trainer.Trainer`; the others
subclass :class:`lipforcing.distill.stages.base.Stage`.  ``register_stage`` adds more (e.g. a decoder stage).
"""
from __future__ import annotations

import importlib

__all__ = ["STAGES", "register_stage", "stage_classes", "stage_names"]

STAGES: dict[str, tuple[str, str, str, str]] = {
    "vae": ("lipforcing.distill.stages.vae", "VAEStageConfig", "VAEStage",
            "the causal VAE, as an autoencoder on world clips"),
    "syncnet": ("lipforcing.distill.stages.syncnet", "SyncNetStageConfig", "SyncNetStage",
                "a small SyncNet, contrastive with offset negatives on world clips"),
    "teacher": ("lipforcing.distill.stages.teacher", "TeacherStageConfig", "TeacherStage",
                "the bidirectional teacher, flow matching with condition dropout"),
    "decoder": ("lipforcing.decoders.train", "DecoderStageConfig", "DecoderStage",
                "a TAEHV decoder distilled from the VAE's decoded frames (or the pixels)"),
    "df": ("lipforcing.distill.trainer", "TrainConfig", "Trainer", "student stage 1: diffusion forcing"),
    "sf": ("lipforcing.distill.trainer", "TrainConfig", "Trainer",
           "student stage 2: Self-Forcing with Sync-Window DMD (+ SyncNet reward)"),
}


def register_stage(name: str, module: str, config_class: str, runner_class: str, help: str) -> None:
    """Add (or replace) a stage: ``runner_class(config)`` must have ``train()``, ``iteration`` and ``rank``;
    ``config_class`` must be a dataclass with ``stage``, ``output_dir``, ``iterations``, ``device`` and
    ``resume`` fields."""
    STAGES[name] = (module, config_class, runner_class, help)


def stage_names() -> tuple[str, ...]:
    return tuple(STAGES)


def stage_classes(name: str):
    """(config class, runner class) of a stage."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    mod, cfg, run, _ = STAGES[name]
    m = importlib.import_module(mod)
    return getattr(m, cfg), getattr(m, run)
