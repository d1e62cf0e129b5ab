"""(h) Derivative sessions: products per second at one point, session vs stateless.

On `reaction_diffusion` (bench/session_models.py), whose forward pass dominates: a session's
`vjp` runs only the transpose of the kept linearization, and its `jvp` after `linearize` of
`grad` only the linear part of the Hessian-vector product, where each stateless request
recomputes the forward pass (and for hvp the whole gradient). Also the wall time of
examples/scipy_trust_ncg.py with and without sessions. Blocks alternate, so load on a shared
machine hits both sides alike; each figure is the median over blocks.

    python -m bench --only h
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable

import numpy as np

from bench.harness import ROOT, Row, Server, Table, median
from client import Client, Pullback, grad, hvp, linearize, vjp

MODELS = "bench/session_models.py"


def _rate(call: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    return n / (time.perf_counter() - t0)


def _side_by_side(
    session: Callable[[], object], stateless: Callable[[], object], n: int, blocks: int
) -> tuple[float, float]:
    session(), stateless()  # compiled and warm before timing
    a, b = [], []
    for _ in range(blocks):
        a.append(_rate(session, n))
        b.append(_rate(stateless, n))
    return median(a), median(b)


def products(table: Table, server: Server, n: int, blocks: int) -> None:
    rng = np.random.default_rng(0)
    u0 = (0.5 * rng.standard_normal(2048)).astype(np.float32)
    k = np.float32(1.5)
    with Client(server.url, timeout=300) as c:
        f = c.model("reaction_diffusion")
        ct = rng.standard_normal(2048).astype(np.float32)
        _, pullback = vjp(f, u0, k)
        stateless = Pullback(f, (u0, k))  # what vjp gave before sessions: a request per call
        np.testing.assert_allclose(pullback(ct)[0], stateless(ct)[0], rtol=1e-4, atol=1e-4)
        s, p = _side_by_side(lambda: pullback(ct), lambda: stateless(ct), n, blocks)
        table.add(
            Row(
                "h. vjp products/s at one point, session vs stateless (reaction_diffusion)",
                f"{s:.1f}/s vs {p:.1f}/s",
                s / p,
                ">= 1.4",
                s / p >= 1.4,
            )
        )
        pullback.close()

        loss = c.model("reaction_diffusion_loss")
        v = (rng.standard_normal(2048).astype(np.float32), np.float32(0.0))
        _, hvp_at = linearize(grad(loss, argnums=(0, 1)), u0, k)

        def stateless_hvp() -> object:
            return hvp(loss, (u0, k), v, argnums=(0, 1))

        np.testing.assert_allclose(hvp_at(*v)[0], stateless_hvp()[0], rtol=1e-3, atol=1e-3)
        s, p = _side_by_side(lambda: hvp_at(*v), stateless_hvp, max(2, n // 4), blocks)
        table.add(
            Row(
                "h. hvp products/s at one point, session vs stateless (reaction_diffusion)",
                f"{s:.1f}/s vs {p:.1f}/s",
                s / p,
                ">= 2",
                s / p >= 2,
            )
        )
        hvp_at.close()


def trust_ncg(table: Table, server: Server, blocks: int) -> None:
    spec = importlib.util.spec_from_file_location("trust_ncg", ROOT / "examples/scipy_trust_ncg.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    x0 = np.zeros(4)
    with Client(server.url) as c:

        def run(sessions: bool) -> float:
            t0 = time.perf_counter()
            result = example.minimise(c, x0, sessions=sessions)
            assert result.success, result.message
            return time.perf_counter() - t0

        run(True), run(False)
        with_s, without = [], []
        for _ in range(blocks):
            with_s.append(run(True))
            without.append(run(False))
    s, p = median(with_s), median(without)
    table.add(
        Row(
            "h. examples/scipy_trust_ncg.py wall time, session vs stateless hessp",
            f"{s * 1e3:.1f} ms vs {p * 1e3:.1f} ms",
            p / s,
            "(reported)",
            None,
            "logistic_loss is tiny: round trips dominate, not forward passes",
        )
    )


def run(table: Table, reps: Callable[[int], int]) -> None:
    with Server(GRADSERVE_MODELS=MODELS) as server:
        products(table, server, reps(40), blocks=max(3, reps(5)))
        trust_ncg(table, server, blocks=max(3, reps(7)))
