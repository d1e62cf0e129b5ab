"""`gradserve serve ...`: run the server with uvicorn (default) or granian, or on Ray Serve."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
from collections.abc import MutableMapping, Sequence

from service.auth import KeyRing, add_hash_key_command, bind_refusal, hash_key_main
from service.quotas import quota_for
from service.ray_serve import add_ray_arguments, ray_options
from service.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradserve", description="Remote JAX derivatives over HTTP."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the registered models")
    serve.add_argument("--host", help="address to bind (env GRADSERVE_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env GRADSERVE_PORT; default 8000)")
    serve.add_argument(
        "--models",
        nargs="+",
        metavar="FILE_OR_MODULE",
        help="extra model files or modules (env GRADSERVE_MODELS, comma-separated)",
    )
    serve.add_argument(
        "--no-builtin-models", action="store_true", help="serve only the models given by --models"
    )
    serve.add_argument(
        "--x64", action="store_true", default=None, help="enable 64-bit JAX (GRADSERVE_X64)"
    )
    serve.add_argument("--log-level", help="server log level (default info)")
    serve.add_argument(
        "--server",
        choices=("uvicorn", "granian"),
        help="HTTP server (env GRADSERVE_SERVER; default uvicorn; granian moves large bodies faster)",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without API keys (GRADSERVE_INSECURE; see SECURITY.md)",
    )
    add_ray_arguments(serve)
    add_hash_key_command(commands)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment first, then every flag that was given overrides it."""
    overrides = {
        "host": args.host,
        "port": args.port,
        "models": args.models,
        "x64": args.x64,
        "log_level": args.log_level,
        "server": args.server,
        "builtin_models": False if args.no_builtin_models else None,
        "insecure": True if args.insecure else None,
    }
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


MALLOC_ARENAS = "2"
_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(environ: MutableMapping[str, str] = os.environ) -> None:
    """Cap glibc's malloc arenas at MALLOC_ARENA_MAX (default 2) before any thread starts.

    glibc gives threads that allocate at once arenas of their own, up to 8 per core, and memory
    freed in one arena is not reused by another. The threads that decode large JSON bodies
    then raise the RSS step after step: the soak grew 0.5 MiB/s with the default, and stays
    flat with 2. An operator's own MALLOC_ARENA_MAX wins; on other C libraries this does nothing.
    """
    environ.setdefault("MALLOC_ARENA_MAX", MALLOC_ARENAS)  # inherited by Ray's replicas too
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, int(environ["MALLOC_ARENA_MAX"]))
    except (OSError, AttributeError, ValueError):
        pass  # not glibc (musl, ...), or a value glibc would not take either


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "hash-key":
        return hash_key_main(args)
    limit_malloc_arenas()
    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )

    try:
        keyring = KeyRing.from_settings(settings)
        for scopes, override in keyring.quota_table().values():
            quota_for(scopes, override, settings)  # a bad GRADSERVE_SCOPE_QUOTAS stops here
    except (OSError, ValueError) as e:
        print(f"gradserve: bad API key configuration: {e}", file=sys.stderr)
        return 2
    if refusal := bind_refusal(settings, keyring):
        print(refusal, file=sys.stderr)
        return 2

    if (ray := ray_options(args)) is not None:
        from service.ray_serve import serve_on_ray

        return serve_on_ray(settings, ray)

    from service.app import create_app
    from service.shutdown import serve
    from service.transport import raise_file_limit

    raise_file_limit()  # the default connection cap is derived from it

    return serve(create_app(settings), settings)


if __name__ == "__main__":
    sys.exit(main())
