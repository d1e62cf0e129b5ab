"""Models that hang: 504 at the deadline, and the other models keep answering meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from hardening_util import FAULTY_MODELS, assert_problem, send, still_serving
from starlette.testclient import TestClient

from client import wire
from service import Settings, create_app

TIMEOUT_S = 1.0


def _app() -> Iterator[TestClient]:
    settings = Settings(
        models=[FAULTY_MODELS], request_timeout_s=TIMEOUT_S, workers_per_device=2, warmup=False
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def deadlined() -> Iterator[TestClient]:
    yield from _app()


@pytest.fixture
def fresh_deadlined() -> Iterator[TestClient]:
    """Its own app: the overdue-worker gauge starts at 0."""
    yield from _app()


@pytest.mark.parametrize(
    ("model", "x"),
    [("sleepy", 3.0), ("trace_hang", 1.0)],  # sleeps in a host callback / while tracing
)
def test_a_hanging_model_gets_504_and_others_still_answer(deadlined, model, x):
    answers: list = []
    hung = threading.Thread(
        target=lambda: answers.append(
            (send(deadlined, model, "eval", wire.dumps({"args": [[x]]})), time.perf_counter())
        )
    )
    started = time.perf_counter()
    hung.start()
    time.sleep(0.2)
    still_serving(deadlined)  # while the hung call holds a worker
    served = time.perf_counter() - started
    hung.join(30)
    response, finished = answers[0]
    assert_problem(response, 504, "deadline_exceeded", f"'{model}'", f"{TIMEOUT_S:g} s")
    assert finished - started < TIMEOUT_S + 1.0, "504 must come at the deadline, not when it ends"
    assert served < TIMEOUT_S + 1.0, "another model waited for the hung one"
    time.sleep(max(0.0, started + 3.5 - time.perf_counter()))  # the worker is back
    still_serving(deadlined)


def test_hung_calls_on_every_worker_do_not_starve_the_device(fresh_deadlined):
    deadlined = fresh_deadlined
    still_serving(deadlined)  # compiled now, so the timing below is the wait for a worker only
    # Two shapes, so the two calls are not batched together: each holds one of the 2 workers.
    bodies = [wire.dumps({"args": [[3.0] * n]}) for n in (1, 2)]
    answers: list = []
    hung = [
        threading.Thread(target=lambda b=b: answers.append(send(deadlined, "sleepy", "eval", b)))
        for b in bodies
    ]
    for thread in hung:
        thread.start()
    time.sleep(TIMEOUT_S + 0.5)  # both are past the deadline and still sleeping in their workers
    started = time.perf_counter()
    still_serving(deadlined)
    served = time.perf_counter() - started
    overdue = deadlined.get("/metrics").text
    for thread in hung:
        thread.join(30)
    assert served < 1.0, "a model waited for the workers stuck in the hung ones"
    assert 'gradserve_overdue_workers{device="cpu:0"} 2.0' in overdue
    for response in answers:
        assert_problem(response, 504, "deadline_exceeded", "'sleepy'")
    deadline = time.monotonic() + 30  # the stuck ones finish their 3 s and leave
    while 'gradserve_overdue_workers{device="cpu:0"} 0.0' not in deadlined.get("/metrics").text:
        assert time.monotonic() < deadline, "the overdue workers never left"
        time.sleep(0.1)
    still_serving(deadlined)
