"""Fixtures for the streaming-engine tests: small engines with random weights (CPU)."""
import pytest
import torch

import lipforcing
from tests.stream.helpers import RES, SMALL_VAE, small_config


@pytest.fixture(scope="session")
def engine():
    """The tiny preset (random weights, tiny VAE, mel front end) at 16x16."""
    return lipforcing.Engine.load(model="tiny", resolution=RES, seed=0, backend="reference")


@pytest.fixture(scope="session")
def small_engine():
    """An even smaller engine for long streams."""
    return lipforcing.Engine.load(model=small_config(), vae=SMALL_VAE, resolution=RES, seed=1, backend="reference")


@pytest.fixture(autouse=True)
def _one_thread():
    # the tests time nothing, but single-threaded CPU kernels keep them fast next to other test processes
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
