"""Pipecat adapter (extra ``pipecat``): a ``FrameProcessor`` placed after the TTS service that turns its audio into
lip-synced video.

::

    from lipforcing.integrations.pipecat import LipForcingVideoService

    avatar = LipForcingVideoService(engine, reference_frames)
    pipeline = Pipeline([transport.input(), stt, llm, tts, avatar, transport.output()])

It consumes ``TTSAudioRawFrame`` (any rate, mono or mixed down) and pushes, per video frame, an
``OutputImageRawFrame`` (RGB, ``sync_with_audio=True``) followed by the ``OutputAudioRawFrame`` of the 640 samples
(16 kHz mono int16) it covers, so the transport plays them in step.  ``TTSStoppedFrame`` ends the utterance and is
passed on after its last frame; ``InterruptionFrame`` (barge-in) drops the queued audio and frames; ``EndFrame``
waits for the remaining frames, ``CancelFrame`` does not.  Other frames pass through.  The engine's scheduler does
the computing, so several pipelines can share one engine (one GPU).
"""
from __future__ import annotations

import asyncio
from collections import deque

import numpy as np

try:
    from pipecat.frames.frames import (CancelFrame, EndFrame, Frame, InterruptionFrame, OutputAudioRawFrame,
                                       OutputImageRawFrame, StartFrame, TTSAudioRawFrame, TTSStoppedFrame)
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("lipforcing.integrations.pipecat needs Pipecat: pip install 'lipforcing[pipecat]'") from exc

from lipforcing.audio.pcm import SAMPLE_RATE, float_to_int16, interleaved_int16_to_mono

__all__ = ["LipForcingVideoService"]


class LipForcingVideoService(FrameProcessor):
    """engine : a :class:`lipforcing.Engine`; reference : this avatar's face frames (what ``engine.session``
    takes); seed : noise seed; end_timeout : seconds ``EndFrame`` waits for the last frames."""

    def __init__(self, engine, reference, *, seed: int = 0, end_timeout: float = 60.0, **kwargs):
        super().__init__(**kwargs)
        self.engine = engine
        self._reference = reference
        self._seed = seed
        self._end_timeout = end_timeout
        self.session = None
        self._rate: int | None = None
        self._out_task: asyncio.Task | None = None
        self._held: deque = deque()          # (end index, frame): control frames released after that index
        self._last_index = -1
        self.frames_out = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._audio(frame)
        elif isinstance(frame, TTSStoppedFrame) and self.session is not None:
            end = self.session.end_of_speech()
            if end is not None and end > self._last_index + 1:
                self._held.append((end, frame))
            else:
                await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            if self.session is not None:
                self.session.interrupt()
            self._held.clear()
            await self.push_frame(frame, direction)
        elif isinstance(frame, EndFrame):
            await self._finish(wait=True)
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._finish(wait=False)
            await self.push_frame(frame, direction)
        else:
            if isinstance(frame, StartFrame):
                self._held.clear()
            await self.push_frame(frame, direction)

    async def _audio(self, frame: TTSAudioRawFrame) -> None:
        if self.session is None:
            self.session = self.engine.session(self._reference, sample_rate=frame.sample_rate, seed=self._seed)
            self._rate = frame.sample_rate
            self._out_task = self.create_task(self._output())
        elif frame.sample_rate != self._rate:
            raise ValueError(f"TTS audio at {frame.sample_rate} Hz, but the session runs at {self._rate} Hz")
        await self.session.apush_audio(interleaved_int16_to_mono(frame.audio, frame.num_channels))

    async def _output(self) -> None:
        async for f in self.session.aframes():
            h, w = f.image.shape[:2]
            image = OutputImageRawFrame(image=np.ascontiguousarray(f.image).tobytes(), size=(w, h), format="RGB")
            image.sync_with_audio = True
            pcm = float_to_int16(f.audio)
            await self.push_frame(image)
            await self.push_frame(OutputAudioRawFrame(audio=pcm.tobytes(), sample_rate=SAMPLE_RATE, num_channels=1))
            self._last_index = f.index
            self.frames_out += 1
            while self._held and self._held[0][0] <= f.index + 1:
                await self.push_frame(self._held.popleft()[1])

    async def _finish(self, *, wait: bool) -> None:
        s = self.session
        if s is None:
            return
        if wait and not s.closed:
            s.end_of_speech()
            loop = asyncio.get_running_loop()
            end = loop.time() + self._end_timeout
            while (s.pending_chunks or s.frames_ready) and loop.time() < end:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)
        s.close()
        if self._out_task is not None:
            await self.cancel_task(self._out_task)
            self._out_task = None
        while self._held:
            await self.push_frame(self._held.popleft()[1])
        self.session = None

    async def cleanup(self):
        await super().cleanup()
        if self.session is not None:
            await self._finish(wait=False)
