"""The JSON helper process: large JSON bodies parsed and printed here, not in the server.

Parsing a 34 MB JSON body and printing a 25 MB answer each hold the GIL for hundreds of
milliseconds, even on a worker thread, so /healthz would wait that long. This process does
both and trades with the server in npz (`client.wire`: flat buffers, no pickle), which the
server reads as views and writes from array buffers without holding the GIL for long.

Run by `service.json_offload` as a script (it must not import `service`, which imports JAX).
Frames on stdin/stdout: a 1-byte op and an 8-byte little-endian length, then the payload.
    D <JSON body>  -> O <npz: residual JSON, paths, arrays> | E <JSON error>
    E <npz: fields, binary> -> O <JSON answer> | E <JSON error>
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

from client import wire
from client.errors import APIError

FRAME = struct.Struct("<cQ")
# Below this many numbers a list stays a list: small lists (argnums, shapes) keep their type.
MIN_NUMBERS = 256
# The request fields declared as lists of pytrees: their items may become arrays, not they.
LIST_FIELDS = ("args", "tangents", "cotangents")
_LIFTED = (np.dtype(np.int64), np.dtype(np.float64), np.dtype(np.bool_))
scan_json: Any = None  # service/limits.py's, loaded by path in main()


def _lift(doc: Any) -> tuple[Any, list[list], list[np.ndarray]]:
    """The document with every large rectangular numeric list replaced by None, and where
    each was (its path) and its array: exactly `np.asarray(the_list)`."""
    paths: list[list] = []
    arrays: list[np.ndarray] = []

    def walk(node: Any, path: list, may_lift: bool) -> Any:
        if isinstance(node, list):
            if may_lift and node:
                try:
                    arr = np.asarray(node)
                except (ValueError, OverflowError):
                    arr = None
                # int64, float64, bool only: a uint64 or object array (ints past int64) and
                # strings ('NaN') stay lists, decoded by the server as always.
                if arr is not None and arr.dtype in _LIFTED:
                    if arr.size >= MIN_NUMBERS:
                        paths.append(path)
                        arrays.append(arr)
                        return None
                    return node
            return [walk(v, [*path, i], True) for i, v in enumerate(node)]
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if not path and k in LIST_FIELDS and isinstance(v, list):
                    out[k] = [walk(item, [k, i], True) for i, item in enumerate(v)]
                else:
                    out[k] = walk(v, [*path, k], True)
            return out
        return node

    return walk(doc, [], False), paths, arrays


def decode(body: bytes, max_depth: int, max_elements: int) -> bytes:
    scan_json(body, max_depth=max_depth, max_elements=max_elements)
    residual, paths, arrays = _lift(wire.loads(body))
    manifest = np.frombuffer(wire.dumps(residual), np.uint8)
    return wire.dump_npz({"residual": manifest, "paths": paths, "arrays": arrays})


def encode(payload: bytes) -> bytes:
    parts = wire.load_npz(payload, max_members=2**31, max_bytes=2**62)
    return wire.dumps(wire.encode_tree(parts["fields"], bool(parts["binary"])))


def _read_exact(stream: Any, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


def main() -> None:
    global scan_json
    spec = importlib.util.spec_from_file_location(
        "_gradserve_limits", Path(__file__).with_name("limits.py")
    )
    limits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(limits)
    scan_json = limits.scan_json
    stdin, stdout = sys.stdin.buffer.raw, sys.stdout.buffer
    while True:
        try:
            op, size = FRAME.unpack(_read_exact(stdin, FRAME.size))
        except EOFError:
            return
        payload = _read_exact(stdin, size)
        try:
            if op == b"D":
                depth, elements = struct.unpack_from("<QQ", payload)
                answer = decode(payload[16:], depth, elements)
            else:
                answer = encode(payload)
            status = b"O"
        except APIError as e:
            status = b"E"
            answer = wire.dumps({"status": e.status, "code": e.code, "detail": str(e)})
        except Exception as e:  # reported to the server, which answers 500
            status = b"E"
            answer = wire.dumps({"status": 500, "code": "internal", "detail": repr(e)})
        stdout.write(FRAME.pack(status, len(answer)))
        stdout.write(answer)
        stdout.flush()


if __name__ == "__main__":
    main()
