"""Full-sequence forward of the teacher and the causal student vs an independent float64 oracle, plus the
mask, per-frame timestep and audio semantics seen through the network."""
import pytest
import torch

from lipforcing.config import ModelConfig
from lipforcing.model import build_model, group_audio_frames
from tests.model.helpers import make_inputs, student_and_teacher
from tests.model.oracle import WanOracle, frame_mask, full_attention, rope_freqs


def _oracle(model):
    c = model.config
    return WanOracle(model.state_dict(), num_heads=c.num_heads, num_layers=c.num_layers, patch=c.patch_size,
                     freq_dim=c.freq_dim, eps=c.eps, audio_injection=c.audio_injection,
                     audio_tokens=c.audio_tokens_per_frame)


def _close(a, b, tol=2e-4):
    err = (a.double() - b.double()).abs().max().item()
    ref = b.double().abs().max().item()
    assert err <= tol * max(ref, 1.0), f"max abs error {err:.3e} (reference max {ref:.3e})"


@pytest.mark.parametrize("injection", ["add", "cross_attn"])
def test_teacher_matches_oracle(injection):
    cfg = ModelConfig.from_name("tiny", audio_injection=injection)
    model = build_model(cfg, causal=False).eval()
    x, t, ctx, audio = make_inputs(cfg, frames=4, height=4, width=6)
    with torch.no_grad():
        out = model(x, t, ctx, audio)
    assert out.shape == (2, 16, 4, 4, 6) and out.dtype == torch.float32
    attend = full_attention(rope_freqs(cfg.head_dim), 4, 2, 3)
    _close(out, _oracle(model).forward(x, t, ctx, audio, attend))


@pytest.mark.parametrize("attention", [None, (3, 0), (None, 0)])
def test_student_block_causal_matches_oracle(attention):
    cfg = ModelConfig.from_name("tiny", chunk_frames=2, window_frames=4, sink_frames=1)
    model = build_model(cfg, causal=True).eval()
    frames = 9  # 5 chunks, the last one short
    x, t, ctx, audio = make_inputs(cfg, frames=frames, batch=1)
    window, sink = (4, 1) if attention is None else attention
    with torch.no_grad():
        out = model(x, t, ctx, audio, attention=attention)
    mask = frame_mask(frames, 2, cfg.chunk_frames, window, sink)
    attend = full_attention(rope_freqs(cfg.head_dim), frames, 1, 2, mask)
    _close(out, _oracle(model).forward(x, t, ctx, audio, attend))


def test_student_one_chunk_without_window_equals_teacher():
    cfg = ModelConfig.from_name("tiny", window_frames=None)
    student, teacher = student_and_teacher(cfg)
    x, t, ctx, audio = make_inputs(cfg, frames=cfg.chunk_frames)
    with torch.no_grad():
        a = student(x, t, ctx, audio)
        b = teacher(x, t, ctx, audio)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and more than one chunk is genuinely causal: the student differs from the teacher
    x, t, ctx, audio = make_inputs(cfg, frames=2 * cfg.chunk_frames)
    with torch.no_grad():
        assert not torch.allclose(student(x, t, ctx, audio), teacher(x, t, ctx, audio), atol=1e-3)


def test_causality_and_window_through_the_network():
    # one block, so a chunk's output depends only on the frames it attends to (deeper stacks chain windows)
    cfg = ModelConfig.from_name("tiny", num_layers=1)  # chunk 3, window 6, sink 1
    student, teacher = student_and_teacher(cfg)
    x, t, ctx, audio = make_inputs(cfg, frames=12)
    x2 = x.clone()
    x2[:, :, 1:3] += torch.randn_like(x2[:, :, 1:3])  # frames 1, 2: chunk 0, not the sink
    with torch.no_grad():
        a, b = student(x, t, ctx, audio), student(x2, t, ctx, audio)
    diff = (a - b).abs().amax(dim=(0, 1, 3, 4))  # per frame
    assert (diff[0:6] > 1e-4).all(), diff   # chunk 0 itself; chunk 1 sees frames 0..5
    assert (diff[6:12] == 0).all(), diff    # chunks 2, 3 see the sink frame 0 and frames 3..11 only
    # a later frame never influences an earlier chunk
    x3 = x.clone()
    x3[:, :, 7] += 1.0
    with torch.no_grad():
        c = student(x3, t, ctx, audio)
    assert torch.equal(c[:, :, :6], a[:, :, :6]) and not torch.equal(c[:, :, 6:], a[:, :, 6:])
    with torch.no_grad():  # the teacher is bidirectional
        assert not torch.equal(teacher(x3, t, ctx, audio)[:, :, :6], teacher(x, t, ctx, audio)[:, :, :6])


