"""schemathesis against the served OpenAPI schema: every endpoint, no 5xx, and every response
(status, content type, headers, body) as the schema documents it."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def api_schema(start_server):
    # Quiet access logs (the server's stdout is a pipe nobody reads until it exits); a big
    # shape budget, so random shapes reach the engine instead of stopping at 429.
    server = start_server(
        "--log-level", "warning", env={"GRADSERVE_MAX_SHAPES_PER_MINUTE": "100000"}
    )
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("GRADSERVE_FUZZ_EXAMPLES", "25")),  # CI: bounded
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api(case):
    case.call_and_validate(checks=CHECKS, timeout=30)
