"""Limits judged before any parsing or compute: JSON shape, batch size, new shapes per minute.

Each refusal is an `APIError` with the status PROTOCOL.md gives, so it leaves as problem+json.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

import numpy as np

from client.errors import PayloadTooLarge, ServerBusy

if TYPE_CHECKING:
    from service.calls import Call
    from service.settings import Settings

_STRUCTURAL = b'[]{}"'
_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in _STRUCTURAL)
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def scan_json(body: bytes, *, max_depth: int, max_elements: int) -> None:
    """Refuse (413) a JSON text nested too deep or holding too many values, before parsing it.

    Parsing is where a hostile body costs memory (a Python object per number), so both limits
    are judged from the bytes: at C speed, with no allocation the size of the body for the
    common case of few brackets.
    """
    opens = body.count(b"[") + body.count(b"{")
    # Every value but the first follows a comma or opens a container; strings can only add.
    elements = body.count(b",") + opens + 1
    if elements > max_elements:
        raise PayloadTooLarge(
            f"the JSON body holds up to {elements} values; the limit is {max_elements}. "
            "Send large arrays as base64 leaves or in an npz body.",
            code="too_many_elements",
        )
    if opens > max_depth and (depth := json_depth(body)) > max_depth:
        raise PayloadTooLarge(
            f"the JSON body nests {depth} levels deep; the limit is {max_depth}",
            code="json_too_deep",
        )


def json_depth(body: bytes) -> int:
    """The deepest nesting of `[`/`{` outside strings (exact for any valid JSON text)."""
    if b"\\" in body:  # escapes inside strings, e.g. \" or \\, must not toggle string state
        body = _ESCAPE.sub(b"", body)
    skeleton = np.frombuffer(body.translate(None, _NOT_STRUCTURAL), np.uint8)
    if skeleton.size == 0:
        return 0
    # A bracket is inside a string when an odd number of quotes precede it.
    outside = np.cumsum(skeleton == ord('"'), dtype=np.int64) % 2 == 0
    steps = np.where(outside, _OPEN[skeleton], 0).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def check_batch(call: Call, settings: Settings) -> None:
    """Batched tangents or cotangents: B products in one request, at most the setting's B."""
    size, limit = call.batch_size, settings.max_batch_tangents
    if size is not None and size > limit:
        field = "cotangent" if call.op.endswith("vjp") else "tangents"  # vjp, session_vjp
        raise PayloadTooLarge(
            f"batched {field} of '{call.model.name}' hold {size} products; the limit is "
            f"{limit} per request. Split them into several requests.",
            code="batch_too_large",
            errors=[{"loc": [field], "msg": f"batch of {size} over {limit}"}],
        )


class ShapeBudget:
    """Per model, at most `per_minute` new input signatures in any 60 s window (else 429).

    Each new signature costs an XLA compile, seconds of a device's time, so a client cycling
    through shapes could starve every other. Signatures seen recently pass free: they are
    compiled already. Judged on the host, before the request reaches the engine.
    """

    window_s = 60.0

    def __init__(self, per_minute: int, remember: int = 4096) -> None:
        self.per_minute, self.remember = per_minute, remember
        self._known: dict[str, OrderedDict[tuple, None]] = {}
        self._recent: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def admit(self, call: Call, now: float | None = None) -> None:
        self.admit_key(call.model.name, call.signature, now)

    def admit_key(self, model: str, key: Any, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            known = self._known.setdefault(model, OrderedDict())
            if key in known:
                known.move_to_end(key)
                return
            recent = self._recent.setdefault(model, deque())
            while recent and recent[0] <= now - self.window_s:
                recent.popleft()
            if len(recent) >= self.per_minute:
                wait = max(1, math.ceil(recent[0] + self.window_s - now))
                raise ServerBusy(
                    f"'{model}' was sent {len(recent)} new input shapes in the last minute, "
                    f"each needing a compile; the limit is {self.per_minute}. Reuse shapes "
                    f"(pad or bucket batches), or retry in {wait} s.",
                    code="too_many_shapes",
                    headers={"Retry-After": str(wait)},
                )
            recent.append(now)
            known[key] = None
            if len(known) > self.remember:
                known.popitem(last=False)
