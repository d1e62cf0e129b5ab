"""Static checks of the Dockerfile, docker-compose.yml and deploy/ (no Docker engine runs here).

hadolint lints the Dockerfile; the compose file is validated against the Compose Specification's
JSON schema (as vendored by check-jsonschema); and every command, flag, setting, extra and file
that they (and the README's Deploy section) name must exist in this repository.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from deploy_files import (
    ROOT,
    Instruction,
    MissingVariable,
    bind_mounts,
    dockerfile,
    dockerignored,
    environment,
    healthcheck_command,
    interpolated,
    load_yaml,
    shell_commands,
)

from service.auth import KeyRing
from service.cli import build_parser
from service.settings import Settings

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY_DOC = ROOT / "README.md"


def deploy_section() -> str:
    """The README's "## Deploy" section, up to the next top-level heading."""
    text = DEPLOY_DOC.read_text()
    start = text.index("\n## Deploy\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What a user would export before `docker compose up`.
USER_ENV = {"GRADSERVE_API_KEYS": "k-client", "GRADSERVE_METRICS_KEY": "k-prometheus"}
CONTAINER_PORT = 8000


def tool(name: str) -> str:
    """A console script of the test extra, on PATH or beside this Python."""
    found = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    if found is None:
        pytest.fail(f"{name} is missing: pip install -e '.[test]'")
    return found


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """`gradserve ...` words -> the namespace, failing the test where argparse would exit.

    Flags must be spelt out: argparse would also take an abbreviation (`--replica`).
    """
    assert argv and argv[0] == "gradserve", argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{' '.join(argv)}` is not a valid gradserve command")
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    known = {s for a in commands.choices[args.command]._actions for s in a.option_strings}
    for word in argv:
        flag = word.split("=", 1)[0]
        assert not flag.startswith("--") or flag in known, f"{flag} is not a flag of {argv[:2]}"
    return args


def env_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings the server would read from exactly `env`."""
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"GRADSERVE_{name.upper()}", raising=False)
    unknown = {k for k in env if k.startswith("GRADSERVE_")} - {
        f"GRADSERVE_{name.upper()}" for name in Settings.model_fields
    }
    assert not unknown, f"not gradserve settings: {sorted(unknown)}"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings()


def check_healthcheck(argv: list[str], port: int) -> None:
    """`python -c CODE` polling /readyz on the server's own port, with no tool beyond Python."""
    assert argv[:2] == ["python", "-c"], argv
    code = argv[2]
    compile(code, "<healthcheck>", "exec")
    assert "/readyz" in code and "urllib.request" in code
    assert f":{port}/" in code or "GRADSERVE_PORT" in code


def app_paths() -> set[str]:
    from service.app import create_app

    return set(create_app(Settings()).openapi()["paths"])


# ---------------------------------------------------------------------------- Dockerfile


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return dockerfile(DOCKERFILE)


def test_hadolint_passes_at_warning_level() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "warning", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_slim_and_non_root(instructions: list[Instruction]) -> None:
    stages = [i.args for i in instructions if i.keyword == "FROM"]
    assert len(stages) >= 2 and all("-slim" in s for s in stages), stages
    final = max(i.line for i in instructions if i.keyword == "FROM")
    users = [i.args for i in instructions if i.keyword == "USER" and i.line > final]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users


def test_dockerfile_entrypoint_and_cmd_are_a_valid_serve_command(
    instructions: list[Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    (entrypoint,) = [i.exec_form() for i in instructions if i.keyword == "ENTRYPOINT"]
    (cmd,) = [i.exec_form() for i in instructions if i.keyword == "CMD"]
    argv = entrypoint + cmd
    assert argv[0] in PYPROJECT["project"]["scripts"], "the entry point is the console script"
    args = parse_cli(argv)
    assert args.command == "serve" and args.host == "0.0.0.0"
    # Binding 0.0.0.0 with keys from the environment passes the bind rule; without, it refuses.
    env = image_env(instructions)
    settings = env_settings({**env, "GRADSERVE_API_KEYS": "k"}, monkeypatch)
    assert KeyRing.from_settings(settings), "keys from GRADSERVE_API_KEYS"
    for name in ("GRADSERVE_API_KEYS", "GRADSERVE_API_KEYS_FILE", "GRADSERVE_INSECURE"):
        assert name not in env, f"{name} must come at run time, not be baked into the image"


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    final = max(i.line for i in instructions if i.keyword == "FROM")
    env: dict[str, str] = {}
    for i in instructions:
        if i.keyword == "ENV" and i.line > final:
            env.update(word.partition("=")[::2] for word in i.exec_form())
    return env


def test_dockerfile_env_port_and_healthcheck_agree(
    instructions: list[Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = image_env(instructions)
    settings = env_settings(
        {k: v for k, v in env.items() if k.startswith("GRADSERVE_")}, monkeypatch
    )
    (expose,) = [i.args for i in instructions if i.keyword == "EXPOSE"]
    assert int(expose.split("/")[0]) == settings.port == CONTAINER_PORT
    (health,) = [i for i in instructions if i.keyword == "HEALTHCHECK"]
    check_healthcheck(healthcheck_command(health), settings.port)
    assert "/readyz" in app_paths()


def test_dockerfile_build_variants_are_pyproject_extras(instructions: list[Instruction]) -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    (install,) = [i.args for i in instructions if i.keyword == "RUN" and "pip install" in i.args]
    assert "server" in extras and re.search(r"\[\$extras\]", install)
    variants = {"cuda12"} | set(re.findall(r"VARIANT=(\w+)", DOCKERFILE.read_text())) - {"cpu"}
    compose = load_yaml(COMPOSE)
    for service in compose["services"].values():
        if isinstance(service.get("build"), dict):
            variants |= {service["build"].get("args", {}).get("VARIANT", "cpu")} - {"cpu"}
    for variant in variants:
        assert variant in extras and any("jax[" in dep for dep in extras[variant]), variant


def test_copied_files_exist_and_are_in_the_build_context(instructions: list[Instruction]) -> None:
    for i in instructions:
        if i.keyword != "COPY" or i.args.startswith("--from"):
            continue
        *sources, _ = i.exec_form()
        for source in sources:
            assert (ROOT / source).exists(), f"line {i.line}: COPY {source}: no such file"
            assert not dockerignored(ROOT, source), f"line {i.line}: .dockerignore drops {source}"
    for private in (".git", ".env", "tests", ".venv", "service/__pycache__/x.pyc"):
        assert dockerignored(ROOT, private), f"{private} must stay out of the build context"


def test_the_build_context_builds_a_complete_wheel(
    instructions: list[Instruction], tmp_path: Path
) -> None:
    """What the build stage copies (less .dockerignore) installs every module and the script."""
    context = tmp_path / "src"
    for i in instructions:
        if i.keyword != "COPY" or i.args.startswith("--from"):
            continue
        *sources, _ = i.exec_form()
        for source in sources:
            for path in [ROOT / source, *(ROOT / source).rglob("*")]:
                rel = path.relative_to(ROOT).as_posix()
                if path.is_file() and not dockerignored(ROOT, rel):
                    (context / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, context / rel)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"]
    result = subprocess.run(
        [*pip_wheel, "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("gradserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
        assert "gradserve = service.cli:main" in zf.read(entry_points).decode()
    modules = {
        p.relative_to(ROOT).as_posix()
        for package in ("client", "service")
        for p in (ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules <= names, f"missing from the image: {sorted(modules - names)}"


# ---------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolated(load_yaml(COMPOSE), USER_ENV)


def compose_schema() -> dict[str, Any]:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(vendored.read_text())


def test_compose_file_validates_against_the_compose_spec() -> None:
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_validates_once_interpolated(compose: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(compose_schema()).validate(compose)


def test_compose_refuses_to_start_without_keys() -> None:
    with pytest.raises(MissingVariable, match="GRADSERVE_API_KEYS"):
        interpolated(load_yaml(COMPOSE), {})


def gradserve_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: s
        for name, s in compose["services"].items()
        if s.get("image", "").startswith("gradserve")
    }


def test_compose_services_profiles_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "profiles" not in services["gradserve"], "the CPU service is the default"
    profiles = {p for s in services.values() for p in s.get("profiles", [])}
    assert {"gpu", "monitoring", "scale"} <= profiles
    gpu = services["gradserve-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert environment(gpu)["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    for name, service in gradserve_services(compose).items():
        named = [str(v).split(":")[0] for v in service["volumes"]]
        assert "compile-cache" in named and "compile-cache" in compose["volumes"], name
        assert any(mode == "ro" and target == "/models" for _, target, mode in bind_mounts(service))
        assert service["healthcheck"]["test"][0] == "CMD"
        check_healthcheck(service["healthcheck"]["test"][1:], CONTAINER_PORT)


def test_compose_environment_is_gradserve_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every GRADSERVE_* variable is a setting, every value parses, and the keys work."""
    for name, service in gradserve_services(compose).items():
        env = environment(service)
        settings = env_settings(env, monkeypatch)
        assert settings.port == CONTAINER_PORT, name
        keys = KeyRing.from_settings(settings)
        assert len(keys.entries) == 2, "the client key and Prometheus' key"
        # Prometheus' key reads /metrics and nothing else; the client's computes.
        assert keys.authenticate(f"Bearer {USER_ENV['GRADSERVE_METRICS_KEY']}") == {"metrics"}
        assert "compute" in keys.authenticate(f"Bearer {USER_ENV['GRADSERVE_API_KEYS']}")
        # The models the service loads are in the folder it mounts read-only.
        mounts = {target: source for source, target, _ in bind_mounts(service)}
        for model_file in settings.models:
            folder, _, rel = model_file.rpartition("/")
            assert (ROOT / mounts[folder] / rel).is_file(), f"{name}: {model_file}"
    without_metrics = interpolated(load_yaml(COMPOSE), {"GRADSERVE_API_KEYS": "k"})
    env = environment(without_metrics["services"]["gradserve"])
    assert len(KeyRing.from_settings(env_settings(env, monkeypatch)).entries) == 1


def test_compose_commands_and_files_exist(compose: dict[str, Any]) -> None:
    (entrypoint,) = [i.exec_form() for i in dockerfile(DOCKERFILE) if i.keyword == "ENTRYPOINT"]
    for service in gradserve_services(compose).values():
        if "command" in service:
            parse_cli(entrypoint + list(service["command"]))
        assert service.get("build", {}).get("context") == "."
    for name, service in compose["services"].items():
        for source, _, _ in bind_mounts(service):
            assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"


def test_prometheus_scrapes_every_gradserve_with_the_metrics_key(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    mounts = {target: source for source, target, _ in bind_mounts(prometheus)}
    config_file = next(
        a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")
    )
    config = load_yaml(ROOT / mounts[config_file])
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] in app_paths()
    secret = job["authorization"]["credentials_file"].removeprefix("/run/secrets/")
    assert job["authorization"]["type"] == "Bearer"
    assert secret in prometheus["secrets"] and secret in compose["secrets"]
    assert compose["secrets"][secret]["environment"] == "GRADSERVE_METRICS_KEY"
    (dns,) = job["dns_sd_configs"]
    assert set(dns["names"]) == set(gradserve_services(compose)) and dns["port"] == CONTAINER_PORT


def test_load_balancer_fronts_the_replicas(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    lb, replica = services["lb"], services["gradserve-replica"]
    assert "ports" not in replica, "replicas are reached through the load balancer only"
    assert int(replica["deploy"]["replicas"]) >= 2
    assert lb["depends_on"]["gradserve-replica"]["condition"] == "service_healthy"
    mounts = {target: source for source, target, _ in bind_mounts(lb)}
    conf = (ROOT / mounts["/etc/nginx/nginx.conf"]).read_text()
    assert re.search(rf"server\s+gradserve-replica:{CONTAINER_PORT}\b", conf)
    (listen,) = re.findall(r"listen\s+(\d+);", conf)
    assert any(str(p).endswith(f":{listen}") for p in lb["ports"])
    body_limit = int(re.search(r"client_max_body_size\s+(\d+)m;", conf)[1]) * 2**20
    # Above gradserve's: an oversize body gets gradserve's problem+json 413, not nginx's page.
    assert body_limit > env_settings(environment(replica), monkeypatch).max_body_bytes


# ---------------------------------------------------------------------------- docs


def test_cli_help_lists_every_flag_used() -> None:
    """The deployment files' flags, checked against the real `gradserve serve --help` too."""
    help_text = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    used = {"--host", "--port", "--ray", "--address", "--replicas", "--gpus-per-replica"}
    used |= {
        w for i in dockerfile(DOCKERFILE) for w in re.findall(r"--[a-z][a-z0-9-]+", i.args)
    } - {
        "--no-cache-dir",
        "--system",
        "--gid",
        "--uid",
        "--create-home",
        "--home-dir",
        "--from",
        "--interval",
        "--timeout",
        "--start-period",
        "--retries",
    }
    doc = deploy_section()
    for argv in shell_commands(doc):
        if argv[:2] == ["gradserve", "serve"]:
            used |= {w.split("=")[0] for w in argv if w.startswith("--")}
    # Flags in the prose and tables: `--replicas N`, `gradserve serve --ray ...`.
    for span in re.findall(r"`([^`\n]+)`", doc):
        if span.startswith(("--", "gradserve serve")):
            used |= set(re.findall(r"--[a-z][a-z0-9-]*", span))
    missing = {flag for flag in used if not re.search(rf"{flag}(?![\w-])", help_text)}
    assert not missing, f"not in `gradserve serve --help`: {sorted(missing)}"


def test_deploy_doc_commands_are_valid() -> None:
    compose = load_yaml(COMPOSE)
    services = set(compose["services"])
    profiles = {p for s in compose["services"].values() for p in s.get("profiles", [])}
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    seen = set()
    doc = deploy_section()
    for span in re.findall(r"`(gradserve [^`\n]+)`", doc):
        parse_cli(shlex.split(span))
    for argv in shell_commands(doc):
        seen.add(argv[0])
        if argv[0] == "gradserve":
            parse_cli(argv)
        elif argv[:2] == ["docker", "compose"]:
            words = argv[2:]
            for flag, value in itertools.pairwise(words):
                if flag == "--profile":
                    assert value in profiles, argv
            sub = next(
                (w for w in words if w in ("up", "down", "logs", "ps", "restart", "build")), None
            )
            if sub in ("up", "logs", "restart", "build"):
                named = [w for w in words[words.index(sub) + 1 :] if not w.startswith("-")]
                named = [w for w in named if not re.fullmatch(r"[\w-]+=\d+", w)]
                assert set(named) <= services, argv
        elif argv[:2] == ["docker", "build"]:
            for flag, value in itertools.pairwise(argv):
                if flag == "--build-arg" and value.startswith("VARIANT="):
                    assert value.split("=", 1)[1] in extras, argv
        elif argv[0] in ("pip", "python") and "install" in argv:
            for extra in re.findall(r"\[([\w,]+)\]", " ".join(argv)):
                assert set(extra.split(",")) <= extras, argv
    assert {"gradserve", "docker", "ray"} <= seen


def test_deploy_doc_names_only_existing_files() -> None:
    text = deploy_section()
    named = set(re.findall(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|yml|yaml|md|conf|toml|npz))`", text))
    named |= {"Dockerfile", ".dockerignore"} & set(re.findall(r"`([\w.]+)`", text))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"the README's Deploy section names files that do not exist: {missing}"
