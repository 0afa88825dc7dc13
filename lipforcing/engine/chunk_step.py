"""The chunk step of a session: the per-session model state (:class:`ChunkRunner`: KV caches, streaming VAE and
audio-feature state), the eager DiT passes and, with ``cuda_graphs=True``, the same passes as captured CUDA graphs
(:class:`ChunkGraphs`)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import torch

from lipforcing import schedule
from lipforcing.audio.pcm import SAMPLES_PER_FRAME

if TYPE_CHECKING:
    from lipforcing.engine.engine import Engine
    from lipforcing.engine.frame import Utterance

__all__ = ["STAGES", "ChunkRunner", "ChunkGraphs", "eager_dit", "eager_write", "noise_offsets", "model_input"]

STAGES = ("audio_features", "vae_encode", "dit_pass_1", "denoise_update", "dit_pass_2", "vae_decode",
          "cache_write")
"""Names passed to ``engine.stage(name)``, in the order a chunk runs them (``denoise_update`` twice)."""


# ------------------------------------------------------------------------------------------------------ runner
class ChunkRunner:
    """Per-session model state: KV caches, streaming VAE encoder/decoder, the audio feature stream and, with
    CUDA graphs, the captured chunk step.  ``reset()`` starts a new utterance in place."""

    def __init__(self, engine: Engine, seed: int):
        self.e = engine
        self.seed = seed
        self.state = dataclasses.replace(engine._template, text_kv=list(engine._template.text_kv), caches=[],
                                         grid=None, frame=0, rope=None)
        self.enc = engine.vae.stream_encoder(frames_per_step=engine.vae_frames_per_step)
        self.dec = engine.vae.stream_decoder(latents_per_step=engine.vae_latents_per_step)
        self.feat = engine.audio.stream()
        self.feat_rows: list[torch.Tensor] = []    # emitted feature rows not yet used ...
        self.feat_start = 0                         # ... starting at this local frame
        self.fed = 0                                # samples of the utterance pushed to the feature stream
        self.ref_latent: torch.Tensor | None = None
        self.graphs: ChunkGraphs | None = None

    def reset(self) -> None:
        self.state.reset()
        self.enc.reset()
        self.dec.reset()
        self.feat.reset()
        self.feat_rows, self.feat_start, self.fed = [], 0, 0
        self.ref_latent = None

    # one chunk ------------------------------------------------------------------------------------------------
    def features(self, utt: Utterance, lo: int, hi: int, last: bool) -> torch.Tensor:
        """Feature rows of local frames [lo, hi): push the utterance's samples up to the chunk's need (a fixed
        point for each chunk, so the pushes never depend on how the host split the audio)."""
        need = utt.pcm.end if last else min(hi * SAMPLES_PER_FRAME + self.e.lookahead_samples, utt.pcm.end)
        if need > self.fed:
            self.feat_rows.append(self.feat.push(utt.pcm.read(self.fed, need)))
            self.fed = need
        if last:
            self.feat_rows.append(self.feat.flush())
        rows = torch.cat(self.feat_rows) if len(self.feat_rows) != 1 else self.feat_rows[0]
        have = self.feat_start + rows.shape[0]
        if have < hi:
            raise RuntimeError(f"the audio front end emitted features up to frame {have} after {self.fed} samples, "
                               f"but frame {hi - 1} was expected (lookahead_samples={self.e.lookahead_samples} "
                               "understated?)")
        out = rows[lo - self.feat_start: hi - self.feat_start]
        self.feat_rows = [rows[hi - self.feat_start:].clone()]   # a copy, so the consumed rows can be freed
        self.feat_start = hi
        return out

    def conditioning(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 reference frames -> y (1, 49, 3, h, w): [ref latent, mask, masked, unmasked]."""
        e = self.e
        vae = e.vae
        video = frames_u8.to(e.device, non_blocking=True).permute(3, 0, 1, 2)[None].to(vae.dtype)
        video = video / 127.5 - 1.0
        both = torch.cat([video, video * e._keep])           # batch 2: unmasked, mouth-masked
        lat = self.enc.encode(both)                          # (2, 16, 3, h, w), normalised
        if self.ref_latent is None:
            self.ref_latent = lat[:1, :, :1].clone()
        F_ = lat.shape[2]
        y = torch.cat([self.ref_latent.expand(-1, -1, F_, -1, -1).to(e.dtype), e._latent_mask[:, :, :F_],
                       lat[1:2].to(e.dtype), lat[:1].to(e.dtype)], dim=1)
        return y

    def dit(self, y: torch.Tensor, audio: torch.Tensor, chunk_id: int) -> tuple[torch.Tensor, Callable]:
        """The denoising passes; returns x0 (1, 16, 3, h, w) float32 and a callable doing the cache write."""
        e = self.e
        if self.graphs is not None:
            return self.graphs.run(y, audio, chunk_id)
        x0 = eager_dit(e, self.state, y, audio, self.seed, chunk_id)
        return x0, lambda: eager_write(e, self.state, x0, y, audio)


def noise_offsets(chunk_id: int) -> tuple[int, int]:
    return 2 * chunk_id, 2 * chunk_id + 1


def model_input(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.to(y.dtype), y], dim=1)


