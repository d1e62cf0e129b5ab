"""`Demand`: when a worker holding a batch waits for more requests of its key, and when not."""

from __future__ import annotations

import time

import pytest

from service.engine import batching
from service.engine.batching import Demand, bucket_for

KEY = ("model", "grad")


def burst(demand: Demand, n: int) -> None:
    """`n` requests of KEY queued one after the other, nothing being decoded meanwhile."""
    for _ in range(n):
        demand.arrived(KEY, 0)


def test_buckets_are_powers_of_two():
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 16, 17, 32)] == [1, 2, 4, 4, 8, 16, 32, 32]


def test_a_lone_client_never_waits():
    demand = Demand(patience=0.1)
    demand.arrived(KEY, 0)
    demand.ran(KEY, 1, 0.010)
    assert demand.wait_for_more(KEY, held=1, arriving=0, waited=0.0) == 0.0


def test_after_a_burst_of_32_the_next_one_is_awaited_up_to_the_cost_of_the_batch_held():
    demand = Demand(patience=0.1)
    burst(demand, 32)
    demand.ran(KEY, 32, 0.030)
    demand.ran(KEY, 1, 0.008)
    demand.left(KEY, 32)  # answered; the 32 clients send again
    demand.arrived(KEY, 0)
    # One request held: wait up to what running it alone costs (8 ms), less what was waited.
    assert demand.wait_for_more(KEY, held=1, arriving=0, waited=0.0) == pytest.approx(0.008)
    assert demand.wait_for_more(KEY, held=1, arriving=0, waited=0.003) == pytest.approx(0.005)
    assert demand.wait_for_more(KEY, held=1, arriving=0, waited=0.009) == 0.0
    # More held: a larger bucket, measured or not, is waited for as long as the largest
    # measured one below it.
    burst(demand, 16)
    assert demand.wait_for_more(KEY, held=17, arriving=0, waited=0.020) == pytest.approx(0.010)


def test_no_wait_once_every_expected_request_is_in():
    demand = Demand(patience=0.1)
    burst(demand, 32)
    demand.ran(KEY, 1, 0.008)
    demand.left(KEY, 32)
    burst(demand, 31)
    assert demand.wait_for_more(KEY, held=31, arriving=0, waited=0.0) > 0
    # The last is being decoded: it counts as expected-and-here (`arriving` has its own wait).
    assert demand.wait_for_more(KEY, held=31, arriving=1, waited=0.0) == 0.0
    demand.arrived(KEY, 0)
    assert demand.wait_for_more(KEY, held=32, arriving=0, waited=0.0) == 0.0


def test_patience_caps_the_wait_and_zero_turns_it_off():
    demand = Demand(patience=0.005)
    burst(demand, 8)
    demand.ran(KEY, 1, 0.050)
    demand.left(KEY, 8)
    demand.arrived(KEY, 0)
    assert demand.wait_for_more(KEY, held=1, arriving=0, waited=0.0) == pytest.approx(0.005)
    off = Demand(patience=0.0)
    burst(off, 8)
    off.ran(KEY, 1, 0.050)
    off.left(KEY, 8)
    off.arrived(KEY, 0)
    assert off.wait_for_more(KEY, held=1, arriving=0, waited=0.0) == 0.0


def test_nothing_measured_yet_means_no_wait():
    demand = Demand(patience=0.1)
    burst(demand, 32)
    demand.left(KEY, 31)
    assert demand.wait_for_more(KEY, held=1, arriving=0, waited=0.0) == 0.0


def test_the_peak_is_forgotten_after_the_burst(monkeypatch):
    demand = Demand(patience=0.1)
    burst(demand, 32)
    demand.ran(KEY, 1, 0.008)
    demand.left(KEY, 32)
    monkeypatch.setattr(batching, "PEAK_MEMORY_S", 0.05)
    time.sleep(0.06)
    demand.arrived(KEY, 0)  # alone now: the peak resets to 1
    assert demand.wait_for_more(KEY, held=1, arriving=0, waited=0.0) == 0.0


def test_keys_of_finished_bursts_are_dropped(monkeypatch):
    monkeypatch.setattr(batching, "PEAK_MEMORY_S", 0.0)
    demand = Demand(patience=0.1)
    burst(demand, 4)
    time.sleep(0.001)
    demand.left(KEY, 4)
    assert demand._keys == {}
