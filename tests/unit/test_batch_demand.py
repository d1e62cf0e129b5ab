"""`Demand`: when a worker holding a batch waits for more requests of its key, and when not.

A fake clock drives it: requests of a burst arrive 1 ms apart.
"""

from __future__ import annotations

import pytest

from service.engine.batching import PEAK_MEMORY_S, Demand, bucket_for

KEY = ("model", "grad")
GAP = 0.001


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def burst(demand: Demand, clock: Clock, n: int) -> None:
    """`n` requests of KEY queued 1 ms apart, none being decoded meanwhile."""
    for _ in range(n):
        clock.now += GAP
        demand.arrived(KEY, 0)


def answered_burst(demand: Demand, clock: Clock, n: int = 32) -> None:
    """A burst of `n` ran (alone at 8 ms, as 32 at 30 ms) and was answered."""
    burst(demand, clock, n)
    demand.ran(KEY, 1, 0.008)
    demand.ran(KEY, 32, 0.030)
    demand.left(KEY, n)


def test_buckets_are_powers_of_two():
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 16, 17, 32)] == [1, 2, 4, 4, 8, 16, 32, 32]


def test_a_lone_client_never_waits(clock):
    demand = Demand(patience=0.1, clock=clock)
    for _ in range(5):
        clock.now += 0.02
        demand.arrived(KEY, 0)
        assert demand.wait_for_more(KEY, held=1, arriving=0, waited=0.0) == 0.0
        demand.ran(KEY, 1, 0.010)
        demand.left(KEY)


def test_while_a_burst_flows_in_a_worker_waits_up_to_a_run_of_what_it_holds(clock):
    demand = Demand(patience=0.1, clock=clock)
    answered_burst(demand, clock)
    clock.now += 0.05  # the answers travel back; the 32 clients send again
    burst(demand, clock, 2)
    # Two held: bounded by a run of them (the largest measured bucket at or below 2: 8 ms)
    # and by when the burst would count as dry (4 gaps + slack after the last arrival).
    assert demand.wait_for_more(KEY, held=2, arriving=0, waited=0.0) == pytest.approx(0.0045)
    assert demand.wait_for_more(KEY, held=2, arriving=0, waited=0.007) == pytest.approx(0.001)
    assert demand.wait_for_more(KEY, held=2, arriving=0, waited=0.008) == 0.0
    burst(demand, clock, 20)  # still flowing: held 22 runs as bucket 32, measured at 30 ms
    assert demand.wait_for_more(KEY, held=22, arriving=0, waited=0.022) == pytest.approx(0.0045)


def test_no_wait_once_the_burst_stops_arriving(clock):
    demand = Demand(patience=0.1, clock=clock)
    answered_burst(demand, clock)
    clock.now += 0.05
    burst(demand, clock, 9)
    clock.now += 4 * GAP + 0.001  # nothing for longer than 4 gaps: the rest hold their answers
    assert demand.wait_for_more(KEY, held=9, arriving=0, waited=0.005) == 0.0


def test_no_wait_once_every_expected_request_is_in(clock):
    demand = Demand(patience=0.1, clock=clock)
    answered_burst(demand, clock)
    burst(demand, clock, 31)
    assert demand.wait_for_more(KEY, held=31, arriving=0, waited=0.0) > 0
    # The last is being decoded: it counts as here (`arriving` has a wait of its own).
    assert demand.wait_for_more(KEY, held=31, arriving=1, waited=0.0) == 0.0
    burst(demand, clock, 1)
    assert demand.wait_for_more(KEY, held=32, arriving=0, waited=0.0) == 0.0


def test_patience_caps_the_wait_and_zero_turns_it_off(clock):
    for patience, expected in ((0.002, 0.002), (0.0, 0.0)):
        demand = Demand(patience=patience, clock=clock)
        answered_burst(demand, clock)
        burst(demand, clock, 1)
        assert demand.wait_for_more(KEY, held=1, arriving=0, waited=0.0) == pytest.approx(expected)


def test_nothing_measured_yet_means_no_wait(clock):
    demand = Demand(patience=0.1, clock=clock)
    burst(demand, clock, 32)
    demand.left(KEY, 31)
    assert demand.wait_for_more(KEY, held=1, arriving=0, waited=0.0) == 0.0


def test_the_peak_is_forgotten_after_the_burst(clock):
    demand = Demand(patience=0.1, clock=clock)
    answered_burst(demand, clock)
    clock.now += PEAK_MEMORY_S + 0.01
    demand.arrived(KEY, 0)  # alone now: the peak starts again from 1
    assert demand.wait_for_more(KEY, held=1, arriving=0, waited=0.0) == 0.0


def test_keys_of_finished_bursts_are_dropped(clock):
    demand = Demand(patience=0.1, clock=clock)
    burst(demand, clock, 4)
    clock.now += PEAK_MEMORY_S + 0.01
    demand.left(KEY, 4)
    assert demand._keys == {}
