"""Apps with small limits (so hostile inputs are cheap to make) and with API keys."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hardening_util import FAULTY_MODELS, FILE_KEY, KEYS, LIMITS
from starlette.testclient import TestClient

from service import Settings, create_app


@pytest.fixture(scope="session")
def limited() -> Iterator[TestClient]:
    """Built-in and faulty models, with small limits; a bug answers 500 instead of raising."""
    # No warm-up: it would trace the faulty models (one sleeps 3 s while tracing).
    settings = Settings(models=[FAULTY_MODELS], warmup=False, **LIMITS)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys"
    digest = hashlib.sha256(FILE_KEY.encode()).hexdigest()
    path.write_text(f"# gradserve keys: sha256 hex, scopes\n\n{digest}:compute  # ci\n")
    return path


@pytest.fixture(scope="session")
def keyed(keys_file: Path) -> Iterator[TestClient]:
    """Keys from the environment form (with scopes) and from a file of hashes."""
    env_keys = (
        f"{KEYS['compute']},{KEYS['admin']}:admin,{KEYS['both']}:compute+admin,"
        f"{KEYS['metrics']}:metrics"
    )
    settings = Settings(api_keys=env_keys, api_keys_file=keys_file)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client
