"""Fixtures of the TAEHV decoder tests: random-weight models, the tiny preset and the real taew2_1 architecture."""
from __future__ import annotations

import pytest

from lipforcing.decoders import TAEHV
from tests.decoders.reference import randomize_


@pytest.fixture
def tiny_taehv() -> TAEHV:
    return randomize_(TAEHV("tiny")).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def full_taehv() -> TAEHV:
    return randomize_(TAEHV()).eval().requires_grad_(False)
