"""Soak: many concurrent clients, valid and hostile requests mixed, every answer checked.

    python bench/soak.py                          # own server on a free 127.0.0.1 port, 60 s
    python bench/soak.py --clients 32 --duration 300 --json soak.json
    python bench/soak.py --url http://127.0.0.1:8000 --pid 1234   # a running server

Every valid request's answer is compared with local JAX (expected values are computed before
the run, so the clients spend their time on the server); every invalid one must get its own
status and problem+json code. It reports wrong answers, lost requests (no HTTP answer),
5xx answers, and the server's RSS, open file descriptors and threads before and after; it
exits 1 unless wrong, lost and 5xx are all 0.

Beside them run abusive clients (`--abusive`, on by default): megabytes of headers, heads and
bodies trickled a byte at a time, clients that send a request and hang up at once, and a
greedy API key hammering past its quota. Each must be refused or cut off as SECURITY.md
says (431, a close, 429 `quota_exceeded`); anything else counts as wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.abusive import GREEDY_KEY, HEAD_TIMEOUT_S, VALID_KEY, abusive_loop  # noqa: E402
from bench.harness import ServerProcess  # noqa: E402
from client import wire  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One request and what must come back: `want` fields (valid) or `status` and `code`."""

    name: str
    path: str
    body: bytes
    headers: dict[str, str]
    want: dict[str, Any] | None = None
    status: int = 200
    code: str | None = None


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    refused_as_expected: int = 0
    busy: int = 0  # 429/503 with Retry-After: an answer, to be retried, never wrong
    wrong: int = 0
    lost: int = 0
    server_errors: int = 0
    by_status: Counter = field(default_factory=Counter)
    rss_mib: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    abusive: Counter = field(default_factory=Counter)  # "<kind> <outcome>" -> count

    def fail(self, kind: str, message: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.failures) < 20:
            self.failures.append(message)


# ---------------------------------------------------------------------------- the cases


