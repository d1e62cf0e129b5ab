"""A real `gradserve serve --x64` with the benchmark and test models, shared by the UM-Bridge
tests (x64: the benchmark models compute in float64; the cookbook's keep their float32)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from umbridge_util import MODELS_FILE

from helpers import LiveServer


@pytest.fixture(scope="session")
def umbridge_server() -> Iterator[LiveServer]:
    server = LiveServer("--x64", "--models", "service.models.benchmarks", MODELS_FILE)
    yield server.wait_ready()
    server.stop()
