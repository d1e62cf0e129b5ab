"""Issue 12's rows: each measured against a floor taken in the same run.

k. a 1M-float32 VJP through the client (npz), per server stack, vs a raw socket echo of the
   same bytes between two processes plus local JAX's compute time;
l. 32 concurrent single-sample grads of a compute-bound MLP (bench/batch_models.py), batching
   on vs off, vs the engine-only ratio (vmapped 32 vs one by one in local JAX).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jax
import numpy as np

from bench import batch_models
from bench.harness import Row, Server, ServerProcess, Table, free_port, median
from client import AsyncClient, Client, grad, vjp
from service.models import cookbook

_ECHO = """
import socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n_in, n_out = int(sys.argv[2]), int(sys.argv[3])
buf = bytearray(n_in); out = bytes(n_out)
while True:
    view, got = memoryview(buf), 0
    while got < n_in:
        k = conn.recv_into(view[got:])
        if not k: sys.exit(0)
        got += k
    conn.sendall(out)
"""


def socket_floor(n_in: int, n_out: int, repeats: int) -> float:
    """Median seconds to send `n_in` bytes to another process and read `n_out` back."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _ECHO, str(port), str(n_in), str(n_out)], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
        payload, back = bytes(n_in), bytearray(n_out)
        samples = []
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(repeats + 2):
                t0 = time.perf_counter()
                s.sendall(payload)
                view, got = memoryview(back), 0
                while got < n_out:
                    got += s.recv_into(view[got:])
                samples.append(time.perf_counter() - t0)
        return median(samples[2:])
    finally:
        proc.kill()
        proc.wait()


def _bytes_moved(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    moved = dict(re.findall(r'^gradserve_bytes_total\{direction="(in|out)"\} (\S+)$', text, re.M))
    return float(moved.get("in", 0)), float(moved.get("out", 0))


def transfer_floor(table: Table, repeats: int) -> None:
    """`vjp(f, x)[1](u)` for a 1M-float32 x: the pullback request carries u (4 MB) and its
    answer the cotangent (4 MB); the session keeps x's linearization on the server. The floor
    is a socket echo of exactly the bytes the server counted, plus local JAX's pullback."""
    x = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)
    u = np.ones_like(x)
    _, local_pullback = jax.vjp(cookbook.square3, x)
    local = jax.jit(local_pullback)
    local(u)[0].block_until_ready()
    t_jax = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.asarray(local(u)[0])
        t_jax.append(time.perf_counter() - t0)
    timed: dict[str, float] = {}
    moved: tuple[float, float] | None = None  # the same requests and answers on every stack
    for stack in ("uvicorn", "granian"):
        with Server(GRADSERVE_SERVER=stack) as server, Client(server.url, encoding="npz") as c:
            _, pullback = vjp(c.model("square3"), x)
            pullback(u)
            if moved is None:
                before = _bytes_moved(server.url)
                pullback(u)
                after = _bytes_moved(server.url)
                moved = after[0] - before[0], after[1] - before[1]
            samples = []
            for _ in range(repeats + 2):
                t0 = time.perf_counter()
                pullback(u)
                samples.append(time.perf_counter() - t0)
        timed[stack] = median(samples[2:])
    assert moved is not None
    n_in, n_out = int(moved[0]), int(moved[1])
    echo = socket_floor(n_in, n_out, repeats)
    floor = echo + median(t_jax)
    for stack, t in timed.items():
        table.add(
            Row(
                f"k. 1M-float32 VJP pullback via client (npz, {stack}; {n_in / 1e6:.1f} MB in, "
                f"{n_out / 1e6:.1f} MB out) vs socket echo + local JAX",
                f"{t * 1e3:.1f} ms vs {echo * 1e3:.1f} + {median(t_jax) * 1e3:.1f} ms",
                t / floor,
                "<= 1.6",
                t / floor <= 1.6,
            )
        )


