"""Per-key quotas: one key past its quota gets 429 `quota_exceeded` with Retry-After while
another key is served at full rate; against a real `gradserve serve` with a keys file."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hardening_util import B, W
from test_cancel import MODELS, metric, wait_until

from bench.harness import ServerProcess
from client import Client, grad
from client.errors import ServerBusy
from helpers import decode
from service import Settings
from service.auth import KeyRing, hash_key_main
from service.cli import build_parser
from service.models import cookbook as cb
from service.quotas import Quota, key_id, parse_quota, quota_for

SLOW, FAST, SINGLE = "slow-key-0123456789", "fast-key-0123456789", "single-key-0123456789"


def line(key: str, rest: str = "") -> str:
    return f"{hashlib.sha256(key.encode()).hexdigest()}:compute {rest}".rstrip()


# -------------------------------------------------------------------- configuration


def test_quota_options_parse_and_refuse() -> None:
    assert parse_quota("rate=0.2 burst=2, concurrent=1", "x") == {
        "rate": 0.2,
        "burst": 2.0,
        "concurrent": 1.0,
    }
    assert parse_quota("", "x") == {}
    for bad in ("rate=-1", "speed=3", "rate", "rate=fast", "burst=inf"):
        with pytest.raises(ValueError, match="bad quota option"):
            parse_quota(bad, "keys:3")


def test_quota_layers_defaults_scopes_and_key() -> None:
    settings = Settings(
        quota_rate=100,
        quota_burst=200,
        quota_concurrent=8,
        scope_quotas={"metrics": "rate=1 burst=2", "admin": "rate=0 concurrent=4"},
    )
    assert quota_for({"compute"}, {}, settings) == Quota(100, 200, 8)
    assert quota_for({"metrics"}, {}, settings) == Quota(1, 2, 8)
    # Several scopes: the most generous of each field (0 is unlimited).
    assert quota_for({"metrics", "admin"}, {}, settings) == Quota(0, 200, 8)
    assert quota_for({"metrics", "compute"}, {}, settings) == Quota(100, 200, 8)
    assert quota_for({"compute"}, {"concurrent": 1}, settings) == Quota(100, 200, 1)


def test_keys_file_carries_quotas(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{line(SLOW, 'rate=0.2 burst=2')}  # slow\n{line(FAST)}\n")
    ring = KeyRing.from_settings(Settings(api_keys_file=path))
    table = ring.quota_table()
    slow = hashlib.sha256(SLOW.encode()).digest()
    assert table[slow] == (frozenset({"compute"}), {"rate": 0.2, "burst": 2.0})
    assert ring.authenticate(f"Bearer {SLOW}") == {"compute"}
    path.write_text(line(SLOW, "rate=lots") + "\n")
    with pytest.raises(ValueError, match=r"keys:1: bad quota option 'rate=lots'"):
        KeyRing.from_settings(Settings(api_keys_file=path))


def test_hash_key_prints_the_quota(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(SLOW + "\n"))
    args = build_parser().parse_args(["hash-key", "--quota", "rate=0.5 concurrent=2"])
    assert hash_key_main(args) == 0
    assert capsys.readouterr().out.strip() == f"{line(SLOW)} rate=0.5 concurrent=2"
    args = build_parser().parse_args(["hash-key", "--quota", "rate=x"])
    assert hash_key_main(args) == 2


# -------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("quotas")
    keys, runs, gate = tmp / "keys", tmp / "runs", tmp / "gate"
    keys.write_text(
        f"{line(SLOW, 'rate=0.2 burst=2')}\n{line(FAST)}\n{line(SINGLE, 'concurrent=1')}\n"
    )
    runs.touch()
    env = {
        "GRADSERVE_API_KEYS_FILE": str(keys),
        "GRADSERVE_TEST_RUNS": str(runs),
        "GRADSERVE_TEST_GATE": str(gate),
        "GRADSERVE_WARMUP": "false",
        "GRADSERVE_COMPILE_CACHE_DIR": "",
    }
    with ServerProcess("--models", MODELS, env=env) as srv:
        yield srv, gate
        gate.touch()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def expected_grad() -> np.ndarray:
    import jax

    return np.asarray(jax.grad(cb.logistic_loss)(W, B))


def grad_request(http: httpx.Client, url: str, key: str) -> httpx.Response:
    doc = {"args": [W.tolist(), float(B)]}
    return http.post(f"{url}/v1/models/logistic_loss/grad", json=doc, headers=auth(key))


def test_over_its_rate_a_key_gets_429_while_another_is_served(server) -> None:
    srv, _ = server
    want = expected_grad()
    refused = []
    with httpx.Client(timeout=60) as http:
        for _ in range(8):
            slow = grad_request(http, srv.url, SLOW)
            fast = grad_request(http, srv.url, FAST)
            assert fast.status_code == 200, fast.text  # the other key: every request served
            np.testing.assert_allclose(decode(fast)["grad"], want, rtol=1e-6)
            if slow.status_code == 429:
                refused.append(slow)
            else:
                assert slow.status_code == 200, slow.text
        for _ in range(12):  # the other key at full rate, while the first is refused
            assert grad_request(http, srv.url, FAST).status_code == 200
    # A burst of 2 refilling at 0.2/s: at most 2 + 0.2 * (time taken) pass.
    assert len(refused) >= 4, [r.status_code for r in refused]
    for response in refused:
        body = response.json()
        assert body["code"] == "quota_exceeded" and body["status"] == 429
        assert int(response.headers["retry-after"]) >= 1
        assert key_id(hashlib.sha256(SLOW.encode()).digest()) in body["detail"]
        assert SLOW not in response.text
    slow_id = key_id(hashlib.sha256(SLOW.encode()).digest())
    assert (
        metric(
            srv.url, "gradserve_key_requests_total", auth(FAST), key=slow_id, result="rate_limited"
        )
        >= 4
    )
    text = httpx.get(f"{srv.url}/metrics", headers=auth(FAST)).text
    assert SLOW not in text and FAST not in text  # ids only, never keys


def test_the_client_waits_out_retry_after(server) -> None:
    srv, _ = server
    with httpx.Client(timeout=60) as http:
        while grad_request(http, srv.url, SLOW).status_code != 429:
            pass  # spend the bucket
    with Client(srv.url, api_key=SLOW, retries=5, timeout=60) as c:
        got = grad(c.model("logistic_loss"))(W, B)  # refused once, then served after the wait
    np.testing.assert_allclose(got, expected_grad(), rtol=1e-6)
    with (
        Client(srv.url, api_key=SLOW, retries=0, timeout=60) as c,
        pytest.raises(ServerBusy) as caught,
    ):
        for _ in range(3):
            grad(c.model("logistic_loss"))(W, B)
    assert caught.value.code == "quota_exceeded" and caught.value.retry_after >= 1


def test_concurrent_compute_per_key(server) -> None:
    srv, gate = server
    held: dict[str, httpx.Response] = {}

    def hold() -> None:
        held["r"] = httpx.post(
            f"{srv.url}/v1/models/gate/eval",
            json={"args": [[2.0]]},
            headers=auth(SINGLE),
            timeout=120,
        )

    holder = threading.Thread(target=hold)
    holder.start()
    single_id = key_id(hashlib.sha256(SINGLE.encode()).digest())
    wait_until(
        lambda: metric(srv.url, "gradserve_key_in_flight", auth(FAST), key=single_id) == 1,
        "the first request of the key computes",
    )
    with httpx.Client(timeout=60) as http:
        second = grad_request(http, srv.url, SINGLE)
        assert second.status_code == 429, second.text
        assert second.json()["code"] == "quota_exceeded" and second.headers["retry-after"]
        assert grad_request(http, srv.url, FAST).status_code == 200  # others unaffected
        assert http.get(f"{srv.url}/v1/models", headers=auth(SINGLE)).status_code == 200
    gate.touch()
    holder.join(120)
    assert held["r"].status_code == 200, held["r"].text
    with httpx.Client(timeout=60) as http:
        assert grad_request(http, srv.url, SINGLE).status_code == 200  # its slot is back


# -------------------------------------------------------------------- every door


def test_every_door_shares_the_key_quota() -> None:
    """v1, sessions, UM-Bridge and the pages' plots all draw on the same bucket."""
    from starlette.testclient import TestClient

    from service import create_app

    settings = Settings(api_keys=f"{SLOW}:compute rate=0.01 burst=1", warmup=False)
    doors = [
        ("POST", "/v1/models/tanh/eval", {"args": [0.5]}),
        ("POST", "/v1/models/logistic_loss/linearize", {"args": [W.tolist(), float(B)]}),
        ("POST", "/Evaluate", {"name": "tanh", "input": [[0.5]], "config": {}}),
        ("GET", "/models/logistic_loss/plots/direction.json", None),
    ]
    with TestClient(create_app(settings), headers=auth(SLOW)) as http:
        first = http.post("/v1/models/tanh/eval", json={"args": [0.5]})
        assert first.status_code == 200, first.text  # the burst of one
        for method, path, doc in doors:
            refused = http.request(method, path, json=doc)
            assert refused.status_code == 429, (path, refused.text)
            assert int(refused.headers["retry-after"]) >= 1
            body = refused.json()
            if path == "/Evaluate":  # UM-Bridge's own error format, exactly type and message
                assert set(body["error"]) == {"type", "message"}, body
                assert "quota" in body["error"]["message"]
            else:
                assert body["code"] == "quota_exceeded", body
