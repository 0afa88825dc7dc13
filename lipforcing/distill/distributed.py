"""Multi-process training helpers of the student stages: torchrun process groups and FSDP2 sharding."""
from __future__ import annotations

import os

import torch

__all__ = ["dist_info", "init_distributed", "shard_model"]


def dist_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> torch.device:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1; return this rank's
    device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local) if world > 1 or device == "auto" else torch.device(device)
        if dev.index is None:  # "cuda": set_device needs an index
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def shard_model(model: torch.nn.Module, *, per_block: bool = True) -> torch.nn.Module:
    """Apply FSDP2 (``torch.distributed.fsdp.fully_shard``) to a LipSyncDiT in place.

    per_block: each block is its own unit (with ``text_kv`` / ``audio_kv`` registered, because the model computes
    those K/V outside the block's forward) and the root holds the embeddings and the head; otherwise one unit.
    The methods the trainer calls besides ``forward`` (``init_stream`` and ``forward_chunk``, which the rollout
    also runs with gradient at the exit step) are registered so that they gather the parameters too."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if per_block:
        for block in model.blocks:
            fully_shard(block)
            for name in ("text_kv", "audio_kv"):  # called outside the block's forward (K/V computed once)
                register_fsdp_forward_method(block, name)
    fully_shard(model)
    if getattr(model, "causal", False):
        for name in ("init_stream", "forward_chunk"):
            register_fsdp_forward_method(model, name)
    return model
