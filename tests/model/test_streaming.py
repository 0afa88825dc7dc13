"""The student's streaming API: absolute-RoPE streaming equals the full-sequence block-causal forward; dynamic RoPE
equals a direct computation of the window-relative positions; state handling."""
import pytest
import torch

from lipforcing.config import ModelConfig
from lipforcing.model import build_model
from tests.model.helpers import make_inputs
from tests.model.oracle import DynamicRopeStream, WanOracle, rope_freqs


def _stream(model, x, t, ctx, audio, state, chunk):
    """Stream x chunk by chunk: a denoising pass (write=False) and then the cache-write pass (write=True) on the
    same input; returns the denoising passes' outputs, concatenated over frames."""
    outs = []
    for s in range(0, x.shape[2], chunk):
        sl = slice(s, s + chunk)
        a = None if audio is None else audio[:, sl]
        frame = state.frame
        v = model.forward_chunk(x[:, :, sl], t[:, sl], state, a, write=False)
        assert state.frame == frame  # write=False changes nothing
        v_write = model.forward_chunk(x[:, :, sl], t[:, sl], state, a, write=True)
        torch.testing.assert_close(v, v_write, rtol=0, atol=0)
        outs.append(v)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("injection", ["add", "cross_attn"])
def test_absolute_streaming_equals_full_sequence(injection):
    # chunk 2, window 4, sink 1: the ring holds 2 frames and wraps several times over 9 frames (last chunk short)
    cfg = ModelConfig.from_name("tiny", rope_mode="absolute", audio_injection=injection, chunk_frames=2,
                                window_frames=4, sink_frames=1)
    model = build_model(cfg, causal=True).eval()
    x, t, ctx, audio = make_inputs(cfg, frames=9)
    with torch.no_grad():
        full = model(x, t, ctx, audio)
        state = model.init_stream(ctx)
        streamed = _stream(model, x, t, ctx, audio, state, cfg.chunk_frames)
        assert state.frame == 9 and len(state.caches) == cfg.num_layers
        torch.testing.assert_close(streamed, full, rtol=1e-4, atol=1e-4)
        # reset() empties the caches in place and the stream reproduces itself
        buffers = [c.k.data_ptr() for c in state.caches]
        state.reset()
        assert state.frame == 0 and [c.k.data_ptr() for c in state.caches] == buffers
        again = _stream(model, x, t, ctx, audio, state, cfg.chunk_frames)
    torch.testing.assert_close(again, streamed, rtol=0, atol=0)


def test_absolute_streaming_default_preset_and_no_audio():
    cfg = ModelConfig.from_name("tiny", rope_mode="absolute")  # chunk 3, window 6, sink 1
    model = build_model(cfg, causal=True).eval()
    x, t, ctx, _ = make_inputs(cfg, batch=1, frames=12)
    with torch.no_grad():
        full = model(x, t, ctx, None)
        state = model.init_stream(ctx[:1], batch=1, latent_size=(2, 4))
        assert state.caches and state.caches[0].capacity == (1 + 3) * 2  # sink + ring frames, in tokens
        streamed = _stream(model, x, t, ctx, None, state, 3)
    torch.testing.assert_close(streamed, full, rtol=1e-4, atol=1e-4)


