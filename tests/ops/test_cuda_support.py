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
