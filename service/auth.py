"""API keys: `Authorization: Bearer <key>`, checked by a small ASGI layer before any route runs.

HTTP Basic whose password is a key (`Authorization: Basic base64(user:KEY)`) is accepted too,
on every path: it is how a key travels in a URL (`http://user:KEY@host:8000`), the only way
UM-Bridge's clients (Python, C++, R, MATLAB, Julia) can send one. The user name is ignored.

Keys come from `GRADSERVE_API_KEYS` (`key[:scope+scope]`, comma-separated) or from
`GRADSERVE_API_KEYS_FILE`, which holds only SHA-256 hashes (`gradserve hash-key` writes its
lines), so a leaked file gives no key away. Every key is hashed and compared with
`hmac.compare_digest` against every entry, so the time taken says nothing about which key
(or how much of one) matched.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from client.errors import Unauthorized
from service.errors import UMBRIDGE_PATHS, render
from service.settings import Settings

log = logging.getLogger("gradserve")

# `metrics`: a key that may only read /metrics (for Prometheus), never compute.
SCOPES = frozenset({"compute", "admin", "metrics"})
DEFAULT_SCOPES = frozenset({"compute"})
OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
_REALM = 'Bearer realm="gradserve"'


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _scopes(text: str, where: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split("+") if s.strip())
    unknown = scopes - SCOPES
    if unknown or not scopes:
        raise ValueError(
            f"{where}: unknown scope(s) {sorted(unknown) or text!r}; known: {sorted(SCOPES)}"
        )
    return scopes


@dataclass(frozen=True)
class KeyRing:
    """The configured keys as (sha256 digest, scopes) pairs; empty means authentication is off."""

    entries: tuple[tuple[bytes, frozenset[str]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.entries)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Keys from the environment and the keys file; `ValueError` for a malformed one."""
        entries: list[tuple[bytes, frozenset[str]]] = []
        if settings.api_keys is not None:
            for n, item in enumerate(settings.api_keys.get_secret_value().split(",")):
                key, _, scopes = item.strip().partition(":")
                if not key:
                    continue
                where = f"GRADSERVE_API_KEYS entry {n + 1}"
                entries.append((digest(key), _scopes(scopes, where) if scopes else DEFAULT_SCOPES))
        if settings.api_keys_file is not None:
            from_file = list(read_keys_file(settings.api_keys_file))
            if not from_file:  # fail closed: a keys file with no keys must not mean "open"
                raise ValueError(f"{settings.api_keys_file} holds no keys")
            entries += from_file
        return cls(tuple(entries))

    def authenticate(self, header: str | None) -> frozenset[str]:
        """The scopes of the key in an Authorization header; `Unauthorized` (401) without one."""
        if not header:
            raise Unauthorized(
                "this server needs an API key: send 'Authorization: Bearer <key>', or put it "
                "in the URL as the password (http://user:KEY@host)",
                code="missing_key",
                headers={"WWW-Authenticate": _REALM},
            )
        given = digest(_key_of(header))
        scopes: frozenset[str] | None = None
        for stored, entry_scopes in self.entries:  # no early exit: same time for every key
            if hmac.compare_digest(given, stored) and scopes is None:
                scopes = entry_scopes
        if scopes is None:
            raise Unauthorized(
                "the API key is not valid",
                code="invalid_key",
                headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
            )
        return scopes


def _key_of(header: str) -> str:
    """The key in `Bearer <key>`, or the password of `Basic base64(user:password)`."""
    scheme, _, credentials = header.strip().partition(" ")
    scheme, credentials = scheme.lower(), credentials.strip()
    key = ""
    if scheme == "bearer":
        key = credentials
    elif scheme == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        key = decoded.partition(":")[2]  # RFC 7617: the user name holds no colon
    if not key:
        raise Unauthorized(
            "the Authorization header must be 'Bearer <key>', or 'Basic' credentials whose "
            "password is the key",
            code="invalid_key",
            headers={"WWW-Authenticate": f'{_REALM}, error="invalid_request"'},
        )
    return key


def read_keys_file(path: Path) -> Iterable[tuple[bytes, frozenset[str]]]:
    """Lines `<sha256 hex>[:scope+scope]`; blank lines and `#` comments are skipped."""
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        hexdigest, _, scopes = line.partition(":")
        where = f"{path}:{n}"
        try:
            stored = bytes.fromhex(hexdigest.strip())
        except ValueError:
            stored = b""
        if len(stored) != 32:
            raise ValueError(
                f"{where}: expected a sha256 hex digest (64 hex digits); see `gradserve hash-key`"
            )
        yield stored, _scopes(scopes, where) if scopes else DEFAULT_SCOPES


