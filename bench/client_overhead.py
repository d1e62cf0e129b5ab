"""Per-call overhead of the Python client against a stdlib `http.client` baseline.

    python bench/client_overhead.py                 # starts a server on a free 127.0.0.1 port
    python bench/client_overhead.py --url http://127.0.0.1:8000 --calls 500

Every variant evaluates the tiny `tanh` model on a scalar over one kept-alive connection, one
call after another, so the server's share is the same for all and the differences are the
client's. It reports wall time and the *client process's* CPU time per call, then times JSON
against npz bodies over growing arrays to find the size where npz starts to win (the client's
`NPZ_THRESHOLD`). `httpx2` is measured when it is importable.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import ServerProcess  # noqa: E402
from client import AsyncClient, Client  # noqa: E402

BODY = b'{"args":[{"dtype":"float32","shape":[],"data":[2.0]}]}'
PATH = "/v1/models/tanh/eval"
HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def _decode(doc: dict) -> np.ndarray:
    leaf = doc["value"]
    return np.asarray(leaf["data"], leaf["dtype"]).reshape(leaf["shape"])


def measure(fn: Callable[[], object], calls: int) -> tuple[float, float, float]:
    """(median wall ms, mean wall ms, client CPU ms) per call."""
    for _ in range(20):
        fn()
    walls = []
    cpu0 = time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / calls
    return statistics.median(walls) * 1e3, statistics.fmean(walls) * 1e3, cpu * 1e3


def overhead(url: str, calls: int) -> list[tuple[str, tuple[float, float, float]]]:
    parts = urlsplit(url)
    rows = []

    conn = http.client.HTTPConnection(parts.hostname, parts.port)

    def stdlib() -> np.ndarray:
        conn.request("POST", PATH, BODY, HEADERS)
        return _decode(json.loads(conn.getresponse().read()))

    rows.append(("stdlib http.client (baseline)", measure(stdlib, calls)))
    conn.close()

    with httpx.Client(base_url=url) as h:
        rows.append(
            (
                "httpx.Client, raw post",
                measure(lambda: _decode(h.post(PATH, content=BODY, headers=HEADERS).json()), calls),
            )
        )
    with Client(url) as c:
        tanh = c.model("tanh")
        rows.append(("gradserve Client (httpx)", measure(lambda: tanh(2.0), calls)))

    rows.append(("httpx.AsyncClient, raw post", _async_rows(url, calls, raw=True)))
    rows.append(("gradserve AsyncClient (httpx)", _async_rows(url, calls, raw=False)))

    try:
        import httpx2
    except ImportError:
        rows.append(("httpx2: not installed", (float("nan"),) * 3))
    else:
        with httpx2.Client(base_url=url) as h2:
            rows.append(
                (
                    "httpx2.Client, raw post",
                    measure(
                        lambda: _decode(h2.post(PATH, content=BODY, headers=HEADERS).json()), calls
                    ),
                )
            )
        with Client(url, http_client=httpx2.Client()) as c2:
            tanh2 = c2.model("tanh")
            rows.append(("gradserve Client over httpx2.Client", measure(lambda: tanh2(2.0), calls)))
    return rows


def _async_rows(url: str, calls: int, raw: bool) -> tuple[float, float, float]:
    async def main() -> tuple[float, float, float]:
        if raw:
            async with httpx.AsyncClient(base_url=url) as h:

                async def one() -> np.ndarray:
                    return _decode((await h.post(PATH, content=BODY, headers=HEADERS)).json())

                return await _timed(one, calls)
        async with AsyncClient(url) as c:
            tanh = c.model("tanh")
            return await _timed(lambda: tanh(2.0), calls)

    return asyncio.run(main())


async def _timed(make: Callable, calls: int) -> tuple[float, float, float]:
    for _ in range(20):
        await make()
    walls = []
    cpu0 = time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        await make()
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / calls
    return statistics.median(walls) * 1e3, statistics.fmean(walls) * 1e3, cpu * 1e3


def encodings(url: str, reps: int) -> list[tuple[int, float, float]]:
    """(elements, JSON ms, npz ms) for tanh over float32 arrays of growing size."""
    rows = []
    with Client(url, encoding="json") as cj, Client(url, encoding="npz") as cn:
        fj, fn = cj.model("tanh"), cn.model("tanh")
        for n in (16, 256, 1024, 4096, 8192, 16384, 32768, 65536, 262144):
            x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
            tj = [_once(fj, x) for _ in range(reps)]
            tn = [_once(fn, x) for _ in range(reps)]
            rows.append((n, statistics.median(tj) * 1e3, statistics.median(tn) * 1e3))
    return rows


def _once(f: Callable, x: np.ndarray) -> float:
    t0 = time.perf_counter()
    f(x)
    return time.perf_counter() - t0


def start_server() -> tuple[ServerProcess, str]:
    server = ServerProcess().wait_ready()
    return server, server.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    server = None
    url = args.url
    if url is None:
        server, url = start_server()
    try:
        rows = overhead(url, args.calls)
        base = rows[0][1]
        print(f"\n{args.calls} sequential calls of tanh(2.0) on {url}\n")
        print("| client | median ms | mean ms | client CPU ms/call | CPU over baseline |")
        print("|---|---:|---:|---:|---:|")
        for name, (med, mean, cpu) in rows:
            print(f"| {name} | {med:.3f} | {mean:.3f} | {cpu:.3f} | {cpu - base[2]:+.3f} |")
        print("\nJSON vs npz bodies, tanh over float32[n] (median ms of a round trip)\n")
        print("| n | bytes | JSON ms | npz ms | npz/JSON |")
        print("|---:|---:|---:|---:|---:|")
        for n, tj, tn in encodings(url, args.reps):
            print(f"| {n} | {4 * n} | {tj:.2f} | {tn:.2f} | {tn / tj:.2f} |")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
