"""`gradserve serve --ray`: the same FastAPI app, replicated by Ray Serve.

Each replica builds its own copy of the app from the driver's settings, so it has its own models,
engine and compile cache, exactly as one `gradserve serve` process would; Ray's HTTP proxy
spreads requests over the replicas. Every response names its replica in `X-Gradserve-Replica`.

Ray is imported only inside the functions that need it: the server runs without the `ray` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("gradserve")

APP_NAME = "gradserve"
REPLICA_HEADER = "X-Gradserve-Replica"
# Ray's default (5) would queue requests at the proxy that the engine could have batched; the
# engine's own queue limit answers 429 when a replica is really full.
MAX_ONGOING_REQUESTS = 64
# Headroom left to the CUDA context and XLA's own buffers when the memory fraction is derived.
GPU_MEMORY_HEADROOM = 0.9
# How long a replica's start-up may wait for warm-up before it takes requests regardless.
WARMUP_TIMEOUT_S = 600.0

# Derivative sessions live in the replica that opened them. Ray's consistent-hash router sends
# every request carrying the same `X-Session-ID` header (Ray's RAY_SERVE_SESSION_ID_HEADER_KEY)
# to one replica; the client sends one such key with a session's linearize and its products.
# Requests without it are spread evenly; under backpressure a request may go to the next
# replica on the ring, where a session is not found and the client recomputes statelessly.
SESSION_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
SESSION_ROUTER_FALLBACKS = 2

RAY_FLAGS = (
    "address",
    "replicas",
    "autoscale",
    "gpus_per_replica",
    "cpus_per_replica",
    "gpu_memory_fraction",
    "num_cpus",
)


@dataclass(frozen=True)
class RayOptions:
    """How to deploy on Ray: where, how many replicas, and what each one gets."""

    address: str | None = None
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    # The share of a GPU's memory each replica preallocates, "auto" for its share of the GPU,
    # or None: the server's own setting (GRADSERVE_GPU_MEMORY_FRACTION; default on demand).
    gpu_memory_fraction: float | str | None = None
    # CPUs of the Ray started here (no `address`); None: all of them.
    num_cpus: int | None = None


def _autoscale(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        bounds = int(low), int(high)
    except ValueError:
        bounds = None
    if not sep or bounds is None or not 0 <= bounds[0] <= bounds[1] or bounds[1] < 1:
        raise argparse.ArgumentTypeError(
            f"expected MIN:MAX with 0 <= MIN <= MAX, 1 <= MAX; got {text!r}"
        )
    return bounds


def _mem_fraction(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a fraction in (0, 1]; got {text!r}")
    return value


def add_ray_arguments(serve: argparse.ArgumentParser) -> None:
    """The `--ray` flags of `gradserve serve`, kept beside the code that reads them."""
    group = serve.add_argument_group(
        "Ray Serve", "scale out over a Ray cluster (needs the `ray` extra)"
    )
    group.add_argument(
        "--ray", action="store_true", help="deploy the app on Ray Serve, one copy per replica"
    )
    group.add_argument(
        "--address", help="Ray cluster to join, e.g. 'auto' (default: start a local Ray)"
    )
    group.add_argument("--replicas", type=int, help="fixed number of replicas (default 1)")
    group.add_argument(
        "--autoscale",
        type=_autoscale,
        metavar="MIN:MAX",
        help="let Ray scale the replicas between MIN and MAX instead of --replicas",
    )
    group.add_argument(
        "--gpus-per-replica",
        type=float,
        metavar="F",
        help="GPUs per replica; 0.5 puts two on a GPU",
    )
    group.add_argument(
        "--cpus-per-replica",
        type=float,
        metavar="F",
        help="CPUs Ray reserves per replica (default 1)",
    )
    group.add_argument(
        "--gpu-memory-fraction",
        type=_mem_fraction,
        metavar="F|auto",
        help="share of a GPU's memory each replica preallocates; 'auto': 0.9 x --gpus-per-replica "
        "(default: GRADSERVE_GPU_MEMORY_FRACTION, else memory grows on demand)",
    )
    group.add_argument(
        "--num-cpus",
        type=int,
        metavar="N",
        help="CPUs of the local Ray started without --address (default: all)",
    )


def ray_options(args: argparse.Namespace) -> RayOptions | None:
    """The options for `--ray`, or None without it. Ray flags without `--ray` are a mistake."""
    given = {
        name: getattr(args, name) for name in RAY_FLAGS if getattr(args, name, None) is not None
    }
    if not getattr(args, "ray", False):
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise SystemExit(f"gradserve: {flags} only apply with --ray")
        return None
    if "replicas" in given and "autoscale" in given:
        raise SystemExit("gradserve: give --replicas or --autoscale, not both")
    if given.get("replicas", 1) < 1:
        raise SystemExit("gradserve: --replicas must be at least 1")
    if given.get("gpu_memory_fraction") == "auto" and not given.get("gpus_per_replica"):
        raise SystemExit("gradserve: --gpu-memory-fraction auto needs --gpus-per-replica")
    if "num_cpus" in given and "address" in given:
        raise SystemExit("gradserve: --num-cpus is for the local Ray; a cluster has its own")
    if given.get("gpus_per_replica", 0) < 0 or given.get("cpus_per_replica", 1) < 0:
        raise SystemExit(
            "gradserve: --gpus-per-replica and --cpus-per-replica must not be negative"
        )
    return RayOptions(**given)


def replica_settings(settings: Settings, options: RayOptions) -> Settings:
    """The settings each replica runs with: the driver's, with its share of GPU memory.

    Like one `gradserve serve`, a replica allocates GPU memory on demand unless a fraction is
    set (service/engine: `configure_jax`); replicas sharing a GPU need one of the two, since
    JAX would otherwise preallocate 75% of it in the first replica.
    """
    fraction = options.gpu_memory_fraction
    if fraction == "auto":
        fraction = round(GPU_MEMORY_HEADROOM * min(options.gpus_per_replica, 1.0), 3)
    if fraction is None:
        return settings
    return settings.model_copy(update={"gpu_memory_fraction": fraction})


def replica_env(options: RayOptions, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of each replica: the operator's JAX device and memory variables.

    Passed explicitly because on a cluster a replica inherits its node's environment, not the
    driver's.
    """
    env = {
        k: v
        for k, v in environ.items()
        if k.startswith("XLA_PYTHON_CLIENT_") or k in ("JAX_PLATFORMS", "MALLOC_ARENA_MAX")
    }
    if not options.gpus_per_replica:
        # A replica that Ray gave no GPU must not take one from a replica that it did.
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


