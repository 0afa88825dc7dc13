"""End-to-end speed of the streaming engine on synthetic input: the measuring code of ``lipforcing profile`` (and of
``lipforcing demo``), usable without the command.

Numbers in the style of gpt-fast (DESIGN.md convention 11).  One session streams a synthetic face clip and
speech-like audio through :class:`lipforcing.Engine`:

1. **Warm-up** (excluded, reported separately): ``warmup`` chunks, as an utterance of ``warmup - 1`` chunks
   and one of a single chunk (so the start of an utterance is warm too).  It pays for ``torch.compile``, Triton
   autotuning, cuBLAS handles, allocator growth and, with ``cuda_graphs``, the graph capture (done at the
   session's second chunk; the graphs stay valid for the session's later utterances).
2. **Measurement**: the next utterance, ``chunks`` chunks on the same, warm session.  Its audio is pushed in
   20 ms pieces, one chunk's worth at a time (plus the front end's lookahead), and the ready frames are drained
   after each chunk's audio, as a real-time host would do, but without waiting for the real-time clock.

Reported: FPS (frames out / wall time of the measurement), time to first frame (wall time from the moment the
first chunk's audio is in to the first frame out: compute only, the audio buffering is given apart as
``algorithmic_latency``), per-chunk latency p50/p90/p99, a per-stage breakdown from ``engine.stage`` (CUDA events
on a GPU, ``time.perf_counter`` on the CPU; the engine holds no timing code), peak memory, and the achieved
TFLOP/s of the DiT against :func:`dit_pass_flops`.  With a TAEHV decoder (``Engine.decoder``),
:func:`compare_decoders` also times it and the Wan VAE's decoder on the same latents, side by side.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["dit_pass_flops", "chunk_key_frames", "chunk_dit_flops", "StageTimer", "StreamPlan", "StreamResult",
           "stream_utterance", "summarize_chunks", "kv_cache_bytes", "synthetic_inputs", "run_profile",
           "format_report", "plot_profile", "write_json", "DIT_STAGES", "compare_decoders"]

DIT_STAGES = ("dit_pass_1", "dit_pass_2", "cache_write")
"""The stages that run a DiT pass (``cache_write`` is the third pass, on the clean x0 at t = 0)."""


# ---------------------------------------------------------------------------------------------------- FLOPs
def dit_pass_flops(config, *, q_tokens: int, k_tokens: int, text_tokens: int = 512, frames: int | None = None,
                   tokens_per_frame: int | None = None) -> dict:
    """FLOPs of one DiT forward pass over a chunk (multiply-add = 2 FLOPs).

    config : a ``ModelConfig`` (uses dim, ffn_dim, num_layers, patch_size, in_dim, out_dim, audio settings).
    q_tokens : tokens of the chunk (Lq); k_tokens : keys it attends to in self-attention, itself included (Lk);
    text_tokens : prompt-embedding length (Lt; its K/V are computed once per session, not per pass).
    frames / tokens_per_frame : latent frames of the chunk (only the audio term needs them; default: derived).

    Per layer, with d = dim and f = ffn_dim:
        linear      2 Lq (4 d^2 [self q,k,v,o] + 2 d^2 [cross q,o] + 2 d f [FFN])
        self_attn   4 Lq Lk d        (QK^T and PV)
        cross_attn  4 Lq Lt d        (text) + 4 Lq A d (audio tokens, A per latent frame; 1 zero token in "add")
    plus the patch embedding 2 Lq (in_dim * patch) d and the head 2 Lq d (patch * out_dim).  Norms, modulation,
    the timestep MLP and the audio projections are left out (< 0.1 %).
    Returns a dict of the parts and ``total``.
    """
    d, f, n = config.dim, config.ffn_dim, config.num_layers
    lq, lk, lt = int(q_tokens), int(k_tokens), int(text_tokens)
    a = config.audio_tokens_per_frame
    linear = 2 * lq * (4 * d * d + 2 * d * d + 2 * d * f) * n
    self_attn = 4 * lq * lk * d * n
    text = 4 * lq * lt * d * n
    audio = 4 * lq * a * d * n
    if config.audio_injection == "cross_attn":
        fr = frames if frames is not None else max(1, lq // (tokens_per_frame or lq))
        audio += 2 * fr * a * 2 * config.audio_token_dim * d * n         # per-layer audio k, v projections
    embed = 2 * lq * config.in_dim * config.patch_numel * d + 2 * lq * d * config.patch_numel * config.out_dim
    parts = {"linear": float(linear), "self_attn": float(self_attn), "cross_attn_text": float(text),
             "cross_attn_audio": float(audio), "embed_head": float(embed)}
    parts["total"] = float(sum(parts.values()))
    return parts


def chunk_key_frames(config, chunk_index: int) -> int:
    """Latent frames chunk ``chunk_index`` (0-based, within an utterance) attends to, itself included:
    all frames before its end while fewer than sink + window, then the sink plus the window."""
    end = (chunk_index + 1) * config.chunk_frames
    if config.window_frames is None:
        return end
    return min(end, config.window_frames + config.sink_frames)


def chunk_dit_flops(config, tokens_per_frame: int, chunk_index: int, text_tokens: int, passes: int = 3) -> float:
    """DiT FLOPs of one chunk step: ``passes`` passes (two denoising passes and the cache-write pass)."""
    lq = config.chunk_frames * tokens_per_frame
    lk = chunk_key_frames(config, chunk_index) * tokens_per_frame
    return passes * dit_pass_flops(config, q_tokens=lq, k_tokens=lk, text_tokens=text_tokens,
                                   frames=config.chunk_frames, tokens_per_frame=tokens_per_frame)["total"]


# ---------------------------------------------------------------------------------------------------- timing
class _Span:
    __slots__ = ("timer", "name", "start", "host")

    def __init__(self, timer: "StageTimer", name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.host = time.perf_counter()
        if self.timer.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = self.host
        return self

    def __exit__(self, *exc):
        if self.timer.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.timer.records.append((self.name, self.start, end, self.host))
        return False


class StageTimer:
    """A replacement for ``engine.stage``: ``engine.stage = StageTimer(device)``.

    Records every stage as (name, start, end, host time at entry): CUDA events on a GPU (device time, no host
    sync while running), ``time.perf_counter`` on the CPU.  :meth:`chunks` groups the records into chunk steps
    (a chunk starts at its ``audio_features`` stage) after synchronising the device.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.records: list[tuple] = []

    def __call__(self, name: str) -> _Span:
        return _Span(self, name)

    def clear(self) -> None:
        self.records = []

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def chunks(self) -> list[dict]:
        """Per chunk: ``stages`` {name: ms} (a stage entered twice, like ``denoise_update``, is summed),
        ``span_ms`` from the first stage's start to the last stage's end, ``host_start`` (perf_counter)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: list[dict] = []
        first_start = None
        for name, start, end, host in self.records:
            if name == "audio_features" or not out:
                out.append({"stages": {}, "host_start": host})
                first_start = start
            cur = out[-1]
            cur["stages"][name] = cur["stages"].get(name, 0.0) + self._ms(start, end)
            cur["span_ms"] = self._ms(first_start, end)
        return out


# ---------------------------------------------------------------------------------------------------- memory
def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def kv_cache_bytes(config, tokens_per_frame: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes of the student's rolling KV caches: per layer K and V for sink + window - chunk frames."""
    window = config.window_frames if config.window_frames is not None else config.chunk_frames
    frames = config.sink_frames + window - config.chunk_frames
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * batch * frames * tokens_per_frame * config.dim * itemsize


