"""Backend selection shared by every public op.

Each op declares, per backend, where its implementation lives (a module path and a function name, imported
lazily) and the op's public function asks :func:`resolve` which one to run.  Order for ``backend="auto"``:
:func:`auto_order` -- measured speed per (op, GPU architecture, dtype, head_dim) from ``dispatch_table.json``
beside this file when a GPU benchmark run has filled it, else ``cuda`` -> ``triton`` -> ``reference``, except
on sm_90+ where the Triton kernels (wgmma) come before the mma.sync CUDA kernels.  The optional library backends
(``flash_attn``, ``cudnn``; chunk_attention only) join ``auto`` only through a measured table entry.  A backend
is *applicable* only to CUDA tensors (the Triton interpreter is used on CPU tensors only when
``backend="triton"`` is asked for explicitly and ``TRITON_INTERPRET=1``).

An implementation module may define ``<fn>_unsupported(*args, **kwargs) -> str | None`` next to ``<fn>``: it gets
the op's arguments and returns why it cannot handle them (dtype, head_dim, ...), or ``None``.

``LIPFORCING_BACKEND`` (``auto | cuda | triton | reference | flash_attn | cudnn``) replaces ``backend="auto"`` in
every call; an explicit ``backend=`` argument wins over the environment.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

logger = logging.getLogger("lipforcing")

BACKENDS = ("cuda", "triton", "reference")
OPTIONAL_BACKENDS = ("flash_attn", "cudnn")  # other libraries' kernels (chunk_attention's dense step only)
_CHOICES = ("auto",) + BACKENDS + OPTIONAL_BACKENDS
TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
_logged: set[tuple] = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs (the message says why)."""


@dataclass(frozen=True)
class Impl:
    """Where one backend's implementation of an op lives: ``module.fn`` (imported on first use)."""

    module: str
    fn: str

    def load(self) -> tuple[Callable, Callable | None]:
        mod = importlib.import_module(self.module)
        if not hasattr(mod, self.fn):
            raise ImportError(f"{self.module} has no function {self.fn}")
        return getattr(mod, self.fn), getattr(mod, self.fn + "_unsupported", None)


def requested_backend(backend: str) -> str:
    """The backend name a call asked for, after the ``LIPFORCING_BACKEND`` override of ``"auto"``."""
    if backend not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("LIPFORCING_BACKEND", "auto").strip().lower() or "auto"
        if env not in _CHOICES:
            raise ValueError(f"environment variable LIPFORCING_BACKEND must be one of {_CHOICES}, got {env!r}")
        return env
    return backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _table() -> tuple[dict, ...]:
    """Rows of dispatch_table.json: {op, arch, dtype, head_dim, order}."""
    try:
        data = json.loads(TABLE_PATH.read_text())
    except FileNotFoundError:
        return ()
    return tuple(data.get("entries", ()))


def _arch(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def auto_order(op: str, device: torch.device, dtype: torch.dtype | None = None,
               head_dim: int | None = None) -> tuple[str, ...]:
    """Backends ``auto`` tries, fastest first.  A dispatch-table row for (op, arch, dtype, head_dim) wins (its
    order, then any core backend it leaves out); without one: cuda -> triton -> reference, with triton first on
    sm_90 and newer (Hopper: Triton issues wgmma, the CUDA kernels are mma.sync)."""
    arch = _arch(device)
    if arch is not None:
        dname = str(dtype).replace("torch.", "") if dtype is not None else None
        for row in _table():
            if (row.get("op"), row.get("arch"), row.get("dtype"), row.get("head_dim")) == (op, arch, dname, head_dim):
                order = [b for b in row["order"] if b in _CHOICES[1:]]
                return tuple(order + [b for b in BACKENDS if b not in order])
        if torch.cuda.get_device_capability(device) >= (9, 0):
            return ("triton", "cuda", "reference")
    return BACKENDS


def _applicable(name: str, device: torch.device, explicit: bool) -> str | None:
    """Why backend ``name`` cannot run on ``device`` at all, or None (``explicit``: the caller asked for it)."""
    if name == "reference":
        return None
    if name in OPTIONAL_BACKENDS:
        return None if device.type == "cuda" else f"the {name} backend needs CUDA tensors, got tensors on {device}"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got tensors on {device}"
        from lipforcing.ops import cuda as _cuda_ext

        return _cuda_ext.unavailable_reason()
    if name == "triton":
        try:
            import triton  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the install
            return f"triton is not importable ({exc}); pip install 'lipforcing[triton]'"
        if device.type == "cuda":
            return None if not _interpreting() else "TRITON_INTERPRET=1 is set, which runs Triton on the CPU only"
        if device.type == "cpu" and _interpreting():
            # the interpreter is a debugging tool: it runs only when asked for by name
            return None if explicit else "the Triton interpreter runs only with backend='triton' asked for by name"
        return f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
    raise AssertionError(name)


def resolve(op: str, impls: Mapping[str, Impl], backend: str, device: torch.device, args: tuple,
            kwargs: dict) -> str:
    """Pick the backend that runs ``op`` on these inputs.

    ``backend`` is the caller's argument.  An explicit backend that cannot run raises
    :class:`BackendUnavailable` with the reason; ``auto`` takes the first backend that can and logs the
    skipped ones once per distinct reason.
    """
    want = requested_backend(backend)
    if want == "auto":
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        order = auto_order(op, device, first.dtype if first is not None else None,
                           first.shape[-1] if first is not None and first.dim() else None)
    else:
        order = (want,)
    reasons = []
    for name in order:
        if name in OPTIONAL_BACKENDS and name not in impls:
            reason = f"{op} has no {name} implementation (the library backends serve chunk_attention only)"
        else:
            reason = _applicable(name, device, explicit=want != "auto")
            if reason is None and name not in impls:
                reason = f"{op} has no {name} implementation yet"
        if reason is None:
            try:
                _, unsupported = impls[name].load()
            except Exception as exc:
                reason = f"could not import {impls[name].module}.{impls[name].fn}: {exc}"
            else:
                if unsupported is not None:
                    reason = unsupported(*args, **kwargs)
        if reason is None:
            if reasons and want == "auto":
                key = (op, name, tuple(reasons))
                if key not in _logged:
                    _logged.add(key)
                    level = logging.WARNING if device.type == "cuda" else logging.DEBUG
                    logger.log(level, "lipforcing.ops.%s: using the %s backend (%s)", op, name, "; ".join(reasons))
            return name
        reasons.append(f"{name}: {reason}")
    raise BackendUnavailable(f"lipforcing.ops.{op}: backend {want!r} cannot run these inputs: " + "; ".join(reasons))


def implementation(impls: Mapping[str, Impl], name: str) -> Callable:
    """The callable of a backend already chosen by :func:`resolve`."""
    return impls[name].load()[0]