def test_per_frame_timesteps():
    cfg = ModelConfig.from_name("tiny")
    student, _ = student_and_teacher(cfg)
    x, _, ctx, audio = make_inputs(cfg, frames=6)
    t = torch.rand(2) * 1000
    with torch.no_grad():
        per_sample = student(x, t, ctx, audio)
        per_frame = student(x, t[:, None].expand(2, 6).contiguous(), ctx, audio)
        torch.testing.assert_close(per_sample, per_frame, rtol=0, atol=0)
        t2 = t[:, None].repeat(1, 6)
        t2[:, 3:] = 0.0  # second chunk at t = 0: the first chunk is causal so it must not change
        mixed = student(x, t2, ctx, audio)
    assert torch.equal(mixed[:, :, :3], per_sample[:, :, :3])
    assert not torch.allclose(mixed[:, :, 3:], per_sample[:, :, 3:])
    with pytest.raises(ValueError, match="timestep"):
        student(x, torch.rand(2, 5), ctx, audio)


def test_audio_add_mode_layers_and_none():
    cfg = ModelConfig.from_name("tiny")
    assert cfg.audio_layers == (2,)
    model = build_model(cfg, causal=False).eval()
    assert len(model.audio_cond_projs) == 1
    x, t, ctx, audio = make_inputs(cfg, frames=3)
    with torch.no_grad():
        with_audio = model(x, t, ctx, audio)
        no_audio = model(x, t, ctx, None)
        assert not torch.allclose(with_audio, no_audio, atol=1e-4)
        for p in model.audio_cond_projs.parameters():
            p.zero_()
        torch.testing.assert_close(model(x, t, ctx, audio), no_audio, rtol=1e-6, atol=1e-6)


def test_audio_cross_attn_mode_scale_zero_is_text_only():
    cfg = ModelConfig.from_name("tiny", audio_injection="cross_attn")
    assert cfg.audio_tokens_per_frame == 4 and cfg.audio_layers == ()
    model = build_model(cfg, causal=False).eval()
    assert not hasattr(model, "audio_cond_projs")
    assert tuple(model.audio_proj.proj.weight.shape) == (4 * 32, 4 * cfg.audio_dim)
    x, t, ctx, audio = make_inputs(cfg, frames=3)
    with torch.no_grad():
        none = model(x, t, ctx, None)
        torch.testing.assert_close(model(x, t, ctx, audio, audio_scale=0.0), none, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(model(x, t, ctx, audio, audio_scale=0.5), none, atol=1e-4)


def test_group_audio_frames_layout():
    B, F, D = 2, 4, 3
    feats = torch.randn(B, 1 + 4 * (F - 1), D)
    g = group_audio_frames(feats)
    assert g.shape == (B, F, 4, D)
    for k in range(F):
        for i in range(4):
            video = max(0, 4 * k - 3 + i)  # latent k covers video frames 4k-3 .. 4k; latent 0 repeats frame 0
            assert torch.equal(g[:, k, i], feats[:, video])
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        group_audio_frames(torch.randn(1, 6, D))


def test_input_validation_messages():
    cfg = ModelConfig.from_name("tiny")
    model = build_model(cfg, causal=True)
    x, t, ctx, audio = make_inputs(cfg, frames=3)
    with pytest.raises(ValueError, match="in_dim=65"):
        model(x[:, :16], t, ctx, audio)
    with pytest.raises(ValueError, match="divisible by the patch"):
        model(x[..., :3], t, ctx, audio)
    with pytest.raises(ValueError, match="text_dim=32"):
        model(x, t, ctx[..., :8], audio)
    with pytest.raises(ValueError, match="audio must have shape"):
        model(x, t, ctx, audio[:, :2])
    with pytest.raises(ValueError, match="window_frames"):
        model(x, t, ctx, audio, attention=(2, 1))
    teacher = build_model(cfg, causal=False)
    with pytest.raises(ValueError, match="causal student only"):
        teacher(x, t, ctx, audio, attention=(6, 1))


def test_backward_through_full_sequence():
    cfg = ModelConfig.from_name("tiny")
    model = build_model(cfg, causal=True)
    model.gradient_checkpointing = True
    model.train()
    x, t, ctx, audio = make_inputs(cfg, batch=1, frames=6)
    model(x, t, ctx, audio).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert not missing, missing
