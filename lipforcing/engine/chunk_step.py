"""The chunk step of a session: the per-session model state (:class:`ChunkRunner`: KV caches, streaming VAE and
audio-feature state), the eager DiT passes and, with ``cuda_graphs=True``, the same passes as captured CUDA graphs
(:class:`ChunkGraphs`)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from lipforcing import schedule
from lipforcing.audio.pcm import FPS, SAMPLES_PER_FRAME
from lipforcing.config import VIDEO_FRAMES_PER_LATENT
from lipforcing.engine.frame import Frame

if TYPE_CHECKING:
    from lipforcing.engine.engine import Engine

logger = logging.getLogger("lipforcing.engine")

__all__ = ["STAGES", "ChunkJob", "ChunkRunner", "ChunkGraphs", "run_chunk_step", "forward_chunks", "eager_dit",
           "eager_write", "noise_offsets", "model_input"]

STAGES = ("audio_features", "face_align", "vae_encode", "dit_pass_1", "denoise_update", "dit_pass_2", "vae_decode",
          "paste_back", "cache_write")
"""Names passed to ``engine.stage(name)``, in the order a chunk runs them (``denoise_update`` twice).
``face_align`` (cut the aligned crops from full reference frames) and ``paste_back`` (composite the generated
crops into them) do nothing for references that are aligned crops already; detection and tracking run once per
reference, when the session opens (or in ``engine.prepare``)."""


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
        self.dec = engine.stream_decoder()          # the Wan VAE's or TAEHV's (Engine.decoder)
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
    def features(self, new_samples: torch.Tensor | None, lo: int, hi: int, last: bool) -> torch.Tensor:
        """Feature rows of local frames [lo, hi).  ``new_samples``: the utterance's samples from ``fed`` up to the
        chunk's need (a fixed point for each chunk, so the pushes never depend on how the host split the audio;
        :meth:`need` says where it is); ``last``: the utterance's last chunk (the stream is flushed)."""
        if new_samples is not None and new_samples.numel():
            self.feat_rows.append(self.feat.push(new_samples))
            self.fed += new_samples.numel()
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

    def need(self, pcm_end: int, hi: int, last: bool) -> int:
        """Samples of the utterance the features of a chunk ending at local frame ``hi`` need pushed."""
        return pcm_end if last else min(hi * SAMPLES_PER_FRAME + self.e.lookahead_samples, pcm_end)

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


