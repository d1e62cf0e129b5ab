"""The client's HTTP paths on a large exchange, side by side in one run.

A 1M-float32 VJP through `Client` and `AsyncClient`, once over httpx (`bulk=False`) and once
over the bulk path (`http.client`, client/_bulk.py), against the floor of bench/limits.py's
row k: a raw socket echo of the same bytes between two processes plus local JAX's compute
time. Two requests: the stateless `/vjp` (x and u in, value and cotangent out: 8 MB each
way) and the session pullback that `vjp(f, x)[1](u)` sends (u in, cotangent out: 4 MB each
way; row k times this one). Also: the client alone against a peer that does no work, and
`tanh(x)` by size of x (where the bulk path starts to pay: `client._core.BULK_THRESHOLD`).
Medians over `--repeats` rounds, the paths interleaved so that a noisy neighbour hits each
alike.

    python -m bench.client_http [--repeats 30] [--server uvicorn|granian]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from bench.harness import ROOT, Server, free_port, median
from bench.limits import socket_floor
from client import AsyncClient, Client, vjp
from client._core import decode
from client._remote import Pullback
from service.models import cookbook

N = 1_000_000

# An HTTP peer that does no work: reads each request whole and answers a fixed npz. Against
# it, the client's own cost shows alone (the server's body reception and compute excluded).
_PEER = """
import socket, sys, threading
import numpy as np
sys.path.insert(0, sys.argv[2])
from client import wire
n = int(sys.argv[3])
body = wire.dump_npz({"value": np.zeros(n, np.float32), "cotangents": [np.zeros(n, np.float32)]})
head = ("HTTP/1.1 200 OK\\r\\ncontent-type: application/x-npz\\r\\n"
        f"content-length: {len(body)}\\r\\n\\r\\n").encode()
def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    while True:
        while b"\\r\\n\\r\\n" not in buf:
            more = conn.recv(1 << 20)
            if not more:
                return conn.close()
            buf += more
        head_in, _, rest = buf.partition(b"\\r\\n\\r\\n")
        length = int(head_in.lower().split(b"content-length:")[1].split(b"\\r\\n")[0])
        view, got = memoryview(bytearray(length)), len(rest)
        view[:got] = rest
        while got < length:
            got += conn.recv_into(view[got:])
        buf = b""
        conn.sendall(head)
        conn.sendall(body)
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""


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


def _calls(c: Client | AsyncClient, x: np.ndarray, u: np.ndarray, loop: Any) -> dict:
    """The two requests for one client, as thunks that block until the answer."""

    def blocking(thunk: Callable[[], Any]) -> Callable[[], Any]:
        if isinstance(c, AsyncClient):
            return lambda: loop.run_until_complete(thunk())
        return thunk

    if isinstance(c, AsyncClient):
        loop.run_until_complete(c.model_info("square3"))
    f = c.model("square3")
    stateless = Pullback(f, (x,))  # POST /vjp with the primals: no session
    _, session = blocking(lambda: vjp(f, x))()
    return {
        "vjp 8/8 MB": blocking(lambda: stateless(u)),
        "pullback 4/4": blocking(lambda: session(u)),
    }


def client_only(repeats: int, x: np.ndarray, u: np.ndarray) -> dict[str, float]:
    """Median seconds of the stateless /vjp exchange against `_PEER` (no server work), per
    path: what the client itself costs over the socket echo."""
    port = free_port()
    peer = subprocess.Popen(
        [sys.executable, "-c", _PEER, str(port), str(ROOT), str(len(x))], stdout=subprocess.PIPE
    )
    try:
        assert peer.stdout is not None and peer.stdout.readline().startswith(b"ready")
        url = f"http://127.0.0.1:{port}"
        clients = {
            "sync httpx": Client(url, encoding="npz", bulk=False),
            "sync bulk": Client(url, encoding="npz"),
        }
        samples: dict[str, list[float]] = {name: [] for name in clients}
        for i in range(repeats + 2):
            for name, c in clients.items():
                t0 = time.perf_counter()
                flow = c._core.send("/v1/models/square3/vjp", {"args": [x], "cotangent": u}, {}, 0)
                decode(c._run(flow))
                if i >= 2:
                    samples[name].append(time.perf_counter() - t0)
        for c in clients.values():
            c.close()
        return {name: median(ts) for name, ts in samples.items()}
    finally:
        peer.kill()
        peer.wait()


