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
