"""Shared pytest setup: deterministic, single-threaded CPU runs; GPU tests skip without CUDA."""

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # One thread: the test models are tiny, and on a small shared machine a second OpenMP thread
    # spins at every op's barrier (measured: token-by-token decode 10-40x slower with 2 threads).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
