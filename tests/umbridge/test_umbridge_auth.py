"""With keys configured, UM-Bridge needs one like every other door: a key in the URL (HTTP
Basic, the password) works for umbridge's client, a missing or wrong one is refused in
UM-Bridge's format, and a key without the compute scope cannot compute."""

from __future__ import annotations

import base64

import pytest
import requests
import umbridge

KEY, METRICS_KEY = "umbridge-test-key-0123456789", "umbridge-metrics-key-0123456789"


@pytest.fixture(scope="module")
def keyed(start_server):
    return start_server(
        "--models",
        "service.models.benchmarks",
        env={"GRADSERVE_API_KEYS": f"{KEY},{METRICS_KEY}:metrics"},
    )


def _with_key(url: str, key: str, user: str = "me") -> str:
    return url.replace("http://", f"http://{user}:{key}@")


def test_a_key_in_the_url_works(keyed):
    donut = umbridge.HTTPModel(_with_key(keyed.url, KEY), "donut")
    assert donut([[2.0, 2.0]])[0][0] == pytest.approx(-1.581180343024592, rel=1e-6)
    assert len(donut.gradient(0, 0, [[1.0, 2.0]], [1.0])) == 2
    # Any user name, or none; and a bearer key as on /v1.
    assert umbridge.supported_models(
        _with_key(keyed.url, KEY, user="")
    ) == umbridge.supported_models(_with_key(keyed.url, KEY))
    bearer = requests.get(
        f"{keyed.url}/Info", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert bearer.status_code == 200 and "donut" in bearer.json()["models"]
    # Basic works on every path, /v1 included.
    v1 = requests.post(
        f"{_with_key(keyed.url, KEY)}/v1/models/donut/eval", json={"args": [[2.0, 2.0]]}, timeout=10
    )
    assert v1.status_code == 200


@pytest.mark.parametrize(
    "auth",
    [
        None,
        ("me", "not-the-key"),
        ("me", ""),
        (KEY, ""),  # the key must be the password, not the user name
    ],
)
def test_a_missing_or_wrong_key_is_refused(keyed, auth):
    for path in ("/Info", "/ModelInfo", "/Evaluate"):
        method = requests.get if path == "/Info" else requests.post
        response = method(f"{keyed.url}{path}", data='{"name": "donut"}', auth=auth, timeout=10)
        assert response.status_code == 401
        body = response.json()
        assert set(body) == {"error"} and body["error"]["type"] == "Unauthorized"
        assert "WWW-Authenticate" in response.headers
    with pytest.raises(KeyError):  # umbridge's client finds no protocol version
        umbridge.HTTPModel(keyed.url, "donut")


def test_malformed_basic_credentials_are_refused(keyed):
    for value in ("Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(), "Digest x"):
        response = requests.get(f"{keyed.url}/Info", headers={"Authorization": value}, timeout=10)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "Unauthorized"


def test_a_metrics_key_cannot_compute(keyed):
    response = requests.post(
        f"{_with_key(keyed.url, METRICS_KEY)}/Evaluate",
        data='{"name": "donut", "input": [[1.0, 2.0]]}',
        timeout=10,
    )
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "Forbidden"
    assert (
        requests.get(f"{_with_key(keyed.url, METRICS_KEY)}/metrics", timeout=10).status_code == 200
    )