# ---------------------------------------------------------------------------------------------------- run
@dataclass
class StreamPlan:
    first: int          # frames of the first chunk of an utterance (9)
    per: int            # frames of later chunks (12)
    lookahead: int      # samples the front end needs past a chunk's last frame

    def frames(self, chunks: int) -> int:
        return self.first + (chunks - 1) * self.per

    def audio_needed(self, c: int) -> int:
        """Samples of the utterance after which chunk ``c`` can run."""
        return (self.first + c * self.per) * 640 + self.lookahead


@dataclass
class StreamResult:
    frames: int = 0
    first_frame_s: float | None = None
    wall_s: float = 0.0
    frame_times: list = field(default_factory=list)


def stream_utterance(session, pcm: np.ndarray, plan: StreamPlan, chunks: int, bar=None,
                     on_frame=None) -> StreamResult:
    """Push ``pcm`` (16 kHz) in 20 ms pieces, one chunk's worth at a time, draining frames after each."""
    res = StreamResult()
    t0 = time.perf_counter()
    pos = 0
    first_ready = None
    for c in range(chunks):
        end = min(plan.audio_needed(c), len(pcm))
        while pos < end:
            session.push_audio(pcm[pos:min(pos + 320, end)])
            pos = min(pos + 320, end)
        if c == chunks - 1:
            if pos < len(pcm):
                session.push_audio(pcm[pos:])
                pos = len(pcm)
            session.end_of_speech()
        if first_ready is None:
            first_ready = time.perf_counter()
        for frame in session.frames(block=True):     # this chunk's frames (computed by the scheduler)
            now = time.perf_counter()
            if res.first_frame_s is None:
                res.first_frame_s = now - first_ready
            res.frames += 1
            res.frame_times.append(now - t0)
            if on_frame is not None:
                on_frame(frame)
            if bar is not None:
                bar.update(1)
    res.wall_s = time.perf_counter() - t0
    return res