def eager_dit(e: Engine, state, y, audio, seed: int, chunk_id: int) -> torch.Tensor:
    from lipforcing import ops

    t0, t1, t2 = e.timesteps
    off0, off1 = noise_offsets(chunk_id)
    shape = (1, e.config.out_dim, y.shape[2], *y.shape[3:])
    with e.stage("dit_pass_1"):
        zeros = torch.zeros(shape, device=y.device, dtype=torch.float32)
        _, x = ops.denoise_update(zeros, zeros, 0.0, 1.0, seed=seed, offset=off0, backend=e.backend)  # x = eps
        v = e.model.forward_chunk(model_input(x, y), schedule.timestep_input(t0), state, audio, write=False)
        v = v.contiguous()  # the velocity is a permuted view: copy it here so the copy counts as part of the pass
    with e.stage("denoise_update"):
        _, x = ops.denoise_update(x, v, t0, t1, seed=seed, offset=off1, backend=e.backend)
    with e.stage("dit_pass_2"):
        v = e.model.forward_chunk(model_input(x, y), schedule.timestep_input(t1), state, audio,
                                  write=False).contiguous()
    with e.stage("denoise_update"):
        x0, _ = ops.denoise_update(x, v, t1, t2, backend=e.backend)
    return x0


def eager_write(e: Engine, state, x0, y, audio) -> None:
    e.model.forward_chunk(model_input(x0, y), schedule.timestep_input(e.timesteps[2]), state, audio, write=True)


class ChunkGraphs:
    """The chunk step as five CUDA graphs sharing one private memory pool, one per stage (pass 1 with its noise
    draw, update 1, pass 2, update 2, cache write), replayed in capture order.  Static inputs: y, audio and the
    noise seed/offsets (0-d int64 device tensors, so replays draw fresh noise without a host sync).

    Captured after the session's first (eager) chunk, which serves as the warm-up (Triton autotuning, cuBLAS
    handles, cache allocation).  The graphs read the session's KV-cache buffers, which never move
    (``RollingKVCache`` resets in place), so they stay valid across utterances.  UNVERIFIED: written without a GPU.
    """

    def __init__(self, e: Engine, state, y: torch.Tensor, audio: torch.Tensor, seed: int):
        from lipforcing import ops

        self.e = e
        dev = y.device
        self.y = y.clone()
        self.audio = audio.clone()
        self.seed = torch.tensor(seed - (1 << 64) if seed >= (1 << 63) else seed, dtype=torch.int64, device=dev)
        self.off0 = torch.zeros((), dtype=torch.int64, device=dev)
        self.off1 = torch.zeros((), dtype=torch.int64, device=dev)
        t0, t1, t2 = e.timesteps
        shape = (1, e.config.out_dim, y.shape[2], *y.shape[3:])
        zeros = torch.zeros(shape, device=dev, dtype=torch.float32)
        self.x = torch.empty(shape, device=dev, dtype=torch.float32)
        self.x1 = torch.empty_like(self.x)
        self.x0 = torch.empty_like(self.x)
        scratch = torch.empty_like(self.x)
        scratch2 = torch.empty_like(self.x)
        model = e.model
        ts = [schedule.timestep_input(t) for t in (t0, t1, t2)]
        self.pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(dev)
        self.graphs = {}
        keep = {}   # outputs of one graph read by the next: kept alive so the pool does not reuse their memory

        def capture(name, fn):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
                keep[name] = fn()
            self.graphs[name] = g

        capture("dit_pass_1", lambda: (
            ops.denoise_update(zeros, zeros, 0.0, 1.0, seed=self.seed, offset=self.off0, out=(scratch, self.x),
                               backend=e.backend),
            model.forward_chunk(model_input(self.x, self.y), ts[0], state, self.audio, write=False).contiguous())[1])
        capture("denoise_update_1", lambda: ops.denoise_update(self.x, keep["dit_pass_1"], t0, t1, seed=self.seed,
                                                                offset=self.off1, out=(scratch, self.x1),
                                                                backend=e.backend))
        capture("dit_pass_2", lambda: model.forward_chunk(model_input(self.x1, self.y), ts[1], state, self.audio,
                                                          write=False).contiguous())
        capture("denoise_update_2", lambda: ops.denoise_update(self.x1, keep["dit_pass_2"], t1, t2,
                                                                out=(self.x0, scratch2), backend=e.backend))
        capture("cache_write", lambda: model.forward_chunk(model_input(self.x0, self.y), ts[2], state, self.audio,
                                                           write=True))
        self._keep = keep
        self._buffers = (zeros, scratch, scratch2)   # allocated outside the graphs: keep their memory
        torch.cuda.synchronize(dev)

    def run(self, y: torch.Tensor, audio: torch.Tensor, chunk_id: int):
        e = self.e
        self.y.copy_(y)
        self.audio.copy_(audio)
        off0, off1 = noise_offsets(chunk_id)
        self.off0.fill_(off0)
        self.off1.fill_(off1)
        g = self.graphs
        with e.stage("dit_pass_1"):
            g["dit_pass_1"].replay()
        with e.stage("denoise_update"):
            g["denoise_update_1"].replay()
        with e.stage("dit_pass_2"):
            g["dit_pass_2"].replay()
        with e.stage("denoise_update"):
            g["denoise_update_2"].replay()
        return self.x0, g["cache_write"].replay