def valid_cases(rng: np.random.Generator, per_kind: int) -> list[Case]:
    """Requests over several models, ops and encodings, expected values from local JAX."""
    import jax
    import jax.numpy as jnp

    from service.models import cookbook as cb

    def f32(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def hvp(f: Any, args: tuple, tangents: tuple) -> list:
        every = tuple(range(len(args)))
        return list(jax.jvp(jax.grad(f, argnums=every), args, tangents)[1])

    params = cb.mlp_init(jax.random.PRNGKey(0))
    kinds = [
        # (model, op, fields(), local(fields) -> expected response fields, encoding)
        ("logistic_loss", "grad", lambda: {"args": [f32(3), f32()]},
         lambda a: {"grad": jax.grad(cb.logistic_loss)(*a["args"])}, "json"),
        ("logistic_loss", "value_and_grad", lambda: {"args": [f32(3), f32()]},
         lambda a: dict(zip(("value", "grad"), jax.value_and_grad(cb.logistic_loss)(*a["args"]), strict=True)), "npz"),
        ("tanh", "eval", lambda: {"args": [f32(8)]}, lambda a: {"value": jnp.tanh(a["args"][0])}, "json"),
        ("tanh", "eval", lambda: {"args": [f32(3, 4)]}, lambda a: {"value": jnp.tanh(a["args"][0])}, "binary"),
        ("tanh_sq_sum", "hessian", lambda: {"args": [f32(5)]},
         lambda a: {"hessian": jax.hessian(cb.tanh_sq_sum)(*a["args"])}, "json"),
        ("tanh_sq_sum", "hvp", lambda: {"args": [f32(5)], "tangents": [f32(5)]},
         lambda a: {"hvp": hvp(cb.tanh_sq_sum, tuple(a["args"]), tuple(a["tangents"]))}, "json"),
        ("logistic_predict", "jacobian", lambda: {"args": [f32(3), f32()]},
         lambda a: {"jacobian": jax.jacobian(cb.logistic_predict)(*a["args"])}, "json"),
        ("logistic_predict", "vjp", lambda: {"args": [f32(3), f32()], "cotangent": f32(4)},
         lambda a: {"cotangents": list(jax.vjp(cb.logistic_predict, *a["args"])[1](a["cotangent"]))}, "npz"),
        ("mlp", "jvp", lambda: {"args": [f32(2, 784)], "tangents": [f32(2, 784)]},
         lambda a: dict(zip(("value", "tangent"), jax.jvp(lambda x: cb.mlp_apply(params, x), tuple(a["args"]), tuple(a["tangents"])), strict=True)), "npz"),
        ("piecewise", "call", lambda: {"args": [f32(scale=2.0)], "transforms": [{"op": "grad"}, {"op": "grad"}]},
         lambda a: {"value": jax.grad(jax.grad(cb.piecewise))(*a["args"])}, "json"),
    ]  # fmt: skip
    cases = []
    for model, op, make, local, encoding in kinds:
        for _ in range(per_kind):
            fields = make()
            want = jax.tree.map(np.asarray, local(fields))
            cases.append(
                _encode(f"{model}.{op}", f"/v1/models/{model}/{op}", fields, encoding, want)
            )
    return cases


def _encode(name: str, path: str, fields: dict, encoding: str, want: dict) -> Case:
    arrays = {k: v for k, v in fields.items() if k in ("args", "tangents", "cotangent")}
    options = {k: v for k, v in fields.items() if k not in arrays}
    if encoding == "npz":
        body, media = wire.dump_npz(wire.npz_ready(arrays) | options), wire.NPZ
    else:
        binary = encoding == "binary"
        doc = wire.encode_tree(arrays, binary) | options | ({"binary": True} if binary else {})
        body, media = wire.dumps(doc), wire.JSON
    return Case(name, path, body, {"content-type": media}, want=want)


def invalid_cases() -> list[Case]:
    """Hostile or wrong requests, each with the status and code it must get."""
    j = {"content-type": wire.JSON}

    def bad(name: str, path: str, body: bytes, status: int, code: str, **headers: str) -> Case:
        return Case(name, path, body, {**j, **headers}, status=status, code=code)

    deep = b'{"args": [' + b"[" * 200 + b"1" + b"]" * 200 + b"]}"
    return [
        bad("malformed_json", "/v1/models/tanh/eval", b'{"args": [1.0', 400, "invalid_json"),
        bad("bad_base64", "/v1/models/tanh/eval",
            b'{"args": [{"dtype": "float32", "shape": [2], "base64": "%%"}]}', 400, "invalid_base64"),
        bad("shape", "/v1/models/logistic_loss/grad", b'{"args": [[1, 2, 3, 4], 0.5]}', 422, "shape_mismatch"),
        bad("non_scalar", "/v1/models/logistic_predict/grad", b'{"args": [[1, 2, 3], 0.5]}', 422, "non_scalar_output"),
        bad("unknown_model", "/v1/models/nope/eval", b'{"args": [1.0]}', 404, "model_not_found"),
        bad("unknown_op", "/v1/models/tanh/integrate", b'{"args": [1.0]}', 404, "op_not_found"),
        bad("media", "/v1/models/tanh/eval", b"x=1", 415, "unsupported_media_type",
            **{"content-type": "application/x-www-form-urlencoded"}),
        bad("accept", "/v1/models/tanh/eval", b'{"args": [1.0]}', 406, "not_acceptable", accept="text/html"),
        bad("deep", "/v1/models/tanh/eval", deep, 413, "json_too_deep"),
        bad("npz_garbage", "/v1/models/tanh/eval", b"PK\x03\x04garbage", 400, "invalid_npz",
            **{"content-type": wire.NPZ}),
        bad("argnums", "/v1/models/logistic_loss/grad", b'{"args": [[1, 2, 3], 0.5], "argnums": 7}', 422,
            "argnums_out_of_range"),
        bad("too_large", "/v1/models/mlp/jacrev", wire.dumps({"args": [np.zeros((400, 784), np.float32)]}), 413,
            "output_too_large"),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- checking


def check(case: Case, response: httpx.Response, tally: Tally) -> None:
    status = response.status_code
    tally.by_status[status] += 1
    if status >= 500 and status != 503:
        tally.fail("server_errors", f"{case.name}: {status} {response.text[:300]}")
        return
    if status in (429, 503):
        tally.busy += 1
        return
    if case.want is None:
        body = response.json() if status >= 400 else {}
        if status != case.status or body.get("code") != case.code or not body.get("request_id"):
            tally.fail(
                "wrong",
                f"{case.name}: want {case.status} {case.code}, got {status} {response.text[:200]}",
            )
        else:
            tally.refused_as_expected += 1
        return
    if status != 200:
        tally.fail("wrong", f"{case.name}: want 200, got {status} {response.text[:300]}")
        return
    media = response.headers["content-type"].split(";")[0]
    doc = wire.load_npz(response.content) if media == wire.NPZ else wire.loads(response.content)
    try:
        for key, want in case.want.items():
            _close(wire.decode_tree(doc[key]), want)
    except (AssertionError, KeyError, ValueError, TypeError) as e:
        tally.fail("wrong", f"{case.name}: {type(e).__name__}: {str(e)[:300]}")
        return
    tally.ok += 1


def _close(got: Any, want: Any) -> None:
    if isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want), (type(got), len(want))
        for g, w in zip(got, want, strict=True):
            _close(g, w)
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (
        got.shape,
        got.dtype,
        want.shape,
        want.dtype,
    )
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------- driving


async def client_loop(
    http: httpx.AsyncClient, cases: list[Case], invalid: list[Case], until: float, max_requests: int,
    tally: Tally, rng: random.Random, invalid_share: float,
) -> None:  # fmt: skip
    while time.monotonic() < until and tally.sent < max_requests:
        case = rng.choice(invalid if rng.random() < invalid_share else cases)
        tally.sent += 1
        try:
            response = await http.post(case.path, content=case.body, headers=case.headers)
        except httpx.HTTPError as e:
            tally.fail("lost", f"{case.name}: {type(e).__name__}: {e}")
            continue
        check(case, response, tally)


async def run_clients(
    url: str, cases: list[Case], invalid: list[Case], clients: int, seconds: float,
    max_requests: int, invalid_share: float, seed: int, pid: int | None = None,
    abusive: int = 0, with_keys: bool = False,
) -> Tally:  # fmt: skip
    tally = Tally()
    sampler = asyncio.create_task(sample_rss(pid, tally.rss_mib)) if pid else None
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"authorization": f"Bearer {VALID_KEY}"} if with_keys else {}
    async with (
        httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as http,
        httpx.AsyncClient(base_url=url, timeout=120) as greedy_http,
    ):
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(
                abusive_loop(
                    url,
                    greedy_http,
                    cases,
                    until,
                    tally,
                    check,
                    random.Random(-seed - i),
                    with_keys,
                )
                for i in range(abusive)
            ),
            *(
                client_loop(
                    http,
                    cases,
                    invalid,
                    until,
                    max_requests,
                    tally,
                    random.Random(seed + i),
                    invalid_share,
                )
                for i in range(clients)
            ),
        )
    if sampler:
        sampler.cancel()
    return tally


