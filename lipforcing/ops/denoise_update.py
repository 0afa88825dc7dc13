"""``denoise_update``: the flow-matching step between two student passes (x0 from the velocity, then re-noise)."""
from __future__ import annotations

from typing import Optional

import torch

from lipforcing import _checks
from lipforcing.ops import _dispatch
from lipforcing.ops._dispatch import Impl
from lipforcing.ops.reference import denoise_update_ref

# Backend signature:
#   fn(x_t, flow, t, t_value, t_next, t_next_value, noise, seed, seed_value, offset, offset_value, x0_out,
#      x_next_out) -> None, filling x0_out and x_next_out.  t / t_next / seed / offset are tensors (0-d, or (B,)
#   for t and t_next) or None, in which case the *_value Python number is used.  Exactly one of noise and
#   (seed or seed_value) is meaningful: noise wins when given.
_IMPLS = {
    "reference": Impl(__name__, "_reference"),
    "triton": Impl("lipforcing.kernels.denoise_update", "denoise_update_triton"),
    "cuda": Impl("lipforcing.ops.cuda.denoise_update", "denoise_update_cuda"),
}


def _reference(x_t, flow, t, t_value, t_next, t_next_value, noise, seed, seed_value, offset, offset_value,
               x0_out, x_next_out):
    seed = seed if seed is not None else seed_value
    offset = offset if offset is not None else offset_value
    x0, x_next = denoise_update_ref(x_t, flow, t, t_value, t_next, t_next_value, noise, seed, offset)
    x0_out.copy_(x0)
    x_next_out.copy_(x_next)


@torch.library.custom_op("lipforcing::denoise_update", mutates_args=("x0_out", "x_next_out"))
def _op(x_t: torch.Tensor, flow: torch.Tensor, t: Optional[torch.Tensor], t_value: float,
        t_next: Optional[torch.Tensor], t_next_value: float, noise: Optional[torch.Tensor],
        seed: Optional[torch.Tensor], seed_value: int, offset: Optional[torch.Tensor], offset_value: int,
        x0_out: torch.Tensor, x_next_out: torch.Tensor, backend: str) -> None:
    _dispatch.implementation(_IMPLS, backend)(x_t, flow, t, t_value, t_next, t_next_value, noise, seed, seed_value,
                                             offset, offset_value, x0_out, x_next_out)


@_op.register_fake
def _(x_t, flow, t, t_value, t_next, t_next_value, noise, seed, seed_value, offset, offset_value, x0_out,
      x_next_out, backend):
    return None


_U64 = 1 << 64


def _span(x: torch.Tensor) -> tuple[int, int]:
    """The byte range [start, end) that a tensor's elements can touch (strides are never negative in torch)."""
    start = x.data_ptr()
    last = sum((n - 1) * s for n, s in zip(x.shape, x.stride()))
    return start, start + (last + 1) * x.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> str:
    """"none" (disjoint memory), "same" (the very same elements: pointer, dtype, shape, strides) or "partial"
    (conservative: any shared byte range that is not "same" counts, even interleaved strides)."""
    if a.numel() == 0 or b.numel() == 0:
        return "none"
    (a0, a1), (b0, b1) = _span(a), _span(b)
    if a1 <= b0 or b1 <= a0:
        return "none"
    if a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride():
        return "same"
    return "partial"


def _check_out(out, x_t: torch.Tensor, inputs: dict) -> None:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("out must be a tuple (x0, x_next) of two tensors")
    for name, o in zip(("out[0]", "out[1]"), out):
        _checks.tensor(name, o, dtypes=_checks.FLOAT_DTYPES)
        _checks.same("x_t", x_t, name, o, dtype=False)
        if o.shape != x_t.shape or not o.is_contiguous():
            raise ValueError(f"{name} must be a contiguous tensor of shape {tuple(x_t.shape)}, got "
                             f"{tuple(o.shape)}" + ("" if o.is_contiguous() else " (non-contiguous)"))
    if _overlap(out[0], out[1]) != "none":
        raise ValueError("out[0] and out[1] must not overlap in memory (they are written at the same time)")
    # An output may be exactly an input (each element is read before it is written), never a shifted or
    # reinterpreted view of one: the kernels would read elements that an earlier block already overwrote.
    for name, o in zip(("out[0]", "out[1]"), out):
        for in_name, v in inputs.items():
            if isinstance(v, torch.Tensor) and _overlap(o, v) == "partial":
                raise ValueError(f"{name} partly overlaps {in_name} in memory; an output may be exactly an input "
                                 "(same storage offset, dtype, shape and strides) or disjoint from it")


def _time(name: str, t, x_t: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    if isinstance(t, torch.Tensor):
        if t.dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != x_t.device:
            raise ValueError(f"{name} must be on x_t's device ({x_t.device}), got {t.device}")
        if not (t.dim() == 0 or (t.dim() == 1 and t.shape[0] == x_t.shape[0])):
            raise ValueError(f"{name} must be a 0-d tensor or have shape (batch,) = ({x_t.shape[0]},), got "
                             f"{tuple(t.shape)}")
        if t.device.type == "cpu" and t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
            # checked only where it costs no host sync; device tensors are read by the kernel as they are
            raise ValueError(f"{name} must be in [0, 1] (flow-matching time), got a tensor holding "
                             f"{t.flatten()[~((t >= 0) & (t <= 1)).flatten()][0].item()}")
        return t.contiguous(), 0.0
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(t).__name__}")
    if not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (flow-matching time), got {t}")
    return None, float(t)


