"""Triton kernel of ``lipforcing.ops.denoise_update``: the fused flow-matching step between two student passes.

One launch, one pass over memory::

    x0     = x_t - t * flow
    x_next = (1 - t_next) * x0 + t_next * eps

with ``eps`` either read from a tensor or drawn in-kernel by Philox4x32-10 (Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC'11) followed by Box-Muller, in exactly the counter scheme documented in
``lipforcing.ops.reference`` (element ``i`` of the flattened tensor: counter ``(i_lo, i_hi, offset_lo,
offset_hi)``, key ``(seed_lo, seed_hi)``, u1 from the top 24 bits of r0, u2 from r1).  ``t`` / ``t_next`` /
``seed`` / ``offset`` may live in device memory and are read by the kernel, so the launch needs no host sync and
can be captured in a CUDA graph whose replays change them.

Math is float32 with FMA contraction disabled and the reference's operation order, so with an explicit noise
tensor the result equals the reference bit for bit; drawn noise matches up to the last-ulp rounding of
log/cos (libdevice on the GPU, numpy under the interpreter).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from lipforcing.kernels._attention_common import device_guard

# Tuning: a memory-bound elementwise op.  4096 elements per program and 8 warps gives 16 elements per thread
# (4 x 16-byte vectors for fp32), enough in flight to saturate HBM while the Philox math hides behind loads.
BLOCK = 4096
NUM_WARPS = 8

# t / t_next modes (constexpr): value passed as a scalar, 0-d tensor, per-sample (B,) tensor.
_SCALAR, _TENSOR0D, _PER_SAMPLE = 0, 1, 2
# noise modes (constexpr): none needed (t_next == 0 as a Python number), tensor, Philox.
_NO_NOISE, _NOISE_TENSOR, _NOISE_PHILOX = 0, 1, 2

_PHILOX_M0 = tl.constexpr(0xD2511F53)  # round multipliers
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)  # key increments (golden ratio, sqrt(3) - 1)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)
_TWO_PI_F32 = tl.constexpr(6.2831854820251465)  # float32(2 pi): the reference multiplies by it in float32
_TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox4x32 rounds on uint32 blocks; returns the four output words."""
    m0 = tl.full(c0.shape, _PHILOX_M0, tl.uint32)
    m1 = tl.full(c0.shape, _PHILOX_M1, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0  # uint32 multiply wraps: the low word of the 64-bit product
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _PHILOX_W0  # Weyl key schedule, mod 2^32
        k1 = k1 + _PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _load_time(ptr, value, sample, mask, MODE: tl.constexpr):
    if MODE == 0:
        return value
    elif MODE == 1:
        return tl.load(ptr).to(tl.float32)
    else:  # masked: lanes past numel have sample >= batch, outside the (batch,) tensor
        return tl.load(ptr + sample, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_u64(ptr, value, FROM_PTR: tl.constexpr):
    """A 64-bit seed/offset as (lo, hi) uint32 words, from a 0-d int64 tensor or an int64 argument."""
    if FROM_PTR:
        v = tl.load(ptr).to(tl.int64)
    else:
        v = tl.to_tensor(value).to(tl.int64)
    lo = (v & 0xFFFFFFFF).to(tl.uint32)
    hi = ((v >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return lo, hi


@triton.jit
def _denoise_update_kernel(
    x_ptr, flow_ptr, noise_ptr, x0_ptr, xn_ptr,
    t_ptr, t_value, tn_ptr, tn_value, omtn_value,
    seed_ptr, seed_value, offset_ptr, offset_value,
    numel, per_sample,
    T_MODE: tl.constexpr, TN_MODE: tl.constexpr, NOISE_MODE: tl.constexpr,
    SEED_PTR: tl.constexpr, OFFSET_PTR: tl.constexpr, INT64: tl.constexpr, LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    if T_MODE == 2 or TN_MODE == 2:
        sample = idx // per_sample  # batch index of each element (per-sample times)
    else:
        sample = 0

    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(flow_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    t = _load_time(t_ptr, t_value, sample, mask, T_MODE)
    x0 = x - t * f

    if NOISE_MODE == 0:
        # t_next == 0: x_next = 1 * x0 + 0 * eps = x0 exactly for finite eps.
        xn = x0
    else:
        tn = _load_time(tn_ptr, tn_value, sample, mask, TN_MODE)
        if TN_MODE == 0:
            omtn = omtn_value  # (1 - t_next) rounded once from the exact value, like the reference
        else:
            omtn = 1.0 - tn
        if NOISE_MODE == 1:
            eps = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        else:
            k0, k1 = _load_u64(seed_ptr, seed_value, SEED_PTR)
            c2, c3 = _load_u64(offset_ptr, offset_value, OFFSET_PTR)
            i64 = idx.to(tl.int64)
            c0 = (i64 & 0xFFFFFFFF).to(tl.uint32)
            c1 = (i64 >> 32).to(tl.uint32)
            zero = tl.zeros(idx.shape, tl.uint32)
            r0, r1, _, _ = _philox4x32_10(c0, c1, zero + c2, zero + c3, zero + k0, zero + k1)
            # Box-Muller on the top 24 bits: u1 in (0, 1] (log is finite), u2 in [0, 1); both exact in float32.
            u1 = ((r0 >> 8) + 1).to(tl.float32) * _TWO_POW_M24
            u2 = (r1 >> 8).to(tl.float32) * _TWO_POW_M24
            if LIBDEVICE:  # correctly rounded sqrt, libdevice logf/cosf (~1 ulp), not the .approx instructions
                eps = libdevice.sqrt_rn(-2.0 * libdevice.log(u1)) * libdevice.cos(u2 * _TWO_PI_F32)
            else:  # the interpreter has no libdevice; its numpy float32 log/cos are accurate too
                eps = tl.sqrt_rn(-2.0 * tl.log(u1)) * tl.cos(u2 * _TWO_PI_F32)
        xn = omtn * x0 + tn * eps

    tl.store(x0_ptr + idx, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    tl.store(xn_ptr + idx, xn.to(xn_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def denoise_update_triton_unsupported(x_t, flow, t, t_value, t_next, t_next_value, noise, seed, seed_value,
                                      offset, offset_value, x0_out, x_next_out) -> str | None:
    """Why the Triton backend cannot run these (already validated) arguments, or None."""
    if x_t.device.type == "cpu":
        if not _interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 (set before importing triton) for the triton backend"
        low = [n for n, v in (("x_t", x_t), ("noise", noise), ("x0_out", x0_out), ("x_next_out", x_next_out))
               if v is not None and v.dtype == torch.bfloat16]
        if low:
            return f"the Triton interpreter does not support bfloat16 reliably ({', '.join(low)} is bfloat16)"
    return None


def denoise_update_triton(x_t, flow, t, t_value, t_next, t_next_value, noise, seed, seed_value, offset,
                          offset_value, x0_out, x_next_out) -> None:
    """Fill ``x0_out`` and ``x_next_out`` (contiguous, shape of ``x_t``) in one launch.

    Arguments follow the backend signature of ``lipforcing/ops/denoise_update.py``: ``x_t``/``flow`` contiguous;
    ``t``/``t_next`` a 0-d or (B,) float tensor on the device, or None with ``*_value`` used; ``noise`` a
    contiguous tensor or None; ``seed``/``offset`` 0-d int64 device tensors or None with ``*_value`` (int64 range)
    used.  No allocation, no host sync."""
    numel = x_t.numel()
    if numel == 0:
        return
    batch = x_t.shape[0]
    per_sample = max(numel // batch, 1)

    def mode(tensor):
        if tensor is None:
            return _SCALAR
        return _TENSOR0D if tensor.dim() == 0 else _PER_SAMPLE

    t_mode, tn_mode = mode(t), mode(t_next)
    if noise is not None:
        noise_mode = _NOISE_TENSOR
    elif t_next is None and t_next_value == 0.0:
        noise_mode = _NO_NOISE
    else:
        noise_mode = _NOISE_PHILOX
    # Unused pointer slots get x_t (never dereferenced: the constexpr mode removes the load).
    grid = (triton.cdiv(numel, BLOCK),)
    with device_guard(x_t):  # launch on x_t's GPU (and its current stream), not the current device's
        _denoise_update_kernel[grid](
            x_t, flow, noise if noise is not None else x_t, x0_out, x_next_out,
            t if t is not None else x_t, float(t_value),
            t_next if t_next is not None else x_t, float(t_next_value), float(1.0 - t_next_value),
            seed if seed is not None else x_t, int(seed_value),
            offset if offset is not None else x_t, int(offset_value),
            numel, per_sample,
            T_MODE=t_mode, TN_MODE=tn_mode, NOISE_MODE=noise_mode,
            SEED_PTR=seed is not None, OFFSET_PTR=offset is not None,
            INT64=numel + BLOCK >= 2**31, LIBDEVICE=not _interpreting(), BLOCK=BLOCK,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
