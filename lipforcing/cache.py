"""RollingKVCache: one attention layer's key/value cache for chunk-by-chunk streaming (sink + rolling window)."""
from __future__ import annotations

import weakref

import torch

from lipforcing import _checks


class ChunkWorkspace:
    """Scratch buffers of the dense chunk step (rotated q/k for dynamic RoPE, the staged post-write view for the
    library backends, their key counts).  Allocated once, never inside a step.  One workspace may serve every
    cache of one stream (the layers run one after another); caches used concurrently (other threads or streams)
    need their own: give the caches of each stream one ``ChunkWorkspace(batch, sink + window, chunk_size, heads,
    head_dim, dtype, device)`` (``RollingKVCache(..., workspace=ws)``), as the student model does per
    StreamState.  Without one, caches of the same shape share a process-wide workspace.

    ``k``/``v`` (B, sink + window, H, D): the keys (rotated for dynamic RoPE) and values of the slots as the
    attention sees them; ``q``/``kc`` (B, chunk, H, D): the rotated queries and current keys; ``count`` (B,)
    int32 and ``mask`` (B, 1, 1, sink + window) bool: how many slots a dense backend reads."""

    def __init__(self, batch: int, slots: int, chunk: int, heads: int, head_dim: int, dtype: torch.dtype, device):
        self.key = (batch, slots, chunk, heads, head_dim, dtype)
        big, small = (batch, slots, heads, head_dim), (batch, chunk, heads, head_dim)
        self.k = torch.zeros(big, dtype=dtype, device=device)
        self.v = torch.zeros(big, dtype=dtype, device=device)
        self.q = torch.zeros(small, dtype=dtype, device=device)
        self.kc = torch.zeros(small, dtype=dtype, device=device)
        self.count = torch.zeros(batch, dtype=torch.int32, device=device)
        self.slot_index = torch.arange(slots, dtype=torch.int32, device=device)
        self.mask = torch.zeros(batch, 1, 1, slots, dtype=torch.bool, device=device)

    @classmethod
    def like(cls, cache: "RollingKVCache") -> "ChunkWorkspace":
        """A new workspace for caches shaped like ``cache``."""
        return cls(cache.batch, cache.slots, cache.chunk_size, cache.heads, cache.head_dim, cache.dtype,
                   cache.device)

    def fits(self, k_cache: torch.Tensor, chunk: int) -> bool:
        B, slots, H, D = k_cache.shape
        return self.key == (B, slots, chunk, H, D, k_cache.dtype) and self.k.device == k_cache.device


_SHARED: "weakref.WeakValueDictionary[tuple, ChunkWorkspace]" = weakref.WeakValueDictionary()
_BY_BUFFER: dict[int, ChunkWorkspace] = {}  # k buffer address of a live cache -> its workspace


def _shared_workspace(batch, slots, chunk, heads, head_dim, dtype, device) -> ChunkWorkspace:
    key = (batch, slots, chunk, heads, head_dim, dtype, torch.device(device))
    ws = _SHARED.get(key)
    if ws is None:
        ws = ChunkWorkspace(batch, slots, chunk, heads, head_dim, dtype, device)
        _SHARED[key] = ws
    return ws


def workspace_of(k_cache: torch.Tensor, chunk: int) -> ChunkWorkspace:
    """The workspace of the cache that owns the buffer ``k_cache`` (the backends get tensors, not the cache), or
    the shared one of its shape (a copy of a cache's buffers, e.g. a snapshot, has no owner)."""
    ws = _BY_BUFFER.get(k_cache.data_ptr())
    if ws is None or not ws.fits(k_cache, chunk):
        B, slots, H, D = k_cache.shape
        ws = _shared_workspace(B, slots, chunk, H, D, k_cache.dtype, k_cache.device)
    return ws