def _counter(name: str, v, x_t: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    if isinstance(v, torch.Tensor):
        if v.dtype != torch.int64 or v.dim() != 0 or v.device != x_t.device:
            raise ValueError(f"{name} must be a 0-d int64 tensor on {x_t.device}, got {v.dtype} shape "
                             f"{tuple(v.shape)} on {v.device}")
        return v, 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int or a 0-d int64 tensor, got {type(v).__name__}")
    if not -(1 << 63) <= v < _U64:
        raise ValueError(f"{name} must fit in 64 bits, got {v}")
    return None, v - _U64 if v >= 1 << 63 else v  # stored as int64; the generator reads its 64 bits


def denoise_update(x_t: torch.Tensor, flow: torch.Tensor, t, t_next, *, noise: torch.Tensor | None = None,
                   seed=None, offset=0, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the student's schedule, fused: ``x0 = x_t - t * flow`` and
    ``x_next = (1 - t_next) * x0 + t_next * eps``.  Math in float32 whatever the storage dtype.

    Parameters
    ----------
    x_t, flow : tensors of one shape, dtype (float32, float16, bfloat16) and device; ``flow`` is the predicted
        velocity ``eps - x0``.
    t, t_next : flow-matching times in [0, 1]: Python floats, 0-d tensors or per-sample (batch,) tensors on the
        device (tensors let a captured CUDA graph change them without a host sync).  ``t_next = 0`` gives
        ``x_next == x0``.  Values outside [0, 1] (NaN included) are refused for floats and CPU tensors; GPU
        tensors are not read on the host (that would be a sync), a NaN there gives NaN outputs.
    noise : explicit eps (shape of x_t; float32, float16, bfloat16 or float64, the latter rounded to float32 like
        every input); otherwise eps is drawn from ``seed``.
    seed, offset : ints or 0-d int64 device tensors for the counter-based generator (Philox4x32-10, scheme in
        ``lipforcing.ops.reference``): element ``i`` of the flattened tensor uses counter ``(i, offset)`` and key
        ``seed``, so the same (seed, offset) gives the same noise on every backend and every run.  Use a new
        offset (or seed) for fresh noise.  Required when ``noise`` is None and ``t_next > 0``.
    out : optional ``(x0, x_next)`` preallocated contiguous tensors of x_t's shape and device (float32, float16,
        bfloat16), written in place.  Each may be exactly an input (x_t, flow or noise: same pointer, dtype, shape
        and strides; the op is elementwise); any other overlap, with an input or with each other, is refused.

    Inputs of any strides (transposed, sliced, expanded) are accepted; the returned tensors are contiguous.  The
    op has no backward: inputs that require grad are refused while grad mode is on.
    backend : ``"auto" | "cuda" | "triton" | "reference"``.

    Returns
    -------
    (x0, x_next), in x_t's dtype unless ``out`` is given.
    """
    # elementwise: any strides are accepted (inputs are made contiguous below)
    _checks.tensor("x_t", x_t, contiguous_last=False)
    _checks.tensor("flow", flow, contiguous_last=False)
    _checks.same("x_t", x_t, "flow", flow)
    if torch.is_grad_enabled():
        grads = [n for n, v in (("x_t", x_t), ("flow", flow), ("t", t), ("t_next", t_next), ("noise", noise))
                 + (tuple(zip(("out[0]", "out[1]"), out)) if isinstance(out, (tuple, list)) else ())
                 if isinstance(v, torch.Tensor) and v.requires_grad]
        if grads:
            raise ValueError(f"denoise_update has no backward, but {', '.join(grads)} requires grad: call it "
                             "under torch.no_grad() or pass detached tensors (for a differentiable step use "
                             "lipforcing.schedule.x0_from_velocity)")
    if flow.shape != x_t.shape:
        raise ValueError(f"flow must have the shape of x_t {tuple(x_t.shape)}, got {tuple(flow.shape)}")
    if x_t.dim() == 0:
        raise ValueError("x_t must have at least one dimension (batch, ...)")
    t_tensor, t_value = _time("t", t, x_t)
    tn_tensor, tn_value = _time("t_next", t_next, x_t)
    if noise is not None:
        _checks.tensor("noise", noise, contiguous_last=False, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
        _checks.same("x_t", x_t, "noise", noise, dtype=False)
        if noise.shape != x_t.shape:
            raise ValueError(f"noise must have the shape of x_t {tuple(x_t.shape)}, got {tuple(noise.shape)}")
        seed_t, seed_v, off_t, off_v = None, 0, None, 0
    else:
        if seed is None:
            if tn_tensor is not None or tn_value > 0:
                raise ValueError("denoise_update needs noise=... or seed=... to draw eps when t_next > 0")
            seed = 0
        seed_t, seed_v = _counter("seed", seed, x_t)
        off_t, off_v = _counter("offset", offset, x_t)
    if out is None:
        # contiguous whatever x_t's strides (empty_like would keep a transposed layout; every kernel writes the
        # outputs in flat C order)
        out = tuple(torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device) for _ in range(2))
    else:
        _check_out(out, x_t, {"x_t": x_t, "flow": flow, "noise": noise, "t": t_tensor, "t_next": tn_tensor,
                              "seed": seed_t, "offset": off_t})
    if noise is not None:
        # the math is float32: a float64 eps is rounded to float32 first on every backend
        noise = noise.to(torch.float32).contiguous() if noise.dtype == torch.float64 else noise.contiguous()
    x_c, f_c = x_t.contiguous(), flow.contiguous()
    args = (x_c, f_c, t_tensor, t_value, tn_tensor, tn_value, noise, seed_t, seed_v, off_t, off_v, out[0], out[1])
    name = _dispatch.resolve("denoise_update", _IMPLS, backend, x_t.device, args, {})
    _op(*args, name)
    return out[0], out[1]
