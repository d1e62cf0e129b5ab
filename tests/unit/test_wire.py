"""The wire format on its own: every leaf form, pytrees, npz, and malformed input."""

from __future__ import annotations

import numpy as np
import pytest

from client import wire
from client.errors import InvalidInput, PayloadTooLarge
from client.specs import ArraySpec, dtype_from_name

DTYPES = [
    "bool",
    "int8",
    "int32",
    "int64",
    "uint8",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(1)
    dt = dtype_from_name(dtype)
    if dt.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    if dt.kind == "b":
        return rng.random(shape) > 0.5
    return (rng.standard_normal(shape) * 10).astype(dt)


def roundtrip_json(tree, binary=False):
    return wire.decode_tree(wire.loads(wire.dumps(wire.encode_tree(tree, binary))))


def roundtrip_npz(tree):
    return wire.load_npz(wire.dump_npz(wire.npz_ready(tree)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 3), (2, 3)])
@pytest.mark.parametrize("how", ["json", "base64", "npz"])
def test_every_dtype_and_shape_roundtrips_exactly(dtype, shape, how):
    x = sample(dtype, shape)
    y = {"json": roundtrip_json, "base64": lambda t: roundtrip_json(t, True), "npz": roundtrip_npz}[
        how
    ](x)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("how", ["json", "base64", "npz"])
def test_non_finite_values_survive(how):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)
    z = np.array([complex(np.nan, np.inf)], np.complex64)
    tree = {"x": x, "z": z}
    y = {"json": roundtrip_json, "base64": lambda t: roundtrip_json(t, True), "npz": roundtrip_npz}[
        how
    ](tree)
    np.testing.assert_array_equal(y["x"], x)
    assert np.signbit(y["x"][4])
    np.testing.assert_array_equal(y["z"], z)


def test_non_finite_json_uses_strings():
    doc = wire.encode_array(np.array([np.nan, np.inf, -np.inf], np.float32))
    assert doc["data"] == ["NaN", "Infinity", "-Infinity"]
    assert b"NaN" in wire.dumps(doc)


def test_pytrees_keep_structure():
    tree = {"a": [np.float32(1), (np.zeros(2, np.int32), None)], "b": {"c": np.ones((1, 1))}}
    back = roundtrip_npz(tree)
    assert back["a"][0].shape == () and back["a"][1][1] is None
    assert back["b"]["c"].dtype == np.float64
    back = roundtrip_json(tree)
    assert isinstance(back["a"], list) and back["a"][1][0].dtype == np.int32


def test_plain_leaves_take_the_spec_dtype():
    spec = [ArraySpec((3,), "float32"), ArraySpec((), "int32"), {"k": ArraySpec(None, "complex64")}]
    args = wire.decode_tree([[1, 2, 3], 4, {"k": [1.5]}], spec)
    assert [args[0].dtype, args[1].dtype, args[2]["k"].dtype] == [
        np.float32,
        np.int32,
        np.complex64,
    ]
    assert wire.decode_tree([1.0, 2.0]).dtype == np.float32
    assert wire.decode_tree(2.0, default_dtype=np.float64).dtype == np.float64


def test_spec_tuples_and_list_ambiguity():
    spec = (ArraySpec((), "float32"), ArraySpec((), "float32"))
    assert isinstance(wire.decode_tree([1.0, 2.0], spec), tuple)
    as_list = wire.decode_tree([1.0, 2.0], [ArraySpec(), ArraySpec()])
    assert isinstance(as_list, list) and len(as_list) == 2
    assert wire.decode_tree([1.0, 2.0]).shape == (2,)


def test_explicit_leaf_accepts_nested_data():
    leaf = {"dtype": "int16", "shape": [2, 2], "data": [[1, 2], [3, 4]]}
    np.testing.assert_array_equal(wire.decode_array(leaf), np.array([[1, 2], [3, 4]], np.int16))


def test_a_dict_with_leaf_keys_is_a_leaf():
    assert wire.is_leaf_object({"dtype": "float32", "shape": [1], "data": [1]})
    assert not wire.is_leaf_object({"dtype": [1.0], "data": [2.0], "other": 1})


@pytest.mark.parametrize(
    ("leaf", "code"),
    [
        ({"dtype": "float32", "shape": [2], "data": [1]}, "data_length_mismatch"),
        ({"dtype": "float32", "shape": [2], "base64": "AAAA"}, "data_length_mismatch"),
        ({"dtype": "float32", "shape": [1], "base64": "A"}, "invalid_base64"),
        ({"dtype": "float32", "shape": [-1], "data": []}, "invalid_body"),
        ({"dtype": "int32", "shape": [1], "data": [1.5]}, "invalid_body"),
        ({"dtype": "complex64", "shape": [1], "real": [1.0]}, "invalid_body"),
        ({"dtype": "object", "shape": [1], "data": [1]}, "invalid_dtype"),
        ({"dtype": "float32", "shape": [1], "data": ["1.0"]}, "invalid_body"),
    ],
)
def test_malformed_leaves_are_400(leaf, code):
    with pytest.raises(InvalidInput) as info:
        wire.decode_array(leaf)
    assert info.value.status == 400 and info.value.code == code


def test_npz_limits_checked_before_inflating():
    big = wire.dump_npz({"args": [np.zeros(10_000, np.float32)]})
    with pytest.raises(PayloadTooLarge):
        wire.load_npz(big, max_bytes=1000)
    with pytest.raises(PayloadTooLarge):
        wire.load_npz(big, max_members=1)


def test_npz_needs_json_member():
    import io

    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(1))
    with pytest.raises(InvalidInput, match="__json__"):
        wire.load_npz(buf.getvalue())


def test_numpy_savez_compressed_is_accepted():
    import io

    buf = io.BytesIO()
    doc = b'{"args": [{"$npz": "x"}]}'
    np.savez_compressed(buf, __json__=np.frombuffer(doc, np.uint8), x=np.arange(5.0))
    np.testing.assert_array_equal(wire.load_npz(buf.getvalue())["args"][0], np.arange(5.0))