# ------------------------------------------------------------------------------------------------------ batching
def forward_chunks(model, x: torch.Tensor, timestep, states: list, audio: torch.Tensor | None, *,
                   write: bool, split_linear: bool = False) -> torch.Tensor:
    """:meth:`CausalLipSyncDiT.forward_chunk` for B independent streams at once: one pass of the student at batch
    B in which every stream ``b`` attends to its own KV caches (``states[b]``, each a batch-1 ``StreamState``).

    x : (B, in_dim, F, h, w); timestep : a number (the same for every stream); audio : (B, F, 4, audio_dim).
    Everything but self-attention (patch embedding, modulation, text/audio cross-attention, FFN, head) runs at
    batch B; self-attention runs per stream on row ``b`` with ``states[b].caches[i]``; the time embedding, the same
    for every stream, is computed once.  States are **mutated** like ``forward_chunk`` when ``write=True``.
    Returns the velocity (B, 16, F, h, w) float32.

    split_linear : run every linear layer once per stream instead of on the B*L rows at once.  A BLAS GEMM's
    rounding can depend on the number of rows (MKL's does), so only the split form is bit-exact with running
    each stream alone; the engine uses it on the CPU and the folded form (the fast one) on a GPU, where results
    agree within rounding.
    """
    import functools

    from lipforcing import ops
    from lipforcing.model.layers import frame_timesteps, patchify
    from lipforcing.model.student import defer_qk, prepared_attention
    from lipforcing.ops.qk_norm import fused_backend as qk_norm_backend, qk_norm_modules
    from lipforcing.ops.rope import apply_rope

    if len(states) == 1:
        return model.forward_chunk(x, timestep, states[0], audio, write=write)
    c = model.config
    B, Fr, gh, gw = model._check_x(x)
    if B != len(states) or any(s.batch != 1 for s in states):
        raise ValueError(f"x has batch {B}; expected one batch-1 stream state per row, got {len(states)} states")
    for s in states:
        if s.grid is None:
            model._allocate(s, (gh, gw))
        elif s.grid != (gh, gw):
            raise ValueError(f"x has a latent grid of {(gh, gw)} tokens but a stream was set up for {s.grid}")
    tpf = gh * gw
    if not isinstance(timestep, (int, float)):
        raise TypeError(f"timestep must be a number shared by the streams, got {type(timestep).__name__}")
    e, e0 = model.embed_time(frame_timesteps(timestep, 1, Fr, x.device))
    e, e0 = e.expand(B, *e.shape[1:]).contiguous(), e0.expand(B, *e0.shape[1:]).contiguous()
    backend = model.attn_backend
    text_kv = _batched_text_kv(states, B)
    mode = _SplitLinear() if split_linear else contextlib.nullcontext()

    # Triton path: the q/k RMSNorm in ops.qk_norm launches (see forward_chunk).  Absolute mode: WanBlock.forward
    # calls attend.prepare_qk = norm + RoPE per stream at its absolute frames.  Dynamic mode: prepare_qk only defers
    # the norms to the attend, which runs model.student.prepared_attention per stream (qk_norm with q's window
    # rotation and the store of the chunk into that stream's caches, then chunk_attention with both flags)
    fused = qk_norm_backend(backend, x.device, model.dtype)
    decided = {}

    def prepare_qk(q, k, norm_q, norm_k):
        qs, ks = zip(*(qk_norm_modules(q[b:b + 1], k[b:b + 1], norm_q, norm_k, frame_offset=s.frame, backend=fused,
                                       rope=model.rope_table(s.grid, s.frame + Fr, x.device))
                       for b, s in enumerate(states)))
        return torch.cat(qs), torch.cat(ks)

    def attend_for(i):
        norms = []

        def attend(q, k, v):
            out = []
            for b, s in enumerate(states):
                qb, kb, vb = q[b:b + 1], k[b:b + 1], v[b:b + 1]
                if norms:  # dynamic mode on the fused path: raw projections (defer_qk)
                    out.append(prepared_attention(qb, kb, vb, norms, s.caches[i], s.rope, write=write,
                                                  backend=backend, fused=fused, decided=decided))
                elif c.rope_mode == "absolute":
                    if fused is None:
                        spec = model.rope_table(s.grid, s.frame + Fr, x.device)
                        t_pos = (torch.arange(Fr, device=x.device) + s.frame).repeat_interleave(tpf)
                        qb = apply_rope(qb, t_pos, spec).to(vb.dtype)
                        kb = apply_rope(kb, t_pos, spec).to(vb.dtype)
                    out.append(ops.chunk_attention(qb, kb, vb, s.caches[i], write=write, backend=backend))
                else:
                    out.append(ops.chunk_attention(qb, kb, vb, s.caches[i], write=write, rope=s.rope,
                                                   backend=backend))
            return torch.cat(out)
        if fused is not None:
            attend.prepare_qk = prepare_qk if c.rope_mode == "absolute" else functools.partial(defer_qk, norms)
        return attend

    with mode:
        audio_tok = model.audio_tokens(audio, B, Fr)
        tokens = patchify(x, model.patch_embedding.weight, model.patch_embedding.bias, c.patch_size).float()
        h = model.run_blocks(tokens, e0, attend_for, text_kv, audio_tok, tokens_per_frame=tpf,
                             audio_scale=states[0].audio_scale, side_effects=write)
        out = model.output(h, e, (Fr, gh, gw))
    if write:
        for s in states:
            s.frame += Fr
    return out


