"""Models that say when they run, for the cancellation and transport tests.

Served with `--models tests/hardening/counting_models.py`; both write to files named by the
environment, so a test in another process can see what ran and hold a worker busy.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import numpy as np

from service.registry import model

VEC = [((None,), "float32")]


def _log(line: str) -> None:
    with open(os.environ["GRADSERVE_TEST_RUNS"], "a") as f:
        f.write(line + "\n")


def _wait_for_gate(x: np.ndarray) -> np.ndarray:
    _log(f"gate {float(x[0]):g} started")
    gate = Path(os.environ["GRADSERVE_TEST_GATE"])
    deadline = time.monotonic() + 60  # a broken test must not hang the server for ever
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return np.asarray(x)


@model("gate", inputs=VEC, description="blocks its worker until the gate file exists, then x")
def gate(x: jax.Array) -> jax.Array:
    return jax.pure_callback(_wait_for_gate, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


def _count(x: np.ndarray) -> np.ndarray:
    _log(f"counted {float(x[0]):g}")
    return np.asarray(x)


@model("counted", inputs=VEC, description="2 x, logging x[0] on the host each time it runs")
def counted(x: jax.Array) -> jax.Array:
    # Batchable: under vmap the callback runs once per request, so each still logs its own x.
    shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return 2 * jax.pure_callback(_count, shape, x, vmap_method="sequential")
