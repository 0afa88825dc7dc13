"""Self-Forcing rollout: the differentiable chunk forward, the exit-step gradient, cache writes without gradient."""
from __future__ import annotations

import pytest
import torch

from lipforcing import ModelConfig, build_model
from lipforcing.distill.rollout import forward_chunk_train, self_forcing_rollout
from lipforcing.model.teacher import Condition


def _student(**changes):
    torch.manual_seed(0)
    s = build_model(ModelConfig.from_name("tiny", **changes), causal=True)
    s.attn_backend = "reference"   # the tests check the distillation logic, not the kernels (no interpreter)
    return s


def _cond(cfg, B, F, H=4, W=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Condition(y=torch.randn(B, cfg.in_dim - cfg.out_dim, F, H, W, generator=g),
                     context=torch.randn(B, 5, cfg.text_dim, generator=g),
                     audio=torch.randn(B, F, 4, cfg.audio_dim, generator=g))


@pytest.mark.parametrize("rope_mode,window,sink", [("dynamic", 6, 1), ("absolute", 6, 1), ("dynamic", 4, 2),
                                                  ("absolute", 9, 0)])
def test_forward_chunk_train_matches_streaming(rope_mode, window, sink):
    s = _student(rope_mode=rope_mode, window_frames=window, sink_frames=sink)
    cfg = s.config
    B, F, H, W = 2, 11, 4, 6          # 4 chunks, the last one short; non-square grid
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.in_dim, F, H, W, generator=g)
    ctx = torch.randn(B, 5, cfg.text_dim, generator=g)
    audio = torch.randn(B, F, 4, cfg.audio_dim, generator=g)
    state = s.init_stream(ctx)
    for a in range(0, F, 3):
        xc, ac = x[:, :, a:a + 3], audio[:, a:a + 3]
        t = torch.tensor([250.0, 900.0])
        with torch.no_grad():
            ref = s.forward_chunk(xc, t, state, ac, write=False)
        out = forward_chunk_train(s, xc, t, state, ac)
        assert out.requires_grad
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            s.forward_chunk(xc, 0.0, state, ac, write=True)


class _Recorder:
    """Counts block-0 forward calls with gradient, their backward passes, and the student's streaming calls."""

    def __init__(self, student):
        self.fwd_grad = 0
        self.bwd = 0
        self.stream_calls = []   # (write, output requires grad)
        block = student.blocks[0]
        block.register_forward_hook(self._fwd)
        block.register_full_backward_hook(self._bwd)
        orig = student.forward_chunk

        def forward_chunk(*args, write, **kwargs):
            out = orig(*args, write=write, **kwargs)
            self.stream_calls.append((write, out.requires_grad))
            return out
        student.forward_chunk = forward_chunk

    def _fwd(self, module, args, out):
        if out.requires_grad:
            self.fwd_grad += 1

    def _bwd(self, module, gin, gout):
        self.bwd += 1


@pytest.mark.parametrize("exit_step", [0, 1])
def test_gradient_only_through_the_exit_step(exit_step):
    s = _student()
    cfg = s.config
    B, F = 1, 7                              # 3 chunks (3, 3, 1 frames)
    rec = _Recorder(s)
    cond = _cond(cfg, B, F)
    noise = torch.randn(B, 16, F, 4, 4, generator=torch.Generator().manual_seed(2))
    gen, info = self_forcing_rollout(s, noise, cond, exit_step=exit_step,
                                     generator=torch.Generator().manual_seed(3))
    assert info["exit_step"] == exit_step and gen.shape == noise.shape
    n_chunks = 3
    # streaming calls: the non-exit denoising passes (exit_step of them per chunk) and one cache write per chunk,
    # none of them with gradient
    assert sum(w for w, _ in rec.stream_calls) == n_chunks
    assert len(rec.stream_calls) == n_chunks * (exit_step + 1)
    assert not any(g for _, g in rec.stream_calls)
    assert rec.fwd_grad == n_chunks          # exactly one forward with gradient per chunk: the exit step
    gen.square().mean().backward()
    assert rec.bwd == n_chunks               # ... and exactly as many backward passes through the network
    assert s.blocks[0].self_attn.q.weight.grad is not None


def test_exit_step_output_depends_on_earlier_chunks_only_through_detached_cache():
    """The loss on chunk 0 alone gets the same gradient whether later chunks exist or not, and the gradient of a
    later chunk does not flow back through chunk 0's output (past K/V are detached)."""
    s = _student()
    cfg = s.config
    cond = _cond(cfg, 1, 6)
    noise = torch.randn(1, 16, 6, 4, 4, generator=torch.Generator().manual_seed(4))
    gen, _ = self_forcing_rollout(s, noise, cond, exit_step=0)
    first = torch.autograd.grad(gen[:, :, :3].sum(), list(s.parameters()), allow_unused=True)
    # the same clip cut to its first chunk (same y / audio / text)
    cond3 = Condition(y=cond.y[:, :, :3], context=cond.context, audio=cond.audio[:, :3])
    gen1, _ = self_forcing_rollout(s, noise[:, :, :3], cond3, exit_step=0)
    alone = torch.autograd.grad(gen1.sum(), list(s.parameters()), allow_unused=True)
    for a, b in zip(first, alone):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)
    # chunk 1's output is computed from the cache (no graph back into chunk 0's forward)
    gen, _ = self_forcing_rollout(s, noise, cond, exit_step=0)
    g_x0 = torch.autograd.grad(gen[:, :, 3:].sum(), gen, allow_unused=True, retain_graph=True)[0]
    assert torch.equal(g_x0[:, :, :3], torch.zeros_like(g_x0[:, :, :3]))


def test_rollout_schedule_and_fresh_noise():
    """Exit at step 1: chunk output = x0 predicted at t = 0.769 from (1 - 0.769) x0_step0 + 0.769 eps' with eps'
    fresh noise drawn from the generator, not the initial noise."""
    s = _student()
    cfg = s.config
    cond = _cond(cfg, 1, 3)
    noise = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        gen, _ = self_forcing_rollout(s, noise, cond, exit_step=1, generator=torch.Generator().manual_seed(6))
        st = s.init_stream(cond.context)
        x = noise
        v = s.forward_chunk(cond.model_input(x), 999.0, st, cond.audio, write=False)
        x0 = x - 0.999 * v
        eps = torch.randn(noise.shape, generator=torch.Generator().manual_seed(6))
        x1 = 0.231 * x0 + 0.769 * eps
        v1 = s.forward_chunk(cond.model_input(x1), 769.0, st, cond.audio, write=False)
        ref = x1 - 0.769 * v1
    torch.testing.assert_close(gen, ref, rtol=1e-4, atol=1e-4)


def test_rollout_rejects_bad_schedule():
    s = _student()
    cond = _cond(s.config, 1, 3)
    with pytest.raises(ValueError, match="timesteps"):
        self_forcing_rollout(s, torch.randn(1, 16, 3, 4, 4), cond, timesteps=(0.5, 0.8, 0.0))
    with pytest.raises(ValueError, match="exit_step"):
        self_forcing_rollout(s, torch.randn(1, 16, 3, 4, 4), cond, exit_step=2)
