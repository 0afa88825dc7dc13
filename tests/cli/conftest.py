"""Shared settings of the command-line tests: the commands set the CPU thread count to 1 for the tiny preset;
restore the suite's setting after each test."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
