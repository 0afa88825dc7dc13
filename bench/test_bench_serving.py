"""Serving throughput: aggregate frames/s and per-session chunk latency for 1, 2, 4, 8 concurrent sessions, with the
scheduler batching their chunks into one DiT pass (max_batch = sessions) and without (max_batch = 1), measured in
the same run (the unbatched row is the baseline of its batched row).  On a shared machine the load drifts between
rows, so every configuration of a session count runs ``LIPFORCING_BENCH_SERVING_REPEATS`` times (default 3),
interleaved (unbatched, batched, unbatched, batched, ...): the ratios are the median of the per-repeat ratios (each
against the unbatched run just before it), FPS is over all repeats, p99 over the pooled chunks of each session.

Closed loop, like a host that streams as fast as the engine allows: each session has its own host thread that
pushes one chunk's audio (plus the front end's lookahead), waits for that chunk's frames (``frames(block=True)``),
and goes on; the latency of a chunk is from its audio being pushed to its last frame being taken.  Warm-up (each
session's first chunk, which builds its caches) is excluded.  Not a timed test: it prints a table and writes JSON
rows to ``bench/results/serving_<device>.json``.

CPU (tiny preset, runs anywhere): ``python -m pytest bench/test_bench_serving.py -s -p no:randomly``
GPU (1.3B, random weights, bf16, 512x512, Wan VAE): ``python -m pytest bench/test_bench_serving.py -s -m gpu``
"""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

import lipforcing
from lipforcing.media import synthetic_face_clip, synthetic_speech
from lipforcing.profiling import StreamPlan

SESSIONS = (1, 2, 4, 8)
CHUNKS = int(os.environ.get("LIPFORCING_BENCH_SERVING_CHUNKS", "6"))     # measured chunks per session
REPEATS = int(os.environ.get("LIPFORCING_BENCH_SERVING_REPEATS", "3"))   # interleaved runs per configuration
_LOAD_START: dict = {}


def _stream(session, pcm, plan, chunks, lat, counts, k, start):
    """One host: chunk 0 (warm-up, not timed), then ``chunks`` chunks, each pushed and drained before the next."""
    pos = 0
    for c in range(chunks + 1):
        end = plan.audio_needed(c)
        t = time.perf_counter()
        session.push_audio(pcm[pos:end])
        pos = end
        n = sum(1 for _ in session.frames(block=True, timeout=600))
        if c == 0:
            start.wait()          # every session warm before the clock starts
            continue
        lat[k].append(time.perf_counter() - t)
        counts[k] += n


def _run(engine, n: int, max_batch: int, chunks: int, seed: int = 0) -> dict:
    engine.scheduler.configure(max_batch=max_batch)
    plan = StreamPlan(engine.first_chunk_frames, engine.chunk_frames, engine.lookahead_samples)
    secs = plan.audio_needed(chunks) / 16000 + 0.2
    refs = [synthetic_face_clip(8, engine.resolution, seed=seed + k) for k in range(n)]
    pcms = [synthetic_speech(secs, 16000, seed=seed + 100 + k) for k in range(n)]
    sessions = [engine.session(refs[k], seed=seed + k) for k in range(n)]
    lat = [[] for _ in range(n)]
    counts = [0] * n
    start = threading.Barrier(n + 1)
    threads = [threading.Thread(target=_stream, args=(sessions[k], pcms[k], plan, chunks, lat, counts, k, start))
               for k in range(n)]
    for t in threads:
        t.start()
    start.wait()
    steps0, batches0 = engine.stats()["steps"], dict(engine.stats()["batch_sizes"])
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    st = engine.stats()
    for s in sessions:
        s.close()
    batches = {b: c - batches0.get(b, 0) for b, c in st["batch_sizes"].items() if c - batches0.get(b, 0)}
    return {"sessions": n, "max_batch": max_batch, "frames": sum(counts), "wall_s": wall, "lat": lat,
            "steps": st["steps"] - steps0, "batches": batches}


def _row(engine, runs: list[dict], chunks: int) -> dict:
    """One table row from the repeats of one configuration."""
    n, max_batch = runs[0]["sessions"], runs[0]["max_batch"]
    lat = [sum((r["lat"][k] for r in runs), []) for k in range(n)]        # each session's chunks, all repeats
    frames, wall = sum(r["frames"] for r in runs), sum(r["wall_s"] for r in runs)
    batches: dict = {}
    for r in runs:
        for b, c in r["batches"].items():
            batches[b] = batches.get(b, 0) + c
    p99 = [float(np.percentile(v, 99)) for v in lat]
    p50 = [float(np.percentile(v, 50)) for v in lat]
    return {"sessions": n, "max_batch": max_batch, "batching": max_batch > 1, "chunks_per_session": chunks,
            "repeats": len(runs), "frames": frames, "wall_s": wall, "fps_total": frames / wall,
            "fps_per_session": frames / wall / n, "fps_total_per_repeat": [r["frames"] / r["wall_s"] for r in runs],
            "chunk_latency_p50_ms": 1e3 * float(np.mean(p50)),
            "chunk_latency_p99_ms_worst_session": 1e3 * max(p99),
            "chunk_latency_p99_ms_mean": 1e3 * float(np.mean(p99)),
            "steps": sum(r["steps"] for r in runs),
            "mean_batch": (sum(b * c for b, c in batches.items()) / max(1, sum(batches.values()))),
            "realtime_budget_ms": 1e3 * engine.chunk_frames / 25}