def by_size(url: str, repeats: int) -> dict[int, tuple[float, float]]:
    """Median seconds of `tanh(x)` (npz both ways from 24 KiB) per size: (httpx, bulk)."""
    out = {}
    with Client(url, bulk=False) as h, Client(url) as b:
        fh, fb = h.model("tanh"), b.model("tanh")
        for n in (8_192, 65_536, 262_144, 1_048_576):
            x = np.ones(n, np.float32)
            th, tb = [], []
            for i in range(repeats + 2):
                for f, ts in ((fh, th), (fb, tb)):
                    t0 = time.perf_counter()
                    f(x)
                    if i >= 2:
                        ts.append(time.perf_counter() - t0)
            out[4 * n] = (median(th), median(tb))
    return out


def run(repeats: int, stack: str) -> None:
    x = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    u = np.ones_like(x)
    want = np.asarray(jax.vjp(cookbook.square3, x)[1](u)[0])
    t_jax = _local_jax(x, u, repeats)
    floors = {
        "vjp 8/8 MB": socket_floor(8_000_000, 8_000_000, repeats),
        "pullback 4/4": socket_floor(4_000_000, 4_000_000, repeats),
    }

    loop = asyncio.new_event_loop()
    samples: dict[tuple[str, str], list[float]] = {}
    with Server(GRADSERVE_SERVER=stack) as server:
        clients = {
            "sync httpx": Client(server.url, encoding="npz", bulk=False),
            "sync bulk": Client(server.url, encoding="npz"),
            "async httpx": AsyncClient(server.url, encoding="npz", bulk=False),
            "async bulk": AsyncClient(server.url, encoding="npz"),
        }
        calls = {}
        for path, c in clients.items():
            for case, call in _calls(c, x, u, loop).items():
                _check(call(), want)  # and warm: one round each before timing
                calls[case, path] = call
                samples[case, path] = []
        for _ in range(repeats):
            for key, call in calls.items():
                t0 = time.perf_counter()
                call()
                samples[key].append(time.perf_counter() - t0)
        for c in clients.values():
            if isinstance(c, AsyncClient):
                loop.run_until_complete(c.aclose())
            else:
                c.close()
        sizes = by_size(server.url, repeats)
    loop.close()

    bare = client_only(repeats, x, u)
    print(f"1M-float32 VJP through the client, npz, {stack}, medians of {repeats}:")
    print(f"  local JAX {t_jax * 1e3:.1f} ms")
    print("  tanh(x), x float32, sync client, by size of x (same size back):")
    for size, (t_h, t_b) in sizes.items():
        print(f"    {size // 1024:>5} KiB  httpx {t_h * 1e3:6.2f} ms  bulk {t_b * 1e3:6.2f} ms")
    echo = floors["vjp 8/8 MB"]
    print(f"  client alone (8/8 MB against a peer that does no work; echo {echo * 1e3:.1f} ms):")
    for path, t in bare.items():
        print(f"    {path:<12} {t * 1e3:7.1f}ms {'':>9} {'':>9} {t / echo:6.2f}x echo")
    for case, echo in floors.items():
        floor = echo + t_jax
        print(f"  {case}: floor {floor * 1e3:.1f} ms (socket echo {echo * 1e3:.1f} + JAX)")
        print(f"    {'path':<12} {'median':>9} {'p10':>9} {'p90':>9} {'/floor':>7}")
        for (c_case, path), ts in samples.items():
            if c_case != case:
                continue
            ts = sorted(ts)
            p10, p90, t = ts[len(ts) // 10], ts[(len(ts) * 9) // 10], median(ts)
            print(
                f"    {path:<12} {t * 1e3:7.1f}ms {p10 * 1e3:7.1f}ms {p90 * 1e3:7.1f}ms"
                f" {t / floor:6.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--server", default="uvicorn", choices=("uvicorn", "granian"))
    args = parser.parse_args()
    run(args.repeats, args.server)


if __name__ == "__main__":
    main()