class RollingKVCache:
    """Fixed-size K/V cache of one layer: ``sink`` tokens that are never evicted plus a ring of the newest
    ``window`` tokens (all sizes in tokens).

    Layout: ``k`` and ``v`` are (batch, sink + window, heads, head_dim); slots ``[0, sink)`` hold stream tokens
    ``0 .. sink-1`` and a later token at stream position ``p`` lives in slot ``sink + (p - sink) % window``.
    ``pos`` is an int64 tensor of shape (1,) *on the device*: the number of tokens written so far.  Nothing
    allocates after construction and nothing reads ``pos`` on the host, so a chunk step that uses the cache can
    be captured in a CUDA graph.  Keys are stored as given (un-rotated when the model uses dynamic RoPE).

    Why the ring holds a whole window: a chunk step writes its own K/V first and then attends densely to the
    slots (no mask for full chunks) -- every key visible to a chunk is visible to all its queries, and attention
    does not depend on key order.  Filled slots always form a prefix (the sink fills first).  Between chunks the
    ``chunk_size`` oldest ring tokens are stale: the next chunk does not see them and overwrites them.

    The next chunk (stream tokens ``pos .. pos+chunk_size-1``) sees the sink tokens and the stream tokens in
    ``[pos + chunk_size - window, pos)``, each once: the rule of ``block_causal_attention``.  Every chunk but the
    last must be exactly ``chunk_size`` tokens long; after a short chunk is written the cache refuses further
    chunks until :meth:`reset`.

    Parameters
    ----------
    batch, heads, head_dim : int
    chunk_size, window, sink : int
        Tokens per chunk, tokens in the attention window (including the current chunk, ``>= chunk_size``) and
        sink tokens.
    dtype, device
        Storage dtype (float32, float16 or bfloat16) and device of the buffers.
    workspace : optional ChunkWorkspace shared with the other caches of the same stream (see ChunkWorkspace);
        default: the process-wide one of this shape.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, *, chunk_size: int, window: int, sink: int = 0,
                 dtype: torch.dtype = torch.float32, device=None, workspace: ChunkWorkspace | None = None):
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
        self.ring = window
        self.dtype = dtype
        shape = (batch, sink + window, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)
        if workspace is None:
            workspace = _shared_workspace(batch, sink + window, chunk_size, heads, head_dim, dtype, self.k.device)
        elif not isinstance(workspace, ChunkWorkspace) or not workspace.fits(self.k, chunk_size):
            raise ValueError("workspace must be a ChunkWorkspace made for this cache's shape, dtype and device "
                             "(ChunkWorkspace.like(cache))")
        self.workspace = workspace
        ptr = self.k.data_ptr()
        _BY_BUFFER[ptr] = workspace
        weakref.finalize(self, _BY_BUFFER.pop, ptr, None)
        # Host-side bookkeeping (no device reads): writes since construction, resets, and the length of the last
        # chunk written when it was short (the stream must end there).
        self.writes = 0
        self.epoch = 0
        self.short_tail = 0

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def slots(self) -> int:
        """Rows of ``k``/``v``: sink + window."""
        return self.sink + self.ring

    @property
    def capacity(self) -> int:
        """Earlier tokens the cache keeps visible for the next chunk: sink + window - chunk_size."""
        return self.sink + self.window - self.chunk_size

    def reset(self) -> None:
        """Empty the cache in place (the buffers are kept): afterwards it is indistinguishable from a new one --
        positions and contents zeroed, so nothing of the previous stream (a NaN included) can be read again."""
        self.k.zero_()
        self.v.zero_()
        self.pos.zero_()
        self.writes = 0
        self.epoch += 1
        self.short_tail = 0

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def __repr__(self) -> str:
        return (f"RollingKVCache(batch={self.batch}, heads={self.heads}, head_dim={self.head_dim}, "
                f"chunk_size={self.chunk_size}, window={self.window}, sink={self.sink}, dtype={self.dtype}, "
                f"device={self.device})")
