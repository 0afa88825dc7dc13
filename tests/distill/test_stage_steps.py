"""The teacher and SyncNet stages' steps against independent computations: the mouth-weighted flow-matching loss,
per-sample condition dropout for CFG, and the lip/audio window pairing with offset negatives."""
from __future__ import annotations

import numpy as np
import pytest
import torch


class _Cond:
    """A stand-in for model.teacher.Condition: y channels appended after the 16 noisy ones."""

    def __init__(self, y):
        self.y, self.context, self.audio = y, torch.zeros(y.shape[0], 2, 3), None

    def model_input(self, x):
        return torch.cat([x, self.y], 1)


@pytest.mark.parametrize("mouth_weight", [1.0, 2.0, 5.0])
def test_flow_matching_loss_weights_the_mouth_cells(mouth_weight):
    from lipforcing.distill.stages.teacher import flow_matching_loss

    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    B, Fr, H, W = 3, 2, 4, 5
    x0, eps, v_pred = (torch.randn(B, 16, Fr, H, W, generator=g) for _ in range(3))
    t = torch.rand(B, generator=g)
    mask = (torch.rand(B, 1, Fr, H, W, generator=g) < 0.3).float()
    y = torch.cat([torch.randn(B, 16, Fr, H, W, generator=g), mask], 1)     # mouth mask in channel 16 of y
    seen = {}

    def model(inp, timestep, context, audio):
        seen["x_t"], seen["timestep"] = inp[:, :16], timestep
        return v_pred

    weighted, mse = flow_matching_loss(model, x0, _Cond(y), t, eps, mouth_weight=mouth_weight)
    tt = t.view(B, 1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], (1 - tt) * x0 + tt * eps)           # x_t = (1 - t) x0 + t eps
    torch.testing.assert_close(seen["timestep"], 1000 * t)
    err = (v_pred - (eps - x0)) ** 2                                             # target velocity eps - x0
    for b in range(B):
        m = mask[b, 0].bool()
        inside, outside = err[b][:, m].sum(), err[b][:, ~m].sum()
        n_in, n_out = 16 * int(m.sum()), 16 * int((~m).sum())
        want = (mouth_weight * inside + outside) / (mouth_weight * n_in + n_out)
        assert float(weighted[b]) == pytest.approx(float(want), rel=1e-5)
        assert float(mse[b]) == pytest.approx(float(err[b].mean()), rel=1e-5)


def _teacher_stage(tmp_path, **kw):
    from lipforcing.distill.stages.teacher import TeacherStage, TeacherStageConfig

    cfg = TeacherStageConfig(iterations=1, output_dir=str(tmp_path / "t"), resume=False, probe_every=0,
                             seed=int(torch.randint(0, 10_000, ())), log_every=0,
                             data={"kind": "synthetic", "num_samples": 4, "frames": 2, "height": 4, "width": 4,
                                   "text_len": 4}, **kw)
    return TeacherStage(cfg)


@pytest.mark.parametrize("text,audio,joint", [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
                                              (0.5, 0.5, 0.0)])
def test_teacher_condition_dropout_per_sample(tmp_path, monkeypatch, text, audio, joint):
    """Dropped text is the negative prompt, dropped audio is zeros, joint dropout drops both; per sample; the
    video conditioning (y) is never dropped."""
    from lipforcing.distill.data import batch_condition, collate
    from lipforcing.distill.stages import teacher as mod

    st = _teacher_stage(tmp_path, batch_size=16, text_dropout=text, audio_dropout=audio, joint_dropout=joint)
    seen = []
    real = mod.flow_matching_loss

    def spy(model, x0, cond, t, eps, **kw):
        seen.append(cond)
        return real(model, x0, cond, t, eps, **kw)

    monkeypatch.setattr(mod, "flow_matching_loss", spy)
    k = int(torch.randint(0, 1000, ()))
    st.step(k)
    idx = torch.randint(len(st.dataset), (16,), generator=st.generator(k, "data"))
    _, full = batch_condition(collate([st.dataset[int(i)] for i in idx]), st.device)
    got = seen[0]
    torch.testing.assert_close(got.y, full.y)
    neg = full.negative_context()
    assert not torch.equal(neg, full.context) and full.audio.abs().sum() > 0       # dropping is visible
    text_dropped = torch.tensor([torch.equal(got.context[b], neg[b]) and not torch.equal(got.context[b],
                                                                                         full.context[b])
                                 for b in range(16)])
    text_kept = torch.tensor([torch.equal(got.context[b], full.context[b]) for b in range(16)])
    audio_dropped = torch.tensor([bool((got.audio[b] == 0).all()) for b in range(16)])
    audio_kept = torch.tensor([torch.equal(got.audio[b], full.audio[b]) for b in range(16)])
    assert bool((text_dropped ^ text_kept).all()) and bool((audio_dropped ^ audio_kept).all())
    if joint == 1.0:
        assert text_dropped.all() and audio_dropped.all()
    else:
        assert bool(text_dropped.all()) == (text == 1.0) and bool(text_kept.all()) == (text == 0.0)
        assert bool(audio_dropped.all()) == (audio == 1.0) and bool(audio_kept.all()) == (audio == 0.0)
    if text == 0.5:      # independent per-sample draws: some of each (all equal has probability 2 ** -15)
        assert 0 < int(text_dropped.sum()) < 16 and 0 < int(audio_dropped.sum()) < 16


def test_syncnet_pairs_align_lips_and_audio_windows():
    """Lip window v holds frames v..v+4; the audio window at offset o holds the MFCC of the audio that starts at
    video frame v + o (computed here from the audio cut at that point)."""
    from lipforcing.distill.mfcc_frontend import mfcc
    from lipforcing.distill.stages.syncnet import syncnet_pairs
    from lipforcing.distill.syncnet_small import SmallSyncNet

    rng = np.random.default_rng()
    T, K = 30, int(rng.integers(1, 5))
    net = SmallSyncNet(16, 4, 8, lower_half=False)
    frames = torch.from_numpy(np.repeat(np.arange(T, dtype=np.uint8)[:, None, None, None] * 7, 3, 3)
                              * np.ones((1, 32, 32, 3), np.uint8))             # frame f is the constant 7 f
    audio = torch.from_numpy(rng.standard_normal(T * 640).astype(np.float32) * 0.1)
    starts = sorted(rng.choice(np.arange(K, T - 5 - K), 3, replace=False).tolist())
    lips, auds = syncnet_pairs(net, frames, audio, starts, K)
    assert lips.shape == (3, 3, 5, 16, 16) and auds.shape == (3, 2 * K + 1, 1, 13, 20)
    for i, v in enumerate(starts):
        for j in range(5):
            assert torch.allclose(lips[i, :, j], torch.full_like(lips[i, :, j], 7.0 * (v + j)))
        for o in range(-K, K + 1):
            cut = audio[640 * (v + o):].double() * 32768.0
            want = mfcc(cut, 16000, dtype=torch.float64)[:, :20]
            # column 0 differs by the pre-emphasis of the cut's first sample; the rest must match
            torch.testing.assert_close(auds[i, o + K, 0, :, 1:].double(), want[:, 1:], rtol=1e-4, atol=1e-3)
