"""npy headers: read as numpy reads them, but without `ast.literal_eval` (see client/_npy.py)."""

from __future__ import annotations

import ast
import io
import struct

import numpy as np
import pytest

from client import _npy, wire
from client.errors import InvalidInput

DTYPES = [
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", ">f4", ">i8",
]  # fmt: skip
SHAPES = [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 1, 1, 1, 1), (7, 5)]


def npy(arr: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array(f, arr, version=version)
    return f.getvalue()


def numpy_reads(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read(f)
    return shape, fortran, dtype, f.tell()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_headers_read_as_numpy_reads_them(dtype: str, shape: tuple[int, ...]) -> None:
    arr = np.zeros(shape, dtype)
    for a in (arr, np.asfortranarray(arr) if arr.ndim > 1 else arr):
        for version in (None, (1, 0), (2, 0)):
            data = npy(a, version)
            assert _npy.read_header(data) == numpy_reads(data)


def test_version_3_and_other_writers_spacing() -> None:
    data = npy(np.arange(6, dtype=np.float32).reshape(2, 3), (3, 0))
    assert _npy.read_header(data)[:3] == ((2, 3), False, np.dtype("<f4"))
    # Another writer's layout: other key order, double quotes, no trailing comma.
    text = b'{"shape": (4,),"fortran_order":True , "descr":"<i4"}\n'
    data = _npy.MAGIC + bytes([1, 0]) + struct.pack("<H", len(text)) + text
    assert _npy.read_header(data) == ((4,), True, np.dtype("<i4"), 10 + len(text))


def test_no_literal_eval_anywhere_on_the_npz_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # numpy's reader compiles the header; on CPython 3.11 that races between threads.
    def refuse(*_: object) -> None:
        raise AssertionError("ast.literal_eval called")

    monkeypatch.setattr(ast, "literal_eval", refuse)
    tree = {"args": [np.arange(12.0, dtype=np.float32).reshape(3, 4), np.int32(7)]}
    back = wire.load_npz(wire.dump_npz(tree))
    np.testing.assert_array_equal(back["args"][0], tree["args"][0])
    assert back["args"][1] == 7 and back["args"][1].dtype == np.int32


def header(text: bytes, version: int = 1) -> bytes:
    size = struct.pack("<H", len(text)) if version == 1 else struct.pack("<I", len(text))
    return _npy.MAGIC + bytes([version, 0]) + size + text


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"NOTNPY" + bytes(10), "magic"),
        (_npy.MAGIC + bytes([4, 0, 0, 0]), "version"),
        (_npy.MAGIC + bytes([1, 0]) + struct.pack("<H", 50) + b"{'descr'", "truncated"),
        (header(b"{'descr': '<f4', 'shape': (2,), }"), "keys"),
        (header(b"{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}"), "dict"),
        (header(b"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }"), "dict"),
        (header(b"{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }"), "dict"),
        (header(b"{'descr': '<f4', 'fortran_order': 0, 'shape': (2,), }"), "dict"),
        (header(b"{'descr': '<f4', 'fortran_order': False, 'shape': 'x', }"), "tuple"),
        (header(b"{'descr': 'nonsense', 'fortran_order': False, 'shape': (2,), }"), "descr"),
        (header(b"{'descr': __import__('os'), 'fortran_order': False, 'shape': (), }"), "dict"),
        (header(b" " * (_npy.MAX_HEADER + 1), version=2), "limit"),
    ],
)
def test_malformed_headers_are_refused(data: bytes, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        _npy.read_header(data)


def test_object_members_are_refused_by_the_wire() -> None:
    arr = np.array([1, "a"], dtype=object)
    f = io.BytesIO()
    np.savez(f, __json__=np.frombuffer(b'{"args": [{"$npz": "a"}]}', np.uint8), a=arr)
    with pytest.raises(InvalidInput, match="Python objects") as e:
        wire.load_npz(f.getvalue())
    assert e.value.code == "invalid_npz"


def test_threads_decoding_while_finalizers_run_never_fail() -> None:
    """numpy's header reader failed here ~1 in 2,000 (SystemError from CPython 3.11's AST)."""
    import sys
    import threading

    class Cycle:  # a finalizer on a cycle: run by the GC in whichever thread allocates
        def __del__(self) -> None:
            sum(range(50))

    body = wire.dump_npz({"args": [np.zeros(3, np.float32), np.ones((2, 2), np.int32)]})
    failures: list[BaseException] = []

    def decode_many() -> None:
        for _ in range(3000):
            a, b = Cycle(), Cycle()
            a.other, b.other = b, a
            del a, b
            try:
                wire.load_npz(body)
            except Exception as e:
                failures.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=decode_many) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []
