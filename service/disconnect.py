"""Cancelled work: when a client goes away before its answer, its work is dropped.

An ASGI layer watches each computing request for the client's disconnect, from shortly after
its body has been read (`WATCH_AFTER_S`; GET requests, which have none, from the start). A
request whose client is gone:

- while its body was still arriving, stops there (nothing was queued);
- while queued, is marked cancelled: no worker starts it, and no batch waits for it;
- while running, lets the XLA computation finish (nothing can stop one midway) and its
  result is dropped instead of encoded.

The engine learns of the disconnect through `current()`, a context variable the layer sets,
so every door that computes through the engine (v1, sessions, UM-Bridge, the pages' plots)
is covered without knowing about it. `gradserve_cancelled_requests{stage}` counts them; the
request itself is recorded with status 499 (nginx's "client closed request"): no answer left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextvars import ContextVar

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client.errors import ServerBusy
from service.errors import render
from service.metrics import Metrics

log = logging.getLogger("gradserve")

CLIENT_CLOSED = 499
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})
# Watching starts this long after the body is read: most requests are answered before, and
# never pay for a watcher task (two turns of the event loop, a third of a tiny grad's time
# there). A client that leaves earlier is noticed when watching starts.
WATCH_AFTER_S = 0.01


class ClientGone(Exception):
    """The client of this request disconnected; nobody is left to answer.

    Not an `APIError`, so no route answers it: it rises to `CancelOnDisconnect`, which records
    the request as 499. Should it reach a request whose client is still there (one sharing a
    cached computation with the one that left), that client gets a 503 and retries.
    """


def _retry(scope: Scope) -> ServerBusy:
    return ServerBusy(
        f"the computation {scope['path']} waited for was cancelled (its first client "
        "disconnected); retry",
        code="cancelled",
        status=503,
        headers={"Retry-After": "1"},
    )


class Watch:
    """One request's link to its client: hooks run once, when the client disconnects."""

    def __init__(self) -> None:
        self.gone = False
        self._hooks: list[Callable[[], None]] = []

    def on_disconnect(self, hook: Callable[[], None]) -> None:
        if self.gone:
            hook()
        else:
            self._hooks.append(hook)

    def fire(self) -> None:
        if self.gone:
            return
        self.gone = True
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()


_current: ContextVar[Watch | None] = ContextVar("gradserve_watch", default=None)


def current() -> Watch | None:
    """The running request's watch (None outside a watched request)."""
    return _current.get()


class CancelOnDisconnect:
    """Pure ASGI, inside the key and quota checks: watches requests whose path computes."""

    def __init__(self, app: ASGIApp, metrics: Metrics, watched: Callable[[Scope], bool]) -> None:
        self.app, self.metrics, self.watched = app, metrics, watched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.watched(scope):
            await self.app(scope, receive, send)
            return
        watch = Watch()
        responded = False
        watcher: asyncio.Task[None] | None = None
        timer: asyncio.TimerHandle | None = None

        async def wait_for_disconnect() -> None:
            # After the body, the server's receive() returns only when the client leaves or
            # the response is complete; the empty messages in between carry nothing.
            while (await receive())["type"] != "http.disconnect":
                pass
            if not responded:
                watch.fire()

        def watch_now() -> None:
            nonlocal watcher
            if watcher is None and not responded:
                watcher = asyncio.create_task(wait_for_disconnect())

        def start_watching() -> None:
            nonlocal timer
            if timer is None:
                timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, watch_now)

        async def receive_and_note() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                watch.fire()
            elif not message.get("more_body", False):
                start_watching()
            return message

        async def send_and_note(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                responded = True
            await send(message)

        if scope["method"] in _BODYLESS:
            start_watching()
        token = _current.set(watch)
        try:
            await self.app(scope, receive_and_note, send_and_note)
        except (ClientGone, ClientDisconnect) as error:
            if isinstance(error, ClientGone) and not watch.gone and not responded:
                # Another request's client left a computation this one shared.
                request_id = scope.get("state", {}).get("request_id")
                await render(_retry(scope), request_id, scope["path"])(scope, receive, send)
                return
            if isinstance(error, ClientDisconnect):  # the engine counts the later stages
                self.metrics.cancelled.labels("reading").inc()
            log.info(
                "client of %s %s disconnected; its work was dropped", scope["method"], scope["path"]
            )
            # Never written (the connection is gone); it makes the request metrics say 499.
            with contextlib.suppress(Exception):
                await send({"type": "http.response.start", "status": CLIENT_CLOSED, "headers": []})
        finally:
            _current.reset(token)
            if timer is not None:
                timer.cancel()
            if watcher is not None:
                watcher.cancel()