def percentiles(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(v.mean()),
            "min": float(v.min()), "max": float(v.max())}


def summarize_chunks(engine, chunks: list[dict]) -> dict:
    """Stage breakdown, latency percentiles and DiT FLOP rate of a list of :meth:`StageTimer.chunks`, where
    chunk i is chunk i of one utterance."""
    from lipforcing.engine import STAGES

    cfg = engine.config
    tpf = tokens_per_frame(engine)
    text_tokens = int(engine.context.shape[1])
    spans = [c["span_ms"] for c in chunks]
    totals = {s: sum(c["stages"].get(s, 0.0) for c in chunks) for s in STAGES}
    n = max(1, len(chunks))
    stage_sum = sum(totals.values())
    span_sum = sum(spans)
    stages = {s: {"total_ms": totals[s], "mean_ms_per_chunk": totals[s] / n,
                  "share": totals[s] / stage_sum if stage_sum else 0.0,
                  "per_chunk_ms": [c["stages"].get(s, 0.0) for c in chunks]} for s in STAGES}
    flops = [chunk_dit_flops(cfg, tpf, i, text_tokens) for i in range(len(chunks))]
    dit_ms = sum(totals[s] for s in DIT_STAGES)
    steady = chunk_dit_flops(cfg, tpf, 10 ** 6, text_tokens)
    per_pass = dit_pass_flops(cfg, q_tokens=cfg.chunk_frames * tpf,
                              k_tokens=chunk_key_frames(cfg, 10 ** 6) * tpf, text_tokens=text_tokens,
                              frames=cfg.chunk_frames, tokens_per_frame=tpf)
    return {
        "chunk_latency_ms": percentiles(spans),
        "per_chunk_ms": spans,
        "stages": stages,
        "stage_sum_ms": stage_sum,
        "chunk_span_sum_ms": span_sum,
        "stage_coverage": stage_sum / span_sum if span_sum else None,
        "dit": {
            "flops_total": float(sum(flops)),
            "flops_per_chunk_steady": steady,
            "flops_per_pass_steady": per_pass,
            "passes_per_chunk": 3,
            "time_ms": dit_ms,
            "achieved_tflops": (sum(flops) / (dit_ms * 1e-3) / 1e12) if dit_ms > 0 else None,
            "q_tokens": cfg.chunk_frames * tpf,
            "k_tokens_steady": chunk_key_frames(cfg, 10 ** 6) * tpf,
            "text_tokens": text_tokens,
        },
    }


