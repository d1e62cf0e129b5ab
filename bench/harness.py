"""Starting servers, timing, and the results table."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A gradserve server in a subprocess on a free 127.0.0.1 port, stopped by PID.

    The one way the benchmarks, the soak and the tests start a server. Its output goes to a
    file, not a pipe: a pipe nobody drains blocks a chatty server once 64 KiB fill it.
    """

    # Those not stopped yet: a failing test shows their logs (tests/conftest.py).
    running: ClassVar[weakref.WeakSet[ServerProcess]] = weakref.WeakSet()

    def __init__(
        self,
        *flags: str,
        env: Mapping[str, str] | None = None,
        program: Sequence[str] = ("service", "serve", "--host", "127.0.0.1"),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.perf_counter()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *program, "--port", str(self.port), *flags],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        ServerProcess.running.add(self)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 180) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"server on {self.url} not ready in {timeout} s")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self, grace: float = 20) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit code."""
        ServerProcess.running.discard(self)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def Server(**env: str) -> ServerProcess:
    """The benchmark's server (`bench.server`: gradserve plus a no-op route), warmed up."""
    return ServerProcess(env={"GRADSERVE_WARMUP": "true", **env}, program=("bench.server",))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def median(samples: list[float]) -> float:
    return statistics.median(samples)


@dataclass
class Row:
    case: str
    measured: str
    ratio: float | None
    target: str
    met: bool | None
    notes: str = ""


@dataclass
class Table:
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(
            f"  {row.case}: {row.measured}"
            + (f"  ratio {row.ratio:.2f}" if row.ratio is not None else ""),
            flush=True,
        )

    def markdown(self) -> str:
        lines = ["| case | measured | ratio | target | met |", "|---|---|---|---|---|"]
        for r in self.rows:
            ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
            met = "" if r.met is None else ("yes" if r.met else "**no**")
            lines.append(f"| {r.case} | {r.measured} | {ratio} | {r.target} | {met} |")
        return "\n".join(lines)
