"""``lipforcing train --stage vae``: the Wan-architecture causal VAE (:class:`lipforcing.vae.WanVAE`, a small
config) trained as an autoencoder on clips of the procedural world.

Default shape: 64 x 64 crops, 4x spatial and 4x temporal compression (``dim_mult`` (1, 2, 2), both resamplings
temporal), 16 latent channels, so a 21-frame clip becomes 6 latent frames of 16 x 16 (the DiT sees 8 x 8 patches of
2 x 2) and the mouth (about 14 x 10 pixels when open) spans several latent cells.  Loss per pixel: L1 + MSE, the
mouth box (from the world's ground truth) weighted ``mouth_weight`` times, plus ``latent_l2`` times the mean square of
the latent mean (keeps the latent scale bounded; the VAE is deterministic, as Wan's is at inference).

Stream position: the engine streams minutes through the causal VAE, but a VAE trained only on whole 21-frame clips
never sees its causal caches past the clip start, and falls apart after it (measured: 25 dB in frames 0-20, then
13, 10, 9 dB in the next 20-frame blocks).  With ``warmup_frames`` > 0 each iteration first streams a prefix of
``4 m`` frames (m uniform in [0, warmup_frames / 4], no gradients) through the encoder and decoder, then trains on
the next ``frames`` frames with the caches the prefix left (truncated back-propagation through time), so every
stream position up to the prefix length is trained.

Data: each iteration renders its world clips with numpy on the CPU; with ``workers`` > 0 they are rendered by a pool
of that many processes (spawned once per ``train`` call, closed when it returns), and the next iteration's clips
are rendered while this one trains (its seeds are known in advance).  The batches are bit-identical to inline
rendering (``workers: 0``), so the training run is the same either way: on a GPU the renderer is the bottleneck.

Weight average: with ``ema_decay`` d > 0 the stage keeps an exponential moving average of the weights (after each
step ``ema = d ema + (1 - d) w``; resuming from a checkpoint without one starts it from the resumed weights).  At
batch 1 the weights of neighbouring checkpoints differ a lot in how well they keep the mouth (measured: the round-trip
mouth-darkness correlation of one held-out clip went 0.73, 0.77, 0.38 over three checkpoints 400 iterations apart);
the average is what gets exported.

Each checkpoint holds the training weights (``vae_raw.safetensors``, for resuming; ``vae_ema.safetensors`` with the
average) and the exported ``vae.safetensors`` (the average when there is one): per-channel latent statistics
measured on ``stats_clips`` world clips are folded into its ``conv1``/``conv2`` (exact affine rewrite), so
``lipforcing.load_vae(path)`` and ``Engine.load(vae=path)`` give zero-mean, unit-std DiT latents with the stock
loader; the measured statistics are in its metadata too.  Metrics: ``loss``, ``psnr`` and ``mouth_psnr`` (dB, on the
training batch).
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from lipforcing.distill.errors import TrainConfigError
from lipforcing.distill.stages.base import Stage, StageConfig, check_int, check_positive_number

log = logging.getLogger("lipforcing.train")

__all__ = ["VAEStageConfig", "VAEStage", "DEFAULT_VAE", "world_video_batch", "world_clip_arrays", "psnr",
           "mouth_psnr"]

DEFAULT_VAE = {"dim": 16, "z_dim": 16, "dim_mult": [1, 2, 2], "num_res_blocks": 1,
               "temporal_downsample": [True, True]}


@dataclass
class VAEStageConfig(StageConfig):
    stage: str = "vae"
    lr: float = 2e-4
    vae: dict = field(default_factory=lambda: dict(DEFAULT_VAE))
    size: int = 64
    frames: int = 21
    mouth_weight: float = 3.0
    latent_l2: float = 1e-4
    warmup_frames: int = 0     # longest no-gradient prefix streamed before the trained frames (multiple of 4)
    speech: str = "auto"
    stats_clips: int = 4
    workers: int = 0           # processes rendering the clips (0: inline); same batches either way
    ema_decay: float = 0.0     # weight average exported (0: off; e.g. 0.999 averages about the last 1000 steps)
    output_dir: str = "runs/vae"

    def __post_init__(self):
        super().__post_init__()
        check_int("size", self.size, minimum=16)
        check_int("frames", self.frames)
        check_int("stats_clips", self.stats_clips)
        check_int("workers", self.workers, minimum=0)
        check_positive_number("mouth_weight", self.mouth_weight)
        check_positive_number("latent_l2", self.latent_l2, allow_zero=True)
        check_int("warmup_frames", self.warmup_frames, minimum=0)
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise TrainConfigError(f"ema_decay must be a number in [0, 1), got {self.ema_decay!r}")
        if self.speech not in ("auto", "espeak", "synthetic"):
            raise TrainConfigError(f"speech must be 'auto', 'espeak' or 'synthetic', got {self.speech!r}")
        cfg = self.vae_config()
        if (self.frames - 1) % cfg.temporal_factor:
            raise TrainConfigError(f"frames must be 1 + {cfg.temporal_factor} k for this VAE, got {self.frames}")
        if self.warmup_frames % cfg.temporal_factor:
            raise TrainConfigError(f"warmup_frames must be a multiple of {cfg.temporal_factor}, got "
                                   f"{self.warmup_frames}")
        if self.size % cfg.spatial_factor:
            raise TrainConfigError(f"size must be a multiple of {cfg.spatial_factor}, got {self.size}")

    def vae_config(self):
        from lipforcing.vae import VAEConfig

        if not isinstance(self.vae, dict):
            raise TrainConfigError(f"vae must be a mapping of VAEConfig fields, got {type(self.vae).__name__}")
        try:
            return VAEConfig.from_dict(self.vae)
        except (TypeError, ValueError) as exc:
            raise TrainConfigError(f"vae: {exc}") from None


def _db(mse: float) -> float:
    """PSNR in dB of a mean squared error between videos in [-1, 1] (peak-to-peak 2)."""
    return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2)."""
    return _db(float(((a.float() - b.float()) ** 2).mean()))


