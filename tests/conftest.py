"""Test tiers (DESIGN.md convention 9).

Default run: the CPU tier and the Triton-interpreter tier (``interp``).  Without a GPU, TRITON_INTERPRET=1 is set
here, before any test module imports triton or lipforcing.kernels.  ``-m compile`` runs compile-only checks (in
subprocesses, without the interpreter); ``-m gpu`` needs a CUDA GPU and skips without one.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every CPU test uses tiny shapes: intra-op threads only add overhead (up to 10x on a busy 2-core machine).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_random_inputs():
    # Fresh random inputs every run (convention: never fixed, never all zeros); print the seed so a failure
    # can be reproduced with LIPFORCING_TEST_SEED.
    seed = int(os.environ.get("LIPFORCING_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(seed)
    print(f"torch seed: LIPFORCING_TEST_SEED={seed}")  # shown with the output of a failing test
    yield seed
