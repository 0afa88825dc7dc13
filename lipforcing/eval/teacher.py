"""The bidirectional teacher as an eval system (the ``teacher_cfg<scale>`` rows of ``lipforcing eval``).

The teacher is not streaming: it sees a whole clip at once and was trained on clips of one length (the data
builder's ``frames``, 21 video frames = 6 latent frames by default).  A held-out clip (8 s = 200 frames) is
therefore sampled as **consecutive windows of the training length**: windows [0, L), [L, 2L), ... and, when T is
not a multiple of L, one last window [T - L, T) of which only the frames not produced yet are kept (no padding
frames, no window longer than what the teacher saw).  A whole 200-frame clip would put the teacher's temporal RoPE
and attention far outside its training distribution.  Each window is an independent clip, as in training.

Per window, the conditioning is the data builder's (:func:`lipforcing.world.build.encode_sample`) with the input
(reference) video as the masked source, since the target is what is generated; the sample then goes through the
training path unchanged (:func:`~lipforcing.distill.data.normalize_sample`, :func:`~lipforcing.distill.data.collate`,
:func:`~lipforcing.distill.data.batch_condition`): the reference latent, mouth mask, masked and reference-sequence
latents, the audio features of the window's audio and the prompt, with the zero negative prompt of training.
Sampling is :func:`lipforcing.model.teacher.sample` (``steps`` shifted Euler steps, CFG ``guidance``; noise drawn
from ``seed``, the same for every call), decoding the VAE's whole-window decode (bit-equal to its streaming
decoder) and the uint8 conversion the engine's.  The engine's output for aligned face crops (the eval's input) is
the decoded crop itself (no paste-back: that only happens for full-frame references), and so is the teacher's, so
``rest_psnr`` measures the same thing for both.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from lipforcing.audio.pcm import SAMPLES_PER_FRAME

__all__ = ["TeacherSystem", "teacher_windows", "to_uint8"]


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, rounded as the engine does."""
    img = ((video.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return img.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def teacher_windows(num_frames: int, window: int, temporal_factor: int = 4) -> list[tuple[int, int, int]]:
    """Windows (start, stop, keep_from) covering frames [0, num_frames): consecutive windows of ``window`` frames
    (1 + k ``temporal_factor``), the last one moved back to end at ``num_frames``; frames [keep_from, stop) of each
    are kept.  A clip shorter than ``window`` gets the longest valid window that fits."""
    T = int(num_frames)
    if T < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if window < 1 or (window - 1) % temporal_factor:
        raise ValueError(f"window must be 1 + {temporal_factor} k frames, got {window}")
    L = min(window, 1 + temporal_factor * ((T - 1) // temporal_factor))
    out = []
    start = 0
    while start + L <= T:
        out.append((start, start + L, start))
        start += L
    if start < T:
        out.append((T - L, T, start))
    return out


@dataclass
class TeacherSystem:
    """The teacher sampled on whole windows (see the module docstring); ``generate(reference, audio)`` has the
    contract of :func:`lipforcing.eval.runner.run_engine`.

    model : a bidirectional LipSyncDiT.  vae : the world VAE (a WanVAE).  text : (1, L, text_dim) or (L, text_dim)
    prompt embedding.  guidance : CFG scale.  steps : sampler steps.  window : video frames per window (1 + 4k,
    the teacher's training clip length).  seed : noise seed.  batch : windows sampled together.  cache : a dict
    shared by the systems of one teacher (its CFG rows) to encode each (reference, audio) pair once; None: no
    caching.  Only the last few pairs are kept.
    """

    model: torch.nn.Module
    vae: object
    text: torch.Tensor
    guidance: float = 4.5
    steps: int = 50
    window: int = 21
    seed: int = 0
    batch: int = 16
    cache: dict | None = None

    def samples(self, reference: np.ndarray, audio: np.ndarray) -> tuple[list, list[dict]]:
        """The windows of :func:`teacher_windows` and each one's training sample (the data builder's
        conditioning through :func:`~lipforcing.distill.data.normalize_sample`)."""
        return self._encoded(reference, audio)[:2]

    def _encoded(self, reference: np.ndarray, audio: np.ndarray) -> tuple[list, list[dict], float]:
        """:meth:`samples` and the seconds their encoding took (now, or when they were cached)."""
        from lipforcing.distill.data import normalize_sample
        from lipforcing.world.build import encode_sample

        cfg = self.model.config
        text = self.text[0] if self.text.dim() == 3 else self.text
        audio = np.asarray(audio, np.float32)
        key = None
        if self.cache is not None:
            h = hashlib.blake2b(digest_size=16)
            for a in (reference, audio):
                h.update(str((a.shape, a.dtype)).encode())
                h.update(np.ascontiguousarray(a).data)
            key = (h.hexdigest(), self.window, id(self.vae), id(self.text))
            if key in self.cache:
                return self.cache[key]
        t0 = time.perf_counter()
        wins = teacher_windows(len(reference), self.window, self.vae.temporal_factor)
        out = []
        for a, b, _ in wins:
            ref = np.ascontiguousarray(reference[a:b])
            raw = encode_sample(self.vae, ref, ref, audio[a * SAMPLES_PER_FRAME:b * SAMPLES_PER_FRAME], cfg,
                                text.float().cpu())
            out.append(normalize_sample(raw, cfg, name=f"window {a}..{b}"))
        res = (wins, out, time.perf_counter() - t0)
        if key is not None:
            while len(self.cache) >= 4:
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = res
        return res

    @torch.no_grad()
    def generate(self, reference: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, float]:
        """Frames (T, H, W, 3) uint8 for ``reference`` frames saying ``audio``, and frames per wall second (VAE
        encode, sampling and decode included; a conditioning taken from the shared cache counts with the seconds its
        encoding took, so every CFG row pays for it)."""
        from lipforcing.distill.data import batch_condition, collate
        from lipforcing.model.teacher import sample

        wins, samples, encode_s = self._encoded(reference, audio)
        t0 = time.perf_counter()
        dev = next(self.model.parameters()).device
        g = torch.Generator().manual_seed(int(self.seed))
        noise = [torch.randn(s["latents"].shape, generator=g) for s in samples]
        frames = []
        for i in range(0, len(samples), self.batch):
            _, cond = batch_condition(collate(samples[i:i + self.batch]), dev)
            x0 = sample(self.model, torch.stack(noise[i:i + self.batch]).to(dev), cond, steps=self.steps,
                        guidance=float(self.guidance))
            video = self.vae.decode(x0.to(self.vae.device, self.vae.dtype), normalize=True)
            for k, (a, b, keep) in enumerate(wins[i:i + self.batch]):
                frames.append(to_uint8(video[k])[keep - a:])
        out = np.concatenate(frames)
        return out, len(out) / max(encode_s + time.perf_counter() - t0, 1e-9)