def mouth_psnr(rec: torch.Tensor, video: torch.Tensor, box: torch.Tensor) -> float:
    """PSNR in dB inside the mouth: ``rec``/``video`` (B, 3, T, H, W) in [-1, 1], ``box`` (B, 1, T, H, W) the 0/1
    mouth mask (the error is averaged over the masked pixels of the 3 channels)."""
    return _db(float((((rec - video) ** 2) * box).sum() / (3 * box.sum()).clamp(min=1)))


def world_clip_arrays(seed: int, frames: int, size: int, speech: str = "auto", split: str = "train"):
    """One world clip as (frames (T, H, W, 3) uint8, mouth boxes [(top, bottom, left, right)] per frame): the
    picklable piece of :func:`world_video_batch` that worker processes render."""
    from lipforcing.world import make_clip

    c = make_clip(int(seed), frames, size=size, split=split, speech=speech, reference=False)
    return c.frames, [tuple(int(v) for v in b) for b in c.boxes]


def _render(args):
    return world_clip_arrays(*args)


def _worker_init(parent: int) -> None:
    """A render worker leaves its parent's process group, so a signal to the group (Ctrl-C, ``timeout``) reaches
    only the trainer, which finishes its iteration with the workers' help and then closes the pool; and it exits
    on its own if the trainer dies without closing it."""
    import os
    import threading
    import time

    if hasattr(os, "setpgrp"):
        os.setpgrp()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def world_video_batch(seeds, frames: int, size: int, speech: str = "auto", split: str = "train", *, pool=None):
    """World clips as a video batch (B, 3, T, H, W) in [-1, 1] and a per-pixel mouth-box mask (B, 1, T, H, W).

    pool : optional ``multiprocessing`` pool (or an ``AsyncResult`` of ``pool.map`` over the same clips, see
        :meth:`VAEStage.prefetch`) that renders the clips; the tensors are the same as without it."""
    jobs = [(int(s), frames, size, speech, split) for s in seeds]
    if pool is None:
        arrays = [_render(j) for j in jobs]
    elif hasattr(pool, "get"):
        arrays = pool.get()
    else:
        arrays = pool.map(_render, jobs)
    return _video_batch(arrays, frames, size)