class _SplitLinear(TorchFunctionMode):
    """``F.linear`` on a (B, ..., K) input with B > 1 as B separate calls, and the text + audio cross-attention op
    (``lipforcing::audio_cross_attention``) once per stream: its reference computes q k^T with a batched GEMM whose
    rounding on the CPU also depends on the batch (see ``forward_chunks``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x = args[0] if args else kwargs["input"]
            if x.dim() >= 3 and x.shape[0] > 1:
                rest = list(args[1:])
                weight = rest.pop(0) if rest else kwargs["weight"]
                bias = rest.pop(0) if rest else kwargs.get("bias")
                return torch.stack([func(x[i], weight, bias) for i in range(x.shape[0])])
        elif func is torch.ops.lipforcing.audio_cross_attention.default and not kwargs and args[0].shape[0] > 1:
            # (q, text_k, text_v, audio_k, audio_v, *scalars) -> (out, lse_text, lse_audio), all batch-first
            tensors, rest = args[:5], args[5:]
            rows = [func(*(t[i:i + 1] for t in tensors), *rest) for i in range(args[0].shape[0])]
            return tuple(torch.cat(parts) for parts in zip(*rows))
        return func(*args, **kwargs)


def _batched_text_kv(states: list, batch: int) -> list:
    """Per block the text (k, v) of every stream stacked on the batch axis (one shared tensor when every stream
    holds the same one, which is the engine's case: the prompt embedding is the engine's)."""
    out = []
    for i in range(len(states[0].text_kv)):
        ks = [s.text_kv[i][0] for s in states]
        vs = [s.text_kv[i][1] for s in states]
        if all(k is ks[0] for k in ks) and all(v is vs[0] for v in vs):
            out.append((ks[0].expand(batch, *ks[0].shape[1:]), vs[0].expand(batch, *vs[0].shape[1:])))
        else:
            out.append((torch.cat(ks), torch.cat(vs)))
    return out


# ------------------------------------------------------------------------------------------------- chunk step
@dataclass
class ChunkJob:
    """One chunk of one session, as the scheduler hands it to :func:`run_chunk_step`: everything read from the
    session under its lock, so the step itself never touches the session's buffers.

    c, lo, hi : chunk index in the utterance and its local video frames [lo, hi); ``last``: the utterance's last
    chunk.  first_index : session index of local frame 0; n_emit : frames [lo, n_emit) are emitted (the last
    chunk's padding frames are not).  samples : new 16 kHz samples for the audio features (from ``runner.fed``);
    frame_audio : (hi - lo) * 640 samples paired with the frames; reference : (hi - lo, H, W, 3) uint8 frames
    (aligned crops, or full frames whose crops ``face`` cuts; ``ref_index``: their reference frame numbers).
    reset : a new utterance starts here (the runner is reset first).  session, epoch, deadline : the scheduler's
    bookkeeping (results of an interrupted epoch are dropped; earliest deadline first); utt : its utterance.
    """

    session: Any
    runner: ChunkRunner
    c: int
    lo: int
    hi: int
    last: bool
    first_index: int
    n_emit: int
    chunk_id: int
    samples: torch.Tensor | None
    frame_audio: np.ndarray
    reference: torch.Tensor
    reset: bool
    epoch: int
    deadline: float
    capture_graphs: bool = False
    utt: Any = None
    face: Any = None                    # the session's FaceReference (full-frame reference) or None
    ref_index: Any = None               # reference frame index of each frame (with ``face``)


def run_chunk_step(e: Engine, jobs: list[ChunkJob]) -> list[list[Frame]]:
    """Compute one chunk for each job (sessions are distinct): audio features, VAE encode and decode per session,
    the DiT passes of all of them at batch ``len(jobs)`` (one pass per stage; each session its own KV caches,
    noise and conditioning; with CUDA graphs, which are captured at batch 1, one session after another).
    Returns the frames of each job.  Runs in the scheduler's worker thread under ``torch.no_grad()``.

    Non-finite values (an audio front end or a model pass that overflowed) never poison a stream: one reduction per
    chunk over its audio features and its x0 flags the chunk on the device; a flagged chunk continues from its
    reference (x0 replaced by the reference latents for the decoder's and the KV cache's state, zero audio for the
    DiT) and, when its frames are handed out (after the decode's device-to-host copy, so no extra wait), its frames
    are the reference frames passed through, with a warning on the ``lipforcing.engine`` logger."""
    from lipforcing.model.audio import group_audio_frames

    with torch.no_grad():
        for j in jobs:
            if j.reset:
                j.runner.reset()
        with e.stage("audio_features"):
            audios = []
            for j in jobs:
                feats = j.runner.features(j.samples, j.lo, j.hi, j.last).to(e.device)
                if j.c == 0:
                    audios.append(group_audio_frames(feats[None]))
                else:
                    audios.append(feats.reshape(1, -1, VIDEO_FRAMES_PER_LATENT, feats.shape[-1]))
            finite = [torch.isfinite(a).all() for a in audios]          # device flags: no host sync here
            audios = [torch.where(ok, a, torch.zeros((), dtype=a.dtype, device=a.device))
                      for ok, a in zip(finite, audios)]
        with e.stage("face_align"):
            crops = [j.reference if j.face is None else j.face.crops(j.reference, j.ref_index) for j in jobs]
        with e.stage("vae_encode"):
            ys = [j.runner.conditioning(c) for j, c in zip(jobs, crops)]
        if e.cuda_graphs:
            for j, y, audio in zip(jobs, ys, audios):
                if j.capture_graphs and j.runner.graphs is None:
                    j.runner.graphs = ChunkGraphs(e, j.runner.state, y, audio, j.runner.seed)
        x0s, write = _dit(e, jobs, ys, audios)
        for b, (x0, y) in enumerate(zip(x0s, ys)):
            finite[b] = finite[b] & torch.isfinite(x0).all()
            # in place: the decoder and the cache write (which holds x0) continue from the reference latents (the
            # last 16 channels of y: the unmasked reference sequence) instead of NaN
            x0.copy_(torch.where(finite[b], x0, y[:, -x0.shape[1]:].to(x0.dtype)))
        with e.stage("vae_decode"):
            images = []
            for j, x0 in zip(jobs, x0s):
                video = j.runner.dec.decode(x0)                                  # (1, 3, n, H, W) in [-1, 1]
                img = ((video[0].float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
                images.append(img.permute(1, 2, 3, 0).contiguous().cpu().numpy())  # (n, H, W, 3)
        with e.stage("paste_back"):
            # only the frames that are emitted (the last chunk's padding frames are not)
            fulls = [imgs if j.face is None else j.face.paste(j.reference[:j.n_emit - j.lo],
                                                              imgs[:j.n_emit - j.lo], j.ref_index[:j.n_emit - j.lo])
                     for j, imgs in zip(jobs, images)]
        with e.stage("cache_write"):
            write()
    out = []
    for b, (j, imgs, full) in enumerate(zip(jobs, images, fulls)):
        if not bool(finite[b]):      # read after the frames reached the host (.cpu() above): no extra wait
            logger.warning("lipforcing: non-finite values (NaN/inf) in the chunk step of frames %d..%d (chunk %d); "
                           "those frames are the reference frames passed through and the stream continues from them",
                           j.first_index + j.lo, j.first_index + j.n_emit - 1, j.chunk_id)
            imgs = crops[b].cpu().numpy()
            full = imgs if j.face is None else j.reference[:j.n_emit - j.lo].cpu().numpy()
        frames = []
        for f in range(j.lo, j.n_emit):
            index = j.first_index + f
            a = j.frame_audio[(f - j.lo) * SAMPLES_PER_FRAME:(f - j.lo + 1) * SAMPLES_PER_FRAME].copy()
            frames.append(Frame(index=index, pts=index / FPS, image=full[f - j.lo], audio=a, chunk_id=j.chunk_id,
                                face=imgs[f - j.lo]))
        out.append(frames)
    return out


def _dit(e: Engine, jobs: list[ChunkJob], ys: list, audios: list) -> tuple[list, Callable]:
    """The two denoising passes of every job; returns each job's x0 (1, 16, F, h, w) and the cache-write call."""
    if len(jobs) == 1 or e.cuda_graphs:
        res = [j.runner.dit(y, a, j.chunk_id) for j, y, a in zip(jobs, ys, audios)]
        writes = [w for _, w in res]
        return [x0 for x0, _ in res], (writes[0] if len(writes) == 1 else lambda: [w() for w in writes])
    from lipforcing import ops

    t0, t1, t2 = e.timesteps
    y, audio = torch.cat(ys), torch.cat(audios)
    states = [j.runner.state for j in jobs]
    split = e.batch_linear == "split"
    offs = [noise_offsets(j.chunk_id) for j in jobs]
    seeds = [j.runner.seed for j in jobs]
    shape = (1, e.config.out_dim, y.shape[2], *y.shape[3:])
    # the noise and the updates per session (own seed and offset); the passes at batch B
    with e.stage("dit_pass_1"):
        zeros = torch.zeros(shape, device=y.device, dtype=torch.float32)
        x = torch.cat([ops.denoise_update(zeros, zeros, 0.0, 1.0, seed=sd, offset=o[0], backend=e.backend)[1]
                       for sd, o in zip(seeds, offs)])
        v = forward_chunks(e.model, model_input(x, y), schedule.timestep_input(t0), states, audio,
                           write=False, split_linear=split).contiguous()
    with e.stage("denoise_update"):
        x = torch.cat([ops.denoise_update(x[b:b + 1], v[b:b + 1], t0, t1, seed=sd, offset=o[1], backend=e.backend)[1]
                       for b, (sd, o) in enumerate(zip(seeds, offs))])
    with e.stage("dit_pass_2"):
        v = forward_chunks(e.model, model_input(x, y), schedule.timestep_input(t1), states, audio,
                           write=False, split_linear=split).contiguous()
    with e.stage("denoise_update"):
        x0 = torch.cat([ops.denoise_update(x[b:b + 1], v[b:b + 1], t1, t2, backend=e.backend)[0]
                        for b in range(len(jobs))])

    def write():
        forward_chunks(e.model, model_input(x0, y), schedule.timestep_input(t2), states, audio, write=True,
                       split_linear=split)

    return [x0[b:b + 1] for b in range(len(jobs))], write
