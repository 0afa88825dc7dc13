"""The teacher rows, the VAE round-trip control and the row order of ``lipforcing eval`` (tiny random teacher, a
linear stand-in VAE made here, 2 sampler steps, one short clip)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipforcing.eval.runner import CONTROLS, EvalConfig, evaluate, row_order, write_report
from lipforcing.eval.teacher import TeacherSystem, teacher_windows



class LinearVAE:
    """Stand-in world VAE: every 4th frame, 8x8 mean pool, a fixed random 3 -> 16 channel map; decode by its
    pseudo-inverse and nearest upsampling (causal layout: 1 + k latents <-> 1 + 4k frames)."""
    temporal_factor, spatial_factor, z_dim = 4, 8, 16
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, seed: int):
        self.w = torch.randn(16, 3, generator=torch.Generator().manual_seed(seed))
        self.pinv = torch.linalg.pinv(self.w)

    def encode(self, video, normalize=True):
        return torch.einsum("zc,bcthw->bzthw", self.w, F.avg_pool3d(video[:, :, ::4], (1, 8, 8)))

    def decode(self, z, normalize=True):
        v = torch.einsum("cz,bzthw->bcthw", self.pinv, z)
        v = torch.cat([v[:, :, :1], v[:, :, 1:].repeat_interleave(4, 2)], 2)
        return v.repeat_interleave(8, 3).repeat_interleave(8, 4).clamp(-1, 1)


class IdentityVAE(LinearVAE):
    def encode(self, video, normalize=True):
        return video

    def decode(self, z, normalize=True):
        return z


def _teacher(seed):
    from lipforcing.config import ModelConfig
    from lipforcing.model import build_model
    from lipforcing.world.build import prompt_embedding

    cfg = ModelConfig.from_name("tiny")
    torch.manual_seed(seed)
    return build_model(cfg, causal=False).eval(), prompt_embedding(cfg.text_dim)[None]


def test_teacher_windows_cover_the_clip():
    rng = np.random.default_rng()
    cases = [(50, 21), (42, 21), (21, 21), (7, 21), (1, 21), (int(rng.integers(1, 300)), 1 + 4 * int(rng.integers(0, 8)))]
    for T, L in cases:
        wins = teacher_windows(T, L)
        kept = np.concatenate([np.arange(k, b) for a, b, k in wins])
        assert np.array_equal(kept, np.arange(T)), (T, L, wins)
        n = wins[0][1] - wins[0][0]
        assert all(b - a == n and a <= k < b for a, b, k in wins) and n <= L and (n - 1) % 4 == 0
        assert n == min(L, 1 + 4 * ((T - 1) // 4))
    with pytest.raises(ValueError, match="1 \\+ 4 k"):
        teacher_windows(50, 20)


def test_teacher_reuses_the_data_builders_conditioning(monkeypatch):
    """Each window's sample is the data builder's (encode_sample, the function encode_clip uses) with the input
    video as the masked source, through the training path (normalize_sample)."""
    from lipforcing.distill.data import normalize_sample
    from lipforcing.world import build, make_clip

    seed = int(np.random.default_rng().integers(0, 10_000))
    model, text = _teacher(seed)
    vae = LinearVAE(seed)
    calls = []
    real = build.encode_sample

    def counting(vae_, frames, ref_frames, audio, *a, **k):
        calls.append((frames.copy(), ref_frames.copy(), np.asarray(audio).copy()))
        return real(vae_, frames, ref_frames, audio, *a, **k)

    monkeypatch.setattr(build, "encode_sample", counting)
    clip = make_clip(seed, 50, size=32, split="eval", speech="synthetic")
    sys_ = TeacherSystem(model, vae, text, steps=2, window=21)
    wins, samples = sys_.samples(clip.ref_frames, clip.audio)
    assert [w[:2] for w in wins] == [(0, 21), (21, 42), (29, 50)] and len(calls) == 3
    for (a, b, _), (fr, ref, au) in zip(wins, calls):
        assert np.array_equal(fr, clip.ref_frames[a:b]) and np.array_equal(ref, clip.ref_frames[a:b])
        assert np.array_equal(au, clip.audio[a * 640:b * 640])
    # the same as the builder's own sample of a 21-frame clip whose target is its input video
    short = make_clip(seed + 1, 21, size=32, split="eval", speech="synthetic")
    built = normalize_sample(build.encode_clip(vae, dataclasses.replace(short, frames=short.ref_frames),
                                               model.config, text[0]), model.config)
    _, (ours,) = sys_.samples(short.ref_frames, short.audio)
    for key in ("y", "audio", "text"):
        assert torch.equal(ours[key], built[key]), key
    # the CFG rows of one teacher share a cache: each (reference, audio) pair is encoded once
    shared: dict = {}
    rows = [TeacherSystem(model, vae, text, guidance=g, steps=2, window=21, cache=shared) for g in (1.0, 4.5)]
    calls.clear()
    got = [r.samples(clip.ref_frames, clip.audio)[1] for r in rows]
    assert len(calls) == 3 and all(torch.equal(x["y"], y["y"]) for x, y in zip(got[1], samples))
    rows[1].samples(clip.ref_frames, np.zeros_like(clip.audio))          # other audio: encoded again
    assert len(calls) == 6


def test_teacher_rows_and_vae_roundtrip():
    from lipforcing.eval.metrics import frame_loudness, mouth_opening_estimate, windowed_correlation
    from lipforcing.eval.runner import held_out_clips

    seed = int(np.random.default_rng().integers(0, 10_000))
    model, text = _teacher(seed)
    vae = LinearVAE(seed)
    systems = {f"teacher_cfg{g!r}": TeacherSystem(model, vae, text, guidance=g, steps=2, window=21, seed=seed)
               for g in (1.0, 4.5)}
    cfg = EvalConfig(clips=1, seconds=2, size=32, speech="synthetic", seed=seed % 1000)
    res = evaluate(systems, cfg, vae=vae)
    assert list(res["rows"]) == ["ground_truth", "vae_roundtrip", "reference_copy", "teacher_cfg1.0",
                                 "teacher_cfg4.5"]
    clip = held_out_clips(cfg)[0]
    frames = {}
    for name, system in systems.items():
        row = res["rows"][name]
        for k in ("mouth_psnr", "mouth_ssim", "rest_psnr", "opening_mean", "silence_open", "fps"):
            assert math.isfinite(row[k]), (name, k, row[k])
        # the row measures the teacher's frames (sampling is deterministic in the seed): sync is their opening's
        # correlation with the loudness, defined whenever the opening read from them is not constant (a random
        # teacher's frames can read as closed throughout: then NaN, as for any constant series)
        f, _ = system.generate(clip.ref_frames, clip.audio)
        assert f.shape == clip.frames.shape and f.dtype == np.uint8
        est = mouth_opening_estimate(f, clip)
        want = windowed_correlation(est, frame_loudness(clip.audio, len(f)), window=cfg.window)
        assert row["sync"] == pytest.approx(want, nan_ok=True)
        assert math.isfinite(row["sync"]) or np.ptp(est) == 0
        frames[name] = f
    # CFG changes the samples (same noise, same conditioning)
    assert not np.array_equal(frames["teacher_cfg1.0"], frames["teacher_cfg4.5"])


def test_vae_roundtrip_of_an_identity_vae_is_ground_truth():
    cfg = EvalConfig(clips=1, seconds=2, size=32, speech="synthetic",
                     seed=int(np.random.default_rng().integers(0, 1000)))
    res = evaluate({}, cfg, vae=IdentityVAE(0))
    gt, rt = res["rows"]["ground_truth"], res["rows"]["vae_roundtrip"]
    assert set(gt) == set(rt)
    for k in gt:
        assert gt[k] == pytest.approx(rt[k], nan_ok=True), k
    with pytest.raises(ValueError, match="controls"):
        evaluate({"vae_roundtrip": object()}, cfg, vae=IdentityVAE(0))


def test_report_row_order(tmp_path):
    names = ["untrained", "sw_dmd", "teacher_cfg4.5", "reference_copy", "df", "ground_truth", "teacher_cfg1.0",
             "vae_roundtrip"]
    want = ["ground_truth", "vae_roundtrip", "reference_copy", "teacher_cfg4.5", "teacher_cfg1.0", "sw_dmd", "df",
            "untrained"]
    assert row_order(names) == want
    res = {"config": dataclasses.asdict(EvalConfig()), "rows": {n: {"sync": 0.5} for n in names}}
    _, md = write_report(res, tmp_path)
    lines = md.read_text().splitlines()
    table = [ln.split("|")[1].strip() for ln in lines if ln.startswith("| ") and "system" not in ln]
    assert table == want
    assert CONTROLS in lines and lines.index(CONTROLS) > max(i for i, ln in enumerate(lines) if ln.startswith("|"))
