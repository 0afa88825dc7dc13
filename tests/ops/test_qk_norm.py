"""qk_norm's input checks (clear errors) and when the model's chunk step takes the fused path; the numerics of
the Triton kernel are in tests/interp/test_qk_norm.py."""
import pytest
import torch

from lipforcing import RollingKVCache
from lipforcing.ops import BackendUnavailable, qk_norm, rope_spec
from lipforcing.ops.qk_norm import fused_backend


def _qk(B=1, L=6, H=2, D=8):
    return torch.randn(B, L, H, D), torch.randn(B, L, H, D), torch.randn(H * D), torch.randn(H * D)


def test_bad_inputs_raise_clear_errors():
    q, k, wq, wk = _qk()
    with pytest.raises(ValueError, match="k must have the shape of q"):
        qk_norm(q, k[:, :5], wq, wk, eps=1e-6)
    with pytest.raises(ValueError, match="4-D"):
        qk_norm(q.flatten(2), k.flatten(2), wq, wk, eps=1e-6)
    with pytest.raises(ValueError, match="weight_q must (be|have a) contiguous"):
        qk_norm(q, k, torch.randn(2 * wq.numel())[::2], wk, eps=1e-6)
    with pytest.raises(ValueError, match="weight_k must have heads \\* head_dim = 16"):
        qk_norm(q, k, wq, wk[:15], eps=1e-6)
    with pytest.raises(ValueError, match="same dtype"):
        qk_norm(q, k.half(), wq, wk, eps=1e-6)
    with pytest.raises(ValueError, match="contiguously"):
        qk_norm(q.transpose(1, 2).contiguous().transpose(1, 2), k, wq, wk, eps=1e-6)  # heads not adjacent
    with pytest.raises(ValueError, match="eps"):
        qk_norm(q, k, wq, wk, eps=-1.0)
    q5, k5, wq5, wk5 = _qk(D=5)
    with pytest.raises(ValueError, match="even head_dim"):
        qk_norm(q5, k5, wq5, wk5, eps=1e-6, rope=rope_spec(6, (2, 3)))
    with pytest.raises(ValueError, match="built for head_dim 6"):
        qk_norm(q, k, wq, wk, eps=1e-6, rope=rope_spec(6, (2, 3)))
    rope = rope_spec(8, (2, 3), max_frames=4)
    with pytest.raises(ValueError, match="needs 5 frames"):
        qk_norm(q, k, wq, wk, eps=1e-6, rope=rope, frame_offset=4)
    with pytest.raises(ValueError, match="need the layer's cache"):
        qk_norm(q, k, wq, wk, eps=1e-6, rope=rope, rope_positions="window")
    with pytest.raises(ValueError, match="need the layer's cache"):
        qk_norm(q, k, wq, wk, eps=1e-6, v=torch.randn_like(q))
    cache = RollingKVCache(1, 2, 8, chunk_size=4, window=8)
    with pytest.raises(ValueError, match="at most cache.chunk_size = 4"):
        qk_norm(q, k, wq, wk, eps=1e-6, cache=cache, v=torch.randn_like(q))
    with pytest.raises(ValueError, match="rope_positions"):
        qk_norm(q, k, wq, wk, eps=1e-6, rope=rope, rope_positions="relative")
    with pytest.raises(ValueError, match="no backward"):
        qk_norm(q.requires_grad_(), k, wq, wk, eps=1e-6)
    with pytest.raises(BackendUnavailable, match="no cuda implementation|needs CUDA"):
        qk_norm(q.detach(), k, wq, wk, eps=1e-6, backend="cuda")


def test_fused_backend_only_on_the_triton_path(monkeypatch):
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert fused_backend("reference", cpu, torch.float32) is None
        assert fused_backend("auto", cpu, torch.float32) is None        # CPU keeps the PyTorch norms
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert fused_backend("triton", cpu, torch.float32) == "triton"  # the interpreter, asked for by name
        assert fused_backend("triton", cpu, torch.bfloat16) is None     # the interpreter has no bf16
        monkeypatch.setenv("LIPFORCING_FUSED_QK_NORM", "0")
        assert fused_backend("triton", cpu, torch.float32) is None
    monkeypatch.delenv("LIPFORCING_FUSED_QK_NORM")
    assert fused_backend("triton", cpu, torch.float32) is None            # gradients recorded: no backward


def test_reference_norm_only_matches_model_rmsnorm_and_write_leaves_pos():
    from lipforcing.model.layers import RMSNorm

    B, L, H, D = 2, 4, 3, 5
    q, k, wq, wk = _qk(B, L, H, D)
    norm = RMSNorm(H * D, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(wk)
        cache = RollingKVCache(B, H, D, chunk_size=4, window=4, sink=2)
        v = torch.randn_like(q)
        _, kn = qk_norm(q, k, wq, wk, eps=1e-5, cache=cache, v=v)
        torch.testing.assert_close(kn, norm(k.reshape(B, L, H * D)).view(B, L, H, D), rtol=0, atol=0)
    assert int(cache.pos) == 0
    # sink slots 0, 1 take tokens 0, 1; ring slots 2..5 take tokens 2, 3 (slots 2, 3), slots 4, 5 stay empty
    torch.testing.assert_close(cache.k[:, :4], kn, rtol=0, atol=0)
    torch.testing.assert_close(cache.v[:, :4], v, rtol=0, atol=0)
    assert not cache.k[:, 4:].any()


def test_opcheck():
    q, k, wq, wk = _qk(1, 4, 2, 6)
    v = torch.randn_like(q)
    rope = rope_spec(6, (1, 2), max_frames=8)
    cache = RollingKVCache(1, 2, 6, chunk_size=4, window=8, sink=2)
    outs = (torch.empty_like(q), torch.empty_like(q))
    torch.library.opcheck(torch.ops.lipforcing.qk_norm.default,
                          (q, k, None, wq, wk, 1e-6, 1, rope.cos, rope.sin, 1, 2, 3, None, None, None, 0, 0, 0, *outs,
                           "reference"))
    torch.library.opcheck(torch.ops.lipforcing.qk_norm.default,
                          (q, k, v, wq, wk, 1e-6, 2, rope.cos, rope.sin, 1, 2, 0, cache.k, cache.v, cache.pos, 4, 8, 2,
                           *outs, "reference"))
