"""Helpers shared by the Triton kernel test tiers: tests/interp (interpreter or GPU) and tests/compile
(compile-only, in a subprocess)."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Largest shared memory per block (bytes): sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set (tests/conftest.py sets it when there is no GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_test_device() -> str:
    """Device for tests that run the Triton kernels: "cpu" under the interpreter, else "cuda".  Called at import
    time of a test module; skips the whole module when neither the interpreter nor a GPU is available."""
    if not interpreting() and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)
    return "cpu" if interpreting() else "cuda"


def record_device_guard(monkeypatch, module) -> list:
    """Replace ``module.device_guard`` (a kernel module's launch-device context) by one that only records the
    device of the tensor each launch enters it with; returns that list (kernels still run)."""
    seen = []

    @contextlib.contextmanager
    def guard(t):
        seen.append(t.device)
        yield

    monkeypatch.setattr(module, "device_guard", guard)
    return seen


def compile_in_subprocess(script: str, timeout: float, env: dict | None = None) -> list[dict]:
    """Run ``script`` (Python source that compiles Triton kernels for real GPU targets and prints a JSON list as
    its last stdout line) in a fresh interpreter with TRITON_INTERPRET unset, from the repository root; ``env``
    entries are added unless already set.  Returns the parsed list; fails the test with the script's stderr."""
    run_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for k, v in (env or {}).items():
        run_env.setdefault(k, v)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=run_env, cwd=ROOT,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
