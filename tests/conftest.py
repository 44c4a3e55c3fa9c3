"""Shared fixtures: one synthetic dataset per test session (per worker). Helpers live in tests/helpers."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data directory shared by the whole session, so the synthetic dataset is generated once."""
    return tmp_path_factory.mktemp("data")
