"""Property tests of the wire format: any dtype, shape (0-d, empty, large) and pytree
round-trips exactly through JSON, base64 and npz."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from client import wire
from client.specs import DTYPE_NAMES, dtype_from_name
from service.limits import json_depth

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
    st.sampled_from([(), (0,), (3, 0, 2), (20_000,), (100, 130)]),  # 0-d, empty, large
)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = dtype_from_name(draw(st.sampled_from(DTYPE_NAMES)))
    shape = draw(SHAPES)
    if dtype.name == "bfloat16":  # hypothesis knows no ml_dtypes: draw float32, narrow exactly
        return draw(hnp.arrays(np.float32, shape)).astype(dtype)
    return draw(hnp.arrays(dtype, shape))


# A dict whose keys are exactly a leaf's (dtype + data) would read back as a leaf, as the
# protocol says; a list must be non-empty (an empty list reads back as an empty array).
KEYS = st.text(min_size=0, max_size=8).filter(lambda k: k not in ("dtype", "data", "base64"))
TREES = st.recursive(
    st.one_of(arrays(), st.none()),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3), st.dictionaries(KEYS, inner, max_size=3)
    ),
    max_leaves=6,
)


def assert_same(got: object, want: object, bits: bool) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for k in want:
            assert_same(got[k], want[k], bits)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w, bits)
    elif want is None:
        assert got is None
    else:
        assert isinstance(got, np.ndarray), type(got)
        assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape)
        if bits:  # base64 and npz carry the bytes themselves, NaN payloads included
            assert got.tobytes() == want.tobytes()
        else:  # JSON: every value exactly, NaN as NaN (JSON's "NaN" carries no sign or payload)
            if want.dtype.name == "bfloat16":  # opaque to numpy's NaN handling; float32 is exact
                got, want = got.astype(np.float32), want.astype(np.float32)
            np.testing.assert_array_equal(got, want)
            if want.dtype.kind in "fc":
                for part in (np.real, np.imag) if want.dtype.kind == "c" else (np.asarray,):
                    g, w = part(got), part(want)
                    keep = ~np.isnan(w)
                    assert np.array_equal(np.signbit(g)[keep], np.signbit(w)[keep])


@PROPERTY
@given(TREES)
def test_json_roundtrip_is_exact(tree):
    assert_same(wire.decode_tree(wire.loads(wire.dumps(wire.encode_tree(tree)))), tree, bits=False)


@PROPERTY
@given(TREES)
def test_base64_roundtrip_is_bit_exact(tree):
    doc = wire.loads(wire.dumps(wire.encode_tree(tree, binary=True)))
    assert_same(wire.decode_tree(doc), tree, bits=True)


@PROPERTY
@given(TREES)
def test_npz_roundtrip_is_bit_exact(tree):
    doc = wire.load_npz(wire.dump_npz(wire.npz_ready({"t": tree})))
    assert_same(wire.decode_tree(doc["t"]), tree, bits=True)


# ---------------------------------------------------------------------------- the depth scan

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=20,
)


def reference_depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(reference_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(reference_depth, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_byte_scan_depth_matches_the_parsed_depth(value, ascii_only):
    """Brackets, quotes and backslashes inside strings must not fool the scan."""
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(text) == reference_depth(value)
