"""``qk_norm``: the RMSNorm of a self-attention layer's q and k over the full model dim in one launch, with the
RoPE rotation and the cache write that follow it in the chunk step optionally fused in.

What it replaces per layer and DiT pass (1.3B chunk step: B 1, L 3072, dim 1536 = 12 heads x 128, bf16; N = L x
dim = 4.72 M elements per tensor; eager PyTorch, counted from the code, not measured):

* ``layers.RMSNorm`` is 9 kernels per tensor (float, pow, mean, +eps, rsqrt, mul, float(weight), mul, to) moving
  ~40 B per element through fp32 intermediates: 18 launches and ~377 MB for q and k;
* in ``rope_mode="absolute"`` the student then runs ``apply_rope(x).to(dtype)`` on q and on k (position table,
  two cos/sin gathers, float, 4 mul, sub, add, two strided copies, to): ~15 launches and ~45 B per element each,
  another ~30 launches and ~420 MB.

The fused op reads q and k once from HBM (its second walk over a row tile re-reads L1/L2) and writes them once:
2 B in + 2 B out per element, **1 launch and ~38 MB** for norm-only and norm + absolute RoPE alike (3 passes x 30
layers per chunk: 90 launches instead of 1620 / 4320).  Under ``compile_blocks`` inductor fuses each eager norm
into one or two kernels already; the op then still saves one tensor's launches and, in absolute mode, the rotation.

Dynamic RoPE (the default mode) rotates q and the keys at window-relative positions read from the cache's device
``pos``.  On the fused path the student's chunk step (``model.student.prepared_attention``) calls this op with
``rope_positions="window"`` (q rotated exactly as chunk_attention would rotate it) and, on the cache-write pass,
``v=`` (k and v stored in the chunk's slots), then ``chunk_attention(..., q_rotated=True, chunk_in_cache=write)``.
The fused launch writes q rotated instead of plain (no extra bytes), so per layer and pass the dense step loses
(1.3B shape, 9.4 MB per bf16 tensor; counted, not measured):

* ``_rope_rows_kernel`` on q -- one launch, 9.4 MB read + 9.4 MB written (~19 MB) -- on every pass;
* ``_chunk_cache_write_kernel`` -- one launch, k and v read and stored (4 x 9.4 MB, ~38 MB) -- on the write pass.
  The fused store puts ~28 MB of it back into the qk_norm launch (k's slot store, v read + stored; k itself is
  already in registers): net ~9.4 MB and one launch.

In total ~19 MB and one launch per layer on a ``write=False`` pass, ~28 MB and two launches on the write pass.

The current keys of a ``write=False`` pass and the cache keys are still rotated by chunk_attention (once per step,
into its workspace).  Where the chosen attention backend declines the flags (the CUDA kernels), the step keeps the
norms-only launch and chunk_attention rotates and stores (``chunk_attention.takes_prepared``).

Backends: ``reference`` (lipforcing.ops.reference.qk_norm_ref) and ``triton`` (kernels/qk_norm.py).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from lipforcing import _checks
from lipforcing.cache import RollingKVCache
from lipforcing.ops import _dispatch
from lipforcing.ops._dispatch import Impl
from lipforcing.ops.reference import qk_norm_ref
from lipforcing.ops.rope import RopeSpec

# Backend signature:
#   fn(q, k, v, weight_q, weight_k, eps, rope_mode, rope_cos, rope_sin, grid_h, grid_w, frame0, k_cache, v_cache,
#      pos, chunk_size, window, sink, q_out, k_out) -> None, filling q_out, k_out (B, L, H, D) and, when k_cache
#   is given, the cache slots of stream positions pos .. pos+L-1 with k_out and v (pos is not advanced).
#   rope_mode: 0 no rotation, 1 q and k at absolute frames frame0 + l // tpf, 2 q only at its window-relative
#   frame in the chunk step at pos (chunk_size, window, sink: the cache's).
_IMPLS = {
    "reference": Impl(__name__, "_reference"),
    "triton": Impl("lipforcing.kernels.qk_norm", "qk_norm_triton"),
}
_MODES = {None: 0, "absolute": 1, "window": 2}


def _reference(q, k, v, weight_q, weight_k, eps, rope_mode, rope_cos, rope_sin, grid_h, grid_w, frame0, k_cache,
               v_cache, pos, chunk_size, window, sink, q_out, k_out):
    rope = RopeSpec(rope_cos, rope_sin, (grid_h, grid_w)) if rope_mode else None
    positions = "absolute" if rope_mode == 1 else "window"
    qn, kn = qk_norm_ref(q, k, v, weight_q, weight_k, eps, rope, positions, frame0, k_cache, v_cache, pos,
                         chunk_size, window, sink)
    q_out.copy_(qn)
    k_out.copy_(kn)


@torch.library.custom_op("lipforcing::qk_norm", mutates_args=("q_out", "k_out", "k_cache", "v_cache"))
def _op(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], weight_q: torch.Tensor, weight_k: torch.Tensor,
        eps: float, rope_mode: int, rope_cos: Optional[torch.Tensor], rope_sin: Optional[torch.Tensor], grid_h: int,
        grid_w: int, frame0: int, k_cache: Optional[torch.Tensor], v_cache: Optional[torch.Tensor],
        pos: Optional[torch.Tensor], chunk_size: int, window: int, sink: int, q_out: torch.Tensor,
        k_out: torch.Tensor, backend: str) -> None:
    _dispatch.implementation(_IMPLS, backend)(q, k, v, weight_q, weight_k, eps, rope_mode, rope_cos, rope_sin,
                                             grid_h, grid_w, frame0, k_cache, v_cache, pos, chunk_size, window,
                                             sink, q_out, k_out)


@_op.register_fake
def _(q, k, v, weight_q, weight_k, eps, rope_mode, rope_cos, rope_sin, grid_h, grid_w, frame0, k_cache, v_cache,
      pos, chunk_size, window, sink, q_out, k_out, backend):
    return None


def fused_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The backend the model's chunk step runs ``qk_norm`` with for its ``attn_backend``, or None: keep the
    model's own PyTorch norms (the reference backend, CPU tensors without the Triton interpreter, gradients
    recorded -- the op has no backward -- or ``LIPFORCING_FUSED_QK_NORM=0``).  Triton when ``backend`` is
    ``"triton"`` (the interpreter included) or ``"auto"`` on CUDA."""
    if os.environ.get("LIPFORCING_FUSED_QK_NORM", "1").strip() in ("0", "false", "off"):
        return None
    if torch.is_grad_enabled():
        return None
    want = _dispatch.requested_backend(backend)
    if want not in ("auto", "triton") or (want == "auto" and device.type != "cuda"):
        return None
    probe = torch.empty(0, dtype=dtype, device="meta")  # the Triton backend's limits depend on the dtype only
    try:
        name = _dispatch.resolve("qk_norm", _IMPLS, want, device, (probe,), {})
    except _dispatch.BackendUnavailable:
        return None
    return name if name == "triton" else None


