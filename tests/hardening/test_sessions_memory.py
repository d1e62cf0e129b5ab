"""Sessions against a real server: 2,000 create/delete cycles leave its RSS flat, and a small
memory budget under churn evicts without a single 5xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np

from client import wire

X = np.random.default_rng(3).standard_normal(16_384).astype(np.float32)  # 128 KB of residuals


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def npz(doc: dict[str, Any]) -> bytes:
    return wire.dump_npz(wire.npz_ready(doc))


def cycle(http: httpx.Client, body: bytes, tangent: bytes) -> None:
    r = http.post("/v1/models/tanh/linearize", content=body)
    assert r.status_code == 200, r.text
    sid = wire.load_npz(r.content)["session"]["id"]
    r = http.post(f"/v1/sessions/{sid}/jvp", content=tangent)
    assert r.status_code == 200, r.text
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204


def gauge(http: httpx.Client, name: str) -> float:
    lines = http.get("/metrics").text.splitlines()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith(name + "{"))


def test_rss_stays_flat_over_2000_create_delete_cycles(start_server: Any) -> None:
    server = start_server()
    body, tangent = npz({"args": [X]}), npz({"tangents": [X]})
    headers = {"content-type": wire.NPZ}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        for _ in range(300):  # warm-up: compiles, pools and allocator arenas settle
            cycle(http, body, tangent)
        before = rss_mib(server.proc.pid)
        for _ in range(2000):
            cycle(http, body, tangent)
        after = rss_mib(server.proc.pid)
        assert gauge(http, "gradserve_sessions") == 0
        assert gauge(http, "gradserve_session_bytes") == 0
    print(f"RSS {before:.1f} -> {after:.1f} MiB over 2000 cycles")
    # Leaking the residuals alone would add 2000 x 128 KB = 250 MiB.
    assert after - before < 25, (before, after)


def test_churn_within_a_small_budget_evicts_and_never_fails(start_server: Any) -> None:
    server = start_server(env={"GRADSERVE_SESSION_MEMORY": str(3 * 2**20)})  # 3 MiB
    body, tangent = npz({"args": [X]}), npz({"tangents": [X]})
    statuses: list[int] = []
    with httpx.Client(base_url=server.url, headers={"content-type": wire.NPZ}) as http:
        ids = []
        for _ in range(200):
            r = http.post("/v1/models/tanh/linearize", content=body)
            statuses.append(r.status_code)
            ids.append(wire.load_npz(r.content)["session"]["id"])
            for sid in ids[-40:]:  # products on recent sessions, some evicted by now
                statuses.append(http.post(f"/v1/sessions/{sid}/jvp", content=tangent).status_code)
        assert gauge(http, "gradserve_session_bytes") <= 3 * 2**20
        evicted = gauge(http, "gradserve_session_evictions_total")
    assert all(s < 500 for s in statuses)
    assert set(statuses) == {200, 404} and evicted > 150


def test_faulty_models_and_hostile_ids_never_5xx(limited: Any) -> None:
    """Model code failing while tracing or running, limits, and made-up ids: clean 4xx."""
    post = lambda path, doc: limited.post(path, content=wire.dumps(doc), headers=JSON)  # noqa: E731
    r = post("/v1/models/boom/linearize", {"args": [[1.0, 2.0]]})
    assert r.status_code == 422 and r.json()["code"] == "model_error", r.text
    r = post("/v1/models/callback_boom/linearize", {"args": [[1.0]]})
    assert r.status_code == 422 and r.json()["code"] == "model_error", r.text
    big = npz({"args": [np.zeros(60_000, np.float32)]})  # over max_output_elements
    r = limited.post("/v1/models/tanh/linearize", content=big, headers={"content-type": wire.NPZ})
    assert r.status_code == 413 and r.json()["code"] == "output_too_large", r.text
    sid = post("/v1/models/tanh/linearize", {"args": [[1.0, 2.0]]}).json()["session"]["id"]
    r = post(f"/v1/sessions/{sid}/jvp", {"tangents": [[[1.0, 2.0]] * 17], "batched": True})
    assert r.status_code == 413 and r.json()["code"] == "batch_too_large", r.text
    for hostile in ("x" * 5000, "..%2F..%2Fetc", "%00", sid + "x", sid.upper()):
        for method in ("GET", "DELETE"):
            r = limited.request(method, f"/v1/sessions/{hostile}")
            # An id that decodes to another path ("../") meets no route: a plain 404.
            assert r.status_code == 404 and r.json()["code"].endswith("not_found"), r.text
        r = post(f"/v1/sessions/{hostile}/vjp", {"cotangent": [1.0, 2.0]})
        assert r.status_code == 404, r.text
    assert limited.get(f"/v1/sessions/{sid}").status_code == 200


JSON = {"content-type": wire.JSON}
