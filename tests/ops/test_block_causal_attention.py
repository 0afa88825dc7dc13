"""CPU tier: block_causal_attention (reference backend) vs an independent dense oracle, gradients, opcheck, errors."""
import pytest
import torch

from lipforcing import ops
from lipforcing.ops.reference import block_causal_mask
from tests.ops.oracles import dense_block_causal

# (batch, seqlen, heads, head_dim, chunk, window, sink)
CASES = [
    (1, 37, 2, 16, 8, 16, 3),     # short last chunk, sink inside chunk 0
    (2, 64, 1, 8, 16, 16, 0),     # window == chunk: each chunk sees only itself
    (1, 50, 3, 32, 10, None, 0),  # no window: plain block-causal
    (2, 97, 2, 16, 12, 36, 12),   # sink == chunk, odd length
    (1, 20, 1, 8, 25, 25, 0),     # one (short) chunk
    (1, 40, 2, 8, 4, 12, 50),     # sink longer than the sequence
    (1, 33, 1, 8, 1, 3, 1),       # chunk of one token = causal sliding window with a sink
]


@pytest.mark.parametrize("B,L,H,D,chunk,window,sink", CASES)
def test_matches_dense_oracle(B, L, H, D, chunk, window, sink):
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    out = ops.block_causal_attention(q, k, v, chunk_size=chunk, window=window, sink=sink, backend="reference")
    expected = dense_block_causal(q, k, v, chunk, window, sink)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


def test_mask_picture():
    # The docstring's example, drawn by hand.
    picture = ["xx......", "xx......", "xxxx....", "xxxx....", "x.xxxx..", "x.xxxx..", "x...xxxx", "x...xxxx"]
    expected = torch.tensor([[c == "x" for c in row] for row in picture])
    assert torch.equal(block_causal_mask(8, 8, 2, 4, 1), expected)


def test_custom_scale():
    q, k, v = (torch.randn(1, 24, 2, 8) for _ in range(3))
    out = ops.block_causal_attention(q, k, v, chunk_size=8, window=16, sink=2, scale=0.3, backend="reference")
    torch.testing.assert_close(out.double(), dense_block_causal(q, k, v, 8, 16, 2, scale=0.3), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp32(dtype):
    q, k, v = (torch.randn(2, 45, 2, 16) for _ in range(3))
    out = ops.block_causal_attention(*(x.to(dtype) for x in (q, k, v)), chunk_size=9, window=27, sink=4,
                                     backend="reference")
    assert out.dtype == dtype
    expected = dense_block_causal(*(x.to(dtype) for x in (q, k, v)), 9, 27, 4)
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("B,L,H,D,chunk,window,sink", CASES[:4])
def test_gradients_match_oracle(B, L, H, D, chunk, window, sink):
    q, k, v = (torch.randn(B, L, H, D, requires_grad=True) for _ in range(3))
    g = torch.randn(B, L, H, D)
    out = ops.block_causal_attention(q, k, v, chunk_size=chunk, window=window, sink=sink, backend="reference")
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    expected = torch.autograd.grad(dense_block_causal(q64, k64, v64, chunk, window, sink), (q64, k64, v64),
                                   g.double())
    for got, exp in zip(grads, expected):
        torch.testing.assert_close(got.double(), exp, atol=1e-4, rtol=1e-4)


def test_opcheck():
    q, k, v = (torch.randn(1, 19, 2, 8, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.lipforcing.block_causal_attention.default,
                          (q, k, v, 6, 12, 2, 0.35, "reference"))


def test_env_var_selects_backend(monkeypatch):
    q, k, v = (torch.randn(1, 8, 1, 8) for _ in range(3))
    monkeypatch.setenv("LIPFORCING_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        ops.block_causal_attention(q, k, v, chunk_size=4)
    # an explicit argument wins over the environment
    ops.block_causal_attention(q, k, v, chunk_size=4, backend="reference")
    monkeypatch.setenv("LIPFORCING_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LIPFORCING_BACKEND"):
        ops.block_causal_attention(q, k, v, chunk_size=4)


def test_explicit_backend_that_cannot_run_says_why():
    q, k, v = (torch.randn(1, 8, 1, 8) for _ in range(3))
    with pytest.raises(ops.BackendUnavailable, match="CUDA tensors"):
        ops.block_causal_attention(q, k, v, chunk_size=4, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.block_causal_attention(q, k, v, chunk_size=4, backend="fast")


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=torch.randn(8, 1, 8)), r"q must be 4-D \(batch, seqlen, heads, head_dim\), got shape \(8, 1, 8\)"),
    (dict(k=torch.randn(1, 9, 1, 8)), r"k must have the shape of q"),
    (dict(v=torch.randn(1, 8, 1, 8, dtype=torch.float64)), r"v must have dtype in"),
    (dict(q=torch.randn(1, 8, 1, 8).half()), r"k must have the same dtype as q"),
    (dict(q=torch.randn(1, 8, 1, 16)[..., ::2]), r"q must have a contiguous last dimension"),
    (dict(chunk_size=0), r"chunk_size must be >= 1, got 0"),
    (dict(window=2), r"window \(2 tokens\) must be >= chunk_size \(4 tokens\)"),
    (dict(sink=-1), r"sink must be >= 0"),
    (dict(chunk_size=2.5), r"chunk_size must be an int"),
    (dict(scale=-1.0), r"scale must be > 0"),
    (dict(scale=float("inf")), r"scale must be a finite number > 0"),
    (dict(scale=float("nan")), r"scale must be > 0"),
    (dict(q=torch.randn(1, 8, 1, 0), k=torch.randn(1, 8, 1, 0), v=torch.randn(1, 8, 1, 0)),
     r"q must have head_dim >= 1, got 0"),
])
def test_errors(kwargs, match):
    args = dict(q=torch.randn(1, 8, 1, 8), k=torch.randn(1, 8, 1, 8), v=torch.randn(1, 8, 1, 8), chunk_size=4,
                window=None, sink=0)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.block_causal_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args, backend="reference")


