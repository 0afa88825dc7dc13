"""The procedural world: deterministic identities/clips, the mouth model's documented rules, held-out splits,
espeak-ng speech (skipped without it), and the reference sequence's unrelated mouth."""
from __future__ import annotations

import numpy as np
import pytest

from lipforcing.world import identity_seeds, identity_split, make_clip, mouth_track, sample_identity
from lipforcing.world.mouth import LEAD_SECONDS, window_rms
from lipforcing.world.speech import (EVAL_SENTENCES, EVAL_VOICES, TRAIN_SENTENCES, TRAIN_VOICES, espeak_available,
                                     espeak_utterance, sample_utterance)


def _seed():
    return int(np.random.default_rng().integers(0, 10_000))


def test_identities_are_deterministic_varied_and_split():
    s = _seed()
    assert sample_identity(s) == sample_identity(s)
    looks = {(sample_identity(i).hair_style, round(sample_identity(i).skin[0])) for i in range(40)}
    assert len(looks) > 10
    held = identity_seeds("eval", 5, start=s)
    assert all(identity_split(i) == "eval" for i in held) and not set(held) & set(identity_seeds("train", 50, start=s))
    assert not set(TRAIN_VOICES) & set(EVAL_VOICES) and not set(TRAIN_SENTENCES) & set(EVAL_SENTENCES)
    with pytest.raises(ValueError, match="seed"):
        sample_identity(-1)


