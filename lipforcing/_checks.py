"""Input validation shared by the public ops.  Messages name the argument, what was expected and what was given."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(name: str, x, *, ndim: int | None = None, dtypes=FLOAT_DTYPES, layout: str | None = None,
           contiguous_last: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        where = f" {layout}" if layout else ""
        raise ValueError(f"{name} must be {ndim}-D{where}, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if contiguous_last and x.dim() > 0 and x.numel() > 0 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {tuple(x.stride())}")


def same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, dtype: bool = True) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on the same device as {name_a} ({a.device}), got {b.device}")
    if dtype and a.dtype != b.dtype:
        raise ValueError(f"{name_b} must have the same dtype as {name_a} ({a.dtype}), got {b.dtype}")


def dim_eq(name: str, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if x.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] ({what}) must be {expected}, got {x.shape[dim]} "
                         f"(shape {tuple(x.shape)})")


def positive_int(name: str, v, *, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")


def scale(v) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(v).__name__}")
    if not v > 0:
        raise ValueError(f"scale must be > 0, got {v}")


def block_mask_args(chunk_size, window, sink) -> None:
    """The (chunk_size, window, sink) rule shared by block_causal_attention and RollingKVCache."""
    positive_int("chunk_size", chunk_size)
    if window is not None:
        positive_int("window", window)
        if window < chunk_size:
            raise ValueError(f"window ({window} tokens) must be >= chunk_size ({chunk_size} tokens): the window "
                             "includes the current chunk")
    positive_int("sink", sink, minimum=0)