async def sample_rss(pid: int, samples: list[float], every_s: float = 2.0) -> None:
    """The server's RSS every few seconds: a leak climbs steadily, a warm-up levels off."""
    while True:
        samples.append(process_stats(pid)["rss_mib"])
        await asyncio.sleep(every_s)


def process_stats(pid: int) -> dict[str, float]:
    """RSS (MiB), threads and open file descriptors of a local process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {
        "rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    server = None
    if args.url:
        url, pid = args.url, args.pid
    else:
        env = {
            "GRADSERVE_SHUTDOWN_DRAIN_S": "0",
            "GRADSERVE_REQUEST_TIMEOUT_S": "120",
            "GRADSERVE_HEADER_TIMEOUT_S": str(HEAD_TIMEOUT_S),
            "GRADSERVE_BODY_WINDOW_S": str(HEAD_TIMEOUT_S),
            "GRADSERVE_API_KEYS": f"{VALID_KEY}:compute rate=0 concurrent=0,"
            f"{GREEDY_KEY}:compute rate=5 burst=5 concurrent=2",
        }
        server = ServerProcess("--log-level", "warning", env=env)
        url, pid = server.url, server.proc.pid
    try:
        cases, invalid = valid_cases(rng, args.per_kind), invalid_cases()
        if server:
            server.wait_ready()
        # Warm up with the same concurrency: compiles done, thread pools at their working size.
        warm = asyncio.run(
            run_clients(
                url,
                cases,
                invalid,
                args.clients,
                args.warmup,
                10**9,
                args.invalid_share,
                7,
                with_keys=server is not None,
            )
        )
        time.sleep(1.0)  # the warm-up's connections close
        before = process_stats(pid) if pid else {}
        t0 = time.monotonic()
        tally = asyncio.run(
            run_clients(
                url,
                cases,
                invalid,
                args.clients,
                args.duration,
                args.max_requests,
                args.invalid_share,
                args.seed,
                pid,
                args.abusive,
                with_keys=server is not None,
            )
        )
        seconds = time.monotonic() - t0
        time.sleep(1.0)  # let closed connections and finished threads go
        after = process_stats(pid) if pid else {}
    finally:
        exit_code = server.stop(grace=60) if server else None
    report = {
        "clients": args.clients,
        "seconds": round(seconds, 1),
        "requests": tally.sent,
        "requests_per_s": round(tally.sent / seconds, 1),
        "ok": tally.ok,
        "refused_as_expected": tally.refused_as_expected,
        "busy_429_503": tally.busy,
        "wrong": tally.wrong + warm.wrong,
        "lost": tally.lost + warm.lost,
        "server_errors_5xx": tally.server_errors + warm.server_errors,
        "by_status": dict(sorted(tally.by_status.items())),
        "abusive": dict(sorted(tally.abusive.items())),
        "before": before,
        "after": after,
        "growth": {k: round(after[k] - before[k], 1) for k in before},
        "rss_mib_every_2s": tally.rss_mib,
        "server_exit_code": exit_code,
        "failures": warm.failures + tally.failures,
        "total_s": round(time.monotonic() - started, 1),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="that server's PID, for RSS/fds/threads")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of soak (bounded)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up first")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many")
    parser.add_argument(
        "--invalid-share", type=float, default=0.3, help="share of invalid requests"
    )
    parser.add_argument("--per-kind", type=int, default=16, help="random inputs per valid kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--abusive", type=int, default=4, help="abusive clients beside the valid ones (0: none)"
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = soak(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    clean = report["wrong"] == report["lost"] == report["server_errors_5xx"] == 0
    return 0 if clean and report["server_exit_code"] in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
