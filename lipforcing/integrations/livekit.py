"""LiveKit Agents adapter (extra ``livekit``): a ``VideoGenerator`` that an ``AvatarRunner`` drives in-process, and
the worker load function that lets LiveKit's dispatcher spread sessions over engines (GPUs).

In-process avatar (the agent's TTS audio goes through a ``QueueAudioOutput``; the runner publishes the lip-synced
video and the paired audio to the room)::

    from livekit.agents.voice.avatar import AvatarOptions, AvatarRunner, QueueAudioOutput
    from lipforcing.integrations.livekit import LipForcingVideoGenerator

    gen = LipForcingVideoGenerator(engine, reference_frames)       # one per room / agent session
    audio = QueueAudioOutput(sample_rate=24000)
    session.output.audio = audio                                   # the AgentSession's TTS output
    runner = AvatarRunner(ctx.room, audio_recv=audio, video_gen=gen, options=gen.avatar_options())
    await runner.start()

Scale-out: one worker process per GPU, each holding one engine, jobs run as threads of that process (so they share
the engine) and report the engine's occupancy; see ``docs/serving.md``::

    WorkerOptions(entrypoint_fnc=entry, job_executor_type=JobExecutorType.THREAD,
                  load_fnc=engine_load_fnc(engine), load_threshold=0.9)

Video frames are RGB24 at the engine's resolution; each is followed by the 640 samples (40 ms, 16 kHz mono int16)
it covers, so ``AvatarOptions(audio_sample_rate=16000, audio_channels=1, video_fps=25)``.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import AsyncIterator

import numpy as np

try:
    from livekit import rtc
    from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarOptions, VideoGenerator
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("lipforcing.integrations.livekit needs LiveKit Agents: pip install 'lipforcing[livekit]'") \
        from exc

from lipforcing.audio.pcm import SAMPLE_RATE, float_to_int16, interleaved_int16_to_mono

__all__ = ["LipForcingVideoGenerator", "engine_load", "engine_load_fnc"]


class LipForcingVideoGenerator(VideoGenerator):
    """LiveKit ``VideoGenerator`` over one :class:`lipforcing.Session`.

    engine : a :class:`lipforcing.Engine` (shared by every generator of the process).  reference : the face frames
    of this avatar (what ``engine.session`` takes).  sample_rate : the TTS audio's rate (default: taken from the
    first ``AudioFrame``; the session resamples to 16 kHz).  seed : noise seed.

    ``push_audio(AudioFrame)`` feeds the session (multi-channel audio is mixed down); ``push_audio(
    AudioSegmentEnd())`` ends the utterance; iteration yields ``rtc.VideoFrame``, ``rtc.AudioFrame`` (the frame's 640
    samples) and, after an utterance's last frame, ``AudioSegmentEnd``; ``clear_buffer()`` is barge-in
    (``session.interrupt()``).  Nothing here computes: the engine's scheduler does.
    """

    def __init__(self, engine, reference, *, sample_rate: int | None = None, seed: int = 0):
        self.engine = engine
        self._reference = reference
        self._seed = seed
        self._rate = sample_rate
        self.session = None
        self._opened = asyncio.Event()
        self._ends: deque[int] = deque()      # end index of each utterance ended and not yet signalled
        self._closed = False
        self.frames_out = 0
        if sample_rate is not None:
            self._open(sample_rate)

    def avatar_options(self) -> AvatarOptions:
        h, w = self.engine.resolution
        return AvatarOptions(video_width=w, video_height=h, video_fps=self.engine.fps,
                             audio_sample_rate=SAMPLE_RATE, audio_channels=1)

    def _open(self, rate: int) -> None:
        self.session = self.engine.session(self._reference, sample_rate=rate, seed=self._seed)
        self._rate = rate
        self._opened.set()

    async def push_audio(self, frame) -> None:
        if self._closed:
            return
        if isinstance(frame, AudioSegmentEnd):
            if self.session is not None:
                end = self.session.end_of_speech()
                if end is not None:
                    self._ends.append(end)
            return
        if self.session is None:
            self._open(frame.sample_rate)
        elif frame.sample_rate != self._rate:
            raise ValueError(f"audio frame at {frame.sample_rate} Hz, but the session runs at {self._rate} Hz")
        await self.session.apush_audio(interleaved_int16_to_mono(frame.data, frame.num_channels))

    def clear_buffer(self) -> None:
        if self.session is not None:
            self.session.interrupt()
        self._ends.clear()

    async def aclose(self) -> None:
        self._closed = True
        if self.session is not None:
            self.session.close()
        self._opened.set()

    def __aiter__(self) -> AsyncIterator:
        return self._frames()

    async def _frames(self):
        await self._opened.wait()
        if self.session is None:
            return
        async for f in self.session.aframes():
            h, w = f.image.shape[:2]
            yield rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24, np.ascontiguousarray(f.image).tobytes())
            pcm = float_to_int16(f.audio)
            yield rtc.AudioFrame(pcm.tobytes(), SAMPLE_RATE, 1, pcm.size)
            self.frames_out += 1
            while self._ends and f.index + 1 >= self._ends[0]:
                self._ends.popleft()
                yield AudioSegmentEnd()


def engine_load(engine) -> float:
    """The engine's occupancy in [0, 1] for LiveKit's dispatcher: open sessions over the real-time capacity
    (``max_sessions`` when it is a number, else the measured :meth:`Scheduler.capacity`; 0 before anything is
    measured), raised to 1 when chunks queue up beyond one per session (the engine is falling behind)."""
    sched = engine.scheduler
    st = sched.stats()
    limit = sched.max_sessions if isinstance(sched.max_sessions, int) else st["capacity"]
    load = 0.0 if not limit else st["sessions"] / limit
    if st["sessions"] and st["queued_chunks"] > 2 * st["sessions"]:
        load = 1.0
    return float(min(1.0, max(0.0, load)))


def engine_load_fnc(engine):
    """A ``load_fnc`` for ``WorkerOptions`` / ``AgentServer`` (called with or without the worker)."""

    def load_fnc(*_args) -> float:
        return engine_load(engine)

    return load_fnc
