"""`gradserve serve --ray` flags -> Ray Serve deployment options; no Ray needed."""

from __future__ import annotations

import pytest

from service.cli import build_parser
from service.ray_serve import (
    MAX_ONGOING_REQUESTS,
    RayOptions,
    deployment_options,
    ray_options,
    replica_env,
)


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
        options("--ray", "--gpus-per-replica", "1", "--gpu-mem-fraction", "auto").gpu_mem_fraction
        == "auto"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "2", "--autoscale", "1:3"], "not both"),
        (["--replicas", "0"], "at least 1"),
        (["--gpu-mem-fraction", "auto"], "needs --gpus-per-replica"),
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
        ["--gpu-mem-fraction", "1.5"],
    ],
)
def test_malformed_values_are_argparse_errors(
    flags: list[str], capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        options("--ray", *flags)
    assert exit_.value.code == 2 and "expected" in capsys.readouterr().err


def test_replicas_default_to_growing_gpu_memory_and_cpu_only_without_gpus() -> None:
    assert replica_env(RayOptions(), environ={}) == {
        "JAX_PLATFORMS": "cpu",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }
    assert replica_env(RayOptions(gpus_per_replica=1), environ={}) == {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false"
    }


def test_gpu_memory_fraction_auto_is_the_replicas_share() -> None:
    env = replica_env(RayOptions(gpus_per_replica=0.5, gpu_mem_fraction="auto"), environ={})
    assert env == {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "true",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45",
    }
    env = replica_env(RayOptions(gpus_per_replica=2, gpu_mem_fraction=0.3), environ={})
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.3"


def test_operator_environment_wins_over_defaults_and_flags_over_both() -> None:
    operator = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2", "JAX_PLATFORMS": "cuda", "HOME": "/x"}
    env = replica_env(RayOptions(), environ=operator)
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2", "JAX_PLATFORMS": "cuda"}
    env = replica_env(RayOptions(gpus_per_replica=1, gpu_mem_fraction=0.6), environ=operator)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.6"


def test_deployment_options() -> None:
    fixed = deployment_options(RayOptions(replicas=2, gpus_per_replica=0.5), environ={})
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == MAX_ONGOING_REQUESTS
    assert fixed["ray_actor_options"]["num_gpus"] == 0.5
    assert fixed["ray_actor_options"]["runtime_env"]["env_vars"] == {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false"
    }
    scaled = deployment_options(RayOptions(autoscale=(0, 4)), environ={})
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 0,
        "initial_replicas": 1,
        "max_replicas": 4,
    }
