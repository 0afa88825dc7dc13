"""Python side of the CUDA backend: loads ``lipforcing._C`` and converts tensors to what its launchers take.

The extension knows nothing about torch.  Wrappers in this package (one file per op, same name as the op)
allocate nothing on their own behalf beyond the outputs, pass ``tensor.data_ptr()`` integers, int64 strides, a
dtype code and the current stream handle, and run under ``torch.cuda.device(tensor.device)``.
"""
from __future__ import annotations

import functools

import torch

# Must match lipforcing::DType in csrc/include/lipforcing/common.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from lipforcing import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, (f"the CUDA extension lipforcing._C is not built ({exc}); reinstall with nvcc on PATH "
                      "(LIPFORCING_CUDA=ON pip install .) to get it")
    return _C, None


def extension():
    """The loaded ``lipforcing._C`` module; raises RuntimeError with the reason when it is missing."""
    ext, reason = _load()
    if ext is None:
        raise RuntimeError(reason)
    return ext


def has_extension() -> bool:
    return _load()[0] is not None


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run in this process (no extension, no GPU), or None."""
    ext, reason = _load()
    if ext is None:
        return reason
    if ext.device_count() == 0:
        return "lipforcing._C is built but no CUDA device is visible"
    return None


def stream_handle(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def arch_problem(device: torch.device) -> str | None:
    """Why the extension has no kernel image for ``device``, or None.  Every kernel of lipforcing._C is built for
    compute capability 8.0+ only (the attention kernels use mma.sync m16n8k16, so the build cannot target older
    GPUs); launching on an older GPU fails with cudaErrorNoKernelImageForDevice, so ``auto`` must fall back."""
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the CUDA extension is built for compute capability 8.0+ only"
    return None


def tile_load_problem(name: str, t: torch.Tensor) -> str | None:
    """Why the tensor-core kernels cannot load ``t`` with 16-byte vector loads (start address aligned to 16 bytes,
    every stride but the last a multiple of 8 elements), or None.  Empty tensors are never read."""
    if t.numel() == 0:
        return None
    if t.data_ptr() % 16:
        return f"{name} must start at a 16-byte aligned address for the CUDA kernel (it is {t.data_ptr() % 16} mod 16)"
    if any(s % 8 for s in t.stride()[:-1]):
        return (f"{name} strides {tuple(t.stride())} must be multiples of 8 elements (except the last) for the "
                "CUDA kernel")
    return None
