"""Backend selection shared by every public op.

Each op declares, per backend, where its implementation lives (a module path and a function name, imported
lazily) and the op's public function asks :func:`resolve` which one to run.  Order for ``backend="auto"``:
``cuda`` -> ``triton`` -> ``reference``.  A backend is *applicable* only to CUDA tensors (the Triton interpreter
is used on CPU tensors only when ``backend="triton"`` is asked for explicitly and ``TRITON_INTERPRET=1``).

An implementation module may define ``<fn>_unsupported(*args, **kwargs) -> str | None`` next to ``<fn>``: it gets
the op's arguments and returns why it cannot handle them (dtype, head_dim, ...), or ``None``.

``LIPFORCING_BACKEND`` (``auto | cuda | triton | reference``) replaces ``backend="auto"`` in every call; an
explicit ``backend=`` argument wins over the environment.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

logger = logging.getLogger("lipforcing")

BACKENDS = ("cuda", "triton", "reference")
_CHOICES = ("auto",) + BACKENDS
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


def _applicable(name: str, device: torch.device, explicit: bool) -> str | None:
    """Why backend ``name`` cannot run on ``device`` at all, or None (``explicit``: the caller asked for it)."""
    if name == "reference":
        return None
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
    order = BACKENDS if want == "auto" else (want,)
    reasons = []
    for name in order:
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
