"""CUDA backend of ``lipforcing.ops.denoise_update``: passes pointers to ``lipforcing._C.denoise_update``
(csrc/denoise_update.cu).  One kernel launch on the current stream; no allocation, no host sync."""
from __future__ import annotations

import torch

from lipforcing.ops.cuda import DTYPE_CODES, arch_problem, extension, stream_handle

# Must match lipforcing::TimeMode in csrc/include/lipforcing/denoise_update.h.
_VALUE, _SCALAR, _PER_SAMPLE = 0, 1, 2


def _time_args(t: torch.Tensor | None, value: float) -> tuple[int, int, int, float]:
    if t is None:
        return _VALUE, 0, 0, float(value)
    return (_SCALAR if t.dim() == 0 else _PER_SAMPLE), t.data_ptr(), DTYPE_CODES[t.dtype], 0.0


def denoise_update_cuda_unsupported(x_t, flow, t, t_value, t_next, t_next_value, noise, seed, seed_value, offset,
                                    offset_value, x0_out, x_next_out) -> str | None:
    """Why the CUDA kernel cannot run these (already validated) arguments, or None."""
    tensors = {"x_t": x_t, "flow": flow, "t": t, "t_next": t_next, "noise": noise, "seed": seed, "offset": offset,
               "x0_out": x0_out, "x_next_out": x_next_out}
    for name, v in tensors.items():
        if v is not None and v.device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {name} on {v.device}"
    for name, v in tensors.items():
        if v is not None and name not in ("seed", "offset") and v.dtype not in DTYPE_CODES:
            return f"the cuda kernel supports float32/float16/bfloat16, got {name} of dtype {v.dtype}"
    for name in ("x_t", "flow", "noise", "x0_out", "x_next_out"):
        v = tensors[name]
        if v is not None and not v.is_contiguous():
            return f"the cuda kernel needs contiguous tensors, got {name} with strides {tuple(v.stride())}"
    return arch_problem(x_t.device)


def denoise_update_cuda(x_t, flow, t, t_value, t_next, t_next_value, noise, seed, seed_value, offset, offset_value,
                        x0_out, x_next_out) -> None:
    """Fill ``x0_out`` and ``x_next_out`` (backend signature of ``lipforcing/ops/denoise_update.py``)."""
    numel = x_t.numel()
    if numel == 0:
        return
    t_mode, t_ptr, t_dtype, t_val = _time_args(t, t_value)
    tn_mode, tn_ptr, tn_dtype, tn_val = _time_args(t_next, t_next_value)
    with torch.cuda.device(x_t.device):
        extension().denoise_update(
            x_t.data_ptr(), flow.data_ptr(), noise.data_ptr() if noise is not None else 0,
            x0_out.data_ptr(), x_next_out.data_ptr(),
            DTYPE_CODES[x_t.dtype], DTYPE_CODES[noise.dtype] if noise is not None else 0,
            DTYPE_CODES[x0_out.dtype], DTYPE_CODES[x_next_out.dtype],
            t_mode, t_ptr, t_dtype, t_val,
            tn_mode, tn_ptr, tn_dtype, tn_val,
            seed.data_ptr() if seed is not None else 0, int(seed_value),
            offset.data_ptr() if offset is not None else 0, int(offset_value),
            numel, max(numel // x_t.shape[0], 1), stream_handle(x_t),
        )
