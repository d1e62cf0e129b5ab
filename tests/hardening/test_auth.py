"""API keys: 401 without or with a wrong key, 403 without the scope, health open, metrics not."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys

import pytest
from hardening_util import FILE_KEY, KEYS, assert_problem, still_serving

from service import auth
from service.settings import Settings

ROOT_CMD = [sys.executable, "-m", "service"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_key"),
        (bearer("not-a-key"), "invalid_key"),
        (bearer(KEYS["compute"] + "x"), "invalid_key"),
        ({"Authorization": f"Basic {KEYS['compute']}"}, "invalid_key"),
        ({"Authorization": "Bearer "}, "invalid_key"),
    ],
)
def test_missing_or_wrong_key_is_401(keyed, headers, code):
    response = keyed.post("/v1/models/tanh/eval", json={"args": [1.0]}, headers=headers)
    assert_problem(response, 401, code)
    assert response.headers["www-authenticate"].startswith("Bearer")
    still_serving(keyed, **bearer(KEYS["compute"]))


def test_key_without_the_scope_is_403(keyed):
    response = keyed.get("/v1/models", headers=bearer(KEYS["admin"]))
    body = assert_problem(response, 403, "insufficient_scope", "'compute'")
    assert 'scope="compute"' in response.headers["www-authenticate"]
    assert body["title"]
    still_serving(keyed, **bearer(KEYS["both"]))


def test_a_metrics_key_reads_metrics_and_cannot_compute(keyed):
    assert keyed.get("/metrics", headers=bearer(KEYS["metrics"])).status_code == 200
    response = keyed.post(
        "/v1/models/tanh/eval", json={"args": [1.0]}, headers=bearer(KEYS["metrics"])
    )
    assert_problem(response, 403, "insufficient_scope", "'compute'")
    still_serving(keyed, **bearer(KEYS["compute"]))


def test_keys_from_the_hashed_file_work(keyed):
    still_serving(keyed, **bearer(FILE_KEY))
    # The file holds the hash: sending the hash itself is not the key.
    digest = hashlib.sha256(FILE_KEY.encode()).hexdigest()
    assert_problem(keyed.get("/v1/models", headers=bearer(digest)), 401, "invalid_key")


def test_health_is_open_and_metrics_need_a_key(keyed):
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200
    assert keyed.get("/openapi.json").status_code == 200
    assert_problem(keyed.get("/metrics"), 401, "missing_key")
    for key in KEYS.values():
        assert keyed.get("/metrics", headers=bearer(key)).status_code == 200
    # Unknown paths say nothing (not even 404) to a caller without a key.
    assert_problem(keyed.get("/nothing-here"), 401, "missing_key")
    still_serving(keyed, **bearer(KEYS["compute"]))


def test_openapi_documents_bearer_auth(keyed):
    schema = keyed.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert schema["components"]["securitySchemes"]["basic"]["scheme"] == "basic"  # key in a URL
    assert schema["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}, {"basic": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_every_key_is_compared_not_looked_up():
    """Timing: a match does not stop the scan, so the position of the key is not observable."""
    ring = auth.KeyRing.from_settings(Settings(api_keys="a,b:admin,c:compute+admin"))
    assert ring.authenticate("Bearer c") == {"compute", "admin"}
    assert ring.authenticate("bearer b") == {"admin"}
    assert ring.authenticate("Bearer a") == {"compute"}


@pytest.mark.parametrize(
    ("line", "message"),
    [("abc", "sha256 hex"), ("0" * 64 + ":root", "unknown scope"), ("", "holds no keys")],
)
def test_malformed_keys_file_refuses_to_start(tmp_path, line, message):
    path = tmp_path / "keys"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        auth.KeyRing.from_settings(Settings(api_keys_file=path))


# ---------------------------------------------------------------------------- binding


def test_public_bind_without_keys_exits_with_a_clear_message():
    done = subprocess.run(
        [*ROOT_CMD, "serve", "--host", "0.0.0.0", "--port", "9"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert done.returncode != 0
    assert "refusing to serve on 0.0.0.0 without API keys" in done.stderr
    assert "GRADSERVE_API_KEYS" in done.stderr and "--insecure" in done.stderr


@pytest.mark.parametrize(
    ("host", "keys", "insecure", "allowed"),
    [
        ("127.0.0.1", None, False, True),
        ("::1", None, False, True),
        ("localhost", None, False, True),
        ("0.0.0.0", None, False, False),
        ("::", None, False, False),
        ("10.1.2.3", None, False, False),
        ("example.org", None, False, False),
        ("0.0.0.0", "k", False, True),
        ("0.0.0.0", None, True, True),
    ],
)
def test_bind_rule(host, keys, insecure, allowed, caplog):
    settings = Settings(host=host, api_keys=keys, insecure=insecure)
    with caplog.at_level(logging.WARNING, logger="gradserve"):
        refusal = auth.bind_refusal(settings, auth.KeyRing.from_settings(settings))
    assert (refusal is None) == allowed
    assert ("INSECURE" in caplog.text) == (insecure and not keys)


def test_hash_key_command_writes_a_keys_file_line():
    done = subprocess.run(
        [*ROOT_CMD, "hash-key", "--scopes", "admin+compute"],
        input="s3cret\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == hashlib.sha256(b"s3cret").hexdigest() + ":admin+compute"


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("GRADSERVE_")}