def _p99_worst(run: dict) -> float:
    return max(float(np.percentile(v, 99)) for v in run["lat"])


def _bench(engine, label: str, linear_modes=None) -> list[dict]:
    """Rows for every session count: unbatched, then batched with each ``batch_linear`` mode (the engine's own
    first: "split" on the CPU, bit-exact; "fold" runs each linear layer on all sessions' rows at once), each
    configuration ``REPEATS`` times, interleaved."""
    linear_modes = linear_modes or [engine.batch_linear]
    _LOAD_START["load"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for n in SESSIONS:
        modes = linear_modes if n > 1 else []
        runs: dict = {None: [], **{m: [] for m in modes}}
        for _ in range(REPEATS):
            engine.batch_linear = linear_modes[0]
            runs[None].append(_run(engine, n, 1, CHUNKS))
            for mode in modes:
                engine.batch_linear = mode
                runs[mode].append(_run(engine, n, n, CHUNKS))
        engine.batch_linear = linear_modes[0]
        rows.append(_row(engine, runs[None], CHUNKS))
        for mode in modes:
            row = _row(engine, runs[mode], CHUNKS)
            row["batch_linear"] = mode
            fps = [(b["frames"] / b["wall_s"]) / (u["frames"] / u["wall_s"]) for b, u in zip(runs[mode], runs[None])]
            p99 = [_p99_worst(b) / _p99_worst(u) for b, u in zip(runs[mode], runs[None])]
            row["fps_ratio_per_repeat"], row["p99_ratio_per_repeat"] = fps, p99
            row["fps_ratio_vs_unbatched"] = float(np.median(fps))
            row["p99_ratio_vs_unbatched"] = float(np.median(p99))
            rows.append(row)
    print(f"\nserving, {label}: {CHUNKS} chunks of {engine.chunk_frames} frames per session, closed loop, "
          f"{REPEATS} interleaved repeats (x FPS, x p99: median ratio to the unbatched run before)")
    print(f"{'sessions':>8} {'batching':>14} {'FPS total':>10} {'FPS/sess':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'mean B':>7} {'x FPS':>6} {'x p99':>6}")
    for r in rows:
        mode = f"on ({r['batch_linear']})" if r["batching"] else "off"
        print(f"{r['sessions']:>8} {mode:>14} {r['fps_total']:>10.1f} "
              f"{r['fps_per_session']:>9.1f} {r['chunk_latency_p50_ms']:>8.1f} "
              f"{r['chunk_latency_p99_ms_worst_session']:>8.1f} {r['mean_batch']:>7.2f} "
              f"{r.get('fps_ratio_vs_unbatched', 1.0):>6.2f} {r.get('p99_ratio_vs_unbatched', 1.0):>6.2f}")
    return rows


def _write(rows, engine, label):
    from lipforcing.benchmarking import environment

    folder = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"serving_{engine.device.type}.json")
    doc = {"schema": "lipforcing.bench_serving/2", "label": label, "device": str(engine.device),
           "dtype": str(engine.dtype).replace("torch.", ""), "resolution": list(engine.resolution),
           "batch_linear": engine.batch_linear, "threads": torch.get_num_threads(),
           "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,   # at the end
           "load_average_1m_start": _LOAD_START.get("load"),
           "environment": environment(), "rows": rows}
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(f"wrote {path}")


def test_serving_tiny_cpu():
    torch.set_num_threads(1)
    engine = lipforcing.Engine.load(model="tiny", resolution=32, seed=0, backend="reference")
    try:
        rows = _bench(engine, "tiny preset, 32x32, CPU, 1 torch thread", ["split", "fold"])
        _write(rows, engine, "tiny-cpu")
    finally:
        engine.close()
    assert all(r["frames"] == r["sessions"] * CHUNKS * engine.chunk_frames * REPEATS for r in rows)
    assert engine.batch_linear == "split"


@pytest.mark.gpu
def test_serving_1_3b_gpu():
    engine = lipforcing.Engine.load(model="1.3b", device="cuda", dtype="bf16", seed=0)
    try:
        rows = _bench(engine, f"1.3b, random weights, bf16, 512x512, {torch.cuda.get_device_name()}")
        _write(rows, engine, "1.3b-gpu")
    finally:
        engine.close()
    assert all(r["frames"] == r["sessions"] * CHUNKS * engine.chunk_frames * REPEATS for r in rows)
