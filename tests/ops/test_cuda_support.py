"""The CUDA wrappers' support rules that need no GPU: which compute capabilities the extension serves."""
import pytest
import torch

from lipforcing.ops import cuda as cuda_ext


@pytest.mark.parametrize("capability, supported", [((7, 0), False), ((7, 5), False), ((8, 0), True),
                                                    ((8, 6), True), ((9, 0), True)])
def test_arch_problem_by_compute_capability(monkeypatch, capability, supported):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    why = cuda_ext.arch_problem(torch.device("cuda", 0))
    if supported:
        assert why is None
    else:
        assert "8.0+" in why


@pytest.mark.parametrize("capability, has_sm90, n, env, runs", [
    ((9, 0), True, 64, None, True),     # H100/H200, full chunk: the wgmma kernel
    ((9, 0), True, 40, None, False),    # short last chunk: the mma.sync kernel
    ((9, 0), False, 64, None, False),   # extension built without 90 in its architectures
    ((8, 0), True, 64, None, False),    # sm_90a code does not run on sm_80 ...
    ((10, 0), True, 64, None, False),   # ... nor on sm_100
    ((9, 0), True, 64, "0", False),     # LIPFORCING_CUDA_SM90=0
])
def test_chunk_attention_sm90_dispatch_rule(monkeypatch, capability, has_sm90, n, env, runs):
    """Which chunk steps the CUDA backend sends to the sm_90 wgmma kernel (csrc/chunk_attention_sm90.cu)."""
    from lipforcing.ops.cuda import chunk_attention as ca

    ext = type("Ext", (), {"chunk_attention_sm90": staticmethod(lambda *a: None)} if has_sm90 else {})()
    monkeypatch.setattr(ca, "extension", lambda: ext)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if env is None:
        monkeypatch.delenv("LIPFORCING_CUDA_SM90", raising=False)
    else:
        monkeypatch.setenv("LIPFORCING_CUDA_SM90", env)
    why = ca.sm90_problem(torch.empty(1, n, 2, 64), 64)
    assert (why is None) == runs, why
    if runs:  # q as a view of a fused qkv projection is fine; a head-major q goes to the mma.sync kernel
        assert ca.sm90_problem(torch.empty(1, n, 3, 2, 64)[:, :, 0], 64) is None
        assert "strides" in ca.sm90_problem(torch.empty(1, 2, n, 64).transpose(1, 2), 64)


@pytest.mark.parametrize("capability, has_sm90, head_dim, env, runs", [
    ((9, 0), True, 128, None, True),    # H100/H200: the wgmma kernel
    ((9, 0), True, 64, None, True),
    ((9, 0), True, 96, None, False),    # head_dim 32/96: the mma.sync kernel
    ((9, 0), False, 128, None, False),  # extension built without 90 in its architectures
    ((8, 9), True, 128, None, False),   # sm_90a code runs on compute capability 9.0 only
    ((10, 0), True, 128, None, False),
    ((9, 0), True, 128, "0", False),    # LIPFORCING_CUDA_SM90=0
])
def test_audio_cross_attention_sm90_dispatch_rule(monkeypatch, capability, has_sm90, head_dim, env, runs):
    """Which inputs the CUDA backend sends to the sm_90 wgmma kernel (csrc/audio_cross_attention_sm90.cu)."""
    from lipforcing.ops.cuda import audio_cross_attention as aca

    ext = type("Ext", (), {"audio_cross_attention_sm90": staticmethod(lambda *a: None)} if has_sm90 else {})()
    monkeypatch.setattr(aca, "extension", lambda: ext)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if env is None:
        monkeypatch.delenv("LIPFORCING_CUDA_SM90", raising=False)
    else:
        monkeypatch.setenv("LIPFORCING_CUDA_SM90", env)
    B, F, tpf, H, T, A = 2, 3, 37, 2, 19, 1
    q, tk, tv = torch.empty(B, F * tpf, H, head_dim), torch.empty(B, T, H, head_dim), torch.empty(B, T, H, head_dim)
    ak, av = torch.empty(B, F, A, H, head_dim), torch.empty(B, F, A, H, head_dim)
    why = aca.sm90_problem(q, tk, tv, ak, av)
    assert (why is None) == runs, why
    if runs:
        # views of fused projections are fine, an empty text is never loaded; head-major or broadcast (stride 0)
        # tensors go to the mma.sync kernel
        fused = torch.empty(B, T, 2, H, head_dim)
        assert aca.sm90_problem(q, fused[:, :, 0], fused[:, :, 1], ak, av) is None
        empty = torch.empty(B, 0, H, head_dim)
        assert aca.sm90_problem(q, empty, empty, ak, av) is None
        assert "text_k" in aca.sm90_problem(q, torch.empty(B, H, T, head_dim).transpose(1, 2), tv, ak, av)
        assert "audio_v" in aca.sm90_problem(q, tk, tv, ak, av[:1].expand(B, -1, -1, -1, -1))
