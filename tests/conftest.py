"""Shared fixtures: the app in-process, and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Warm-up compiles every model's common ops before /readyz turns 200: seconds per app. Tests
# build many apps, so it is off unless a test asks for it (tests/server/test_engine.py does).
os.environ.setdefault("GRADSERVE_WARMUP", "false")
SEED = ROOT.parent / "shared" / "seed" / "000_1b531a577a061421.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`gradserve serve` in a subprocess on a free loopback port; stopped by PID."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *flags,
        ]
        # A file, not a pipe: nobody reads a pipe while tests run, and once its 64 KiB fill
        # with access-log lines the server blocks on its next log write.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> LiveServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