def tokens_per_frame(engine) -> int:
    h, w = engine.latent_size
    ph, pw = engine.config.patch_size[1:]
    return (h // ph) * (w // pw)


def compile_engine(engine) -> None:
    """``torch.compile`` the student's chunk forward.  Today dynamo recompiles the per-layer attention closure once
    per layer (a guard on the layer index) and once per timestep value, so the recompile limit is raised to cover
    every layer; all of it happens in the warm-up."""
    import torch._dynamo.config as dynamo_config

    need = 4 * engine.config.num_layers + 16
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), need))
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * need)
    engine.model.forward_chunk = torch.compile(engine.model.forward_chunk)


def synthetic_inputs(engine, seconds: float, *, seed: int = 0, max_reference_frames: int = 25,
                     frame_size: tuple[int, int] | None = None):
    """A face clip at the engine's resolution (ping-ponged by the session) and speech-like 16 kHz audio.  With
    ``frame_size`` (H, W), the face (a square of 0.45 x the short side) moves inside frames of that size instead,
    so the session runs the face stage (tracking, ``face_align``, ``paste_back``)."""
    from lipforcing.media import frame_loudness, synthetic_face_clip, synthetic_speech

    pcm = synthetic_speech(seconds, 16000, seed=seed)
    n_ref = max(1, min(max_reference_frames, int(seconds * 25)))
    loud = frame_loudness(pcm, n_ref)
    if frame_size is None:
        return synthetic_face_clip(n_ref, engine.resolution, mouth_open=loud, seed=seed), pcm
    H, W = frame_size
    side = max(16, int(0.45 * min(H, W)))
    faces = synthetic_face_clip(n_ref, side, mouth_open=loud, seed=seed)
    ref = np.empty((n_ref, H, W, 3), np.uint8)
    ref[:] = np.linspace(60, 140, W, dtype=np.float32).astype(np.uint8)[None, :, None]   # a plain gradient
    for i in range(n_ref):
        x0 = int((W - side) / 2 + 0.1 * (W - side) * np.sin(2 * np.pi * i / n_ref))
        y0 = (H - side) // 2
        ref[i, y0:y0 + side, x0:x0 + side] = faces[i]
    return ref, pcm


