"""Benchmark timing and the one JSON schema of lipforcing's benchmarks (DESIGN.md convention 10).

A row: ``op, backend, shape, dtype, median_us, p20_us, p80_us, tflops, gbps, gpu, torch, triton, cuda, commit,
date``.  Rows of one run are written together with the environment; ``compare`` prints ratios between two files.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


def environment() -> dict:
    """GPU name, library versions, git commit and date of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def time_cuda(fn: Callable[[], object], *, warmup: int = 10, rounds: int = 50) -> dict:
    """Median / p20 / p80 of ``fn`` in microseconds, timed with CUDA events around each call (after warm-up).

    The rounds are enqueued back to back and the device is synchronised once at the end (both events of every
    pair are recorded before any ``elapsed_time``), so the host's Python overhead of one call overlaps the
    device work of the previous ones instead of being counted as idle device time; a launch-bound ``fn`` still
    measures its launch rate."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) * 1e3 for start, end in events]
    t = torch.tensor(times, dtype=torch.float64)
    return {"median_us": t.quantile(0.5).item(), "p20_us": t.quantile(0.2).item(), "p80_us": t.quantile(0.8).item()}


@dataclass
class Row:
    op: str
    backend: str
    shape: dict
    dtype: str
    median_us: float
    p20_us: float
    p80_us: float
    tflops: float | None = None
    gbps: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def measure(cls, op: str, backend: str, shape: dict, dtype, fn: Callable[[], object], *, flops: float | None = None,
                nbytes: float | None = None, **timing) -> "Row":
        t = time_cuda(fn, **timing)
        seconds = t["median_us"] * 1e-6
        return cls(op, backend, dict(shape), str(dtype).replace("torch.", ""), **t,
                   tflops=flops / seconds / 1e12 if flops else None,
                   gbps=nbytes / seconds / 1e9 if nbytes else None)


def write(rows: list[Row], path: str, env: dict | None = None) -> None:
    """Write the rows with the environment (``env``: a cached :func:`environment`, else it is queried).  The file
    is replaced atomically, so a run killed while writing leaves the previous complete file."""
    env = environment() if env is None else env
    doc = {"environment": env, "rows": [{**asdict(r), **env} for r in rows]}
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, path)


def _key(row: dict) -> tuple:
    return row["op"], row["backend"], json.dumps(row["shape"], sort_keys=True), row["dtype"]


def compare(path_a: str, path_b: str) -> list[tuple[tuple, float, float, float]]:
    """Rows present in both files: (key, median_us A, median_us B, speed-up A/B)."""
    rows_a = {_key(r): r for r in json.load(open(path_a))["rows"]}
    rows_b = {_key(r): r for r in json.load(open(path_b))["rows"]}
    out = []
    for key in sorted(rows_a.keys() & rows_b.keys()):
        a, b = rows_a[key]["median_us"], rows_b[key]["median_us"]
        out.append((key, a, b, a / b))
    return out
