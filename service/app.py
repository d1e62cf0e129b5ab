"""`create_app(settings)`: the FastAPI application. Nothing is built at import time."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import auth, errors, pages, umbridge
from service.engine import Engine, configure_jax
from service.limits import ShapeBudget
from service.metrics import Metrics
from service.registry import Registry
from service.routes import router
from service.schemas import REQUESTS
from service.session_routes import router as session_router
from service.settings import Settings
from service.state import State

log = logging.getLogger("gradserve")

BUILTIN_MODELS = "service.models.cookbook"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# PROTOCOL.md: every response has Server-Timing with queue, compile and compute.
_NO_COMPUTE_TIMING = "queue;dur=0, compile;dur=0, compute;dur=0"


def build_state(settings: Settings, metrics: Metrics) -> State:
    """Configure JAX, load the models and start the engine (blocking: JAX work)."""
    configure_jax(settings)
    registry = Registry()
    for source in ([BUILTIN_MODELS] if settings.builtin_models else []) + settings.models:
        loaded = registry.load(source)
        log.info("loaded %d model(s) from %s", len(loaded), source)
    return State(settings, registry, Engine(registry, settings, metrics), metrics)


class RequestContext:
    """Outermost layer: request id, request metrics, and a clean 500 for any bug below.

    Pure ASGI rather than BaseHTTPMiddleware, which costs a task and a stream per request.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        # Ids need to be unique, not unguessable: a random prefix per process and a counter
        # cost nothing, where uuid4 reads the kernel's entropy on every request.
        self._id_prefix = uuid.uuid4().hex[:16]
        self._ids = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = (
            given if _REQUEST_ID.fullmatch(given) else f"{self._id_prefix}{next(self._ids):016x}"
        )
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started, status = True, message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                if "server-timing" not in headers:  # errors and non-compute routes
                    total = (time.perf_counter() - started) * 1e3
                    headers["server-timing"] = _NO_COMPUTE_TIMING + f", total;dur={total:.3f}"
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if not response_started:
                await errors.internal_error(request_id)(scope, receive, send_with_id)
        finally:
            model, op = scope.get("gradserve.labels", ("-", "other"))
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(model, op, str(status)).inc()
            self.metrics.latency.labels(model, op).observe(elapsed)
            if model != "-":  # the pages' live figures (service/live.py)
                self.metrics.recent.record(model, status, elapsed, scope.get("gradserve.batch"))


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; its lifespan loads models and starts the engine."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await run_in_threadpool(build_state, settings, metrics)
        app.state.gradserve = state
        # Serve (healthz, 503 on readyz) while warming, so orchestrators see a live process.
        state.ready = not settings.warmup
        warming = asyncio.create_task(_warm_up(state))
        try:
            yield
        finally:
            state.draining = True
            warming.cancel()
            state.engine.close()

    app = FastAPI(
        title="gradserve",
        version="1",
        summary="Remote derivatives of JAX models: grad, jacobians, hessians, jvp, vjp, hvp.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from service.pages, with their files served here
        redoc_url=None,
    )
    errors.install(app)
    # Before `router`: its POST /v1/models/{name}/{op} catches every op name.
    app.include_router(session_router)
    app.include_router(router)
    umbridge.install(app, settings)  # UM-Bridge 1.0 at the root paths
    app.state.shape_budget = ShapeBudget(settings.max_shapes_per_minute)
    keyring = auth.install(app, settings)  # inside RequestContext: refusals get ids, metrics
    pages.install(app, with_keys=bool(keyring))
    app.add_middleware(RequestContext, metrics=metrics)
    _document(app, with_keys=bool(keyring))
    return app


async def _warm_up(state: State) -> None:
    if not state.ready:
        started = time.perf_counter()
        compiled = await run_in_threadpool(state.engine.warm_up)
        log.info("warm: %d program(s) compiled in %.1f s", compiled, time.perf_counter() - started)
        state.ready = True
    # JAX, the models and the compiled programs are a large heap that lives as long as the
    # process; moving it out of the collector's sight keeps each request's GC pass short.
    gc.freeze()


def _document(app: FastAPI, with_keys: bool) -> None:
    """The OpenAPI schema: FastAPI's, plus what it cannot see, built once on first use.

    Op routes read raw bodies (JSON or npz), so their request schemas are published here;
    errors are problem+json; with keys, operations say they need one.
    """
    generate = app.openapi  # FastAPI's; it keeps its result in `app.openapi_schema`

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _, defs = models_json_schema(
                [(m, "validation") for m in REQUESTS.values()],
                ref_template="#/components/schemas/{model}",
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            if with_keys:
                auth.document(schema)
            errors.document(schema, auth.OPEN_PATHS)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
