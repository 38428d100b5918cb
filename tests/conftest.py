"""Root conftest: registers the fixture plugins every test directory may use, and the environment they share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.cluster",
    "tests.fixtures.s3",
    "tests.fixtures.prometheus",
    "tests.fixtures.kueue",
]


def pytest_configure(config: pytest.Config) -> None:
    # The same defaults as the Makefile, so `pytest` alone behaves like `make test`. Set before any fixture starts
    # a server or a local Ray run: they inherit HF_HOME from here, and no test may reach a model hub.
    cache = Path(os.environ.get("FT_CACHE") or Path(__file__).resolve().parents[1] / ".cache")
    os.environ.setdefault("FT_CACHE", str(cache))
    os.environ.setdefault("HF_HOME", str(cache / "hf"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
