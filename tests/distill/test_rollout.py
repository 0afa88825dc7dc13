"""Self-Forcing rollout: the exit forward's gradient (vs a float64 oracle), the exit-step gradient, cache writes
without gradient."""
from __future__ import annotations

import pytest
import torch

from lipforcing import ModelConfig, build_model
from lipforcing.distill.rollout import self_forcing_rollout
from lipforcing.model.teacher import Condition
from tests.model.oracle import WanOracle, rope_freqs, rotate, softmax_attention


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


class _OracleStream:
    """Self-attention of a stream for the float64 WanOracle, with a constant history: every written frame's
    un-rotated (k, v) per layer.  A chunk starting at frame P sees the sink frames, the window frames
    [max(S, P + C - W), P) and itself; RoPE time positions are the stream frame indices (absolute) or the indices
    0, 1, 2, ... of the visible frames (dynamic)."""

    def __init__(self, head_dim, gh, gw, chunk, window, sink, mode):
        self.freqs, self.gh, self.gw, self.C, self.W, self.S, self.mode = (rope_freqs(head_dim), gh, gw, chunk,
                                                                          window, sink, mode)
        self.hist, self.frame = {}, 0

    def attend_for_chunk(self, frames, write):
        tpf, P = self.gh * self.gw, self.frame
        seen = [j for j in range(P) if j < self.S or j >= P + self.C - self.W] + list(range(P, P + frames))
        pos = torch.tensor(seen if self.mode == "absolute" else list(range(len(seen))))

        def attend(layer, q, k, v):
            hist = self.hist.setdefault(layer, [])
            kk = torch.cat([hist[j][0] for j in seen[:-frames]] + [k], 1)
            vv = torch.cat([hist[j][1] for j in seen[:-frames]] + [v], 1)
            q_t, k_t = pos[-frames:].repeat_interleave(tpf), pos.repeat_interleave(tpf)
            out = softmax_attention(rotate(q, q_t, self.gh, self.gw, self.freqs),
                                    rotate(kk, k_t, self.gh, self.gw, self.freqs), vv)
            if write:
                hist.extend((k[:, f * tpf:(f + 1) * tpf], v[:, f * tpf:(f + 1) * tpf]) for f in range(frames))
            return out
        self.frame += frames if write else 0
        return attend


@pytest.mark.parametrize("rope_mode", ["dynamic", "absolute"])
def test_exit_forward_gradient_matches_float64_oracle(rope_mode):
    """The exit forward (``forward_chunk(write=False)`` with gradient, after chunks written without gradient and
    followed by this chunk's own cache write) has the gradient, w.r.t. its input and every parameter, of a float64
    re-statement of the model that attends to the same cached keys/values held constant."""
    s = _student(rope_mode=rope_mode, chunk_frames=2, window_frames=4, sink_frames=1)
    c = s.config
    B, Fr, H, W = 1, 7, 2, 4          # chunks of 2, 2, 2, 1 frames; the ring (2 frames) wraps; grid (1, 2)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, c.in_dim, Fr, H, W, generator=g)
    t = torch.rand(B, Fr, generator=g) * 1000
    ctx = torch.randn(B, 5, c.text_dim, generator=g)
    audio = torch.randn(B, Fr, 4, c.audio_dim, generator=g)
    oracle = WanOracle(s.state_dict(), num_heads=c.num_heads, num_layers=c.num_layers, freq_dim=c.freq_dim,
                       eps=c.eps, audio_injection=c.audio_injection, audio_tokens=c.audio_tokens_per_frame)
    stream = _OracleStream(c.head_dim, 1, 2, c.chunk_frames, c.window_frames, c.sink_frames, rope_mode)
    state = s.init_stream(ctx)   # with gradient, as in the rollout (text K/V)
    with torch.no_grad():
        for a in range(0, 6, 2):
            sl = slice(a, a + 2)
            s.forward_chunk(x[:, :, sl], t[:, sl], state, audio[:, sl], write=True)
            oracle.forward(x[:, :, sl], t[:, sl], ctx, audio[:, sl], stream.attend_for_chunk(2, True))
    sl = slice(6, 7)
    xe = x[:, :, sl].clone().requires_grad_()
    out = s.forward_chunk(xe, t[:, sl], state, audio[:, sl], write=False)
    with torch.no_grad():   # this chunk's cache write comes before the backward in the rollout
        s.forward_chunk(torch.randn(xe.shape, generator=g), 0.0, state, audio[:, sl], write=True)
    weight = torch.randn(out.shape, generator=g)
    params = dict(s.named_parameters())
    got = torch.autograd.grad((out * weight).sum(), [xe, *params.values()], allow_unused=True)
    oracle.W = {k: v.detach().double().requires_grad_(k in params) for k, v in s.state_dict().items()}
    x64 = x[:, :, sl].double().requires_grad_()
    want_out = oracle.forward(x64, t[:, sl], ctx, audio[:, sl], stream.attend_for_chunk(1, False))
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    want = torch.autograd.grad((want_out * weight.double()).sum(), [x64, *(oracle.W[k] for k in params)],
                               allow_unused=True)
    assert got[0].abs().sum() > 0
    for name, a, b in zip(["x", *params], got, want):
        b = torch.zeros_like(a) if b is None else b
        a = torch.zeros_like(b) if a is None else a
        err = (a.double() - b).norm().item()
        assert err <= 1e-4 * max(1.0, b.norm().item()), (name, err, b.norm().item())


class _Recorder:
    """Counts block-0 forward calls with gradient, their backward passes, and records the student's streaming
    calls."""

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
    # streaming calls (write, with gradient) per chunk: the non-exit denoising passes without gradient, the exit
    # pass with gradient, then the cache write without gradient
    per_chunk = [(False, False)] * exit_step + [(False, True), (True, False)]
    assert rec.stream_calls == per_chunk * n_chunks
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


@pytest.mark.parametrize("exit_step", [0, 1])
def test_gradient_checkpointing_gives_the_same_gradient(exit_step):
    """Checkpointing re-runs the exit forward in the backward, after later chunks were written to the caches: the
    gradient must still be that of the caches the forward saw."""
    grads = []
    for ckpt in (False, True):
        s = _student().train()
        s.gradient_checkpointing = ckpt
        cond = _cond(s.config, 1, 7)
        noise = torch.randn(1, 16, 7, 4, 4, generator=torch.Generator().manual_seed(2))
        gen, _ = self_forcing_rollout(s, noise, cond, exit_step=exit_step, generator=torch.Generator().manual_seed(3))
        gen.square().mean().backward()
        grads.append([p.grad for p in s.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
