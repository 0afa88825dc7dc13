"""The scheduler: one worker thread per :class:`~lipforcing.engine.Engine` owns the device and runs every chunk step.

Sessions only buffer audio and hand out finished frames; the worker picks the chunks that are ready, **earliest
deadline first** (a chunk's deadline is when its first frame is due: the wall time its utterance started plus the
frame's pts within the utterance, so a session whose output would run dry first goes first and none starves),
takes up to ``max_batch`` of them (one per session) and runs them as one chunk step: the DiT passes at batch B,
each session with its own KV caches, noise and conditioning (:func:`~lipforcing.engine.chunk_step.run_chunk_step`;
on the CPU bit-exact with running each alone).

Threading: the worker is a daemon thread (it never keeps the interpreter alive), started with the first session and
ended when no session is open (or by :meth:`Scheduler.close` / ``engine.close()``).  It touches a session's
buffers only under that session's lock, and computes outside it, so ``push_audio`` and ``frames()`` never wait for
the model.  Results of a chunk whose session was interrupted or closed while it ran are dropped.

Admission control: :meth:`capacity` estimates how many real-time sessions the engine holds from the measured chunk
steps (a chunk of 12 frames lasts 480 ms of audio; 20 % headroom); ``max_sessions`` of the engine decides what
:meth:`admit` refuses (an int, ``"auto"`` for the measured capacity, or None for no limit).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import logging
import threading
import time
import weakref

import numpy as np

from lipforcing.audio.pcm import FPS
from lipforcing.engine.chunk_step import run_chunk_step

logger = logging.getLogger("lipforcing.engine")

__all__ = ["Scheduler", "AdmissionError"]

_HEADROOM = 0.8          # admit sessions up to 80 % of the real-time budget
_IDLE_POLL_S = 0.5       # the worker re-checks for closed / collected sessions this often when idle
_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    # A daemon thread killed inside a torch kernel at interpreter exit aborts the process ("terminate called
    # without an active exception"): stop every worker after its step in flight, before finalisation.
    for sched in list(_LIVE):
        sched.close(timeout=30.0)


class AdmissionError(RuntimeError):
    """The engine is full: opening another session would make the open ones fall behind real time."""


class Scheduler:
    """The worker of one engine.  ``max_batch``: most sessions per chunk step (1 = no batching)."""

    def __init__(self, engine, *, max_batch: int = 8, max_sessions=None):
        self.engine = engine
        self.configure(max_batch=max_batch, max_sessions=max_sessions)
        self._cond = threading.Condition()
        self._sessions: weakref.WeakSet = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._wake = False
        self._closed = False
        self._paused = 0
        self._seq = itertools.count()
        # measurements (under _cond)
        self.steps = 0
        self.chunks = 0
        self._batch_counts: collections.Counter = collections.Counter()
        self._step_s: dict[int, float] = {}              # EMA of the step time per batch size
        self._latency = collections.deque(maxlen=2048)   # per chunk: seconds from audio ready to frames ready
        self._step_times = collections.deque(maxlen=2048)
        _LIVE.add(self)

    def configure(self, *, max_batch: int | None = None, max_sessions="keep") -> None:
        """Change ``max_batch`` and/or ``max_sessions`` (see :meth:`Engine.load`); takes effect at the next step."""
        if max_batch is not None:
            if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
                raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
            self.max_batch = max_batch
        if max_sessions != "keep":
            if not (max_sessions is None or max_sessions == "auto" or (isinstance(max_sessions, int)
                                                                      and not isinstance(max_sessions, bool)
                                                                      and max_sessions >= 1)):
                raise ValueError(f"max_sessions must be None (no limit), 'auto' (the measured real-time capacity) "
                                 f"or a positive int, got {max_sessions!r}")
            self.max_sessions = max_sessions

    # ----------------------------------------------------------------------------------------------- sessions
    def register(self, session) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed (engine.close() was called); load a new one")
            self._sessions.add(session)
        self.notify()

    def unregister(self, session) -> None:
        with self._cond:
            self._sessions.discard(session)
            self._wake = True
            self._cond.notify_all()

    def open_sessions(self) -> list:
        with self._cond:
            return [s for s in self._sessions if not s.closed]

    def notify(self) -> None:
        """There may be new work: wake the worker (starting it if needed)."""
        with self._cond:
            if self._closed:
                return
            self._wake = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lipforcing-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    @contextlib.contextmanager
    def paused(self):
        """``with engine.scheduler.paused():`` no new chunk step starts inside the block (the one in flight
        finishes); on exit the chunks that became ready meanwhile are scheduled together (batched)."""
        with self._cond:
            self._paused += 1
        try:
            yield self
        finally:
            with self._cond:
                self._paused -= 1
            self.notify()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker (after the chunk step in flight) and refuse new sessions."""
        with self._cond:
            self._closed = True
            self._wake = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    # ------------------------------------------------------------------------------------------------- worker
    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    self._thread = None
                    return
                self._wake = False
                paused = self._paused > 0
            jobs = [] if paused else self._collect()
            if jobs:
                self._execute(jobs)
                continue
            with self._cond:
                if self._closed:
                    self._thread = None
                    return
                if not self._wake or self._paused:
                    if not any(not s.closed for s in self._sessions):
                        self._thread = None          # nothing open: end; the next session starts a new worker
                        return
                    self._cond.wait(_IDLE_POLL_S)

    def _collect(self) -> list:
        with self._cond:
            sessions = list(self._sessions)
        ready = []
        for s in sessions:
            try:
                d = s._next_deadline()
            except Exception as exc:
                s._fail(None, exc)
                continue
            if d is not None:
                ready.append((d, next(self._seq), s))
        ready.sort(key=lambda r: (r[0], r[1]))
        jobs = []
        for _, _, s in ready:
            try:
                job = s._take_job()
            except Exception as exc:      # a bug; the session reports it, the worker goes on
                s._fail(None, exc)
                continue
            if job is not None:
                jobs.append(job)
                if len(jobs) == self.max_batch:
                    break
        return jobs

    def _execute(self, jobs: list) -> None:
        e = self.engine
        t = time.perf_counter()
        try:
            with e._lock:
                results = run_chunk_step(e, jobs)
        except Exception as exc:      # delivered to the sessions: their frames() raises it
            logger.error("lipforcing: a chunk step of %d session(s) failed: %s", len(jobs), exc)
            for j in jobs:
                j.session._fail(j, exc)
            return
        done = time.perf_counter()
        dt = done - t
        lat = []
        for j, frames in zip(jobs, results):
            ready_at = j.session._finish(j, frames)
            if ready_at is not None:
                lat.append(done - ready_at)
        with self._cond:
            self.steps += 1
            self.chunks += len(jobs)
            b = len(jobs)
            self._batch_counts[b] += 1
            self._step_s[b] = dt if b not in self._step_s else 0.8 * self._step_s[b] + 0.2 * dt
            self._step_times.append(dt)
            self._latency.extend(lat)

    # ------------------------------------------------------------------------------------------- measurements
    def capacity(self) -> int | None:
        """About how many sessions the engine serves in real time (None before any chunk step was measured):
        the best measured per-session cost of a chunk step against the 480 ms a 12-frame chunk lasts."""
        with self._cond:
            if not self._step_s:
                return None
            per_session = min(t / b for b, t in self._step_s.items())
        budget = self.engine.chunk_frames / FPS
        return max(1, int(_HEADROOM * budget / max(per_session, 1e-9)))

    def admit(self) -> None:
        """Raise :class:`AdmissionError` when ``max_sessions`` says the engine is full."""
        if self._closed:
            raise RuntimeError("the engine is closed (engine.close() was called); load a new one")
        limit, why = self.max_sessions, "max_sessions"
        if limit == "auto":
            limit, why = self.capacity(), "the measured real-time capacity"
        if limit is None:
            return
        n = len(self.open_sessions())
        if n >= limit:
            with self._cond:
                cost = min((t / b for b, t in self._step_s.items()), default=None)
            measured = "" if cost is None else (f" (a chunk step costs {1e3 * cost:.1f} ms per session, a chunk "
                                                f"lasts {1e3 * self.engine.chunk_frames / FPS:.0f} ms)")
            raise AdmissionError(f"the engine is full: {n} session(s) open and {why} is {limit}{measured}; "
                                 "close a session, run another engine (another GPU), or raise max_sessions")

    def stats(self) -> dict:
        """Numbers for health and metrics: open sessions, chunks waiting, chunk latency percentiles (seconds
        from a chunk's audio being complete to its frames being ready), step times, batch sizes, capacity."""
        sessions = self.open_sessions()
        queued = sum(s.pending_chunks for s in sessions)
        with self._cond:
            lat = np.asarray(self._latency, dtype=np.float64)
            steps = np.asarray(self._step_times, dtype=np.float64)
            out = {"sessions": len(sessions), "queued_chunks": queued, "steps": self.steps, "chunks": self.chunks,
                   "batch_sizes": dict(sorted(self._batch_counts.items())), "max_batch": self.max_batch,
                   "running": self.running}
        pct = (50, 90, 99)
        out["chunk_latency_s"] = ({f"p{p}": float(v) for p, v in zip(pct, np.percentile(lat, pct))} if lat.size
                                  else {f"p{p}": None for p in pct})
        out["step_s"] = ({f"p{p}": float(v) for p, v in zip(pct, np.percentile(steps, pct))} if steps.size
                         else {f"p{p}": None for p in pct})
        out["capacity"] = self.capacity()
        return out
