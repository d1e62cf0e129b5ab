"""Shared fixtures: the app in-process, and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from bench.harness import ServerProcess
from helpers import ROOT, LiveServer


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failing test shows the log tail of every server still running: a 500's traceback is
    there, and CI prints nothing else of a server subprocess."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in list(ServerProcess.running):
            report.sections.append((f"server log ({server.url})", server.output()[-3000:]))


# Warm-up compiles every model's common ops before /readyz turns 200: seconds per app. Tests
# build many apps, so it is off unless a test asks for it (tests/server/test_engine.py does).
os.environ.setdefault("GRADSERVE_WARMUP", "false")


@pytest.fixture(scope="session")
def app_client() -> Iterator:
    """The app in-process (ASGI, lifespan run), shared by the whole session."""
    from starlette.testclient import TestClient

    from service import Settings, create_app

    settings = Settings(models=[str(ROOT / "examples" / "models.py")])
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    """A real uvicorn serving the built-in models, shared by the whole session."""
    server = LiveServer().wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client_server() -> Iterator[LiveServer]:
    """A live server with the built-in models and examples/models.py (`ridge` returns
    `(loss, aux)`, which the client's has_aux tests need)."""
    server = LiveServer("--models", "examples/models.py").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def start_server() -> Iterator:
    """`start_server(*flags, env=...)`: LiveServers of a test module's own, stopped after it
    (for tests that need other settings, or that stop the server themselves)."""
    started: list[LiveServer] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> LiveServer:
        started.append(LiveServer(*flags, env=env))
        return started[-1].wait_ready()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def app_factory():
    """`with app_factory(**settings) as client:` a fresh app in-process, ready when entered."""
    from contextlib import contextmanager

    from starlette.testclient import TestClient

    from service import Settings, create_app

    @contextmanager
    def make(**settings):
        with TestClient(create_app(Settings(**settings))) as client:
            deadline = time.monotonic() + 120
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "app never became ready"
                time.sleep(0.05)
            yield client

    return make
