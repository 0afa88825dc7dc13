"""Fixtures of the serving tests: one small engine (random weights, CPU) closed at the end, and a check that no
scheduler thread outlives its engine."""
import threading

import pytest

import lipforcing
from tests.stream.helpers import RES, SMALL_VAE, small_config


@pytest.fixture(scope="module")
def serve_engine():
    e = lipforcing.Engine.load(model=small_config(), vae=SMALL_VAE, resolution=RES, seed=2, backend="reference")
    yield e
    e.close()
    assert not e.scheduler.running


def scheduler_threads():
    return [t for t in threading.enumerate() if t.name == "lipforcing-scheduler"]
