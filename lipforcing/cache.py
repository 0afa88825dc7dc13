"""RollingKVCache: one attention layer's key/value cache for chunk-by-chunk streaming (sink + rolling window)."""
from __future__ import annotations

import torch

from lipforcing import _checks


class RollingKVCache:
    """Fixed-size K/V cache of one layer: ``sink`` tokens that are never evicted plus a ring of the newest
    ``window - chunk_size`` earlier tokens (all sizes in tokens).

    Layout: ``k`` and ``v`` are (batch, sink + ring, heads, head_dim); slots ``[0, sink)`` hold stream tokens
    ``0 .. sink-1``, and a later token at stream position ``p`` lives in slot ``sink + (p - sink) % ring``.
    ``pos`` is an int64 tensor of shape (1,) *on the device*: the number of tokens written so far.  Nothing
    allocates after construction and nothing reads ``pos`` on the host, so a chunk step that uses the cache can
    be captured in a CUDA graph.  Keys are stored as given (un-rotated when the model uses dynamic RoPE).

    The next chunk (stream tokens ``pos .. pos+chunk_size-1``) sees the sink tokens and the stream tokens in
    ``[pos + chunk_size - window, pos)``, each once: the rule of ``block_causal_attention``.  Every chunk but the
    last must be exactly ``chunk_size`` tokens long.

    Parameters
    ----------
    batch, heads, head_dim : int
    chunk_size, window, sink : int
        Tokens per chunk, tokens in the attention window (including the current chunk, ``>= chunk_size``) and
        sink tokens.
    dtype, device
        Storage dtype (float32, float16 or bfloat16) and device of the buffers.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, *, chunk_size: int, window: int, sink: int = 0,
                 dtype: torch.dtype = torch.float32, device=None):
        for name, v in (("batch", batch), ("heads", heads), ("head_dim", head_dim)):
            _checks.positive_int(name, v)
        if window is None:
            raise ValueError("RollingKVCache needs a finite window (in tokens); window=None means an unbounded "
                             "cache, use block_causal_attention on the whole sequence instead")
        _checks.block_mask_args(chunk_size, window, sink)
        if dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.chunk_size, self.window, self.sink = chunk_size, window, sink
        self.ring = window - chunk_size
        self.dtype = dtype
        shape = (batch, sink + self.ring, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def capacity(self) -> int:
        """Slots in the cache (sink + ring), in tokens."""
        return self.sink + self.ring

    def reset(self) -> None:
        """Empty the cache (in place; the buffers are kept)."""
        self.pos.zero_()

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def __repr__(self) -> str:
        return (f"RollingKVCache(batch={self.batch}, heads={self.heads}, head_dim={self.head_dim}, "
                f"chunk_size={self.chunk_size}, window={self.window}, sink={self.sink}, dtype={self.dtype}, "
                f"device={self.device})")
