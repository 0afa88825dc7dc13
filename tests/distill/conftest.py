"""Shared fixtures of the distillation tests (tiny preset, CPU)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny preset's matmuls are far too small for intra-op threads; on a busy 2-core machine the thread pool
    # makes them 10x slower.  Restored after each test.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
