"""The lip-sync DiT: bidirectional teacher / critic, causal student, audio modules, checkpoint loading.

Modules (one responsibility each): ``layers`` (norms, timestep embedding, patchify), ``audio`` (frame grouping,
AudioPack), ``blocks`` (Wan block, head), ``network`` (:class:`LipSyncDiT`, full-sequence forward), ``student``
(:class:`CausalLipSyncDiT`, streaming), ``teacher`` (CFG, sampler), ``loading`` (checkpoints).
"""
from __future__ import annotations

import torch

from lipforcing.config import ModelConfig
from lipforcing.model.audio import AudioPack, group_audio_frames
from lipforcing.model.network import LipSyncDiT
from lipforcing.model.student import CausalLipSyncDiT, StreamState
from lipforcing.model.teacher import Condition, cfg_velocity, sample

__all__ = [
    "AudioPack",
    "CausalLipSyncDiT",
    "Condition",
    "LipSyncDiT",
    "ModelConfig",
    "StreamState",
    "build_model",
    "cfg_velocity",
    "count_parameters",
    "group_audio_frames",
    "load_model",
    "sample",
]


def build_model(config: ModelConfig | str, *, causal: bool, device=None, dtype: torch.dtype | None = None,
                init: bool = True) -> LipSyncDiT:
    """Build the network with random weights.

    config : a ModelConfig or a preset name ("tiny", "1.3b", "14b").
    causal : True -> the causal student (:class:`CausalLipSyncDiT`); False -> the bidirectional teacher / critic.
    device : ``"meta"`` builds without allocating memory (shapes only).  Otherwise the model is built on the meta
        device, materialised directly on ``device`` in ``dtype`` (no full-size float32 CPU copy) and
        initialised there.  Default: CPU.
    dtype : parameter dtype (default float32).
    init : False leaves the materialised parameters uninitialised (for loading a checkpoint right after).
    """
    if isinstance(config, str):
        config = ModelConfig.from_name(config)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig or a preset name, got {type(config).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    cls = CausalLipSyncDiT if causal else LipSyncDiT
    with torch.device("meta"):
        model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    device = torch.device("cpu" if device is None else device)
    if device.type == "meta":
        return model
    model = model.to_empty(device=device)
    if init:
        model.init_weights()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(path, *, config: ModelConfig | str | None = None, causal: bool = True, device=None,
               dtype: torch.dtype | None = None, **kwargs) -> LipSyncDiT:
    """Load a checkpoint (see :func:`lipforcing.model.loading.load_model`)."""
    from lipforcing.model import loading

    return loading.load_model(path, config=config, causal=causal, device=device, dtype=dtype, **kwargs)