def _video_batch(arrays, frames: int, size: int):
    vids, masks = [], []
    for clip_frames, boxes in arrays:
        vids.append(torch.from_numpy(clip_frames).permute(3, 0, 1, 2).float() / 127.5 - 1)
        m = torch.zeros(1, frames, size, size)
        for f, (t, b, l, r) in enumerate(boxes):
            m[0, f, t:b, l:r] = 1
        masks.append(m)
    return torch.stack(vids), torch.stack(masks)


class VAEStage(Stage):
    name = "vae"
    Config = VAEStageConfig

    def build(self) -> None:
        from lipforcing.vae import WanVAE

        self.vae = WanVAE(self.cfg.vae_config()).to(self.device)
        self.vae.check_inputs = False
        self.models = {"vae_raw": (self.vae, self.optimizer(self.vae))}
        self.ema = copy.deepcopy(self.vae).requires_grad_(False).eval() if self.cfg.ema_decay else None

    @property
    def exported(self):
        """The weights that are exported and evaluated: the average when ``ema_decay`` > 0."""
        return self.vae if self.ema is None else self.ema

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is None:
            return
        for e, p in zip(self.ema.parameters(), self.vae.parameters()):
            e.lerp_(p, 1.0 - self.cfg.ema_decay)
        for e, b in zip(self.ema.buffers(), self.vae.buffers()):
            e.copy_(b)

    def load(self, path) -> None:
        """Resume (see :meth:`Stage.load`), then the weight average: from the checkpoint's ``vae_ema.safetensors``,
        or the resumed weights when it has none."""
        from lipforcing.distill import checkpoint as ckpt

        super().load(path)
        if self.ema is None:
            return
        f = ckpt.resolve_checkpoint(path) / "vae_ema.safetensors"
        if f.is_file():
            sd, _ = ckpt.load_tensors(f)
            try:
                self.ema.load_state_dict(sd)
            except RuntimeError as exc:
                raise TrainConfigError(f"{f}: does not fit this run's VAE ({' '.join(str(exc).split())[:300]})") \
                    from None
        else:
            self.ema.load_state_dict(self.vae.state_dict())
            log.info("vae: the weight average starts from the resumed weights (%s has no vae_ema.safetensors)",
                     f.parent)

    # data: clip seeds and prefix of iteration k; rendered inline or by the worker pool, one iteration ahead ------
    def clip_jobs(self, k: int) -> tuple[list, int]:
        """(seeds, frames) of iteration k's clips: frames = prefix + ``frames``, the prefix drawn per iteration."""
        c = self.cfg
        seeds = [self.seed_of(k, "clip", b) for b in range(c.batch_size)]
        f = self.vae.temporal_factor
        prefix = f * (self.seed_of(k, "prefix") % (c.warmup_frames // f + 1))
        return seeds, prefix + c.frames

    def _pool(self):
        if self.cfg.workers and getattr(self, "_workers", None) is None:
            import multiprocessing
            import os

            self._workers = multiprocessing.get_context("spawn").Pool(self.cfg.workers, _worker_init, (os.getpid(),))
            self._ahead = None
        return getattr(self, "_workers", None)

    def prefetch(self, k: int) -> None:
        """Start rendering iteration k's clips in the pool (no-op without workers)."""
        pool = self._pool()
        if pool is not None:
            seeds, frames = self.clip_jobs(k)
            self._ahead = (k, pool.map_async(_render, [(s, frames, self.cfg.size, self.cfg.speech, "train")
                                                       for s in seeds]))

    def batch(self, k: int):
        """Iteration k's (video, box) on the CPU: from the prefetched render when it is k's, then the next one is
        started; inline without workers."""
        c = self.cfg
        seeds, frames = self.clip_jobs(k)
        pool = self._pool()
        if pool is None:
            return world_video_batch(seeds, frames, c.size, c.speech)
        ahead = self._ahead if self._ahead is not None and self._ahead[0] == k else None
        out = world_video_batch(seeds, frames, c.size, c.speech, pool=ahead[1] if ahead else pool)
        self.prefetch(k + 1)
        return out

    def close(self) -> None:
        pool = getattr(self, "_workers", None)
        if pool is not None:
            pool.terminate()
            pool.join()
            self._workers = self._ahead = None

    def step(self, k: int) -> dict:
        c = self.cfg
        video, box = self.batch(k)
        prefix = video.shape[2] - c.frames
        video, box = video.to(self.device), box.to(self.device)
        enc_state, dec_state = {}, {}
        if prefix:
            # frames 0 .. prefix (a valid first piece, 1 + 4 m) only set the caches; the trained piece is the
            # remaining frames - 1 frames (a multiple of 4, as every later piece of a stream)
            with torch.no_grad():
                self.vae._decode_step(self.vae._encode_step(video[:, :, :prefix + 1], enc_state), dec_state)
            video, box = video[:, :, prefix + 1:], box[:, :, prefix + 1:]
        mu = self.vae._encode_step(video, enc_state)        # causal pass (whole clip when there is no prefix)
        rec = self.vae._decode_step(mu, dec_state)
        w = 1.0 + (c.mouth_weight - 1.0) * box
        err = rec - video
        pix = (w * (err.abs() + err ** 2)).mean() / w.mean()
        loss = pix + c.latent_l2 * mu.pow(2).mean()
        gnorm = self.clip_and_step("vae_raw", loss)
        self.update_ema()
        with torch.no_grad():
            r = rec.clamp(-1, 1)
        return {"loss": loss.item(), "psnr": psnr(r, video), "mouth_psnr": mouth_psnr(r, video, box),
                "grad_norm": gnorm,
                "latent_rms": float(mu.detach().pow(2).mean().sqrt())}

    @torch.no_grad()
    def latent_stats(self) -> tuple[list, list]:
        """Per-channel mean and std of the exported weights' raw latent mean over ``stats_clips`` fixed world
        clips."""
        c = self.cfg
        seeds = [self.seed_of("stats", i) for i in range(c.stats_clips)]
        pool = getattr(self, "_workers", None)          # a running pool only (export may run outside train)
        video, _ = (world_video_batch(seeds, c.frames, c.size, c.speech) if pool is None else
                    world_video_batch(seeds, c.frames, c.size, c.speech, pool=pool))
        vae = self.exported
        was_training = vae.training
        vae.eval()
        mu = vae.encode(video.to(self.device), normalize=False).float()
        vae.train(was_training)
        mean = mu.mean(dim=(0, 2, 3, 4))
        std = mu.std(dim=(0, 2, 3, 4)).clamp(min=1e-3)
        return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]

    def export(self, ck) -> None:
        """``vae.safetensors``: the exported weights (the average when ``ema_decay`` > 0) with their measured latent
        statistics folded into ``conv1`` / ``conv2`` (see :func:`fold_latent_stats`), loadable by any Wan-VAE
        loader; the statistics are in its metadata too.  ``vae_ema.safetensors``: the average as it is, to resume."""
        from lipforcing.distill import checkpoint as ckpt

        if self.ema is not None:
            ckpt.save_tensors(self.ema.state_dict(), ck / "vae_ema.safetensors",
                              {"stage": "vae", "ema_decay": json.dumps(self.cfg.ema_decay)})
        mean, std = self.latent_stats()
        sd = fold_latent_stats(self.exported.state_dict(), mean, std, self.vae.config)
        ckpt.save_tensors(sd, ck / "vae.safetensors",
                          {"stage": "vae", "vae_config": json.dumps(self.vae.config.to_dict()),
                           "measured_latents_mean": json.dumps(mean), "measured_latents_std": json.dumps(std),
                           "weights": "ema %g" % self.cfg.ema_decay if self.ema is not None else "raw",
                           "note": "measured statistics folded into conv1/conv2 (normalised with the config's)"})


def fold_latent_stats(sd: dict, mean, std, config) -> dict:
    """Rewrite a VAE state dict so that its raw latent mean ``mu`` (measured per-channel ``mean`` / ``std``)
    comes out as ``mu' = M + S (mu - mean) / std`` with ``M``, ``S`` the config's statistics (Wan2.1's for 16
    channels), and the decoder undoes it: ``normalize=True`` then yields zero-mean, unit-std DiT latents with the
    stock loader, and decode(encode(x)) is unchanged.  ``conv1`` (rows of the mean) and ``conv2`` (1x1x1) are affine,
    so the fold is exact up to rounding."""
    M = torch.tensor(config.latents_mean, dtype=torch.float64)
    S = torch.tensor(config.latents_std, dtype=torch.float64)
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    a, d = S / s, M - S / s * m                       # mu' = a mu + d
    z = len(M)
    out = {k: v.clone() for k, v in sd.items()}
    w1, b1 = out["conv1.weight"].double(), out["conv1.bias"].double()
    w1[:z] *= a.view(-1, 1, 1, 1, 1)
    b1[:z] = a * b1[:z] + d
    w2, b2 = out["conv2.weight"].double(), out["conv2.bias"].double()   # conv2(mu) = W2 (mu' - d) / a + b2
    b2 = b2 - (w2[:, :, 0, 0, 0] * (d / a)[None]).sum(1)
    w2 = w2 / a.view(1, -1, 1, 1, 1)
    dt = sd["conv1.weight"].dtype
    out.update({"conv1.weight": w1.to(dt), "conv1.bias": b1.to(dt), "conv2.weight": w2.to(dt),
                "conv2.bias": b2.to(dt)})
    return out


def resolve_vae(path, *, device=None):
    """A trained VAE from a vae run folder (its ``latest`` checkpoint), a checkpoint folder or a weight file;
    a preset name (``"tiny"``, ``"wan2.1"``) gives random weights of that preset."""
    from pathlib import Path

    from lipforcing.distill import checkpoint as ckpt
    from lipforcing.vae import WanVAE, load_vae

    p = Path(path)
    if not p.exists() and str(path) in ("tiny", "wan2.1"):
        return WanVAE(str(path)).to(device).eval()
    if p.is_dir():
        p = ckpt.resolve_checkpoint(p)
        if p.is_dir():
            p = p / "vae.safetensors"
    if not p.is_file():
        raise TrainConfigError(f"{path}: no VAE weights (expected a vae run folder, a checkpoint folder or a file)")
    return load_vae(p, device=device)


@torch.no_grad()
def evaluate_vae(vae, *, clips: int = 4, frames: int = 21, size: int = 64, split: str = "eval", seed: int = 0,
                 speech: str = "auto", late_frames: int = 60) -> dict:
    """Reconstruction quality of ``vae`` on world clips (held-out people and speech by default), averaged over
    clips: PSNR (dB) of the whole frame (``psnr``) and of the mouth box (``mouth_psnr``) over the first ``frames``
    frames, the same two over the ``late_frames`` frames that follow them in the same stream (``late_psnr``,
    ``late_mouth_psnr``: a streaming VAE must not degrade past its training clip length; 0 skips them), and the
    mouth diagnostics of :func:`mouth_fidelity`."""
    seeds = [30_000_001 + 7919 * seed + i for i in range(clips)]
    if late_frames % vae.temporal_factor:
        raise ValueError(f"late_frames must be a multiple of {vae.temporal_factor}, got {late_frames}")
    video, box = world_video_batch(seeds, frames + late_frames, size, speech, split)
    video, box = video.to(vae.device, vae.dtype), box.to(vae.device, vae.dtype)
    rec = torch.cat([vae.decode(vae.encode(v[None], normalize=True), normalize=True) for v in video])
    out = {"psnr": psnr(rec[:, :, :frames], video[:, :, :frames]),
           "mouth_psnr": mouth_psnr(rec[:, :, :frames], video[:, :, :frames], box[:, :, :frames])}
    if late_frames:
        out.update(late_psnr=psnr(rec[:, :, frames:], video[:, :, frames:]),
                   late_mouth_psnr=mouth_psnr(rec[:, :, frames:], video[:, :, frames:], box[:, :, frames:]))
        out.update(stream_mouth_track(vae, seeds, frames + late_frames, size, split, speech, skip=frames))
    return {**out, **mouth_fidelity(vae, seeds, frames, size, split, speech), "clips": clips, "frames": frames,
            "late_frames": late_frames, "split": split}


def _roundtrip_u8(vae, frames_u8: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 frames through ``vae`` as one causal clip -> the same layout."""
    x = torch.from_numpy(frames_u8).permute(3, 0, 1, 2)[None].to(vae.device, vae.dtype) / 127.5 - 1
    r = vae.decode(vae.encode(x, normalize=True), normalize=True)[0].float().clamp(-1, 1)
    return ((r + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 1e-6 and b.std() > 1e-6 else float("nan")


@torch.no_grad()
def stream_mouth_track(vae, seeds, frames: int, size: int, split: str = "eval", speech: str = "auto", *,
                       skip: int = 0) -> dict:
    """Per-frame mouth motion over a stream of ``frames`` frames (the people ``seeds`` saying their clips' speech),
    mean over clips:

    * ``stream_mouth_track``: correlation of the round trip's mouth-box darkness with the input's over frames
      ``skip`` .. ``frames`` (past the training-clip length when ``skip`` is, e.g., 21);
    * ``stream_mouth_track_ceiling``: the same correlation for the input's own means over each latent group (frame
      0 alone, then groups of ``vae.temporal_factor``): what a VAE that keeps only each latent frame's average
      mouth would score; the temporal compression itself costs 1 minus this."""
    from lipforcing.eval.metrics import box_darkness
    from lipforcing.world import make_clip

    f = vae.temporal_factor
    track, ceiling = [], []
    for s in seeds:
        c = make_clip(int(s), frames, size=size, split=split, speech=speech, reference=False)
        truth = box_darkness(c.frames, c.boxes)
        got = box_darkness(_roundtrip_u8(vae, c.frames), c.boxes)
        groups = np.concatenate([truth[:1]] + [np.full(len(truth[i:i + f]), truth[i:i + f].mean())
                                               for i in range(1, len(truth), f)])
        track.append(_corr(truth[skip:], got[skip:]))
        ceiling.append(_corr(truth[skip:], groups[skip:]))
    return {"stream_mouth_track": float(np.mean(track)), "stream_mouth_track_ceiling": float(np.mean(ceiling))}


@torch.no_grad()
def mouth_fidelity(vae, seeds, frames: int, size: int, split: str = "eval", speech: str = "auto") -> dict:
    """Whether ``vae`` carries the mouth, for the world people ``seeds`` (their head motion and blinks):

    * ``mouth_contrast``: (open - closed) mouth-box darkness after the VAE round trip of the person holding the mouth
      fully open vs closed for the whole clip, as a fraction of the same difference in the input (1: the opening
      survives; 0: the VAE draws the same mouth for both; averaged over people);
    * ``mouth_track``: correlation over all frames of the round trip's box darkness with the input's, for the
      person saying the clip's speech (the per-frame opening must survive the 4x temporal compression).
    PSNR can rise while both stay near 0 (a blurred face with an average mouth), so VAE runs report them."""
    from lipforcing.eval.metrics import box_darkness
    from lipforcing.world import make_clip
    from lipforcing.world.mouth import MouthTrack
    from lipforcing.world.render import render_frames

    contrast, track = [], []
    for s in seeds:
        c = make_clip(int(s), frames, size=size, split=split, speech=speech, reference=False)
        dark = {}
        for name, opening in (("closed", 0.0), ("open", 1.0)):
            mouth = MouthTrack(np.full(frames, opening, np.float32), np.full(frames, 0.5, np.float32))
            f = render_frames(c.identity, mouth, c.motion, c.blink, size)
            dark[name] = (box_darkness(f, c.boxes).mean(), box_darkness(_roundtrip_u8(vae, f), c.boxes).mean())
        contrast.append((dark["open"][1] - dark["closed"][1]) / max(dark["open"][0] - dark["closed"][0], 1e-6))
        truth = box_darkness(c.frames, c.boxes)
        got = box_darkness(_roundtrip_u8(vae, c.frames), c.boxes)
        if truth.std() > 1e-6 and got.std() > 1e-6:
            track.append(float(np.corrcoef(truth, got)[0, 1]))
    return {"mouth_contrast": float(np.mean(contrast)), "mouth_track": float(np.mean(track)) if track else float("nan")}
