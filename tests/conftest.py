"""Shared fixtures: one synthetic dataset per test session (per worker). Helpers live in tests/helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data directory shared by the whole session, so the synthetic dataset is generated once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run many small ops, where a second thread only contends with the other
    test worker on a 2-core machine; and reductions then run in a fixed order, so outputs repeat exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
