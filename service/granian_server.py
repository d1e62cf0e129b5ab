"""`gradserve serve --server granian`: the same app on granian, a Rust HTTP server.

granian receives a request body whole in Rust and hands it over in one piece, where uvicorn
passes it up in socket-sized chunks with flow control in between: a bare 8 MB-in/4 MB-out echo
took about half the time (docs/benchmarks.md). uvicorn stays the default (see README, "Server").

granian runs *embedded*: in this process, on this event loop, with the app object itself, so
settings, engine and metrics are exactly those uvicorn would serve. The SIGTERM drain is the
same as uvicorn's (service/shutdown.py): `/readyz` and new work answer 503 for
`shutdown_drain_s`, then granian stops and lets in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from fastapi import FastAPI

from service import transport
from service.settings import Settings

log = logging.getLogger("gradserve")


def serve_granian(app: FastAPI, settings: Settings) -> int:
    """Serve `app` with granian until stopped; 0 after a stop, 3 when it could not start."""
    try:
        from granian.constants import HTTPModes, Interfaces
        from granian.log import LogLevels
        from granian.server.embed import Server
    except ImportError:
        log.error("--server granian needs granian: pip install 'gradserve[granian]'")
        return 3

    server = Server(
        app,
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        http=HTTPModes.http1,
        http1_settings=transport.granian_http1_settings(settings),  # 431, head timeout
        websockets=False,
        log_level=LogLevels(settings.log_level.lower()),
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        draining: list[asyncio.TimerHandle] = []

        def on_signal(sig: int) -> None:
            state = getattr(app.state, "gradserve", None)
            if state is not None:
                state.draining = True
            if sig == signal.SIGTERM and not draining and settings.shutdown_drain_s > 0:
                log.info("SIGTERM: draining for %.1f s (readyz 503)", settings.shutdown_drain_s)
                draining.append(loop.call_later(settings.shutdown_drain_s, server.stop))
                return
            server.stop()  # a second signal, or SIGINT: stop now

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await server.serve()

    try:
        asyncio.run(main())
    except (OSError, RuntimeError) as e:
        log.error("granian could not start: %s", e)
        return 3
    return 0
