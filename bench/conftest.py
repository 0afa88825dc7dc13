"""Kernel micro-benchmarks (pytest-benchmark; GPU only, except the unmarked CPU rows of test_bench_decoder.py).
Run: ``pytest bench -m gpu`` or ``lipforcing bench``.

Use the ``bench_record`` fixture: ``bench_record(op, backend, shape, dtype, fn, flops=..., nbytes=...)`` times
``fn`` with CUDA events (median, p20, p80), stores the row in pytest-benchmark's ``extra_info`` and in the run's
JSON (``--bench-json PATH``, default bench/results/latest.json), one schema for every op
(lipforcing.benchmarking.Row).  Always record a PyTorch baseline in the same test module.
"""
import os

import pytest
import torch

from lipforcing.benchmarking import Row, environment, write

_ROWS: list[Row] = []
_JSON: list[str] = []   # the --bench-json path of this run
_ENV: dict = {}          # environment() once per run (it runs git)


def pytest_configure(config):
    _JSON[:] = [config.getoption("--bench-json")]
    # The FlexAttention baselines compile torch.nn.attention.flex_attention once per shape (dynamic=False): 8
    # chunk shapes + the block-causal training shapes, more than dynamo's default recompile limit of 8, after
    # which it would silently run the unfused eager flex_attention (materialised scores) under the "flex" label.
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 512)


def pytest_addoption(parser):
    parser.addoption("--bench-json", default=os.path.join(os.path.dirname(__file__), "results", "latest.json"),
                     help="where to write the benchmark rows (JSON)")


def pytest_collection_modifyitems(config, items):
    # GPU benchmarks carry the gpu marker; a few unmarked ones (bench/test_bench_decoder.py) run on the CPU
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def bench_record(benchmark):
    """Record one row per call (a test may record several, e.g. a kernel and its PyTorch baseline); the first
    call also feeds pytest-benchmark's own timer, which allows one measurement per test."""
    calls = []

    def record(op, backend, shape, dtype, fn, *, flops=None, nbytes=None, **timing):
        row = Row.measure(op, backend, shape, dtype, fn, flops=flops, nbytes=nbytes, **timing)
        _ROWS.append(row)
        _save()  # after every row: a run cut off by a timeout (bench/gpu_session.sh) keeps what it measured
        benchmark.extra_info[f"{op}/{backend}"] = {k: v for k, v in row.__dict__.items() if k != "extra"}
        if not calls:
            benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=5, iterations=1, warmup_rounds=1)
        calls.append(row)
        return row

    return record


def _save():
    if _ROWS and _JSON:
        if not _ENV:
            _ENV.update(environment())
        write(_ROWS, _JSON[0], env=_ENV)


def pytest_runtest_teardown(item, nextitem):
    # rows are Row objects whose ``extra`` a test may fill after recording (ratios to a baseline): save again
    _save()


def pytest_sessionfinish(session, exitstatus):
    _save()