def test_mouth_follows_loudness_with_a_lead_and_closes_in_silence():
    rng = np.random.default_rng()
    T = 60 + int(rng.integers(0, 40))
    env = np.repeat(rng.uniform(0, 1, T // 5 + 1), 5 * 640)[: T * 640]       # piecewise-constant loudness
    audio = (0.3 * env * np.sin(np.arange(T * 640) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    m = mouth_track(audio, T)
    lead_rms = window_rms(audio, T, lead=LEAD_SECONDS)
    assert np.corrcoef(m.opening, lead_rms)[0, 1] > 0.85
    assert 0 <= m.opening.min() and m.opening.max() <= 1 and 0 <= m.spread.min() and m.spread.max() <= 1
    silent = mouth_track(np.zeros(T * 640, np.float32), T)
    assert np.all(silent.opening == 0) and np.all(silent.spread == 0.5)
    # the lead: a burst starting at frame 20 opens the mouth at frame 19 (40 ms = 1 frame early)
    burst = np.zeros(T * 640, np.float32)
    burst[20 * 640: 30 * 640] = 0.3 * np.sin(np.arange(6400) * 2 * np.pi * 200 / 16000)
    o = mouth_track(burst, T).opening
    assert o[18] == 0 and o[19] > 0.3
    with pytest.raises(ValueError, match="NaN"):
        mouth_track(np.full(640, np.nan), 1)


def test_spread_follows_the_spectral_centroid():
    t = np.arange(25 * 640) / 16000
    low = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    high = (0.3 * np.sin(2 * np.pi * 2800 * t)).astype(np.float32)
    assert mouth_track(low, 25).spread[10:].mean() < 0.3 < 0.7 < mouth_track(high, 25).spread[10:].mean()


def test_clip_is_deterministic_and_the_mouth_darkness_tracks_the_truth():
    from lipforcing.eval.metrics import mouth_opening_estimate, windowed_correlation

    s = _seed()
    a = make_clip(s, 60, size=48, speech="synthetic")
    b = make_clip(s, 60, size=48, speech="synthetic")
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)
    assert a.frames.shape == (60, 48, 48, 3) and a.frames.dtype == np.uint8 and a.audio.shape == (60 * 640,)
    assert identity_split(a.identity.seed) == "train"
    est = mouth_opening_estimate(a.frames, a)
    assert windowed_correlation(est, a.mouth.opening) > 0.8
    # the reference sequence: same person and motion (upper face equal), unrelated mouth
    assert np.array_equal(a.frames[:, :20], a.ref_frames[:, :20])
    long = make_clip(s, 200, size=16, speech="synthetic")       # 8 s: independent mouths correlate < 0.5 (150 seeds)
    assert abs(np.corrcoef(long.mouth.opening, long.ref_mouth.opening)[0, 1]) < 0.6
    assert make_clip(s, 30, split="eval", speech="synthetic").identity.split == "eval"
    with pytest.raises(ValueError, match="split"):
        make_clip(s, 10, identity_seed=9, split="train")


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_espeak_speech_voices_and_held_out_split():
    u = espeak_utterance("Hello there.", voice=TRAIN_VOICES[0])
    assert u.samples.dtype == np.float32 and 0.2 < u.seconds < 3 and np.abs(u.samples).max() == pytest.approx(0.5)
    v = sample_utterance(_seed(), seconds=2.0, split="eval", source="espeak")
    assert len(v.samples) == 32000 and v.voice in EVAL_VOICES and v.source == "espeak"
    # held-out sentences only (and the training split never speaks them)
    assert any(x in v.text for x in EVAL_SENTENCES) and not any(x in v.text for x in TRAIN_SENTENCES)
    t = sample_utterance(_seed(), seconds=2.0, split="train", source="espeak")
    assert t.voice in TRAIN_VOICES and any(x in t.text for x in TRAIN_SENTENCES)
    assert not any(x in t.text for x in EVAL_SENTENCES)
    other = espeak_utterance("Hello there.", voice=EVAL_VOICES[1])                 # voices differ
    n = min(len(u.samples), len(other.samples))
    assert not np.allclose(u.samples[:n], other.samples[:n], atol=1e-3)
    with pytest.raises(ValueError, match="text"):
        espeak_utterance("  ")


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_every_voice_sounds_different():
    """A voice name espeak-ng does not resolve as written falls back to another voice without a word; the world would
    then have fewer voices than it lists."""
    voices = TRAIN_VOICES + EVAL_VOICES
    audio = {v: espeak_utterance("Seven quick fish.", voice=v).samples for v in voices}
    same = [(a, b) for i, a in enumerate(voices) for b in voices[i + 1:]
            if len(audio[a]) == len(audio[b]) and np.array_equal(audio[a], audio[b])]
    assert not same, f"voices with identical audio: {same}"


def test_data_builder_writes_the_papers_conditioning(tmp_path):
    import torch

    from lipforcing.audio import MelFeatures
    from lipforcing.config import ModelConfig
    from lipforcing.distill import LatentFileDataset
    from lipforcing.vae import VAEConfig, WanVAE
    from lipforcing.world.build import build_latent_dataset

    vae = WanVAE(VAEConfig(dim=4, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True)))
    cfg = ModelConfig.from_name("tiny")
    seed = _seed()
    files = build_latent_dataset(tmp_path, vae, num_clips=2, frames=9, size=32, speech="synthetic", seed=seed,
                                 model_config=cfg)
    from safetensors.torch import load_file

    raw = load_file(str(files[0]))
    assert raw["latents"].shape == (16, 3, 8, 8) and raw["mask"].shape == (1, 3, 8, 8)
    assert torch.equal(raw["ref_latent"], raw["ref_sequence"][:, :1])
    assert not torch.allclose(raw["latents"], raw["ref_sequence"])         # the reference's mouth differs ...
    assert not torch.allclose(raw["latents"], raw["masked_latents"])       # ... and the target's mouth is blanked
    m = raw["mask"][0]
    assert set(m.unique().tolist()) == {0.0, 1.0} and m[:, -2:, 3:5].all() and not m[:, :3].any()   # mouth: 1
    want = MelFeatures(n_mels=cfg.audio_dim // 2).frames(raw["waveform"])
    torch.testing.assert_close(raw["audio"], want)                          # the engine's own front end
    ds = LatentFileDataset(tmp_path, cfg)
    assert len(ds) == 2 and ds[1]["y"].shape == (49, 3, 8, 8) and ds[1]["audio"].shape == (3, 4, cfg.audio_dim)
    # resumable: an existing file is kept
    before = files[0].stat().st_mtime_ns
    build_latent_dataset(tmp_path, vae, num_clips=2, frames=9, size=32, speech="synthetic", seed=seed)
    assert files[0].stat().st_mtime_ns == before


def test_head_motion_is_slow_and_blinks_close_the_eyes():
    """Head sway stays within a few percent and moves slowly (periods >= 2 s at 25 fps); blinks are 5-frame
    closures 2-6 s apart that the renderer draws on the eyes only (the mouth box is unchanged)."""
    from lipforcing.eval.metrics import box_darkness
    from lipforcing.world import MouthTrack, blinks, head_motion, render_frames
    from lipforcing.world.render import mouth_boxes

    s, n = _seed(), 750                                                     # 30 s
    m = head_motion(n, s)
    for series, amp in ((m.dx, 0.02), (m.dy, 0.01), (m.tilt, np.deg2rad(3.0)), (m.scale - 1, 0.02)):
        assert 0.1 * amp < np.abs(series).max() <= 1.5 * amp + 1e-12              # three sinusoids, peak <= 1.5 amp
        assert np.abs(np.diff(series)).max() <= 1.5 * amp * 2 * np.pi / (2.0 * 25)   # no period under 2 s
    still = head_motion(n, s, strength=0.0)
    assert not np.any(still.dx) and np.all(still.scale == 1.0)
    b = blinks(n, s)
    assert b.min() == 0 and b.max() == 1 and np.array_equal(b, blinks(n, s))
    onsets = np.flatnonzero((b[1:] > 0) & (b[:-1] == 0)) + 1
    assert len(onsets) >= 4 and np.all(np.diff(onsets) >= 50) and np.all(np.diff(onsets) <= 150)
    assert all(np.count_nonzero(b[o:o + 10]) == 5 for o in onsets[:-1])
    ident = sample_identity(s)
    closed = MouthTrack.closed(2)
    still2 = head_motion(2, s, strength=0.0)
    f = render_frames(ident, closed, still2, np.array([0.0, 1.0]), 64)
    diff = np.abs(f[0].astype(int) - f[1]).sum(-1)
    rows = np.flatnonzero(diff.any(1))
    eye_y = (ident.face_cy - 0.08) * 64
    assert len(rows) and np.all(np.abs(rows - eye_y) < 6)                       # only around the eyes
    boxes = mouth_boxes(ident, still2, 64, 2)
    assert box_darkness(f[:1], boxes[:1])[0] == box_darkness(f[1:], boxes[1:])[0]
