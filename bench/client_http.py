"""The client's HTTP paths on a large exchange, side by side in one run.

A 1M-float32 VJP (npz: 8 MB in, 8 MB out) through `Client` and `AsyncClient`, once over
httpx (`bulk=False`) and once over the bulk path (`http.client`, client/_bulk.py), against
the floor of bench/limits.py's row k: a raw socket echo of the same bytes between two
processes plus local JAX's compute time. Medians over `--repeats` rounds, interleaved so
that a noisy neighbour hits every path alike.

    python -m bench.client_http [--repeats 30] [--server uvicorn|granian]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from bench.harness import Server, median
from bench.limits import socket_floor
from client import AsyncClient, Client, vjp
from service.models import cookbook

N = 1_000_000


def _local_jax(x: np.ndarray, u: np.ndarray, repeats: int) -> float:
    local = jax.jit(lambda x, u: jax.vjp(cookbook.square3, x)[1](u))
    local(x, u)[0].block_until_ready()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.asarray(local(x, u)[0])
        samples.append(time.perf_counter() - t0)
    return median(samples)


def _check(got: Any, want: np.ndarray) -> None:
    np.testing.assert_array_equal(np.asarray(got[0]), want)


def run(repeats: int, stack: str) -> None:
    x = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    u = np.ones_like(x)
    want = np.asarray(jax.vjp(cookbook.square3, x)[1](u)[0])
    t_jax = _local_jax(x, u, repeats)
    echo = socket_floor(8_000_000, 8_000_000, repeats)
    floor = echo + t_jax

    loop = asyncio.new_event_loop()
    with Server(GRADSERVE_SERVER=stack) as server:
        clients = {
            "sync httpx": Client(server.url, encoding="npz", bulk=False),
            "sync bulk": Client(server.url, encoding="npz"),
            "async httpx": AsyncClient(server.url, encoding="npz", bulk=False),
            "async bulk": AsyncClient(server.url, encoding="npz"),
        }
        calls: dict[str, Callable[[], Any]] = {}
        for name, c in clients.items():
            if isinstance(c, AsyncClient):
                loop.run_until_complete(c.model_info("square3"))
                _, pullback = loop.run_until_complete(vjp(c.model("square3"), x))

                def call(pb: Any = pullback) -> Any:
                    return loop.run_until_complete(pb(u))
            else:
                _, pullback = vjp(c.model("square3"), x)

                def call(pb: Any = pullback) -> Any:
                    return pb(u)

            _check(call(), want)  # and warm: one round each before timing
            calls[name] = call
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - t0)
        for c in clients.values():
            if isinstance(c, AsyncClient):
                loop.run_until_complete(c.aclose())
            else:
                c.close()
    loop.close()

    print(f"1M-float32 VJP, npz 8 MB in / 8 MB out, {stack}, medians of {repeats}:")
    print(f"  floor: socket echo {echo * 1e3:.1f} ms + local JAX {t_jax * 1e3:.1f} ms")
    print(f"  {'path':<12} {'median':>9} {'p10':>9} {'p90':>9} {'/floor':>7}")
    for name, ts in samples.items():
        ts = sorted(ts)
        p10, p90 = ts[len(ts) // 10], ts[(len(ts) * 9) // 10]
        t = median(ts)
        print(
            f"  {name:<12} {t * 1e3:7.1f}ms {p10 * 1e3:7.1f}ms {p90 * 1e3:7.1f}ms {t / floor:6.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--server", default="uvicorn", choices=("uvicorn", "granian"))
    args = parser.parse_args()
    run(args.repeats, args.server)


if __name__ == "__main__":
    main()