class RayReplica:
    """What a replica adds to the app; pure ASGI, like `RequestContext`.

    - Every response names the replica in `X-Gradserve-Replica`.
    - Ray's proxy gives every request an `X-Request-ID` and adds it to every response itself,
      so the app's echo of that same id is dropped: one header, not two.
    - Ray routes to a replica once its ASGI start-up completes, but the app warms its models
      after that (serving 503 meanwhile, for orchestrators that poll /readyz); so the start-up
      is reported complete only once the app is ready, and no request meets a cold replica.
    """

    def __init__(self, app: ASGIApp, name: str, ready: Callable[[], bool]) -> None:
        self.app, self.name, self.ready = app, name, ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._when_ready(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get("x-request-id")

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[REPLICA_HEADER] = self.name
                if request_id is not None and headers.get("x-request-id") == request_id:
                    del headers["x-request-id"]
            await send(message)

        await self.app(scope, receive, send_named)

    def _when_ready(self, send: Send) -> Send:
        async def send_when_ready(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                deadline = time.monotonic() + WARMUP_TIMEOUT_S
                while not self.ready() and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                if not self.ready():
                    log.warning("replica %s still warming; serving 503 until ready", self.name)
            await send(message)

        return send_when_ready


def replica_name() -> str:
    """This replica's id as Ray knows it (in `serve status` and the replica's logs)."""
    from ray import serve

    context = serve.get_replica_context()
    return f"{context.deployment}#{context.replica_id.unique_id}"


def app_builder(settings: Settings) -> Callable[[], FastAPI]:
    """What each replica calls at start-up: the ordinary app, plus the replica header."""

    def build() -> FastAPI:
        from service.app import create_app

        app = create_app(settings)

        def ready() -> bool:
            state = getattr(app.state, "gradserve", None)
            return state is not None and state.ready

        app.add_middleware(RayReplica, name=replica_name(), ready=ready)
        return app

    return build


def session_routing() -> dict[str, Any] | None:
    """The request router that keeps a session's requests on one replica, if this Ray has it
    (else None: Ray's default routing, and the client's fallback keeps results right)."""
    module = SESSION_ROUTER.rpartition(".")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        log.warning("this Ray lacks %s: session products may miss their replica", SESSION_ROUTER)
        return None
    return {
        "request_router_class": SESSION_ROUTER,
        "request_router_kwargs": {"num_fallback_replicas": SESSION_ROUTER_FALLBACKS},
    }


def deployment_options(
    options: RayOptions,
    environ: Mapping[str, str] = os.environ,
    request_router: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `serve.deployment`: replicas, resources, environment, routing."""
    scale: dict[str, Any] = {"num_replicas": options.replicas}
    if options.autoscale is not None:
        low, high = options.autoscale
        scale = {
            "autoscaling_config": {
                "min_replicas": low,
                "initial_replicas": max(low, 1),
                "max_replicas": high,
            }
        }
    return {
        "name": APP_NAME,
        **scale,
        **({"request_router_config": request_router} if request_router else {}),
        "max_ongoing_requests": MAX_ONGOING_REQUESTS,
        "ray_actor_options": {
            "num_cpus": options.cpus_per_replica,
            "num_gpus": options.gpus_per_replica,
            "runtime_env": {"env_vars": replica_env(options, environ)},
        },
    }


def deploy(settings: Settings, options: RayOptions) -> None:
    """Start Serve's HTTP proxy on `settings.host:port` and run the app; returns once it serves.

    Needs a connected Ray (`ray.init`). On a cluster where Serve already runs, Serve keeps the
    proxy address it has.
    """
    from ray import serve

    ingress = serve.ingress(app_builder(replica_settings(settings, options)))

    @serve.deployment(**deployment_options(options, request_router=session_routing()))
    @ingress
    class Gradserve:
        """One replica: a whole gradserve app (models, engine, compile cache)."""

    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(Gradserve.bind(), name=APP_NAME, route_prefix="/")
    log.info("gradserve on Ray Serve at http://%s:%d", settings.host, settings.port)


def serve_on_ray(settings: Settings, options: RayOptions) -> int:
    """`gradserve serve --ray`: deploy, serve until SIGINT or SIGTERM, then remove the app.

    Without `--address` Ray starts here, reachable from this machine only, and stops on exit; on
    a cluster only the app is removed.
    """
    if options.address is None:
        # Ray otherwise gives a local node the machine's network address and its internal
        # servers listen on every interface; this keeps them on loopback. Read at Ray's import.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise SystemExit("gradserve: --ray needs Ray Serve: pip install 'gradserve[ray]'") from None
    from ray import serve

    ray.init(address=options.address, num_cpus=options.num_cpus)
    try:
        deploy(settings, options)
        # After ray.init, which installs its own SIGTERM handler (sys.exit, skipping the clean-up).
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
        log.info("removing the gradserve app from Ray Serve")
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
    return 0
