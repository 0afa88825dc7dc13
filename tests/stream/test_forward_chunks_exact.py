"""The batched chunk step of the scheduler (engine.chunk_step.forward_chunks with split_linear, the CPU's mode) is
bit-exact with each stream's own forward_chunk: every row of the batch equals that stream run alone, for both audio
injection modes, streams at different frames, over a write pass and a second chunk."""
import pytest
import torch

from lipforcing.engine.chunk_step import forward_chunks
from lipforcing.model import build_model
from tests.stream.helpers import small_config


@pytest.mark.parametrize("audio_injection", ["add", "cross_attn"])
def test_split_batched_step_equals_each_stream_alone(audio_injection, _fresh_random_inputs):
    cfg = small_config().replace(audio_injection=audio_injection)
    model = build_model(cfg, causal=True).eval()
    model.attn_backend = "reference"
    B, F = 3, cfg.chunk_frames
    ctx = torch.randn(1, 7, cfg.text_dim)
    xs = torch.randn(2, B, cfg.in_dim, F, 2, 2)
    audio = torch.randn(2, B, F, 4, cfg.audio_dim)
    ahead_x, ahead_a = torch.randn(1, cfg.in_dim, F, 2, 2), torch.randn(1, F, 4, cfg.audio_dim)
    with torch.no_grad():
        alone = [model.init_stream(ctx) for _ in range(B)]
        batched = [model.init_stream(ctx) for _ in range(B)]
        for states in (alone, batched):            # the last stream one chunk ahead (other RoPE frames, full cache)
            model.forward_chunk(ahead_x, 0, states[-1], ahead_a, write=True)
        for c in range(2):
            want = torch.cat([model.forward_chunk(xs[c, b:b + 1], 700.0, alone[b], audio[c, b:b + 1], write=False)
                              for b in range(B)])
            got = forward_chunks(model, xs[c], 700.0, batched, audio[c], write=False, split_linear=True)
            assert torch.equal(got, want), (c, (got - want).abs().max().item())
            for b in range(B):
                model.forward_chunk(xs[c, b:b + 1], 0, alone[b], audio[c, b:b + 1], write=True)
            forward_chunks(model, xs[c], 0, batched, audio[c], write=True, split_linear=True)
        # the comparison can fail: other inputs in a row give other outputs
        other = forward_chunks(model, torch.flip(xs[1], [0]), 700.0, batched, audio[1], write=False, split_linear=True)
        assert not torch.equal(other[0], got[0])
