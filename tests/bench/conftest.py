"""Benchmarks in tests/bench run only when asked for:

    .venv/bin/python -m pytest tests/bench --benchmark-only

A plain ``pytest`` run collects them and skips them. PYEVO_BENCH_THREADS=N runs them with N
intra-op threads (default: the test suite's setting); on a shared 2-core machine, 1 thread gives
steadier ratios, since a parallel region waits for its slowest thread.
"""
import os
import pathlib

import pytest
import torch

BENCH_DIR = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="benchmark: run `pytest tests/bench --benchmark-only`")
    for item in items:
        if BENCH_DIR in pathlib.Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def bench_threads():
    threads = os.environ.get("PYEVO_BENCH_THREADS")
    if not threads:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    yield
    torch.set_num_threads(previous)
