"""CPU tier: audio_cross_attention (reference backend) vs a per-frame dense oracle, gradients, opcheck, errors."""
import pytest
import torch

from lipforcing import ops
from tests.ops.oracles import dense_audio_cross

# (batch, frames, tokens_per_frame, heads, head_dim, text_len, audio_window, audio_scale)
CASES = [
    (1, 3, 10, 2, 16, 7, 4, 1.0),
    (2, 2, 13, 1, 8, 0, 1, 0.5),     # no text (audio only), a single audio token
    (1, 4, 5, 3, 32, 20, 64, 2.0),   # widest audio window
    (2, 1, 9, 2, 8, 3, 5, 0.0),      # audio branch switched off
]


def _inputs(B, F, T, H, D, Lt, A, dtype=torch.float32, grad=False):
    xs = (torch.randn(B, F * T, H, D), torch.randn(B, Lt, H, D), torch.randn(B, Lt, H, D),
          torch.randn(B, F, A, H, D), torch.randn(B, F, A, H, D))
    return tuple(x.to(dtype).requires_grad_(grad) for x in xs)


@pytest.mark.parametrize("B,F,T,H,D,Lt,A,scale_a", CASES)
def test_matches_dense_oracle(B, F, T, H, D, Lt, A, scale_a):
    xs = _inputs(B, F, T, H, D, Lt, A)
    out = ops.audio_cross_attention(*xs, tokens_per_frame=T, audio_scale=scale_a, backend="reference")
    torch.testing.assert_close(out.double(), dense_audio_cross(*xs, T, scale_a), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    xs = _inputs(1, 3, 8, 2, 16, 6, 4, dtype)
    out = ops.audio_cross_attention(*xs, tokens_per_frame=8, backend="reference")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), dense_audio_cross(*xs, 8, 1.0), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("B,F,T,H,D,Lt,A,scale_a", CASES[:3])
def test_gradients_match_oracle(B, F, T, H, D, Lt, A, scale_a):
    xs = _inputs(B, F, T, H, D, Lt, A, grad=True)
    g = torch.randn(B, F * T, H, D)
    out = ops.audio_cross_attention(*xs, tokens_per_frame=T, audio_scale=scale_a, backend="reference")
    got = torch.autograd.grad(out, xs, g)
    xs64 = tuple(x.detach().double().requires_grad_(True) for x in xs)
    exp = torch.autograd.grad(dense_audio_cross(*xs64, T, scale_a), xs64, g.double(), allow_unused=True)
    for a, b in zip(got, exp):
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_opcheck():
    xs = _inputs(1, 2, 5, 2, 8, 3, 4, grad=True)
    torch.library.opcheck(torch.ops.lipforcing.audio_cross_attention.default, (*xs, 5, 0.7, 0.3, "reference"))


@pytest.mark.parametrize("change,match", [
    (dict(q=torch.randn(1, 31, 2, 8)), r"q has 31 tokens, which is not a whole number of frames"),
    (dict(audio_k=torch.randn(1, 2, 4, 2, 8), audio_v=torch.randn(1, 2, 4, 2, 8)),
     r"audio_k has 2 frames but q has 3 frames"),
    (dict(text_k=torch.randn(1, 6, 3, 8)), r"text_v must have the shape of text_k"),
    (dict(text_k=torch.randn(1, 6, 3, 8), text_v=torch.randn(1, 6, 3, 8)), r"text_k must be \(batch=1, text_len, heads=2"),
    (dict(audio_v=torch.randn(1, 3, 5, 2, 8)), r"audio_v must have the shape of audio_k"),
    (dict(audio_k=torch.randn(1, 3, 4, 2, 4), audio_v=torch.randn(1, 3, 4, 2, 4)), r"audio_k must be \(batch=1, frames"),
    (dict(audio_k=torch.randn(1, 3, 4, 2, 8).half()), r"audio_k must have the same dtype as q"),
    (dict(audio_k=torch.randn(3, 4, 2, 8)), r"audio_k must be 5-D"),
    (dict(tokens_per_frame=0), r"tokens_per_frame must be >= 1"),
    (dict(audio_k=torch.randn(1, 3, 0, 2, 8), audio_v=torch.randn(1, 3, 0, 2, 8)), r"audio window of at least 1"),
    (dict(audio_scale=float("nan")), r"audio_scale must be a finite number, got nan"),
    (dict(scale=float("inf")), r"scale must be a finite number > 0"),
    (dict(scale=float("nan")), r"scale must be > 0"),
    (dict(q=torch.randn(1, 30, 2, 0), text_k=torch.randn(1, 6, 2, 0), text_v=torch.randn(1, 6, 2, 0),
          audio_k=torch.randn(1, 3, 4, 2, 0), audio_v=torch.randn(1, 3, 4, 2, 0)), r"q must have head_dim >= 1, got 0"),
])
def test_errors(change, match):
    args = dict(q=torch.randn(1, 30, 2, 8), text_k=torch.randn(1, 6, 2, 8), text_v=torch.randn(1, 6, 2, 8),
                audio_k=torch.randn(1, 3, 4, 2, 8), audio_v=torch.randn(1, 3, 4, 2, 8), tokens_per_frame=10)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.audio_cross_attention(args.pop("q"), args.pop("text_k"), args.pop("text_v"), args.pop("audio_k"),
                                  args.pop("audio_v"), **args)


@pytest.mark.parametrize("what", ["q", "text_k", "audio_k", "audio_v"])
def test_reference_nonfinite_inputs_propagate_only_where_seen(what):
    """NaN in q poisons its row, in text_k every row, in frame 1's audio only frame 1's rows (never zeros)."""
    B, F, T, H, D, Lt, A = 1, 3, 5, 2, 8, 4, 3
    xs = dict(q=torch.randn(B, F * T, H, D), text_k=torch.randn(B, Lt, H, D), text_v=torch.randn(B, Lt, H, D),
              audio_k=torch.randn(B, F, A, H, D), audio_v=torch.randn(B, F, A, H, D))
    clean = ops.audio_cross_attention(**xs, tokens_per_frame=T, audio_scale=0.5, backend="reference")
    bad = xs[what].clone()
    if what == "q":
        bad[0, 7, 1, 0] = float("nan")
        seen = torch.zeros(F * T, dtype=torch.bool)
        seen[7] = True
    elif what == "text_k":
        bad[0, 2, 1, 0] = float("nan")
        seen = torch.ones(F * T, dtype=torch.bool)
    else:
        bad[0, 1, 2, 1, 0] = float("nan")
        seen = (torch.arange(F * T) // T) == 1
    out = ops.audio_cross_attention(**dict(xs, **{what: bad}), tokens_per_frame=T, audio_scale=0.5,
                                    backend="reference")
    assert torch.isnan(out[0, seen, 1]).any(dim=-1).all()
    assert torch.equal(out[:, ~seen], clean[:, ~seen]) and torch.equal(out[:, :, 0], clean[:, :, 0])
