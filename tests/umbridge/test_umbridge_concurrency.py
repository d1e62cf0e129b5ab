"""16 umbridge clients at once, each in its own thread with its own points: every answer is
its own (the engine batches concurrent requests of a model, so answers must not mix), equal
to local JAX; and UM-Bridge's requests are counted in /metrics like every other."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
import umbridge
from umbridge_util import Local, tolerance

CLIENTS, CALLS = 16, 12


def test_sixteen_concurrent_clients_all_get_their_own_answers(umbridge_server):
    url = umbridge_server.url
    locals_ = {name: Local(name) for name in ("funnel", "logistic_predict")}
    start = threading.Barrier(CLIENTS)

    def client(n: int) -> int:
        rng = np.random.default_rng(n)
        name = "funnel" if n % 2 else "logistic_predict"
        model, local = umbridge.HTTPModel(url, name), locals_[name]
        start.wait()
        checked = 0
        for _ in range(CALLS):
            inputs = [rng.normal(size=s).tolist() for s in local.input_sizes]
            sens = rng.normal(size=local.output_sizes[0]).tolist()
            vec = rng.normal(size=local.input_sizes[0]).tolist()
            close = tolerance(local)
            np.testing.assert_allclose(model(inputs)[0], local.evaluate(inputs)[0], **close)
            np.testing.assert_allclose(
                model.gradient(0, 0, inputs, sens), local.gradient(0, 0, inputs, sens), **close
            )
            np.testing.assert_allclose(
                model.apply_hessian(0, 0, 0, inputs, sens, vec),
                local.apply_hessian(0, 0, 0, inputs, sens, vec),
                **close,
            )
            checked += 3
        return checked

    with ThreadPoolExecutor(CLIENTS) as pool:
        assert sum(pool.map(client, range(CLIENTS))) == CLIENTS * CALLS * 3

    metrics = requests.get(f"{url}/metrics", timeout=10).text
    for op in ("Evaluate", "Gradient", "ApplyHessian"):
        assert f'model="funnel",op="{op}",status="200"' in metrics, op
