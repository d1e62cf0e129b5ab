"""Starting servers, timing, and the results table."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m bench.server` on a free 127.0.0.1 port, stopped by PID."""

    def __init__(self, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.server", "--port", str(self.port)],
            cwd=ROOT,
            env={**os.environ, "GRADSERVE_WARMUP": "true", **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def wait_ready(self, timeout: float = 180) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode()[-3000:])
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"server on {self.url} not ready in {timeout} s")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
