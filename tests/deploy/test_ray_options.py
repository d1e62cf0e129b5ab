"""`gradserve serve --ray` without Ray: flags -> deployment options, and the replica middleware."""

from __future__ import annotations

import pytest
from fastapi import Request, Response

from service.cli import MALLOC_ARENAS, build_parser, limit_malloc_arenas
from service.ray_serve import (
    MAX_ONGOING_REQUESTS,
    REPLICA_HEADER,
    RayOptions,
    RayReplica,
    deployment_options,
    ray_options,
    replica_env,
    replica_settings,
)
from service.settings import Settings


def options(*flags: str) -> RayOptions | None:
    return ray_options(build_parser().parse_args(["serve", *flags]))


def test_without_ray_there_are_no_options() -> None:
    assert options() is None
    assert options("--port", "9000") is None


@pytest.mark.parametrize(
    "flags",
    [
        ["--replicas", "2"],
        ["--address", "auto"],
        ["--gpus-per-replica", "0.5"],
        ["--num-cpus", "2"],
    ],
)
def test_ray_flags_need_ray(flags: list[str]) -> None:
    with pytest.raises(SystemExit, match="only apply with --ray"):
        options(*flags)


def test_flags_become_options() -> None:
    got = options("--ray", "--address", "auto", "--replicas", "3", "--gpus-per-replica", "0.5")
    assert got == RayOptions(address="auto", replicas=3, gpus_per_replica=0.5)
    assert options("--ray") == RayOptions()
    assert options("--ray", "--autoscale", "1:4").autoscale == (1, 4)
    assert (
        options(
            "--ray", "--gpus-per-replica", "1", "--gpu-memory-fraction", "auto"
        ).gpu_memory_fraction
        == "auto"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "2", "--autoscale", "1:3"], "not both"),
        (["--replicas", "0"], "at least 1"),
        (["--gpu-memory-fraction", "auto"], "needs --gpus-per-replica"),
        (["--num-cpus", "2", "--address", "auto"], "local Ray"),
        (["--gpus-per-replica", "-1"], "negative"),
    ],
)
def test_inconsistent_flags_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        options("--ray", *flags)


@pytest.mark.parametrize(
    "flags",
    [
        ["--autoscale", "4:1"],
        ["--autoscale", "3"],
        ["--autoscale", "0:0"],
        ["--gpu-memory-fraction", "1.5"],
    ],
)
def test_malformed_values_are_argparse_errors(
    flags: list[str], capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        options("--ray", *flags)
    assert exit_.value.code == 2 and "expected" in capsys.readouterr().err


def test_replicas_without_gpus_use_cpu_only() -> None:
    assert replica_env(RayOptions(), environ={}) == {"JAX_PLATFORMS": "cpu"}
    assert replica_env(RayOptions(gpus_per_replica=1), environ={}) == {}


def test_operator_jax_variables_reach_the_replicas() -> None:
    operator = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2", "JAX_PLATFORMS": "cuda", "HOME": "/x"}
    env = replica_env(RayOptions(), environ=operator)
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2", "JAX_PLATFORMS": "cuda"}


def test_malloc_arenas_capped_unless_the_operator_chose_and_passed_to_replicas() -> None:
    environ: dict[str, str] = {}
    limit_malloc_arenas(environ)
    assert environ == {"MALLOC_ARENA_MAX": MALLOC_ARENAS}
    assert replica_env(RayOptions(), environ=environ)["MALLOC_ARENA_MAX"] == MALLOC_ARENAS
    operator = {"MALLOC_ARENA_MAX": "8"}
    limit_malloc_arenas(operator)
    assert operator == {"MALLOC_ARENA_MAX": "8"}


def test_gpu_memory_fraction_goes_to_the_replicas_settings() -> None:
    settings = Settings(gpu_memory_fraction=0.3)
    assert replica_settings(settings, RayOptions()) is settings
    auto = RayOptions(gpus_per_replica=0.5, gpu_memory_fraction="auto")
    assert replica_settings(settings, auto).gpu_memory_fraction == 0.45
    whole = RayOptions(gpus_per_replica=2, gpu_memory_fraction="auto")
    assert replica_settings(settings, whole).gpu_memory_fraction == 0.9
    fixed = RayOptions(gpus_per_replica=1, gpu_memory_fraction=0.6)
    assert replica_settings(Settings(), fixed).gpu_memory_fraction == 0.6
    assert Settings().gpu_memory_fraction is None


def test_deployment_options() -> None:
    fixed = deployment_options(RayOptions(replicas=2, gpus_per_replica=0.5), environ={})
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == MAX_ONGOING_REQUESTS
    assert fixed["ray_actor_options"]["num_gpus"] == 0.5
    assert fixed["ray_actor_options"]["runtime_env"]["env_vars"] == {}
    assert "request_router_config" not in fixed  # Ray's default routing unless one is given
    routed = deployment_options(RayOptions(), environ={}, request_router={"a": 1})
    assert routed["request_router_config"] == {"a": 1}
    scaled = deployment_options(RayOptions(autoscale=(0, 4)), environ={})
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 0,
        "initial_replicas": 1,
        "max_replicas": 4,
    }


def test_replica_middleware_waits_for_warm_up_and_names_itself() -> None:
    """Start-up completes only once the app is ready; one X-Request-ID; the replica header."""
    import asyncio
    import contextlib

    from fastapi import FastAPI
    from starlette.testclient import TestClient

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def warm() -> None:
            await asyncio.sleep(0.3)
            app.state.ready = True

        task = asyncio.create_task(warm())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)
    app.state.ready = False

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        rid = request.headers.get("x-request-id", "none")
        return Response(str(app.state.ready), headers={"x-request-id": rid})

    app.add_middleware(RayReplica, name="gradserve#abc", ready=lambda: app.state.ready)
    with TestClient(app) as client:
        response = client.get("/ready", headers={"x-request-id": "r1"})
    assert response.text == "True", "start-up returned before warm-up"
    assert response.headers[REPLICA_HEADER] == "gradserve#abc"
    assert "x-request-id" not in response.headers, "Ray's proxy adds it back, once"