def qk_norm_modules(q: torch.Tensor, k: torch.Tensor, norm_q, norm_k, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``qk_norm`` with the weights and eps of two ``layers.RMSNorm`` modules (kwargs: the rest of qk_norm's)."""
    if norm_q.eps != norm_k.eps:
        raise ValueError(f"qk_norm uses one eps; norm_q has {norm_q.eps}, norm_k {norm_k.eps}")
    return qk_norm(q, k, norm_q.weight, norm_k.weight, eps=norm_q.eps, **kwargs)


def _check_weight(name: str, w, dim: int, x: torch.Tensor) -> None:
    _checks.tensor(name, w, ndim=1, layout="(dim,)")
    if w.device != x.device:
        raise ValueError(f"{name} must be on {x.device}, got {w.device}")
    if w.shape[0] != dim:
        raise ValueError(f"{name} must have heads * head_dim = {dim} elements, got {w.shape[0]}")
    if not w.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(w.stride())}")


def qk_norm(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, *, eps: float,
            rope: RopeSpec | None = None, rope_positions: str = "absolute", frame_offset: int = 0,
            cache: RollingKVCache | None = None, v: torch.Tensor | None = None,
            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of q and of k over their full dim ``heads * head_dim`` (``lipforcing.model.layers.RMSNorm``:
    float32 math, ``x * rsqrt(mean(x^2) + eps) * weight``, result in the input dtype), in one launch; optionally
    the RoPE rotation of the normalised q (and k) and the store of the normalised k and v into a cache.

    Parameters
    ----------
    q, k : (batch, L, heads, head_dim), same shape, dtype and device; each token's heads * head_dim values
        contiguous (the view of a Linear output).
    weight_q, weight_k : (heads * head_dim,) contiguous norm weights (any float dtype; used in float32).
    eps : the norms' epsilon.
    rope : None, or the RopeSpec to rotate with (head_dim even), after the norm, in float32, rounded to the
        input dtype -- ``apply_rope(norm(x)).to(dtype)``:

        * ``rope_positions="absolute"``: q and k, token l at time frame ``frame_offset + l // tokens_per_frame``
          (the student's ``rope_mode="absolute"``);
        * ``rope_positions="window"``: q only, at its window-relative frame in ``cache``'s next chunk step (the
          rotation ``chunk_attention(..., rope=rope)`` gives q; positions from ``cache.pos`` on the device).
    cache : the layer's RollingKVCache (needed for ``"window"`` and for ``v``); ``L <= cache.chunk_size``.
    v : (batch, L, heads, head_dim) or None.  Given: the returned k and v are stored in the cache slots the chunk
        (stream positions ``pos .. pos+L-1``) occupies -- exactly ``chunk_attention(write=True)``'s store.
        **Mutates** the cache's k, v; ``cache.pos`` is not advanced (chunk_attention advances it).
    backend : ``"auto" | "triton" | "reference"``.

    Returns
    -------
    (q, k) normalised (q rotated / k rotated as asked), new contiguous tensors of q's shape and dtype.  Not
    differentiable (raises ValueError when gradients would be recorded).
    """
    layout = "(batch, L, heads, head_dim)"
    _checks.tensor("q", q, ndim=4, layout=layout)
    _checks.tensor("k", k, ndim=4, layout=layout)
    _checks.same("q", q, "k", k)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    B, L, H, D = q.shape
    if min(B, L, H, D) == 0:
        raise ValueError(f"q must have no empty dimension, got shape {tuple(q.shape)}")
    for name, x in (("q", q), ("k", k)):
        if x.stride(2) != D:
            raise ValueError(f"{name} must hold each token's heads * head_dim values contiguously (stride of dim 2 "
                             f"== head_dim {D}), got strides {tuple(x.stride())}")
    _check_weight("weight_q", weight_q, H * D, q)
    _check_weight("weight_k", weight_k, H * D, q)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, weight_q, weight_k)):
        raise ValueError("qk_norm has no backward: call it under torch.no_grad() (the model keeps its PyTorch "
                         "norms when gradients are recorded)")
    if rope_positions not in ("absolute", "window"):
        raise ValueError(f"rope_positions must be 'absolute' or 'window', got {rope_positions!r}")
    if cache is not None and not isinstance(cache, RollingKVCache):
        raise TypeError(f"cache must be a lipforcing.RollingKVCache or None, got {type(cache).__name__}")
    mode = _MODES[rope_positions] if rope is not None else 0
    if (mode == 2 or v is not None) and cache is None:
        raise ValueError("rope_positions='window' and v= need the layer's cache")
    if cache is not None:
        if (B, H, D) != (cache.batch, cache.heads, cache.head_dim) or q.dtype != cache.dtype \
                or q.device != cache.device:
            raise ValueError(f"q {tuple(q.shape)} {q.dtype} on {q.device} does not fit the cache (batch, heads, "
                             f"head_dim) = {(cache.batch, cache.heads, cache.head_dim)}, {cache.dtype} on "
                             f"{cache.device}")
        if L > cache.chunk_size:
            raise ValueError(f"q has {L} tokens; a chunk has at most cache.chunk_size = {cache.chunk_size}")
    if v is not None:
        _checks.tensor("v", v, ndim=4, layout=layout)
        _checks.same("q", q, "v", v)
        if v.shape != q.shape:
            raise ValueError(f"v must have the shape of q {tuple(q.shape)}, got {tuple(v.shape)}")
    if rope is not None:
        if not isinstance(rope, RopeSpec):
            raise TypeError(f"rope must be a lipforcing.ops.RopeSpec or None, got {type(rope).__name__}")
        if D % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {D}")
        if rope.head_dim != D:
            raise ValueError(f"rope is built for head_dim {rope.head_dim}, but q has head_dim {D}")
        if rope.cos.dtype != torch.float32 or rope.cos.device != q.device or not rope.cos.is_contiguous() or \
                rope.sin.shape != rope.cos.shape or rope.sin.dtype != torch.float32 or not rope.sin.is_contiguous():
            raise ValueError(f"rope.cos and rope.sin must be contiguous float32 tensors of one shape on {q.device}")
        tpf = rope.tokens_per_frame
        if mode == 1:
            if isinstance(frame_offset, bool) or not isinstance(frame_offset, int) or frame_offset < 0:
                raise ValueError(f"frame_offset must be an int >= 0, got {frame_offset!r}")
            frames = frame_offset + -(-L // tpf)
        else:
            from lipforcing.ops.chunk_attention import _check_rope

            _check_rope(rope, q, cache)
            frames = (cache.sink + cache.window) // tpf
        if frames > rope.max_positions or max(rope.grid) > rope.max_positions:
            raise ValueError(f"rope tables have {rope.max_positions} positions, the rotation needs {frames} frames "
                             f"and grid {rope.grid}")
    q_out = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty_like(q_out)
    cos, sin = (rope.cos, rope.sin) if mode else (None, None)
    gh, gw = rope.grid if mode else (0, 0)
    kc, vc, pos = (cache.k, cache.v, cache.pos) if cache is not None else (None, None, None)
    size = (cache.chunk_size, cache.window, cache.sink) if cache is not None else (0, 0, 0)
    args = (q, k, v if v is not None else None, weight_q, weight_k, float(eps), mode, cos, sin, gh, gw,
            int(frame_offset) if mode == 1 else 0, kc if v is not None else None, vc if v is not None else None,
            pos, *size, q_out, k_out)
    name = _dispatch.resolve("qk_norm", _IMPLS, backend, q.device, args, {})
    _op(*args, name)
    return q_out, k_out
