"""Prometheus text exposition (format 0.0.4) of an engine's scheduler and the server's counters."""
from __future__ import annotations

import torch

__all__ = ["prometheus_text"]


def _line(out: list, name: str, kind: str, help_text: str, samples) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        if value is None:
            continue
        lab = "" if not labels else "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        out.append(f"{name}{lab} {float(value):.9g}")


def _q(name: str) -> str:
    return f"{int(name[1:]) / 100:g}"       # "p99" -> "0.99"


def prometheus_text(engine, counters: dict) -> str:
    """Open sessions, queued chunks, chunk latency and step-time quantiles, batch sizes, capacity, the server's
    counters (``counters``: name -> (help, value)) and, on CUDA, GPU memory."""
    st = engine.stats()
    out: list[str] = []
    _line(out, "lipforcing_sessions", "gauge", "Open streaming sessions.", [({}, st["sessions"])])
    _line(out, "lipforcing_queued_chunks", "gauge", "Chunks whose audio is complete and whose frames are not "
          "computed yet (in flight included).", [({}, st["queued_chunks"])])
    _line(out, "lipforcing_capacity_sessions", "gauge", "Estimated real-time sessions this engine holds (from "
          "measured chunk steps).", [({}, st["capacity"])])
    _line(out, "lipforcing_chunk_latency_seconds", "summary", "Seconds from a chunk's audio being complete to its "
          "frames being ready (latest 2048 chunks).",
          [({"quantile": _q(q)}, v) for q, v in st["chunk_latency_s"].items()])
    _line(out, "lipforcing_step_seconds", "summary", "Seconds per chunk step (one DiT batch; latest 2048).",
          [({"quantile": _q(q)}, v) for q, v in st["step_s"].items()])
    _line(out, "lipforcing_chunk_steps_total", "counter", "Chunk steps run.", [({}, st["steps"])])
    _line(out, "lipforcing_chunks_total", "counter", "Session chunks computed.", [({}, st["chunks"])])
    _line(out, "lipforcing_batch_steps_total", "counter", "Chunk steps by batch size.",
          [({"batch": b}, n) for b, n in st["batch_sizes"].items()])
    for name, (help_text, value) in counters.items():
        _line(out, name, "counter" if name.endswith("_total") else "gauge", help_text, [({}, value)])
    dev = engine.device
    if dev.type == "cuda":
        _line(out, "lipforcing_gpu_memory_allocated_bytes", "gauge", "torch.cuda.memory_allocated.",
              [({"device": str(dev)}, torch.cuda.memory_allocated(dev))])
        _line(out, "lipforcing_gpu_memory_reserved_bytes", "gauge", "torch.cuda.memory_reserved.",
              [({"device": str(dev)}, torch.cuda.memory_reserved(dev))])
        free, total = torch.cuda.mem_get_info(dev)
        _line(out, "lipforcing_gpu_memory_total_bytes", "gauge", "GPU memory.", [({"device": str(dev)}, total)])
        _line(out, "lipforcing_gpu_memory_free_bytes", "gauge", "Free GPU memory.", [({"device": str(dev)}, free)])
    return "\n".join(out) + "\n"
