"""SIGTERM on a real server: readyz 503 while draining, in-flight work finishes, exit 0."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import numpy as np
from hardening_util import FAULTY_MODELS, assert_problem

DRAIN_S = 2.0


def test_sigterm_drains_finishes_in_flight_work_and_exits_0(start_server):
    server = start_server(
        "--models",
        FAULTY_MODELS,
        env={"GRADSERVE_SHUTDOWN_DRAIN_S": str(DRAIN_S), "GRADSERVE_WARMUP": "false"},
    )
    with httpx.Client(base_url=server.url, timeout=30) as client:
        # Compile first, so the in-flight request below is pure (sleeping) compute.
        assert client.post("/v1/models/sleepy/eval", json={"args": [[0.0]]}).status_code == 200
        answers: list[httpx.Response] = []
        # 3.5 s: it outlives the 2 s drain, so uvicorn's own graceful phase must wait too.
        slow = threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    f"{server.url}/v1/models/sleepy/eval", json={"args": [[3.5]]}, timeout=30
                )
            )
        )
        slow.start()
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = client.get("/readyz")
        assert_problem(ready, 503, "shutting_down")
        refused = client.post("/v1/models/tanh/eval", json={"args": [1.0]})
        assert_problem(refused, 503, "shutting_down")
        assert client.get("/healthz").status_code == 200  # alive, just not ready
        slow.join(30)
    assert answers and answers[0].status_code == 200, answers
    np.testing.assert_array_equal(answers[0].json()["value"]["data"], [3.5])
    assert server.proc.wait(30) == 0
    log = server.output()
    assert "draining" in log and "Traceback" not in log
