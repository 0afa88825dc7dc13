"""Ping-pong indexing of a reference clip (played forwards, backwards, forwards... when speech outlasts it)."""
from __future__ import annotations

__all__ = ["pingpong_index"]


def pingpong_index(i: int, n: int) -> int:
    """Frame of an ``n``-frame clip shown at step ``i`` when the clip is played forwards, backwards, forwards...
    (0, 1, ..., n-1, n-2, ..., 1, 0, 1, ...); the turning frames are not repeated.  ``n == 1`` always gives 0."""
    if n <= 1:
        return 0
    period = 2 * n - 2
    r = i % period
    return r if r < n else period - r
