"""The units of a stream: the output :class:`Frame`, the 16 kHz sample buffer of an utterance and the bookkeeping of
an utterance's chunks (which video frames each chunk covers)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Frame", "PcmBuffer", "Utterance", "chunk_span", "chunks_for"]


@dataclass(frozen=True)
class Frame:
    """One output video frame.

    index : frame number in the session (0, 1, 2, ... over the frames delivered; never skipped).
    pts : presentation time in seconds on the audio clock, ``index / 25``.
    image : (H, W, 3) uint8 RGB numpy array: the output video frame.  For a full-frame reference, the reference
        frame at full resolution with the generated region pasted back; for aligned crops, the generated crop.
    audio : (640,) float32 numpy array: the 16 kHz samples this frame covers (zero-padded after the end of an
        utterance), so a host can keep audio and video paired.
    chunk_id : the model step that produced it (counts chunks over the whole session).
    face : (h, w, 3) uint8 RGB numpy array: the aligned crop the model generated (the same pixels as ``image``
        for aligned-crop references).
    """

    index: int
    pts: float
    image: np.ndarray
    audio: np.ndarray
    chunk_id: int
    face: np.ndarray | None = None


class PcmBuffer:
    """16 kHz float32 samples of one utterance, addressed from its first sample; holds [start, end)."""

    def __init__(self):
        self._parts: list[torch.Tensor] = []
        self.start = 0
        self.end = 0

    def append(self, x: torch.Tensor) -> None:
        if x.numel():
            self._parts.append(x)
            self.end += x.numel()

    def _data(self) -> torch.Tensor:
        if len(self._parts) != 1:
            self._parts = [torch.cat(self._parts) if self._parts else torch.zeros(0)]
        return self._parts[0]

    def read(self, a: int, b: int) -> torch.Tensor:
        """Samples [a, b); zeros past ``end``.  ``a`` must not precede ``start`` (dropped history)."""
        assert a >= self.start, (a, self.start)
        data = self._data()
        out = data[a - self.start: min(b, self.end) - self.start]
        if b > self.end:
            out = torch.cat([out, out.new_zeros(b - max(a, self.end))])
        return out

    def drop_before(self, a: int) -> None:
        a = min(a, self.end)
        if a > self.start:
            self._parts = [self._data()[a - self.start:].clone()]
            self.start = a

    @property
    def held(self) -> int:
        return self.end - self.start


class Utterance:
    """Audio of one utterance and how far its chunks got.  Frame f (local) is session frame ``first_index + f``.
    ``t_start``: wall time (perf_counter) of its first audio, the origin of its frames' deadlines;
    ``ready_count``: chunks whose audio is complete, ``ready_times`` when each became so (until computed)."""

    def __init__(self, first_index: int, t_start: float = 0.0):
        self.first_index = first_index
        self.t_start = t_start
        self.pcm = PcmBuffer()
        self.closed = False
        self.num_frames: int | None = None    # frames to emit, known once closed
        self.num_chunks: int | None = None
        self.chunks_done = 0
        self.ready_count = 0
        self.ready_times: dict[int, float] = {}


def chunk_span(c: int, first: int, per: int) -> tuple[int, int]:
    """Local video frames [lo, hi) of chunk ``c`` of an utterance (first chunk ``first`` frames, then ``per``)."""
    if c == 0:
        return 0, first
    return first + (c - 1) * per, first + c * per


def chunks_for(n_frames: int, first: int, per: int) -> int:
    if n_frames <= 0:
        return 0
    return 1 + max(0, -(-(n_frames - first) // per))
