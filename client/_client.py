"""`Client` and `AsyncClient`: they differ only in how a request is sent and a pause is taken.

This is the one module that touches the HTTP library (httpx); everything else is the shared,
I/O-free core in `client._core`. Exchanges the core flags `bulk` (an npz body over
`BULK_THRESHOLD` either way) go over `client._bulk` (`http.client`, no 64 KB pieces, no joins)
when the client owns its HTTP; httpx carries the rest, whose latency on small bodies is lower.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import httpx

from client import _bulk
from client._core import Core, Flow, HTTPRequest, HTTPResponse, ModelInfo, Sleep
from client._remote import RemoteFunction
from client.errors import ConnectError, Timeout, TransportError


def _response(r: Any) -> HTTPResponse:
    return HTTPResponse(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)


def _library(http: Any) -> ModuleType:
    """httpx, or its fork httpx2 (same API, its own exception classes) when the caller passes
    one of its clients."""
    for cls in type(http).__mro__:
        root = cls.__module__.split(".")[0]
        if root in ("httpx", "httpx2"):
            return sys.modules[root]
    return httpx


def _transport_error(lib: ModuleType, e: Exception, url: str) -> TransportError:
    # A connection refused, reset or dropped before any answer: safe to retry, since every op
    # is a pure function of its request.
    if isinstance(e, (lib.ConnectError, lib.ConnectTimeout, lib.RemoteProtocolError)):
        return ConnectError(f"cannot reach {url}: {e}")
    # A pooled connection the server closed while idle fails on reuse with a read or write
    # error: retried like a refused one, for the same reason.
    if isinstance(e, (lib.ReadError, lib.WriteError)):
        return ConnectError(f"connection to {url} dropped before an answer: {type(e).__name__} {e}")
    if isinstance(e, lib.TimeoutException):
        return Timeout(f"no answer from {url} within the timeout: {e}")
    return TransportError(f"{type(e).__name__} talking to {url}: {e}")


class _BaseClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.1,
        encoding: str = "auto",
        headers: Mapping[str, str] | None = None,
        bulk: bool = True,
    ) -> None:
        self._bulk_wanted = bulk
        self._pool: _bulk.Pool | None = None
        self._core = Core(
            base_url,
            api_key=api_key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            encoding=encoding,
            headers=headers,
        )

    def _request(self, req: HTTPRequest) -> dict[str, Any]:
        return {
            "method": req.method,
            "url": self._core.url(req.path),
            "headers": req.headers,
            "content": req.body(),
            "timeout": req.timeout,
        }

    def _own_http(self, owns: bool) -> None:
        """The bulk pool, when this client made its own httpx client (one passed in carries
        everything: its transport, hooks and proxies are the caller's) and can reach the
        server as httpx would."""
        self._owns_http = owns
        if owns and self._bulk_wanted and _bulk.usable(self._core.base_url):
            https = self._core.base_url.startswith("https:")
            # httpx's own default TLS context (certifi or SSL_CERT_FILE): same verification.
            context = httpx.create_ssl_context() if https else None
            self._pool = _bulk.Pool(self._core.base_url, context)

    def _bulk_send(self, req: HTTPRequest) -> HTTPResponse:
        assert self._pool is not None
        status, headers, content = self._pool.request(
            req.method, req.path, req.headers, req.content, req.timeout
        )
        return HTTPResponse(status, headers, content)

    def _info_now(self, name: str) -> ModelInfo:
        raise RuntimeError(
            f"the spec of {name!r} is not fetched yet: `await client.model_info({name!r})` first"
        )

    def _run(self, flow: Flow) -> Any:
        raise NotImplementedError


class Client(_BaseClient):
    """A blocking client for a gradserve server.

    Args:
      base_url: the server, e.g. ``"http://127.0.0.1:8000"``.
      api_key: sent as ``Authorization: Bearer <key>``.
      timeout: seconds one call may take in all, retries and back-off included.
      retries: how often to retry a refused connection, a 429 or a 503.
      encoding: ``"auto"`` (JSON with base64 array leaves when small, npz when large),
        ``"json"`` (plain numbers), ``"base64"`` or ``"npz"``.
      http_client: an ``httpx.Client`` to send with (its transport, hooks, limits); the caller
        closes it. Every request goes through it then.
      bulk: send exchanges with an npz body either way (24 KiB or more) over the standard
        library's ``http.client``, faster than httpx for them (no 64 KB pieces, no joins);
        ``False`` sends all through httpx (e.g. behind a proxy httpx is configured for). Off
        by itself when ``http_client`` is given or an ``HTTP(S)_PROXY`` variable applies to
        ``base_url``.

    >>> with Client("http://127.0.0.1:8000") as c:
    ...     grad(grad(c.model("tanh")))(2.0)
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        http_client: httpx.Client | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, **options)
        self._own_http(http_client is None)
        self._http = http_client or httpx.Client()
        self._lib = _library(self._http)

    def _run(self, flow: Flow) -> Any:
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = flow.throw(error) if error is not None else flow.send(reply)
            except StopIteration as stop:
                return stop.value
            reply, error = None, None
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                continue
            if step.bulk and self._pool is not None:
                try:
                    reply = self._bulk_send(step)
                except TransportError as e:
                    error = e
                continue
            try:
                reply = _response(self._http.request(**self._request(step)))
            except self._lib.TransportError as e:
                error = _transport_error(self._lib, e, self._core.base_url)

    def model(self, name: str) -> RemoteFunction:
        """The remote function for a served model; its spec is fetched now (once per client),
        so an unknown name fails here with `ModelNotFound`."""
        self._info_now(name)
        return RemoteFunction(self, name)

    def model_info(self, name: str) -> ModelInfo:
        """The model's description: version, device, input specs, output spec, ops."""
        return self._info_now(name)

    def _info_now(self, name: str) -> ModelInfo:
        return self._run(self._core.info(name))

    def models(self) -> list[ModelInfo]:
        """Every served model (name, version, description, device)."""
        return self._run(self._core.models())

    def close(self) -> None:
        if self._owns_http:
            self._http.close()
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_BaseClient):
    """The asyncio twin of `Client`: same arguments (``http_client`` an ``httpx.AsyncClient``);
    remote functions return awaitables.

    >>> async with AsyncClient("http://127.0.0.1:8000") as c:
    ...     await grad(c.model("tanh"))(2.0)
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        http_client: httpx.AsyncClient | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, **options)
        self._own_http(http_client is None)
        self._http = http_client or httpx.AsyncClient()
        self._lib = _library(self._http)

    async def _run(self, flow: Flow) -> Any:
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = flow.throw(error) if error is not None else flow.send(reply)
            except StopIteration as stop:
                return stop.value
            reply, error = None, None
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                continue
            if step.bulk and self._pool is not None:
                # On a worker thread: the exchange blocks, but releases the GIL on the socket.
                try:
                    reply = await asyncio.to_thread(self._bulk_send, step)
                except TransportError as e:
                    error = e
                continue
            try:
                reply = _response(await self._http.request(**self._request(step)))
            except self._lib.TransportError as e:
                error = _transport_error(self._lib, e, self._core.base_url)

    def model(self, name: str) -> RemoteFunction:
        """The remote function for a served model; its spec is fetched with the first call."""
        return RemoteFunction(self, name)

    async def model_info(self, name: str) -> ModelInfo:
        """The model's description: version, device, input specs, output spec, ops."""
        return await self._run(self._core.info(name))

    async def models(self) -> list[ModelInfo]:
        """Every served model (name, version, description, device)."""
        return await self._run(self._core.models())

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()
        if self._pool is not None:
            self._pool.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
