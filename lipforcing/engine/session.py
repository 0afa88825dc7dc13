"""The :class:`Session`: one stream of one :class:`~lipforcing.engine.Engine`, push audio, pull lip-synced frames
(the timeline, chunking and utterance rules are in the package docstring, :mod:`lipforcing.engine`).

The session never computes: ``push_audio`` buffers, the engine's :class:`~lipforcing.engine.scheduler.Scheduler`
takes the chunks that are ready (:meth:`Session._take_job`, under the session's lock) and hands the frames back
(:meth:`Session._finish`); ``frames()`` / ``aframes()`` hand them out.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from typing import AsyncIterator, Iterator

import torch

from lipforcing import face
from lipforcing.audio.features import num_frames
from lipforcing.audio.pcm import (FPS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SAMPLE_RATE, SAMPLES_PER_FRAME,
                                  check_sample_rate, to_mono_float)
from lipforcing.engine.chunk_step import ChunkJob, ChunkRunner
from lipforcing.engine.engine import Engine, check_seed
from lipforcing.engine.frame import Frame, PcmBuffer, Utterance, chunk_span, chunks_for
from lipforcing.engine.reference import prepare_reference

__all__ = ["Session"]

_READY_SECONDS = 4.0     # frames computed but not taken beyond which the scheduler stops computing for a session


class Session:
    """One stream: push audio, pull lip-synced frames.  Open with :meth:`Engine.session`; see the package docstring
    for the timeline, chunking and utterance rules.  Thread-safe: any thread (or an asyncio task) may push and
    pull; the chunks are computed by the engine's scheduler thread, batched with other sessions' chunks."""

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
        self.max_ready_frames = max(int(_READY_SECONDS * FPS), engine.first_chunk_frames + engine.chunk_frames)
        ref = prepare_reference(engine, reference)  # full frames: face track (Reference objects pass through)
        self.reference = ref.frames                  # (N, H, W, 3) uint8: the crops, or the full frames
        self.face = ref.face                         # None for aligned crops, else the face stage (reference.py)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._resampler = None
        if self.sample_rate != SAMPLE_RATE:
            from lipforcing.audio import Resampler

            self._resampler = Resampler(self.sample_rate, SAMPLE_RATE)
        self._raw = PcmBuffer()                  # input-rate samples not yet resampled
        self._raw_block = max(1, self.sample_rate // 50)
        self._utts: deque[Utterance] = deque()
        self._ready: deque[Frame] = deque()
        self._delivered = 0                       # frames taken by the host (next index after an interrupt)
        self._last_chunk = -1                     # chunk_id of the last frame taken
        self._chunk_id = 0
        self._runner: ChunkRunner | None = None   # touched by the scheduler's thread only
        self._runner_utt: Utterance | None = None
        self._closed = False
        self._epoch = 0                           # bumped by interrupt() / close(): results of older jobs are dropped
        self._busy = False                        # a chunk of this session is in the scheduler
        self._error: BaseException | None = None
        self._waiters: list = []                  # (loop, future) of aframes() / apush_audio() waiting
        self.chunk_latencies: deque[float] = deque(maxlen=1024)
        """Seconds from a chunk's audio being complete to its frames being ready (the latest 1024 chunks)."""
        engine.scheduler.register(self)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def frames_delivered(self) -> int:
        return self._delivered

    @property
    def buffered_samples(self) -> int:
        """16 kHz samples held (audio not yet turned into frames, plus what the resampler holds back)."""
        with self._lock:
            return sum(u.pcm.held for u in self._utts) + self._raw.held

    @property
    def frames_ready(self) -> int:
        """Frames computed and not yet taken."""
        return len(self._ready)

    @property
    def pending_chunks(self) -> int:
        """Chunks whose audio is complete but whose frames are not computed yet (in flight included)."""
        with self._lock:
            return sum((u.ready_count - u.chunks_done) for u in self._utts)

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
        utt = Utterance(first, time.perf_counter())
        self._utts.append(utt)
        return utt

    def _mark_ready(self, utt: Utterance) -> bool:
        """Count the chunks of ``utt`` whose audio is now complete (time-stamped for the latency numbers)."""
        e = self.engine
        if utt.closed:
            n = utt.num_chunks
        else:
            n = utt.ready_count
            while utt.pcm.end >= chunk_span(n, e.first_chunk_frames, e.chunk_frames)[1] * SAMPLES_PER_FRAME \
                    + e.lookahead_samples:
                n += 1
        if n <= utt.ready_count:
            return False
        now = time.perf_counter()
        for c in range(utt.ready_count, n):
            utt.ready_times[c] = now
        utt.ready_count = n
        return True

    def _notify(self) -> None:
        """Wake every thread and task waiting on this session (call with the lock held)."""
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:          # the loop is closed
                pass

    # ---------------------------------------------------------------------------------------------------- input
    def push_audio(self, pcm, *, sample_rate: int | None = None) -> None:
        """Append mono speech: 1-D numpy/torch, int16 (scaled by 1/32768) or float32/float64 in [-1, 1], any
        length, at the session's ``sample_rate`` (``sample_rate=`` may restate it; a different rate raises).
        Nothing is computed here (the engine's scheduler computes the chunks this audio completes).  Bad input
        raises (TypeError / ValueError) and leaves the session unchanged; BufferError when more than
        ``max_buffer_seconds`` of audio would be waiting (drain ``frames()``, or use :meth:`apush_audio`, which
        waits for room)."""
        if self._push(pcm, sample_rate):
            self.engine.scheduler.notify()

    def _push(self, pcm, sample_rate) -> bool:
        """push_audio under the lock; True when a chunk became ready."""
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
                return False
            utt = self._open_utterance()
            if self._resampler is None:
                utt.pcm.append(x)
                return self._mark_ready(utt)
            # feed the resampler in fixed-size blocks so its output does not depend on the push sizes
            self._raw.append(x)
            n = (self._raw.held // self._raw_block) * self._raw_block
            if n:
                block = self._raw.read(self._raw.start, self._raw.start + n)
                self._raw.drop_before(self._raw.start + n)
                utt.pcm.append(self._resampler.push(block.contiguous()))
            return self._mark_ready(utt)

    def end_of_speech(self) -> int | None:
        """End the current utterance: its last chunk is computed on audio padded with silence, and only the
        frames covered by real audio (a partial last frame counts) are emitted; ``frames()`` then waits for them.
        Returns the index after the utterance's last frame (a host can mark the segment's end when that frame
        has been shown), or None (a no-op) without pending audio."""
        work, end = self._end_of_speech()
        if work:
            self.engine.scheduler.notify()
        return end

    def _end_of_speech(self) -> tuple[bool, int | None]:
        with self._lock:
            self._check_open()
            if not self._utts or self._utts[-1].closed:
                return False, None
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
                self._notify()
                return False, (utt.first_index + utt.num_frames if utt.num_frames else None)
            _, hi = chunk_span(utt.num_chunks - 1, e.first_chunk_frames, e.chunk_frames)
            pad = hi * SAMPLES_PER_FRAME - utt.pcm.end
            if pad > 0:
                utt.pcm.append(torch.zeros(pad))
            self._mark_ready(utt)
            return True, utt.first_index + utt.num_frames

    def interrupt(self) -> None:
        """Barge-in: drop the buffered audio, the queued chunks and every frame not yet taken (a chunk being
        computed for this session is discarded when it finishes).  The next ``push_audio`` starts a new utterance
        whose first frame gets the index after the last frame delivered.  The session stays usable."""
        with self._lock:
            self._check_open()
            self._drop()
            self._notify()

    def _drop(self) -> None:
        self._utts.clear()
        self._ready.clear()
        self._raw = PcmBuffer()
        if self._resampler is not None:
            self._resampler.reset()
        self._epoch += 1
        self._chunk_id = self._last_chunk + 1     # chunk ids (and so the noise) follow the frames delivered
        if not self._busy:
            self._runner_utt = None

    def close(self) -> None:
        """Release the session's state (caches, buffers, graphs) and leave the scheduler.  Further calls raise
        RuntimeError; a ``frames()`` or ``aframes()`` waiting in another thread or task returns."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop()
            self._runner = None
            self._notify()
        self.engine.scheduler.unregister(self)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------------------------------- output
    def frames(self, block: bool | None = None, timeout: float | None = None) -> Iterator[Frame]:
        """Yield the frames that are ready, in order; never computes (the scheduler does).

        block=None (default): what is ready now, and after ``end_of_speech()`` every remaining frame of the ended
        utterance (waiting for them).  block=False: only what is ready now.  block=True: also wait for every chunk
        the audio pushed so far completes.  ``timeout`` (seconds) bounds the total wait.  A failed chunk step
        raises here (once; the session drops that utterance and stays usable)."""
        self._check_open()
        if timeout is not None and not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                        and timeout >= 0):
            raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
        if block not in (None, True, False):
            raise TypeError(f"block must be None, True or False, got {block!r}")
        return self._iter(block, timeout)

    def _iter(self, block, timeout) -> Iterator[Frame]:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while True:
                    frame = self._pop()
                    if frame is not None:
                        break
                    if self._closed or not self._should_wait(block):
                        return
                    if end is None:
                        self._cond.wait()
                    else:
                        left = end - time.monotonic()
                        if left <= 0:
                            return
                        self._cond.wait(left)
            yield frame

    def _pop(self) -> Frame | None:
        """The next ready frame (lock held), raising a failed step's error first."""
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if not self._ready:
            return None
        wake = len(self._ready) >= self.max_ready_frames
        frame = self._ready.popleft()
        self._delivered = frame.index + 1
        self._last_chunk = frame.chunk_id
        if wake:                                   # the scheduler had stopped for this session: resume it
            self.engine.scheduler.notify()
        return frame

    def _should_wait(self, block) -> bool:
        if block is False:
            return False
        if block is True:
            return self._busy or self._next_work() is not None
        return any(u.closed and u.chunks_done < u.num_chunks for u in self._utts)   # an ended utterance's rest

    async def aframes(self, *, follow: bool = True) -> AsyncIterator[Frame]:
        """``async for frame in session.aframes()``: the frames in order as the scheduler produces them, without
        blocking the event loop.  follow=True: until the session is closed (a host's output loop);
        follow=False: until nothing more can come from the audio pushed so far (like ``frames(block=True)``)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        while True:
            fut = loop.create_future()
            with self._lock:
                frame = self._pop()
                if frame is None:
                    if self._closed or (not follow and not self._should_wait(True)):
                        return
                    self._waiters.append((loop, fut))
            if frame is not None:
                yield frame
                continue
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()

    async def apush_audio(self, pcm, *, sample_rate: int | None = None, timeout: float | None = None) -> None:
        """``await session.apush_audio(pcm)``: :meth:`push_audio` that waits (without blocking the event loop)
        while the buffer is full, pushing as much as fits at a time, instead of raising; BufferError only after
        ``timeout`` seconds, if given.  Frames must be taken meanwhile (e.g. by an ``aframes()`` task), or the
        buffer never drains.  Same frames as one ``push_audio`` of the whole piece."""
        with self._lock:
            self._check_open()
            if sample_rate is not None and check_sample_rate(sample_rate) != self.sample_rate:
                raise ValueError(f"sample_rate={sample_rate} differs from the session's {self.sample_rate} Hz; "
                                 "open a new session for another rate")
        x = to_mono_float(pcm, self.sample_rate)            # validated once; the pieces are float32 slices of it
        if x.device.type != "cpu":
            x = x.cpu()
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        pos = 0
        while pos < x.numel():
            fut = loop.create_future()
            with self._lock:
                self._check_open()
                free = self.max_buffer_samples - self.buffered_samples        # 16 kHz samples
                fit = free if self._resampler is None else (free * self.sample_rate) // SAMPLE_RATE - 1
                n = min(x.numel() - pos, max(0, fit))
                if n > 0:
                    self.push_audio(x[pos:pos + n])
                    pos += n
                    continue
                if end is not None and loop.time() >= end:
                    raise BufferError(f"the session's buffer stayed full for {timeout:g} s (max_buffer_seconds="
                                      f"{self.max_buffer_samples / SAMPLE_RATE:g}): take its frames")
                self._waiters.append((loop, fut))
            try:
                if end is None:
                    await fut
                else:
                    await asyncio.wait_for(fut, max(0.0, end - loop.time()))
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------------------------------------------ scheduler
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

    def _next_deadline(self) -> float | None:
        """When the first frame of this session's next ready chunk is due (perf_counter seconds), or None when it
        has nothing for the scheduler (no ready chunk, one in flight, too many frames not taken, closed)."""
        with self._lock:
            if self._closed or self._busy or self._error is not None or len(self._ready) >= self.max_ready_frames:
                return None
            work = self._next_work()
            if work is None:
                return None
            utt, c = work
            lo, _ = chunk_span(c, self.engine.first_chunk_frames, self.engine.chunk_frames)
            return utt.t_start + lo / FPS

    def _take_job(self) -> ChunkJob | None:
        """Hand the next ready chunk to the scheduler: read what it needs from the buffers (under the lock) and
        mark the session busy until :meth:`_finish` or :meth:`_fail`."""
        with self._lock:
            if self._closed or self._busy or self._error is not None:
                return None
            work = self._next_work()
            if work is None:
                return None
            utt, c = work
            e = self.engine
            lo, hi = chunk_span(c, e.first_chunk_frames, e.chunk_frames)
            last = utt.closed and c == utt.num_chunks - 1
            if self._runner is None:
                self._runner = ChunkRunner(e, self.seed)
            runner = self._runner
            reset = self._runner_utt is not utt
            if reset:
                if c != 0:
                    raise AssertionError("an utterance must start at its first chunk")
                self._runner_utt = utt
            fed = 0 if reset else runner.fed
            need = runner.need(utt.pcm.end, hi, last)
            samples = utt.pcm.read(fed, need) if need > fed else None
            frame_audio = utt.pcm.read(lo * SAMPLES_PER_FRAME, hi * SAMPLES_PER_FRAME).numpy()
            n_ref = self.reference.shape[0]
            idx = torch.tensor([face.pingpong_index(utt.first_index + f, n_ref) for f in range(lo, hi)])
            # keep only what later chunks need: frame audio from hi on, and samples not yet fed to the features
            utt.pcm.drop_before(min(hi * SAMPLES_PER_FRAME, need))
            job = ChunkJob(session=self, runner=runner, c=c, lo=lo, hi=hi, last=last, first_index=utt.first_index,
                           n_emit=hi if utt.num_frames is None else min(hi, utt.num_frames),
                           chunk_id=self._chunk_id, samples=samples, frame_audio=frame_audio,
                           reference=self.reference[idx], face=self.face, ref_index=idx, reset=reset,
                           epoch=self._epoch,
                           deadline=utt.t_start + lo / FPS, capture_graphs=e.cuda_graphs and self._chunk_id > 0,
                           utt=utt)
            self._chunk_id += 1
            self._busy = True
            self._notify()                         # buffered audio shrank: apush_audio may go on
            return job

    def _finish(self, job: ChunkJob, frames: list[Frame]) -> float | None:
        """The scheduler's result for ``job``; returns when the chunk's audio was complete (None if dropped)."""
        with self._lock:
            self._busy = False
            if job.epoch != self._epoch or self._closed:
                self._runner_utt = None            # the runner went past a dropped chunk: reset it at the next one
                self._notify()
                return None
            utt = job.utt
            self._ready.extend(frames)
            utt.chunks_done += 1
            if utt.closed and utt.chunks_done >= utt.num_chunks and self._utts and self._utts[0] is utt:
                self._utts.popleft()
            ready_at = utt.ready_times.pop(job.c, None)
            if ready_at is not None:
                self.chunk_latencies.append(time.perf_counter() - ready_at)
            self._notify()
            return ready_at

    def _fail(self, job: ChunkJob | None, exc: BaseException) -> None:
        """A chunk step failed: the error is raised by the next frames(); that utterance is dropped."""
        with self._lock:
            if job is not None:
                self._busy = False
            self._runner_utt = None
            if (job is None or job.epoch == self._epoch) and not self._closed:
                self._error = exc
                self._utts.clear()
                self._epoch += 1
                self._chunk_id = self._last_chunk + 1
            self._notify()


def _resolve(fut) -> None:
    if not fut.done():
        fut.set_result(None)
