"""Fixtures for the streaming-engine tests: small engines with random weights (CPU)."""
import pytest

import lipforcing
from tests.stream.helpers import RES, SMALL_VAE, small_config


@pytest.fixture(scope="session")
def engine():
    """The tiny preset (random weights, tiny VAE, mel front end) at 16x16."""
    e = lipforcing.Engine.load(model="tiny", resolution=RES, seed=0, backend="reference")
    yield e
    e.close()          # stops its scheduler thread


@pytest.fixture(scope="session")
def small_engine():
    """An even smaller engine for long streams."""
    e = lipforcing.Engine.load(model=small_config(), vae=SMALL_VAE, resolution=RES, seed=1, backend="reference")
    yield e
    e.close()