def run_profile(*, model: str = "tiny", checkpoint: str | None = None, device: str = "cpu", dtype=None,
                chunks: int = 16, warmup: int = 3, compile: bool = False, cuda_graphs: bool = False,
                backend: str = "auto", seed: int = 0, resolution: int | None = None, progress=None,
                engine=None, frame_size: tuple[int, int] | None = None) -> dict:
    """Load an engine (or take ``engine``), warm it up, stream ``chunks`` chunks of synthetic input and return
    every number (the document written by ``--json``).  See the module docstring for what is measured.
    ``progress``: None (quiet) or a factory ``progress(total, desc) -> bar`` of an object with ``update(n)``,
    ``set_description(desc)`` and ``close()`` (e.g. the command layer's progress display)."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    if warmup < 1 or (cuda_graphs and warmup < 2):
        raise ValueError(f"warmup must be >= 1 chunk (>= 2 with CUDA graphs, which are captured at the second), "
                         f"got {warmup}")
    saved_backend = os.environ.get("LIPFORCING_BACKEND")
    if backend != "auto":
        os.environ["LIPFORCING_BACKEND"] = backend
    try:
        return _run_profile(model=model, checkpoint=checkpoint, device=device, dtype=dtype, chunks=chunks,
                            warmup=warmup, compile=compile, cuda_graphs=cuda_graphs, backend=backend, seed=seed,
                            resolution=resolution, progress=progress, engine=engine, frame_size=frame_size)
    finally:
        if backend != "auto":
            if saved_backend is None:
                os.environ.pop("LIPFORCING_BACKEND", None)
            else:
                os.environ["LIPFORCING_BACKEND"] = saved_backend


def _run_profile(*, model, checkpoint, device, dtype, chunks, warmup, compile, cuda_graphs, backend, seed,
                 resolution, progress, engine, frame_size=None) -> dict:
    from lipforcing import Engine
    from lipforcing.benchmarking import environment

    t = time.perf_counter()
    if engine is None:
        engine = Engine.load(checkpoint, model=model, device=device, dtype=dtype, seed=seed, resolution=resolution,
                             cuda_graphs=cuda_graphs)
    load_s = time.perf_counter() - t
    dev = engine.device
    cuda_graphs = engine.cuda_graphs
    if compile:
        compile_engine(engine)
    plan = StreamPlan(engine.first_chunk_frames, engine.chunk_frames, engine.lookahead_samples)
    # other processes competing for the CPU make CPU timings slower: record the load when the run starts
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    timer = StageTimer(dev)
    engine.stage = timer

    warm_utts = [warmup] if warmup == 1 else [warmup - 1, 1]
    warm_frames = sum(plan.frames(c) for c in warm_utts)
    seconds = (warm_frames + plan.frames(chunks)) * 640 / 16000 + 0.5
    ref, pcm = synthetic_inputs(engine, seconds, seed=seed, frame_size=frame_size)
    meas_pcm = pcm[warm_frames * 640: (warm_frames + plan.frames(chunks)) * 640]

    bar = progress(warm_frames + plan.frames(chunks), "warm-up") if progress else None
    t = time.perf_counter()
    session = engine.session(ref, seed=seed)         # full frames: face detection + tracking of the reference here
    face_track_ms = 1e3 * (time.perf_counter() - t) / len(ref) if session.face is not None else None
    try:
        t = time.perf_counter()
        warm_frames_out, pos = 0, 0
        for c in warm_utts:
            n = plan.frames(c) * 640
            warm_frames_out += stream_utterance(session, pcm[pos:pos + n], plan, c, bar).frames
            pos += n
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        warm_s = time.perf_counter() - t
        warm_chunks = timer.chunks()
        timer.clear()
        peak_with_warmup = None
        if dev.type == "cuda":
            peak_with_warmup = int(torch.cuda.max_memory_allocated(dev))
            torch.cuda.reset_peak_memory_stats(dev)
        if bar is not None:
            bar.set_description("measure")
        meas = stream_utterance(session, meas_pcm, plan, chunks, bar)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        meas_chunks = timer.chunks()
    finally:
        session.close()
        if bar is not None:
            bar.close()
        del engine.stage        # back to the engine's no-op hook

    summary = summarize_chunks(engine, meas_chunks)
    decoders = compare_decoders(engine, chunks=min(max(chunks, 2), 8), seed=seed) if engine.decoder is not None \
        else None
    cfg = engine.config
    tpf = tokens_per_frame(engine)
    if dev.type == "cuda":
        memory = {"peak_bytes": int(torch.cuda.max_memory_allocated(dev)), "kind": "torch.cuda.max_memory_allocated",
                  "peak_bytes_with_warmup": peak_with_warmup,
                  "reserved_bytes": int(torch.cuda.max_memory_reserved(dev)),
                  "note": "peak of allocated tensors during the measurement (reset after the warm-up)"}
    else:
        memory = {"peak_bytes": _peak_rss_bytes(), "kind": "process peak RSS",
                  "note": "peak resident set size of the whole process since it started (Python and libraries "
                          "included); weights_bytes and kv_cache_bytes are the tensors the engine holds"}
    memory["weights_bytes"] = _module_bytes(engine.model) + _module_bytes(engine.vae) + (
        _module_bytes(engine.decoder) if engine.decoder is not None else 0)
    memory["model_bytes"] = _module_bytes(engine.model)
    memory["kv_cache_bytes"] = kv_cache_bytes(cfg, tpf, engine.dtype)

    lat = engine.latency_report()
    steady = summary["chunk_latency_ms"]["p50"]
    doc = {
        "schema": "lipforcing.profile/1",
        "model": model if checkpoint is None else os.path.basename(os.fspath(checkpoint)),
        "preset": model,
        "checkpoint": None if checkpoint is None else os.fspath(checkpoint),
        "random_weights": checkpoint is None,
        "config": cfg.to_dict(),
        "device": str(dev),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "backend": backend if backend != "auto" else os.environ.get("LIPFORCING_BACKEND", "auto") or "auto",
        "compile": bool(compile),
        "cuda_graphs": bool(cuda_graphs),
        "threads": torch.get_num_threads(),
        "timer": "cuda_events" if timer.cuda else "perf_counter",
        "resolution": list(engine.resolution),
        "frame_size": list(ref.shape[1:3]),
        "face_track_ms_per_frame": face_track_ms,
        "latent_size": list(engine.latent_size),
        "tokens_per_latent_frame": tpf,
        "chunk_frames": engine.chunk_frames,
        "first_chunk_frames": engine.first_chunk_frames,
        "chunks": chunks,
        "frames": meas.frames,
        "wall_s": meas.wall_s,
        "fps": meas.frames / meas.wall_s if meas.wall_s > 0 else None,
        "steady_state_fps": (engine.chunk_frames * 1e3 / steady) if steady else None,
        "realtime_factor": (meas.frames / meas.wall_s / 25.0) if meas.wall_s > 0 else None,
        "time_to_first_frame_s": meas.first_frame_s,
        "decoder": engine.decoder_name,
        "decoder_comparison": decoders,
        "algorithmic_latency_s": lat["first_chunk_audio_ms"] / 1e3,
        "latency": lat,
        **summary,
        "memory": memory,
        "warmup": {"chunks": warmup, "utterances": warm_utts, "frames": warm_frames_out, "seconds": warm_s, "engine_load_s": load_s,
                   "per_chunk_ms": [c["span_ms"] for c in warm_chunks],
                   "note": "excluded from every other number; includes torch.compile, autotuning and CUDA-graph "
                           "capture when enabled"},
        "environment": {**environment(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                        "load_average_1m": load_avg},
    }
    return doc


def compare_decoders(engine, *, chunks: int = 4, seed: int = 0) -> dict:
    """Decode time of a steady-state chunk (``latent_chunk_frames`` latents -> ``chunk_frames`` frames) for the
    engine's decoder and for the Wan VAE's, on the same random latents, each after its own warm-up (the first
    chunk of a stream, which gives fewer frames, is excluded).  Medians over ``chunks`` chunks, in ms (CUDA events
    on a GPU, ``perf_counter`` on the CPU)."""
    dev = engine.device
    h, w = engine.latent_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    lat = [torch.randn(1, engine.vae.z_dim, engine.latent_chunk_frames, h, w, generator=g).to(dev, engine.vae.dtype)
           for _ in range(chunks + 1)]
    decoders = {engine.decoder_name: engine.stream_decoder()}
    if engine.decoder is not None:
        decoders["wan-vae"] = engine.vae.stream_decoder(latents_per_step=engine.vae_latents_per_step)
    out = {}
    with torch.inference_mode():
        for name, dec in decoders.items():
            dec.decode(lat[0])                       # first chunk of the stream: warm-up, fewer frames
            times = []
            for z in lat[1:]:
                if dev.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    dec.decode(z)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t = time.perf_counter()
                    dec.decode(z)
                    times.append(1e3 * (time.perf_counter() - t))
            dec.flush()
            out[name] = float(np.median(times))
    doc = {"decoder": engine.decoder_name, "latents_per_chunk": engine.latent_chunk_frames,
           "frames_per_chunk": engine.chunk_frames, "chunks": chunks, "ms_per_chunk": out}
    if "wan-vae" in out and engine.decoder is not None:
        doc["speedup_vs_wan_vae"] = out["wan-vae"] / out["taehv"] if out["taehv"] > 0 else None
        doc["taehv_macs_per_frame"] = engine.decoder.decode_macs_per_latent(h, w) // 4
    return doc


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None


# ---------------------------------------------------------------------------------------------------- output
def _gib(n) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _flops_str(x) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def format_report(doc: dict, *, title: str = "lipforcing profile") -> str:
    """The terminal table of a profile document."""
    from lipforcing.engine import STAGES

    env = doc["environment"]
    dev = doc["device"] + (f" ({env['gpu']})" if doc["device"].startswith("cuda") else f" ({doc['threads']} thread{'s' if doc['threads'] != 1 else ''})")
    weights = "random weights" if doc["random_weights"] else f"checkpoint {doc['checkpoint']}"
    lines = [
        f"{title}: model {doc['preset']} ({weights}), {dev}, {doc['dtype']}, backend {doc['backend']}, "
        f"compile {'on' if doc['compile'] else 'off'}, CUDA graphs {'on' if doc['cuda_graphs'] else 'off'}, "
        f"decoder {doc.get('decoder', 'wan-vae')}",
        f"  {doc['resolution'][0]}x{doc['resolution'][1]} face crops, {doc['tokens_per_latent_frame']} tokens per latent "
        f"frame, chunks of {doc['chunk_frames']} frames (first {doc['first_chunk_frames']}); "
        f"torch {env['torch']}, commit {env['commit']}",
        f"  warm-up (excluded): {doc['warmup']['chunks']} chunk{'s' if doc['warmup']['chunks'] != 1 else ''} in {doc['warmup']['seconds']:.2f} s "
        f"(engine load {doc['warmup']['engine_load_s']:.2f} s)",
        f"  measured: {doc['chunks']} chunks, {doc['frames']} frames in {doc['wall_s']:.2f} s"
        + (f" (CPU load average {env['load_average_1m']:.1f} on {env['cpu_count']} cores at the start)"
           if doc["device"] == "cpu" and env.get("load_average_1m") is not None else ""),
        "",
    ]
    lat = doc["chunk_latency_ms"]
    rows = [
        ("FPS", f"{doc['fps']:.2f}", f"real time is 25; x{doc['realtime_factor']:.2f}"),
        ("steady-state FPS", f"{doc['steady_state_fps']:.2f}", f"{doc['chunk_frames']} frames / p50 chunk latency"),
        ("time to first frame", f"{doc['time_to_first_frame_s']:.3f} s",
         f"compute; + {doc['algorithmic_latency_s']:.3f} s of audio buffering"),
        ("chunk latency", f"{lat['p50']:.1f} ms", f"p50; p90 {lat['p90']:.1f}, p99 {lat['p99']:.1f}, "
                                                  f"max {lat['max']:.1f} ms"),
        ("peak memory", _gib(doc["memory"]["peak_bytes"]), f"{doc['memory']['kind']}; weights "
                                                           f"{_gib(doc['memory']['weights_bytes'])}, KV cache "
                                                           f"{_gib(doc['memory']['kv_cache_bytes'])}"),
    ]
    dit = doc["dit"]
    if dit["achieved_tflops"] is not None:
        rows.append(("DiT throughput", _flops_str(dit["achieved_tflops"] * 1e12) + "/s",
                     f"{_flops_str(dit['flops_per_chunk_steady'])}/chunk (3 passes, Lq {dit['q_tokens']}, "
                     f"Lk {dit['k_tokens_steady']})"))
    cmp = doc.get("decoder_comparison")
    if cmp:
        ms = cmp["ms_per_chunk"]
        speed = cmp.get("speedup_vs_wan_vae")
        rows.append((f"decode ({cmp['decoder']})", f"{ms[cmp['decoder']]:.2f} ms",
                     f"per {cmp['frames_per_chunk']}-frame chunk; wan-vae {ms['wan-vae']:.2f} ms on the same "
                     f"latents" + (f" ({speed:.1f}x)" if speed else "")))
    if doc.get("face_track_ms_per_frame") is not None:
        fs = doc["frame_size"]
        rows.append(("face tracking", f"{doc['face_track_ms_per_frame']:.2f} ms",
                     f"per {fs[1]}x{fs[0]} reference frame, once when the session opens (detection, landmarks, "
                     "smoothing); not in the chunk stages"))
    for name, value, note in rows:
        lines.append(f"  {name:<22}{value:>16}   {note}")
    lines += ["", f"  {'stage':<22}{'ms/chunk':>16}{'share':>9}"]
    for s in STAGES:
        st = doc["stages"][s]
        lines.append(f"  {s:<22}{st['mean_ms_per_chunk']:>16.2f}{100 * st['share']:>8.1f}%")
    n = max(1, doc["chunks"])
    lines.append(f"  {'sum of stages':<22}{doc['stage_sum_ms'] / n:>16.2f}")
    cov = doc["stage_coverage"]
    lines.append(f"  {'chunk (first to last stage)':<28}{doc['chunk_span_sum_ms'] / n:>10.2f}"
                 f"{'' if cov is None else f'   stages cover {100 * cov:.1f}%'}")
    return "\n".join(lines)


_COLORS = {"audio_features": "#8dd3c7", "vae_encode": "#80b1d3", "dit_pass_1": "#fb8072", "denoise_update": "#ffed6f",
           "dit_pass_2": "#e15759", "vae_decode": "#bebada", "cache_write": "#fdb462", "face_align": "#b3de69",
           "paste_back": "#fccde5"}


def plot_profile(doc: dict, path: str) -> None:
    """PNG: mean time per stage (bars, with shares) and per-chunk latency over the stream (stacked by stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lipforcing.engine import STAGES

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [1, 1.4]})
    means = [doc["stages"][s]["mean_ms_per_chunk"] for s in STAGES]
    y = np.arange(len(STAGES))[::-1]
    ax1.barh(y, means, color=[_COLORS[s] for s in STAGES], edgecolor="#444444", linewidth=0.5)
    ax1.set_yticks(y, STAGES)
    ax1.set_xlabel("ms per chunk (mean)")
    ax1.set_title("stage breakdown")
    top = max(means) if max(means) > 0 else 1.0
    for yi, m, s in zip(y, means, STAGES):
        ax1.text(m + 0.01 * top, yi, f"{m:.1f} ms  {100 * doc['stages'][s]['share']:.0f}%", va="center", fontsize=8)
    ax1.set_xlim(0, top * 1.35)
    ax1.grid(axis="x", alpha=0.3)

    idx = np.arange(len(doc["per_chunk_ms"]))
    bottom = np.zeros(len(idx))
    for s in STAGES:
        vals = np.asarray(doc["stages"][s]["per_chunk_ms"], dtype=float)
        ax2.bar(idx, vals, bottom=bottom, width=0.8, color=_COLORS[s], label=s, linewidth=0)
        bottom += vals
    ax2.plot(idx, doc["per_chunk_ms"], color="black", linewidth=1.0, marker="o", markersize=2.5,
             label="chunk latency")
    budget = doc["chunk_frames"] * 40.0
    lat = doc["chunk_latency_ms"]
    right = idx[-1] + 0.5 if len(idx) else 0.5
    top = max(doc["per_chunk_ms"], default=1.0) * 1.3
    # The reference lines are named in the legend below the axes, never by text inside them: a label drawn at
    # the line would sit on the bars whenever the chunks come close to (or exceed) the line.
    budget_label = f"real-time budget: {budget:.0f} ms per {doc['chunk_frames']} frames"
    if budget <= 2 * top:       # the real-time line, when it does not squash the bars
        top = max(top, budget * 1.1)
        ax2.axhline(budget, color="#2a9d8f", linestyle="--", linewidth=1.2, label=budget_label)
    else:
        ax2.plot([], [], color="#2a9d8f", linestyle="--", linewidth=1.2, label=budget_label + " (off the scale)")
    for q, style in (("p50", ":"), ("p99", "-.")):
        ax2.axhline(lat[q], color="#333333", linestyle=style, linewidth=0.9, label=f"{q} chunk latency {lat[q]:.1f} ms")
    ax2.set_ylim(0, top)
    ax2.set_xlim(-0.5, right)
    ax2.set_xlabel("chunk of the measured utterance (chunk 0 has 9 frames, the others 12)")
    ax2.set_ylabel("ms")
    ax2.set_title("per-chunk latency, stacked by stage")
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, ncol=4, frameon=False)
    ax2.grid(axis="y", alpha=0.3)
    env = doc["environment"]
    where = env["gpu"] if doc["device"].startswith("cuda") else f"CPU, {doc['threads']} thread{'s' if doc['threads'] != 1 else ''}"
    fig.suptitle(f"lipforcing {doc['preset']} ({'random weights' if doc['random_weights'] else 'checkpoint'}), "
                 f"{doc['resolution'][0]}x{doc['resolution'][1]}, {doc['dtype']}, {where}:  "
                 f"{doc['fps']:.1f} FPS, first frame {doc['time_to_first_frame_s'] * 1e3:.0f} ms, "
                 f"p50 chunk {lat['p50']:.0f} ms", fontsize=10)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(doc: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
