"""Large JSON bodies parsed and printed in a helper process, so the event loop never stalls.

`orjson` holds the GIL for the whole of a parse or a print: about 0.3 s for a 34 MB body, on
any thread, and /healthz waits that long. Above `json_offload_bytes` the text goes to
`service/_json_child.py` instead. The two trade in npz (`client.wire`): the server writes
arrays from their buffers and reads views of the reply, and pipe I/O releases the GIL, so
the server thread holds it only for short steps. Nothing crosses as pickle.

Large numeric lists come back as `wire.JSONNumbers` arrays (exactly `np.asarray(the_list)`),
which `wire.decode_tree` converts like the lists they were, so results are unchanged.
"""

from __future__ import annotations

import atexit
import os
import queue
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import numpy as np

from client import wire
from client.errors import ServerError, error_class

_CHILD = Path(__file__).with_name("_json_child.py")
_FRAME = struct.Struct("<cQ")
_CHUNK = 1 << 20  # pipe reads and writes release the GIL; 1 MiB steps keep copies short


class _Child:
    """One helper process, used by one thread at a time."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[1])
        # Only what finding the modules needs: the parent's whole environment could hold a
        # variable past the kernel's 128 KiB per-string limit (pytest's PYTEST_CURRENT_TEST
        # names a test by its parameters), and the exec would fail with E2BIG.
        env = {
            key: os.environ[key] for key in ("PATH", "LANG", "LC_ALL", "HOME") if key in os.environ
        }
        env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, str(_CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )

    def call(self, op: bytes, *parts: bytes | memoryview) -> tuple[bytes, bytearray]:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(_FRAME.pack(op, sum(len(p) for p in parts)))
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, len(view), _CHUNK):
                stdin.write(view[start : start + _CHUNK])
        stdin.flush()
        status, size = _FRAME.unpack(_read_exact(stdout, _FRAME.size))
        return status, _read_exact(stdout, size)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _read_exact(stream: IO[bytes], n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = stream.readinto(view[got : got + _CHUNK])  # type: ignore[attr-defined]
        if not k:
            raise ServerError("the JSON helper process exited", code="internal_error")
        got += k
    return buf


class JSONOffload:
    """A small pool of helper processes, started on first use."""

    def __init__(self, processes: int = 1) -> None:
        self._idle: queue.SimpleQueue[_Child] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._size, self._started = processes, 0
        self._all: list[_Child] = []
        atexit.register(self.close)

    def _call(self, op: bytes, *parts: bytes | memoryview) -> bytearray:
        with self._lock:
            if self._idle.empty() and self._started < self._size:
                self._started += 1
                child = _Child()
                self._all.append(child)
                self._idle.put(child)
        child = self._idle.get()
        try:
            status, reply = child.call(op, *parts)
        except BaseException:
            child.close()  # a half-read frame: this one cannot be trusted again
            with self._lock:
                self._all.remove(child)
                self._started -= 1
            raise
        self._idle.put(child)
        if status != b"O":
            problem = wire.loads(bytes(reply))
            raise error_class(problem["status"])(
                problem["detail"], code=problem["code"], status=problem["status"]
            )
        return reply

    def decode(self, body: bytes, *, max_depth: int, max_elements: int) -> Any:
        """JSON text -> document, large numeric lists as `wire.JSONNumbers` arrays."""
        reply = self._call(b"D", struct.pack("<QQ", max_depth, max_elements), body)
        parts = wire.load_npz(reply, max_members=2**31, max_bytes=2**62)
        doc = wire.loads(np.asarray(parts["residual"]).tobytes())
        for path, arr in zip(parts["paths"], parts["arrays"], strict=True):
            node = doc
            for step in path[:-1]:
                node = node[step]
            node[path[-1]] = arr.view(wire.JSONNumbers)
        return doc

    def encode(self, fields: dict[str, Any], binary: bool) -> bytes:
        """Response fields -> JSON bytes, the same bytes `wire.dumps(wire.encode_tree(...))`
        writes."""
        payload = wire.dump_npz({"fields": wire.npz_ready(fields), "binary": binary})
        return bytes(self._call(b"E", payload))

    def close(self) -> None:
        for child in self._all:
            child.close()
        self._all.clear()


def offloadable(fields: Any) -> bool:
    """Only numeric arrays (and None) round-trip through npz unchanged."""
    if isinstance(fields, dict):
        return all(offloadable(v) for v in fields.values())
    if isinstance(fields, (list, tuple)):
        return all(offloadable(v) for v in fields)
    if fields is None:
        return True
    return isinstance(fields, (np.ndarray, np.generic)) and fields.dtype.kind in "biufc"