def _batch_metric(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    total = sum(float(v) for v in re.findall(r"^gradserve_batch_size_sum\S* (\S+)$", text, re.M))
    count = sum(float(v) for v in re.findall(r"^gradserve_batch_size_count\S* (\S+)$", text, re.M))
    return total, count


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batching(table: Table, rounds: int) -> None:
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((32, 1, 784)).astype(np.float32)
    ys = rng.integers(0, 10, (32, 1)).astype(np.int32)
    flags = ("--no-builtin-models", "--models", "bench.batch_models")

    async def clients_of(stack: contextlib.AsyncExitStack, url: str) -> list[Any]:
        # 32 clients, as 32 users would have: one connection each. (One AsyncClient shared by
        # 32 tasks pays httpcore's pool, quadratic in its connections: docs/profile.md.)
        clients = [
            await stack.enter_async_context(AsyncClient(url, timeout=300)) for _ in range(32)
        ]
        return [grad(c.model("big_mlp_loss")) for c in clients]

    async def burst(fs: list[Any]) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(f(xs[i], ys[i]) for i, f in enumerate(fs)))
        return time.perf_counter() - t0

    async def lone(f: Any, i: int) -> float:
        t0 = time.perf_counter()
        await f(xs[i % 32], ys[i % 32])
        return time.perf_counter() - t0

    async def timed_burst(fs: list[Any], pid: int, out: dict[str, list[float]], key: str) -> None:
        cpu = _cpu_s(pid), time.process_time()
        out[key].append(await burst(fs))
        out[f"cpu_server_{key}"].append(_cpu_s(pid) - cpu[0])
        out[f"cpu_clients_{key}"].append(time.process_time() - cpu[1])

    async def measure(on: ServerProcess, off: ServerProcess) -> dict[str, list[float]]:
        """Both servers up at once, measured in turns, so that a change in the machine's load
        reaches both sides of each ratio alike."""
        async with contextlib.AsyncExitStack() as stack:
            fs_on, fs_off = await clients_of(stack, on.url), await clients_of(stack, off.url)
            for _ in range(3):
                await burst(fs_on), await burst(fs_off)
            before = _batch_metric(on.url)
            out: dict[str, list[float]] = collections.defaultdict(list)
            for _ in range(rounds):
                await timed_burst(fs_on, on.proc.pid, out, "on")
                await timed_burst(fs_off, off.proc.pid, out, "off")
            after = _batch_metric(on.url)
            out["mean_batch"] = [(after[0] - before[0]) / (after[1] - before[1])]
            await asyncio.sleep(1.5)  # past the bursts' memory: the next requests are alone
            for i in range(rounds * 4):
                out["lone_on"].append(await lone(fs_on[0], i))
                out["lone_off"].append(await lone(fs_off[0], i))
        return out

    # Warm-up compiles the model's buckets up to 32 (its `warmup_batch_size`).
    warm = {"GRADSERVE_WARMUP": "true"}
    with (
        ServerProcess(*flags, env=warm) as on,
        ServerProcess(*flags, env={**warm, "GRADSERVE_MAX_BATCH_SIZE": "1"}) as off,
    ):
        results = asyncio.run(measure(on, off))
    params = jax.tree.map(np.asarray, batch_models.init(jax.random.PRNGKey(0)))
    g = jax.jit(jax.grad(batch_models.big_mlp_loss, argnums=1))
    vg = jax.jit(jax.vmap(g, in_axes=(None, 0, 0)))
    g(params, xs[0], ys[0]).block_until_ready()
    vg(params, xs, ys).block_until_ready()
    one, many = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(32):
            np.asarray(g(params, xs[i], ys[i]))
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.asarray(vg(params, xs, ys))
        many.append(time.perf_counter() - t0)
    engine = median(one) / median(many)
    t_on, t_off = median(results["on"]), median(results["off"])
    lone_on, lone_off = median(results["lone_on"]), median(results["lone_off"])
    mean_on = results["mean_batch"][0]
    gain = t_off / t_on
    table.add(
        Row(
            "l. 32 concurrent big-MLP grads, batching on vs off (end to end)",
            f"{t_on * 1e3:.0f} ms vs {t_off * 1e3:.0f} ms: {gain:.2f}x; engine only (local JAX, "
            f"vmapped 32 vs one by one) {median(many) * 1e3:.0f} vs {median(one) * 1e3:.0f} ms: "
            f"{engine:.2f}x",
            gain / engine,
            ">= 0.8 of engine",
            gain / engine >= 0.8,
        )
    )
    # Summed over the rounds: /proc counts in clock ticks (10 ms), a burst lasts ~100 ms.
    cpu = {
        k: sum(results[f"cpu_{k}"]) * 1e3 / (32 * rounds)
        for k in ("server_on", "clients_on", "server_off", "clients_off")
    }
    table.add(
        Row(
            f"l. CPU per request on {os.cpu_count()} cores, batching on (off): server, clients",
            f"{cpu['server_on']:.2f} ({cpu['server_off']:.2f}) ms, "
            f"{cpu['clients_on']:.2f} ({cpu['clients_off']:.2f}) ms",
            None,
            "(reported)",
            None,
        )
    )
    table.add(
        Row(
            "l. mean batch size at 32 clients",
            f"{mean_on:.1f}",
            None,
            ">= 16",
            mean_on >= 16,
        )
    )
    table.add(
        Row(
            "l. single-client latency, batching on vs off",
            f"{lone_on * 1e3:.1f} ms vs {lone_off * 1e3:.1f} ms",
            lone_on / lone_off,
            "<= 1.1",
            lone_on / lone_off <= 1.1,
        )
    )
