"""The session store alone: budgets, LRU, TTL renewal, per-key cap, owners. A fake clock, so
TTLs are exact and nothing waits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from client.errors import ModelNotFound
from service.metrics import Metrics
from service.sessions import SessionStore


@dataclass(frozen=True)
class Device:
    platform: str = "cpu"
    id: int = 0


@dataclass
class Lin:
    nbytes: int


@dataclass
class Model:
    name: str = "m"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


CPU0, CPU1 = Device("cpu", 0), Device("cpu", 1)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> Any:
    s = SessionStore(
        {CPU0: 1000, CPU1: 1000},
        ttl_s=10.0,
        max_per_key=3,
        metrics=Metrics(),
        clock=clock,
        sweep_every_s=3600,
    )
    yield s
    s.close()


def open_(store: SessionStore, nbytes: int = 100, owner: str = "a", device: Device = CPU0) -> Any:
    return store.open(owner, Model(), device, Lin(nbytes), (), store.ttl_for(None))


def gone(store: SessionStore, session_id: str, owner: str = "a") -> bool:
    try:
        store.get(session_id, owner, renew=False)
    except ModelNotFound as e:
        assert e.code == "session_not_found" and e.status == 404
        return True
    return False


def metric(store: SessionStore, name: str, **labels: str) -> float:
    value = store.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_ids_are_unguessable_and_distinct(store: SessionStore) -> None:
    ids = {open_(store, 1, owner=f"k{i}").id for i in range(50)}
    assert len(ids) == 50 and all(len(i) >= 32 for i in ids)


def test_another_owner_and_an_unknown_id_get_the_same_answer(store: SessionStore) -> None:
    s = open_(store)
    with pytest.raises(ModelNotFound) as other:
        store.get(s.id, "b")
    with pytest.raises(ModelNotFound) as unknown:
        store.get("no-such-id", "a")
    assert str(other.value) == str(unknown.value)
    assert not gone(store, s.id)  # the stranger's attempt did not touch it
    with pytest.raises(ModelNotFound):
        store.delete(s.id, "b")
    assert not gone(store, s.id)


def test_ttl_expires_and_every_product_renews_it(store: SessionStore, clock: Clock) -> None:
    s = open_(store)
    clock.now += 9
    store.get(s.id, "a")  # a product: the clock restarts
    clock.now += 9
    assert store.get(s.id, "a", renew=False).describe(clock())["expires_in_s"] == 1
    clock.now += 1
    assert gone(store, s.id)
    assert metric(store, "gradserve_session_expirations_total") == 1


def test_ttl_requested_is_capped(store: SessionStore) -> None:
    assert store.ttl_for(1.0) == 1.0 and store.ttl_for(1e9) == 10.0 and store.ttl_for(None) == 10


def test_memory_budget_evicts_least_recently_used_on_that_device(store: SessionStore) -> None:
    a, b, c = (open_(store, 300, owner=o) for o in "abc")
    store.get(a.id, "a")  # a is now the most recently used
    other = open_(store, 900, owner="d", device=CPU1)  # another device's budget
    d = open_(store, 400, owner="d")
    assert gone(store, b.id, "b") and not gone(store, a.id) and not gone(store, c.id, "c")
    assert not gone(store, other.id, "d") and not gone(store, d.id, "d")
    assert store.used(CPU0) == 1000 and store.used(CPU1) == 900
    assert metric(store, "gradserve_session_evictions_total", reason="memory") == 1
    assert metric(store, "gradserve_session_bytes", device="cpu:0") == 1000
    assert metric(store, "gradserve_sessions", device="cpu:0") == 3


def test_make_room_frees_before_the_work_runs(store: SessionStore) -> None:
    a = open_(store, 600)
    store.make_room(CPU0, 500)
    assert gone(store, a.id) and store.used(CPU0) == 0


def test_per_key_cap_evicts_that_keys_oldest(store: SessionStore) -> None:
    first, *rest = [open_(store, 1) for _ in range(3)]
    others = open_(store, 1, owner="b")
    newest = open_(store, 1)
    assert gone(store, first.id)
    assert not any(gone(store, s.id) for s in [*rest, newest]) and not gone(store, others.id, "b")
    assert metric(store, "gradserve_session_evictions_total", reason="key_cap") == 1


def test_delete_frees_at_once(store: SessionStore) -> None:
    s = open_(store, 700)
    assert store.delete(s.id, "a") == "m"
    assert gone(store, s.id) and store.used(CPU0) == 0 and len(store) == 0
    assert metric(store, "gradserve_sessions", device="cpu:0") == 0


def test_the_sweeper_drops_expired_sessions_unasked(clock: Clock) -> None:
    store = SessionStore(
        {CPU0: 1000}, ttl_s=1.0, max_per_key=3, metrics=Metrics(), clock=clock, sweep_every_s=0.01
    )
    try:
        open_(store, 10)
        clock.now += 2
        store._stop.wait(0.5)  # the sweeper's own wake-ups
        assert len(store) == 0 and store.used(CPU0) == 0
    finally:
        store.close()