def test_auto_on_cpu_uses_the_reference_even_under_the_interpreter(monkeypatch):
    # TRITON_INTERPRET=1 is a debugging mode: "auto" must not route CPU tensors through it
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from lipforcing.ops import _dispatch
    from lipforcing.ops.block_causal_attention import _FWD

    q = torch.randn(1, 8, 1, 8)
    args = (q, q, q, 4, None, 0, 0.3)
    assert _dispatch.resolve("block_causal_attention", _FWD, "auto", q.device, args, {}) == "reference"


# (L, chunk, window, sink, poisoned key position): keys that later chunks stop seeing (out of the window) and
# that earlier chunks do not see yet (future)
POISON = [(23, 4, 8, 2, 17), (23, 4, 8, 2, 5), (19, 3, 6, 3, 7)]


@pytest.mark.parametrize("L,chunk,window,sink,j", POISON)
@pytest.mark.parametrize("what", ["k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_reference_hidden_nonfinite_key_never_leaks(L, chunk, window, sink, j, what, bad):
    """A NaN/inf in the key or value of token j changes exactly the rows that see j (they become non-finite);
    every other row is bit-for-bit the clean result (hidden keys are selected away, not multiplied by 0)."""
    q, k, v = (torch.randn(1, L, 2, 8) for _ in range(3))
    clean = ops.block_causal_attention(q, k, v, chunk_size=chunk, window=window, sink=sink, backend="reference")
    poisoned = dict(k=k.clone(), v=v.clone())
    poisoned[what][0, j, 1, 3] = bad
    out = ops.block_causal_attention(q, poisoned["k"], poisoned["v"], chunk_size=chunk, window=window, sink=sink,
                                     backend="reference")
    sees = block_causal_mask(L, L, chunk, window, sink)[:, j]
    assert sees.any() and not sees.all()
    assert torch.equal(out[:, ~sees], clean[:, ~sees])
    assert torch.equal(out[:, :, 0], clean[:, :, 0])  # the other head
    if what == "v":
        assert not torch.isfinite(out[0, sees, 1, 3]).any()
    elif bad != bad:  # an inf key may score -inf (weight 0) for some rows: only NaN is sure to show
        assert torch.isnan(out[0, sees, 1]).all()


def test_reference_nonfinite_query_row_stays_nonfinite():
    """A NaN query row gives a NaN row (not zeros, as before), on the reference as on Triton; the gradient of
    the other queries stays finite."""
    L, chunk = 12, 4
    q, k, v = (torch.randn(1, L, 1, 8) for _ in range(3))
    q[0, 9, 0, 2] = float("nan")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = ops.block_causal_attention(q, k, v, chunk_size=chunk, backend="reference")
    assert torch.isnan(out[0, 9]).all() and torch.isfinite(out[0, :8]).all()
    g = torch.zeros_like(out)
    g[0, :8] = torch.randn(8, 1, 8)  # loss from the rows before the NaN row's chunk only
    dq, = torch.autograd.grad(out, (q,), g)
    assert torch.isfinite(dq[0, :8]).all() and torch.isfinite(dq[0, 12:]).all()
