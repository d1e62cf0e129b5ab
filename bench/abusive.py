"""The soak's abusive clients (bench/soak.py): each abuse must be refused or cut off as
SECURITY.md says, and anything else is counted wrong in the soak's tally.

- header bombs: 1 MB of headers (431 or a close);
- trickled heads and bodies, a byte every 0.2 s (cut off: 408 or a close);
- hang-ups: a valid request, then the connection closed at once (its work is dropped);
- a greedy API key far past its quota (429 `quota_exceeded` with `Retry-After`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from bench.soak import Case, Tally

Check = Callable[["Case", httpx.Response, "Tally"], Any]

GREEDY_KEY = "soak-greedy-key"  # its own server gives it rate=5 burst=5 concurrent=2
VALID_KEY = "soak-valid-key"  # and this one no quota, so valid clients see none
HEAD_TIMEOUT_S = 2.0  # its own server's GRADSERVE_HEADER_TIMEOUT_S


async def _read_all(reader: asyncio.StreamReader, within: float) -> bytes | None:
    """What the server sends until it closes; None if it is still open after `within` s."""
    try:
        return await asyncio.wait_for(reader.read(), within)
    except (ConnectionError, OSError):
        return b""
    except asyncio.TimeoutError:
        return None


def _status(reply: bytes | None) -> int | None:
    return int(reply.split(b" ", 2)[1]) if reply and reply.startswith(b"HTTP/1.1 ") else None


async def header_bomb(host: str, port: int, tally: Tally) -> None:
    """1 MB of headers: 431 or a close, never an answer from the app."""
    reader, writer = await asyncio.open_connection(host, port)
    header = b"X-Bomb: " + b"b" * 8192 + b"\r\n"
    try:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: soak\r\n")
        for _ in range(128):
            writer.write(header)
            await writer.drain()
        writer.write(b"\r\n")
        await writer.drain()
    except (ConnectionError, OSError):
        pass  # refused while still sending
    reply = await _read_all(reader, 30)
    writer.close()
    _judge(tally, "header_bomb", reply == b"" or _status(reply) == 431, reply)


async def trickle(host: str, port: int, tally: Tally, body: bool) -> None:
    """A head (or a body) sent a byte every 0.2 s: the server must cut it off."""
    reader, writer = await asyncio.open_connection(host, port)
    kind = "slow_body" if body else "slow_head"
    head = b"POST /v1/models/tanh/eval HTTP/1.1\r\nHost: soak\r\n"
    if body:
        head += b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    deadline = time.monotonic() + 10 * HEAD_TIMEOUT_S + 30
    try:
        writer.write(head)
        while time.monotonic() < deadline:
            writer.write(b"1")
            await writer.drain()
            if reader.at_eof():
                break
            await asyncio.sleep(0.2)
            if writer.transport.is_closing():
                break
    except (ConnectionError, OSError):
        pass
    reply = await _read_all(reader, 5)
    writer.close()
    ok = reply is not None and (reply == b"" or _status(reply) == 408)
    _judge(tally, kind, ok, reply)


async def hang_up(host: str, port: int, case: Case, tally: Tally) -> None:
    """A valid request, and the connection closed before the answer: the work is dropped."""
    _, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST {case.path} HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer {VALID_KEY}\r\n"
        f"Content-Type: {case.headers['content-type']}\r\nContent-Length: {len(case.body)}\r\n\r\n"
    )
    writer.write(head.encode() + case.body)
    await writer.drain()
    writer.close()
    tally.abusive["hang_up sent"] += 1


async def greedy(http: httpx.AsyncClient, case: Case, tally: Tally, check: Check) -> None:
    """One key far past its quota: 429 quota_exceeded with Retry-After, or a right answer."""
    headers = {**case.headers, "authorization": f"Bearer {GREEDY_KEY}"}
    try:
        response = await http.post(case.path, content=case.body, headers=headers)
    except httpx.HTTPError as e:
        tally.fail("lost", f"greedy {case.name}: {type(e).__name__}: {e}")
        return
    if response.status_code == 429:
        ok = response.json().get("code") == "quota_exceeded" and "retry-after" in response.headers
        _judge(tally, "greedy_key", ok, response.content)
    else:
        check(case, response, tally)


def _judge(tally: Tally, kind: str, ok: bool, reply: bytes | None) -> None:
    if ok:
        tally.abusive[f"{kind} refused"] += 1
    else:
        shown = "still open" if reply is None else reply[:200]
        tally.fail("wrong", f"{kind}: not refused or cut off: {shown!r}")


async def abusive_loop(
    url: str, http: httpx.AsyncClient, cases: list[Case], until: float, tally: Tally,
    check: Check, rng: random.Random, with_keys: bool,
) -> None:  # fmt: skip
    """One abusive client until `until`: each round a random kind of abuse."""
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    while time.monotonic() < until:
        kinds = ["header_bomb", "slow_head", "slow_body", "hang_up"] + ["greedy"] * with_keys
        kind = rng.choice(kinds)
        case = rng.choice(cases)
        try:
            if kind == "header_bomb":
                await header_bomb(host, port, tally)
            elif kind in ("slow_head", "slow_body"):
                await trickle(host, port, tally, body=kind == "slow_body")
            elif kind == "hang_up":
                await hang_up(host, port, case, tally)
            else:
                for _ in range(20):
                    await greedy(http, case, tally, check)
        except OSError as e:
            tally.fail("lost", f"{kind}: could not connect: {e}")
        await asyncio.sleep(0.05)
