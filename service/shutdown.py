"""Run uvicorn with a graceful stop: SIGTERM drains, finishes in-flight work, then exits 0.

On SIGTERM the server first *drains* for `shutdown_drain_s`: it still accepts connections, but
`/readyz` and new work answer 503, so a load balancer takes it out of rotation while nothing is
refused at the TCP level. Then uvicorn stops listening and gives in-flight requests
`shutdown_grace_s` to finish. A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service import transport
from service.settings import Settings

log = logging.getLogger("gradserve")


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, with a drain phase before its own graceful shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self.app, self.drain_s = app, drain_s
        self._drain: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self.app.state, "gradserve", None)
        if state is not None:
            state.draining = True
        if (
            sig == signal.SIGTERM
            and self._drain is None
            and self.drain_s > 0
            and not self.should_exit
        ):
            log.info("SIGTERM: draining for %.1f s (readyz 503, new work refused)", self.drain_s)
            self._drain = threading.Timer(self.drain_s, self._stop)
            self._drain.daemon = True
            self._drain.start()
            return
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has stopped, which would make a clean, graceful
        # stop exit with 143 (killed by SIGTERM) instead of 0.
        getattr(self, "_captured_signals", []).clear()

    def _stop(self) -> None:
        log.info(
            "drained; finishing in-flight requests (up to %.0f s)",
            self.config.timeout_graceful_shutdown or 0,
        )
        self.should_exit = True


def serve(app: FastAPI, settings: Settings) -> int:
    """Serve `app` until stopped; 0 after a graceful stop, 3 when it could not start."""
    if settings.server == "granian":
        from service.granian_server import serve_granian

        return serve_granian(app, settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
        timeout_keep_alive=settings.keep_alive_s,
        **transport.uvicorn_options(settings, getattr(app.state, "metrics", None)),
    )
    server = DrainingServer(config, app, settings.shutdown_drain_s)
    server.run()
    return 0 if server.started else 3
