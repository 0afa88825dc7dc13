"""The causal student: block-causal full-sequence forward (training) and chunk-by-chunk streaming (inference).

Attention rule (in latent frames; the ops take tokens = frames * tokens_per_frame): the clip is cut into chunks
of ``chunk_frames``; a chunk attends bidirectionally to itself, to the ``window_frames - chunk_frames`` frames
before it, and to the first ``sink_frames`` frames of the stream (never evicted).

Streaming, per chunk (DESIGN.md section 2)::

    state = student.init_stream(context)                     # once per clip / session
    v = student.forward_chunk(x, 999, state, audio, write=False)    # denoise at t = 0.999
    v = student.forward_chunk(x, 769, state, audio, write=False)    # denoise at t = 0.769
    student.forward_chunk(x0, 0, state, audio, write=True)          # cache write of the clean chunk at t = 0

RoPE: ``rope_mode="absolute"`` rotates q and k at absolute frame indices before caching, so streaming equals the
full-sequence forward; ``"dynamic"`` caches un-rotated keys and lets ``ops.chunk_attention`` rotate with
window-relative time positions (sink at 0, then the window in order; at most ``sink + window - 1``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from lipforcing import ops
from lipforcing.cache import ChunkWorkspace, RollingKVCache
from lipforcing.config import ModelConfig
from lipforcing.model.layers import frame_timesteps, patchify
from lipforcing.model.network import LipSyncDiT
from lipforcing.ops.qk_norm import fused_backend as qk_norm_backend, qk_norm_modules
from lipforcing.ops.rope import RopeSpec, apply_rope


@dataclass
class StreamState:
    """Everything a stream keeps between chunks.

    caches : one RollingKVCache per block (allocated once, at ``init_stream`` when the latent size is given, else
        at the first chunk).  text_kv : per block the text cross-attention (k, v), computed once.
    frame : host-side count of latent frames written so far (used only for absolute RoPE positions).
    audio_scale : weight of the audio branch in ``"cross_attn"`` mode.
    """

    batch: int
    dtype: torch.dtype
    device: torch.device
    text_kv: list
    audio_scale: float = 1.0
    window_frames: int | None = None
    caches: list = field(default_factory=list)
    grid: tuple[int, int] | None = None
    frame: int = 0
    rope: RopeSpec | None = None

    @property
    def tokens_per_frame(self) -> int | None:
        return None if self.grid is None else self.grid[0] * self.grid[1]

    def reset(self) -> None:
        """Start a new stream with the same text: empty every cache in place (no reallocation)."""
        for cache in self.caches:
            cache.reset()
        self.frame = 0

    def nbytes(self) -> int:
        """Bytes held by the KV caches."""
        return sum(c.nbytes() for c in self.caches)


class CausalLipSyncDiT(LipSyncDiT):
    """The causal student (same parameters as :class:`LipSyncDiT`).

    ``forward(x, timestep, context, audio=None, *, attention=None)`` is the full-sequence block-causal mode
    (``ops.block_causal_attention`` with chunk = ``chunk_frames``, window = ``window_frames``, sink =
    ``sink_frames``, all times the tokens per frame; absolute RoPE).  ``attention=(window_frames, sink_frames)``
    overrides the window and sink for one call (diffusion-forcing training); ``(None, 0)`` = all earlier frames.
    Our ``window_frames`` excludes the sink; the reference code's ``local_attn_size`` includes it, so its DF
    configs (7, 1), (10, 1), (13, 1), (9, 3), (12, 3) are ``attention=`` (6, 1), (9, 1), (12, 1), (6, 3), (9, 3).

    Streaming: :meth:`init_stream` and :meth:`forward_chunk` (see the module docstring).  In ``"dynamic"`` RoPE
    mode a chunk step reads no host state, so it can be captured in a CUDA graph; ``"absolute"`` mode bakes the
    frame positions (``state.frame``) into the call.
    """

    causal = True

    def full_attention_args(self, frames: int, tokens_per_frame: int, attention=None) -> tuple[int, int | None, int]:
        c = self.config
        window, sink = (c.window_frames, c.sink_frames) if attention is None else _window_sink(attention, c)
        return (c.chunk_frames * tokens_per_frame, None if window is None else window * tokens_per_frame,
                sink * tokens_per_frame if window is not None else 0)

    # ------------------------------------------------------------------------------------------------ streaming
    def init_stream(self, context: torch.Tensor, *, batch: int | None = None, audio_scale: float = 1.0,
                    latent_size: tuple[int, int] | None = None, max_frames: int | None = None) -> StreamState:
        """Start a stream: compute the text cross-attention K/V once and set up one KV cache per block.

        Parameters
        ----------
        context : (B or 1, Lt, text_dim) text embedding; a batch of 1 is broadcast to ``batch``.
        batch : stream batch size (default: context's batch).
        audio_scale : weight of the audio branch (``"cross_attn"`` mode).
        latent_size : (H, W) of the latents; if given the caches are allocated now, else at the first chunk.
        max_frames : needed only when ``config.window_frames is None`` (attend to everything): the longest
            stream in latent frames; the cache then holds that many frames.

        Text K/V are computed under the caller's grad mode (use ``torch.no_grad()`` for inference).
        """
        c = self.config
        if batch is None:
            batch = context.shape[0] if isinstance(context, torch.Tensor) and context.dim() == 3 else 1
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        ctx = self.embed_text(context)
        if ctx.shape[0] not in (1, batch):
            raise ValueError(f"context has batch {ctx.shape[0]}; expected 1 or batch={batch}")
        ctx = ctx.expand(batch, *ctx.shape[1:])
        text_kv = [block.text_kv(ctx) for block in self.blocks]
        window = c.window_frames
        if window is None:
            if max_frames is None:
                raise ValueError("config.window_frames is None (attend to all earlier frames): pass max_frames= "
                                 "(the longest stream, in latent frames) so the cache can be sized")
            if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < c.chunk_frames:
                raise ValueError(f"max_frames must be an int >= chunk_frames ({c.chunk_frames}), got {max_frames!r}")
            window = max_frames
        state = StreamState(batch=batch, dtype=self.dtype, device=self.device, text_kv=text_kv,
                            audio_scale=float(audio_scale), window_frames=window)
        if latent_size is not None:
            ph, pw = c.patch_size[1:]
            H, W = latent_size
            if H % ph or W % pw:
                raise ValueError(f"latent_size {tuple(latent_size)} must be divisible by the patch {(ph, pw)}")
            self._allocate(state, (H // ph, W // pw))
        return state

    def _allocate(self, state: StreamState, grid: tuple[int, int]) -> None:
        c = self.config
        tpf = grid[0] * grid[1]
        sink = c.sink_frames if c.window_frames is not None else 0
        chunk, window = c.chunk_frames * tpf, state.window_frames * tpf
        # one scratch workspace per stream, shared by its layers: streams stepped concurrently never share one
        ws = ChunkWorkspace(state.batch, sink * tpf + window, chunk, c.num_heads, c.head_dim, state.dtype,
                            state.device)
        state.caches = [RollingKVCache(state.batch, c.num_heads, c.head_dim, chunk_size=chunk, window=window,
                                       sink=sink * tpf, dtype=state.dtype, device=state.device, workspace=ws)
                        for _ in self.blocks]
        state.grid = grid
        state.rope = self.rope_table(grid, sink + state.window_frames, state.device)

    def forward_chunk(self, x: torch.Tensor, timestep, state: StreamState, audio: torch.Tensor | None = None, *,
                      write: bool) -> torch.Tensor:
        """The velocity of the next chunk of the stream.

        Parameters
        ----------
        x : (B, in_dim, F_chunk, H, W), ``F_chunk <= chunk_frames`` (only the last chunk of a stream may be
            short); noisy latents + conditioning channels.
        timestep : (B,) or per frame (B, F_chunk) (or a number), 0..1000 scale.
        state : from :meth:`init_stream`.  **Mutated** when ``write=True``: every layer's cache stores this
            chunk's keys/values and ``state.frame`` advances by F_chunk.
        audio : (B, F_chunk, 4, audio_dim) or None.
        write : False for the denoising passes, True for the cache-write pass (clean x0 at t = 0).

        Returns
        -------
        velocity : (B, 16, F_chunk, H, W) float32.
        """
        if not isinstance(state, StreamState):
            raise TypeError(f"state must be a StreamState from init_stream, got {type(state).__name__}")
        if not isinstance(write, bool):
            raise TypeError(f"write must be a bool, got {type(write).__name__}")
        c = self.config
        B, Fr, gh, gw = self._check_x(x)
        if B != state.batch:
            raise ValueError(f"x has batch {B} but the stream was started with batch {state.batch}")
        if Fr > c.chunk_frames:
            raise ValueError(f"x has {Fr} latent frames; a chunk has at most chunk_frames={c.chunk_frames}")
        if state.grid is None:
            self._allocate(state, (gh, gw))
        elif state.grid != (gh, gw):
            raise ValueError(f"x has a latent grid of {(gh, gw)} tokens but the stream was set up for {state.grid}")
        if x.device != state.device:
            raise ValueError(f"x is on {x.device} but the stream state is on {state.device}")
        tpf = gh * gw
        t = frame_timesteps(timestep, B, Fr, x.device)
        e, e0 = self.embed_time(t)
        audio_tok = self.audio_tokens(audio, B, Fr)
        tokens = patchify(x, self.patch_embedding.weight, self.patch_embedding.bias, c.patch_size).float()
        backend = self.attn_backend
        # Triton path (attn_backend triton, or auto on CUDA; no autograd): q/k RMSNorm (+ absolute RoPE) in one
        # ops.qk_norm launch per layer (WanBlock.forward calls attend.prepare_qk); in dynamic RoPE mode that launch
        # also rotates q and stores the chunk (prepared_attention); else the PyTorch code below.
        fused = qk_norm_backend(backend, x.device, self.dtype)

        if c.rope_mode == "absolute":
            spec = self.rope_table(state.grid, state.frame + Fr, x.device)
            t_pos = (torch.arange(Fr, device=x.device) + state.frame).repeat_interleave(tpf)

            def attend_for(i):
                def attend(q, k, v):
                    if fused is None:
                        q = apply_rope(q, t_pos, spec).to(v.dtype)
                        k = apply_rope(k, t_pos, spec).to(v.dtype)
                    return ops.chunk_attention(q, k, v, state.caches[i], write=write, backend=backend)
                if fused is not None:
                    attend.prepare_qk = functools.partial(qk_norm_modules, rope=spec, frame_offset=state.frame,
                                                          backend=fused)
                return attend
        else:
            decided = {}  # prepared_attention's backend check, made once per pass (every layer has the same shapes)

            def attend_for(i):
                norms = []

                def attend(q, k, v):
                    if norms:  # fused path: q, k are the raw projections (see defer_qk)
                        return prepared_attention(q, k, v, norms, state.caches[i], state.rope, write=write,
                                                  backend=backend, fused=fused, decided=decided)
                    return ops.chunk_attention(q, k, v, state.caches[i], write=write, rope=state.rope,
                                               backend=backend)
                if fused is not None:
                    attend.prepare_qk = functools.partial(defer_qk, norms)
                return attend

        h = self.run_blocks(tokens, e0, attend_for, state.text_kv, audio_tok, tokens_per_frame=tpf,
                            audio_scale=state.audio_scale, side_effects=write)
        if write:
            state.frame += Fr
        return self.output(h, e, (Fr, gh, gw))


def defer_qk(norms: list, q: torch.Tensor, k: torch.Tensor, norm_q, norm_k):
    """An ``attend.prepare_qk`` that defers the q/k norms to the attend itself (it needs v and the cache to fuse
    the store): records the norm modules in ``norms`` and returns the raw projections."""
    norms[:] = [norm_q, norm_k]
    return q, k


def prepared_attention(q, k, v, norms, cache: RollingKVCache, rope, *, write: bool, backend: str, fused: str,
                       decided: dict) -> torch.Tensor:
    """The dynamic-RoPE chunk step on the fused Triton path, from the raw q/k projections: one ``ops.qk_norm``
    launch normalises q and k, rotates q at its window-relative frame and, on the cache-write pass, stores k and
    v in the chunk's slots; ``chunk_attention`` then runs with ``q_rotated`` / ``chunk_in_cache`` (no q rotation,
    no store pass of its own).  When the attention backend would decline the flags (``takes_prepared``; decided
    once per pass, cached in ``decided``) only the norms are fused and chunk_attention rotates and stores."""
    from lipforcing.ops.chunk_attention import takes_prepared

    if write not in decided:
        decided[write] = takes_prepared(q, cache, write=write, rope=rope, backend=backend)
    norm_q, norm_k = norms
    if not decided[write]:
        q, k = qk_norm_modules(q, k, norm_q, norm_k, backend=fused)
        return ops.chunk_attention(q, k, v, cache, write=write, rope=rope, backend=backend)
    q, k = qk_norm_modules(q, k, norm_q, norm_k, rope=rope, rope_positions="window", cache=cache,
                           v=v if write else None, backend=fused)
    return ops.chunk_attention(q, k, v, cache, write=write, rope=rope, backend=backend, q_rotated=True,
                               chunk_in_cache=write)


def _window_sink(attention, config: ModelConfig) -> tuple[int | None, int]:
    if not isinstance(attention, (tuple, list)) or len(attention) != 2:
        raise ValueError(f"attention must be (window_frames, sink_frames), got {attention!r}")
    window, sink = attention
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < config.chunk_frames:
            raise ValueError(f"attention window_frames must be None or an int >= chunk_frames "
                             f"({config.chunk_frames}), got {window!r}")
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"attention sink_frames must be an int >= 0, got {sink!r}")
    return window, sink
