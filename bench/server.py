"""The benchmark's server: `gradserve`'s own app plus one no-op route.

`POST /bench/noop` reads the body and answers a small JSON document through the same uvicorn,
middleware and error handling as the model routes, so "grad vs no-op" isolates what the
model work itself adds to a round trip.

    python -m bench.server --port 8000 [GRADSERVE_* environment as usual]
"""

from __future__ import annotations

import argparse
import logging
import sys

from fastapi import Request, Response

from service import Settings, create_app
from service.shutdown import serve
from service.transport import raise_file_limit


def build_app(settings: Settings):
    app = create_app(settings)

    @app.post("/bench/noop", include_in_schema=False)
    async def noop(request: Request) -> Response:
        await request.body()
        return Response(b'{"value":null}', media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")
    # GRADSERVE_SERVER picks the stack; served exactly as `gradserve serve` serves it.
    settings = Settings(host="127.0.0.1", port=args.port, log_level="warning")
    raise_file_limit()
    sys.exit(serve(build_app(settings), settings))


if __name__ == "__main__":
    main()
