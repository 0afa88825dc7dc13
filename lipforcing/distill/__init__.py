"""Distillation of the Lip Forcing students: teacher utilities, losses, SyncNet reward, trainer.

Names are imported on first use so that ``import lipforcing.distill`` stays light.
"""
from __future__ import annotations

from lipforcing._lazy import lazy_attributes

_LAZY = {
    "SyncNet": "lipforcing.distill.syncnet",
    "mfcc": "lipforcing.distill.mfcc_frontend",
    "SyncScore": "lipforcing.distill.syncnet",
    "sync_confidence": "lipforcing.distill.syncnet",
    "sync_reward_weight": "lipforcing.distill.syncnet",
    "sync_embeddings": "lipforcing.distill.syncnet",
    "score_embeddings": "lipforcing.distill.syncnet",
    "offset_distances": "lipforcing.distill.syncnet",
    "guidance_scale": "lipforcing.distill.losses",
    "sync_window_target": "lipforcing.distill.losses",
    "dmd_gradient": "lipforcing.distill.losses",
    "dmd_loss": "lipforcing.distill.losses",
    "sw_dmd_loss": "lipforcing.distill.losses",
    "critic_loss": "lipforcing.distill.losses",
    "df_loss": "lipforcing.distill.losses",
    "self_forcing_rollout": "lipforcing.distill.rollout",
    "sample_trajectory": "lipforcing.distill.teacher",
    "euler_jump": "lipforcing.distill.teacher",
    "euler_jump_grid": "lipforcing.distill.teacher",
    "SyncReward": "lipforcing.distill.reward",
    "TrainConfig": "lipforcing.distill.trainer",
    "Trainer": "lipforcing.distill.trainer",
    "SyntheticLatentDataset": "lipforcing.distill.data",
    "LatentFileDataset": "lipforcing.distill.data",
    "TrainConfigError": "lipforcing.distill.errors",
    "SmallSyncNet": "lipforcing.distill.syncnet_small",
    "load_syncnet": "lipforcing.distill.syncnet_small",
    "register_stage": "lipforcing.distill.stages",
}

__all__ = list(_LAZY)


__getattr__ = lazy_attributes(globals(), _LAZY)
