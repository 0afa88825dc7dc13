"""The :class:`Session`: one stream of one :class:`~lipforcing.engine.Engine`, push audio, pull lip-synced frames
(the timeline, chunking and utterance rules are in the package docstring, :mod:`lipforcing.engine`)."""
from __future__ import annotations

import math
import threading
from collections import deque
from typing import Iterator

import torch

from lipforcing import face
from lipforcing.audio.features import num_frames
from lipforcing.audio.pcm import (FPS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SAMPLE_RATE, SAMPLES_PER_FRAME,
                                  check_sample_rate, to_mono_float)
from lipforcing.config import VIDEO_FRAMES_PER_LATENT
from lipforcing.engine.chunk_step import ChunkGraphs, ChunkRunner
from lipforcing.engine.engine import Engine, check_seed
from lipforcing.engine.frame import Frame, PcmBuffer, Utterance, chunk_span, chunks_for

__all__ = ["Session"]


class Session:
    """One stream: push audio, pull lip-synced frames.  Open with :meth:`Engine.session`; see the package docstring
    for the timeline, chunking and utterance rules.  Thread-safe (one lock per session; chunk steps of all the
    engine's sessions are serialised)."""

    def __init__(self, engine: Engine, reference, *, sample_rate: int = SAMPLE_RATE, seed: int = 0,
                 max_buffer_seconds: float = 60.0):
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a lipforcing.Engine, got {type(engine).__name__}")
        self.engine = engine
        self.sample_rate = check_sample_rate(sample_rate)
        if not MIN_SAMPLE_RATE <= self.sample_rate <= MAX_SAMPLE_RATE:
            raise ValueError(f"sample_rate must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz, got "
                             f"{self.sample_rate}")
        self.seed = check_seed(seed)
        if (isinstance(max_buffer_seconds, bool) or not isinstance(max_buffer_seconds, (int, float))
                or not max_buffer_seconds > 0 or math.isinf(max_buffer_seconds)):
            raise ValueError(f"max_buffer_seconds must be a positive finite number, got {max_buffer_seconds!r}")
        min_buffer = (engine.first_chunk_frames + engine.chunk_frames) * SAMPLES_PER_FRAME + engine.lookahead_samples
        self.max_buffer_samples = max(int(max_buffer_seconds * SAMPLE_RATE), min_buffer)
        self.reference = engine._reference_frames(reference)
        self._lock = threading.RLock()
        self._resampler = None
        if self.sample_rate != SAMPLE_RATE:
            from lipforcing.audio import Resampler

            self._resampler = Resampler(self.sample_rate, SAMPLE_RATE)
        self._raw = PcmBuffer()                  # input-rate samples not yet resampled
        self._raw_block = max(1, self.sample_rate // 50)
        self._utts: deque[Utterance] = deque()
        self._ready: deque[Frame] = deque()
        self._delivered = 0                       # frames taken by the host (next index after an interrupt)
        self._chunk_id = 0
        self._runner: ChunkRunner | None = None
        self._runner_utt: Utterance | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def frames_delivered(self) -> int:
        return self._delivered

    @property
    def buffered_samples(self) -> int:
        """16 kHz samples held (audio not yet turned into frames, plus what the resampler holds back)."""
        return sum(u.pcm.held for u in self._utts) + self._raw.held

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the session is closed (close() was called); open a new one with engine.session(...)")

    def _open_utterance(self) -> Utterance:
        if self._utts and not self._utts[-1].closed:
            return self._utts[-1]
        if self._utts:
            last = self._utts[-1]
            first = last.first_index + last.num_frames
        else:
            first = self._delivered + len(self._ready)
        utt = Utterance(first)
        self._utts.append(utt)
        return utt

    # ---------------------------------------------------------------------------------------------------- input
    def push_audio(self, pcm, *, sample_rate: int | None = None) -> None:
        """Append mono speech: 1-D numpy/torch, int16 (scaled by 1/32768) or float32/float64 in [-1, 1], any
        length, at the session's ``sample_rate`` (``sample_rate=`` may restate it; a different rate raises).
        Nothing is computed here.  Bad input raises (TypeError / ValueError) and leaves the session unchanged;
        BufferError when more than ``max_buffer_seconds`` of audio would be waiting (drain ``frames()``)."""
        with self._lock:
            self._check_open()
            if sample_rate is not None and check_sample_rate(sample_rate) != self.sample_rate:
                raise ValueError(f"sample_rate={sample_rate} differs from the session's {self.sample_rate} Hz; "
                                 "open a new session for another rate")
            x = to_mono_float(pcm, self.sample_rate)
            if x.device.type != "cpu":
                x = x.cpu()
            incoming = x.numel() if self._resampler is None else -(-x.numel() * SAMPLE_RATE // self.sample_rate)
            if self.buffered_samples + incoming > self.max_buffer_samples:
                raise BufferError(f"the session holds {self.buffered_samples / SAMPLE_RATE:.2f} s of audio that has "
                                  f"not been turned into frames yet; {incoming / SAMPLE_RATE:.2f} s more would exceed "
                                  f"max_buffer_seconds={self.max_buffer_samples / SAMPLE_RATE:g}: drain frames() first")
            if not x.numel():
                return
            utt = self._open_utterance()
            if self._resampler is None:
                utt.pcm.append(x)
                return
            # feed the resampler in fixed-size blocks so its output does not depend on the push sizes
            self._raw.append(x)
            n = (self._raw.held // self._raw_block) * self._raw_block
            if n:
                block = self._raw.read(self._raw.start, self._raw.start + n)
                self._raw.drop_before(self._raw.start + n)
                utt.pcm.append(self._resampler.push(block.contiguous()))

    def end_of_speech(self) -> None:
        """End the current utterance: its last chunk is computed on audio padded with silence, and only the
        frames covered by real audio (a partial last frame counts) are emitted.  No-op without pending audio."""
        with self._lock:
            self._check_open()
            if not self._utts or self._utts[-1].closed:
                return
            utt = self._utts[-1]
            if self._resampler is not None:
                rest = self._raw.read(self._raw.start, self._raw.end)
                self._raw = PcmBuffer()
                tail = self._resampler.push(rest.contiguous()) if rest.numel() else rest
                utt.pcm.append(tail)
                utt.pcm.append(self._resampler.flush())
                self._resampler.reset()
            e = self.engine
            utt.closed = True
            utt.num_frames = num_frames(utt.pcm.end)
            utt.num_chunks = chunks_for(utt.num_frames, e.first_chunk_frames, e.chunk_frames)
            if utt.num_chunks == 0 or utt.chunks_done >= utt.num_chunks:
                if utt.chunks_done == 0:
                    self._utts.pop()
                return
            _, hi = chunk_span(utt.num_chunks - 1, e.first_chunk_frames, e.chunk_frames)
            pad = hi * SAMPLES_PER_FRAME - utt.pcm.end
            if pad > 0:
                utt.pcm.append(torch.zeros(pad))

    def interrupt(self) -> None:
        """Drop the buffered audio and every frame not yet taken; the next ``push_audio`` starts a new utterance
        whose first frame gets the index after the last frame delivered.  The session stays usable."""
        with self._lock:
            self._check_open()
            self._utts.clear()
            self._ready.clear()
            self._raw = PcmBuffer()
            if self._resampler is not None:
                self._resampler.reset()
            self._runner_utt = None

    def close(self) -> None:
        """Release the session's state (caches, buffers, graphs).  Further calls raise RuntimeError."""
        with self._lock:
            self._closed = True
            self._utts.clear()
            self._ready.clear()
            self._raw = PcmBuffer()
            self._runner = None
            self._runner_utt = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------------------------------- output
    def frames(self) -> Iterator[Frame]:
        """Yield the frames that can be produced now, computing chunks as the iterator advances, then return
        (never waits for audio).  After ``end_of_speech()`` this yields all the remaining frames."""
        self._check_open()
        return self._drain()

    def _drain(self) -> Iterator[Frame]:
        while True:
            with self._lock:
                if self._closed:
                    return
                if not self._ready and not self._step():
                    return
                frame = self._ready.popleft()
                self._delivered = frame.index + 1
            yield frame

    def _next_work(self) -> tuple[Utterance, int] | None:
        e = self.engine
        while self._utts:
            utt = self._utts[0]
            c = utt.chunks_done
            if utt.closed:
                if c < utt.num_chunks:
                    return utt, c
                self._utts.popleft()
                continue
            _, hi = chunk_span(c, e.first_chunk_frames, e.chunk_frames)
            if utt.pcm.end >= hi * SAMPLES_PER_FRAME + e.lookahead_samples:
                return utt, c
            return None
        return None

    def _step(self) -> bool:
        """Compute one chunk if one is ready; append its frames to the ready queue."""
        work = self._next_work()
        if work is None:
            return False
        utt, c = work
        e = self.engine
        with e._lock, torch.no_grad():
            if self._runner is None:
                self._runner = ChunkRunner(e, self.seed)
            runner = self._runner
            if self._runner_utt is not utt:
                if c != 0:
                    raise AssertionError("an utterance must start at its first chunk")
                runner.reset()
                self._runner_utt = utt
            self._ready.extend(self._compute(runner, utt, c))
        utt.chunks_done += 1
        if utt.closed and utt.chunks_done >= utt.num_chunks:
            self._utts.popleft()
        return True

    def _compute(self, runner: ChunkRunner, utt: Utterance, c: int) -> list[Frame]:
        e = self.engine
        lo, hi = chunk_span(c, e.first_chunk_frames, e.chunk_frames)
        last = utt.closed and c == utt.num_chunks - 1
        chunk_id = self._chunk_id
        with e.stage("audio_features"):
            feats = runner.features(utt, lo, hi, last).to(e.device)
            if c == 0:
                from lipforcing.model.audio import group_audio_frames

                audio = group_audio_frames(feats[None])
            else:
                audio = feats.reshape(1, -1, VIDEO_FRAMES_PER_LATENT, feats.shape[-1])
        with e.stage("vae_encode"):
            n_ref = self.reference.shape[0]
            idx = torch.tensor([face.pingpong_index(utt.first_index + f, n_ref) for f in range(lo, hi)])
            y = runner.conditioning(self.reference[idx])
        if e.cuda_graphs and runner.graphs is None and self._chunk_id > 0:
            runner.graphs = ChunkGraphs(e, runner.state, y, audio, self.seed)
        x0, write = runner.dit(y, audio, chunk_id)
        with e.stage("vae_decode"):
            video = runner.dec.decode(x0)                                   # (1, 3, n, H, W) in [-1, 1]
            images = ((video[0].float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
            images = images.permute(1, 2, 3, 0).contiguous().cpu().numpy()  # (n, H, W, 3)
        with e.stage("cache_write"):
            write()
        self._chunk_id += 1
        n_emit = hi if utt.num_frames is None else min(hi, utt.num_frames)
        pcm = utt.pcm.read(lo * SAMPLES_PER_FRAME, hi * SAMPLES_PER_FRAME).numpy()
        out = []
        for f in range(lo, n_emit):
            index = utt.first_index + f
            a = pcm[(f - lo) * SAMPLES_PER_FRAME:(f - lo + 1) * SAMPLES_PER_FRAME].copy()
            out.append(Frame(index=index, pts=index / FPS, image=images[f - lo], audio=a, chunk_id=chunk_id))
        # keep only what later chunks need: frame audio from hi on, and samples not yet fed to the features
        utt.pcm.drop_before(min(hi * SAMPLES_PER_FRAME, runner.fed))
        return out