def required_scope(path: str) -> str | None:
    """None: open to all. "": any valid key. Else the scope the path needs."""
    if path in OPEN_PATHS or path.startswith("/static/"):  # stylesheet, script, docs assets
        return None
    if path.startswith("/models/"):  # model pages compute (their point, their plots)
        return "compute"
    if path == "/v1" or path.startswith("/v1/") or path in UMBRIDGE_PATHS:
        return "compute"
    if path == "/admin" or path.startswith("/admin/"):
        return "admin"
    return ""  # /metrics, and unknown paths (so a 404 says nothing to a stranger)


class Authenticate:
    """Pure ASGI, inside RequestContext, so refusals carry a request id and are counted."""

    def __init__(self, app: ASGIApp, keyring: KeyRing) -> None:
        self.app, self.keyring = app, keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (need := required_scope(scope["path"])) is None:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        try:
            scopes = self.keyring.authenticate(header)
            if need and need not in scopes:
                raise Unauthorized(
                    f"this key lacks the {need!r} scope that {scope['path']} needs",
                    code="insufficient_scope",
                    status=403,
                    headers={
                        "WWW-Authenticate": f'{_REALM}, error="insufficient_scope", scope="{need}"'
                    },
                )
        except Unauthorized as e:
            if e.status == 401 and is_page(scope["path"]):
                e.headers = {"WWW-Authenticate": BASIC_CHALLENGE}  # the browser's own prompt
            request_id = scope.get("state", {}).get("request_id")
            await render(e, request_id, scope["path"])(scope, receive, send)
            return
        scope.setdefault("state", {})["scopes"] = scopes
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------- pages (browsers)

BASIC_CHALLENGE = 'Basic realm="gradserve", charset="UTF-8"'


def is_page(path: str) -> bool:
    """The HTML pages (service/pages.py): a browser asks for a key with its Basic prompt."""
    return path in ("/", "/live.json") or path.startswith("/models/")


def install(app: FastAPI, settings: Settings) -> KeyRing:
    """Add the key check when keys are configured; the keys, empty when they are not."""
    keyring = KeyRing.from_settings(settings)
    if keyring:
        app.add_middleware(Authenticate, keyring=keyring)
    return keyring


def document(schema: dict[str, Any]) -> None:
    """Mark in an OpenAPI schema each operation that needs a bearer key."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["bearer"] = {"type": "http", "scheme": "bearer"}
    schemes["basic"] = {
        "type": "http",
        "scheme": "basic",
        "description": "any user name, the key as the password (a key in a URL)",
    }
    for path, operations in schema.get("paths", {}).items():
        if required_scope(path) is not None:
            for operation in operations.values():
                operation["security"] = [{"bearer": []}, {"basic": []}]


# ---------------------------------------------------------------------------- binding


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def bind_refusal(settings: Settings, keyring: KeyRing) -> str | None:
    """Why the server must not start on `settings.host` (None: it may)."""
    if keyring or is_loopback(settings.host):
        return None
    if settings.insecure:
        log.warning(
            "!!! INSECURE: serving on %s WITHOUT API KEYS: anyone who can reach this port can "
            "run work on this machine's devices. Set GRADSERVE_API_KEYS or "
            "GRADSERVE_API_KEYS_FILE. !!!",
            settings.host,
        )
        return None
    return (
        f"gradserve: refusing to serve on {settings.host} without API keys: anyone who can "
        "reach it could run work on this machine. Set GRADSERVE_API_KEYS or "
        "GRADSERVE_API_KEYS_FILE (see SECURITY.md), bind 127.0.0.1, or pass --insecure if "
        "something else in front of it authenticates."
    )


# ---------------------------------------------------------------------------- CLI


def add_hash_key_command(commands: Any) -> None:
    cmd = commands.add_parser(
        "hash-key",
        help="print a keys-file line (sha256 of a key read from stdin, or of a new key)",
        description="Reads a key from stdin (so it stays out of shell history) and prints the "
        "line for GRADSERVE_API_KEYS_FILE. With --generate, makes a new key and prints it first.",
    )
    cmd.add_argument("--scopes", default="compute", help="scopes joined by '+' (default compute)")
    cmd.add_argument("--generate", action="store_true", help="generate a new random key")


def hash_key_main(args: argparse.Namespace) -> int:
    try:
        scopes = "+".join(sorted(_scopes(args.scopes, "--scopes")))
    except ValueError as e:
        print(f"gradserve: {e}", file=sys.stderr)
        return 2
    if args.generate:
        key = secrets.token_urlsafe(32)
        print(f"key: {key}")
    else:
        key = sys.stdin.readline().strip()
        if not key:
            print("gradserve: no key on stdin", file=sys.stderr)
            return 2
    line = f"{hashlib.sha256(key.encode()).hexdigest()}:{scopes}"
    print(f"line: {line}" if args.generate else line)
    return 0