def test_first_chunk_equals_teacher():
    cfg = ModelConfig.from_name("tiny")
    student = build_model(cfg, causal=True).eval()
    teacher = build_model(cfg, causal=False).eval()
    teacher.load_state_dict(student.state_dict())
    x, t, ctx, audio = make_inputs(cfg, frames=3)
    with torch.no_grad():
        state = student.init_stream(ctx)
        v = student.forward_chunk(x, t, state, audio, write=False)
        torch.testing.assert_close(v, teacher(x, t, ctx, audio), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("injection", ["add", "cross_attn"])
def test_dynamic_rope_streaming_matches_direct_computation(injection):
    cfg = ModelConfig.from_name("tiny", rope_mode="dynamic", audio_injection=injection, chunk_frames=2,
                                window_frames=4, sink_frames=1, num_layers=3)
    model = build_model(cfg, causal=True).eval()
    frames = 9
    x, t, ctx, audio = make_inputs(cfg, batch=1, frames=frames)
    c = cfg
    oracle = WanOracle(model.state_dict(), num_heads=c.num_heads, num_layers=c.num_layers, freq_dim=c.freq_dim,
                       eps=c.eps, audio_injection=c.audio_injection, audio_tokens=c.audio_tokens_per_frame)
    direct = DynamicRopeStream(rope_freqs(c.head_dim), 1, 2, c.chunk_frames, c.window_frames, c.sink_frames)
    with torch.no_grad():
        state = model.init_stream(ctx)
        for s in range(0, frames, c.chunk_frames):
            sl = slice(s, s + c.chunk_frames)
            n = x[:, :, sl].shape[2]
            for write in (False, True):
                got = model.forward_chunk(x[:, :, sl], t[:, sl], state, audio[:, sl], write=write)
                want = oracle.forward(x[:, :, sl], t[:, sl], ctx, audio[:, sl], direct.attend_for_chunk(n, write))
                err = (got.double() - want).abs().max().item()
                assert err < 2e-4 * max(1.0, want.abs().max().item()), (s, write, err)
            direct.advance(n)
        # and dynamic RoPE is not absolute RoPE once the window has slid past the sink
        abs_model = build_model(cfg.replace(rope_mode="absolute"), causal=True).eval()
        abs_model.load_state_dict(model.state_dict())
        full = abs_model(x, t, ctx, audio)
    assert not torch.allclose(got, full[:, :, -got.shape[2]:], atol=1e-3)


def test_stream_state_validation():
    cfg = ModelConfig.from_name("tiny")
    model = build_model(cfg, causal=True).eval()
    x, t, ctx, audio = make_inputs(cfg, frames=4)
    with torch.no_grad():
        state = model.init_stream(ctx)
        with pytest.raises(ValueError, match="chunk_frames=3"):
            model.forward_chunk(x, t, state, audio, write=False)
        with pytest.raises(TypeError, match="write must be a bool"):
            model.forward_chunk(x[:, :, :3], t[:, :3], state, audio[:, :3], write=1)
        model.forward_chunk(x[:, :, :3], t[:, :3], state, audio[:, :3], write=True)
        with pytest.raises(ValueError, match="latent grid"):
            model.forward_chunk(torch.randn(2, 65, 3, 4, 4), t[:, :3], state, audio[:, :3], write=False)
        with pytest.raises(ValueError, match="batch"):
            model.forward_chunk(x[:1, :, :3], t[:1, :3], state, audio[:1, :3], write=False)
        # per-sample timestep is accepted as well as per frame
        a = model.forward_chunk(x[:, :, 3:4], t[:, 3], state, audio[:, 3:4], write=False)
        b = model.forward_chunk(x[:, :, 3:4], t[:, 3:4], state, audio[:, 3:4], write=False)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    unbounded = build_model(cfg.replace(window_frames=None), causal=True)
    with pytest.raises(ValueError, match="max_frames"):
        unbounded.init_stream(ctx)


def test_unbounded_window_streaming_equals_full_sequence():
    cfg = ModelConfig.from_name("tiny", rope_mode="absolute", window_frames=None, chunk_frames=2)
    model = build_model(cfg, causal=True).eval()
    x, t, ctx, audio = make_inputs(cfg, batch=1, frames=6)
    with torch.no_grad():
        full = model(x, t, ctx, audio)
        state = model.init_stream(ctx, max_frames=6)
        streamed = _stream(model, x, t, ctx, audio, state, 2)
    torch.testing.assert_close(streamed, full, rtol=1e-4, atol=1e-4)


def test_bfloat16_streaming_close_to_float32():
    cfg = ModelConfig.from_name("tiny")
    m32 = build_model(cfg, causal=True).eval()
    m16 = build_model(cfg, causal=True, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    x, t, ctx, audio = make_inputs(cfg, batch=1, frames=6)
    with torch.no_grad():
        s32, s16 = m32.init_stream(ctx), m16.init_stream(ctx)
        assert s16.caches == [] and s16.dtype == torch.bfloat16
        for sl in (slice(0, 3), slice(3, 6)):
            v32 = m32.forward_chunk(x[:, :, sl], t[:, sl], s32, audio[:, sl], write=True)
            v16 = m16.forward_chunk(x[:, :, sl], t[:, sl], s16, audio[:, sl], write=True)
    assert s16.caches[0].k.dtype == torch.bfloat16 and v16.dtype == torch.float32
    rel = ((v16 - v32).norm() / v32.norm()).item()
    assert rel < 3e-2, rel
