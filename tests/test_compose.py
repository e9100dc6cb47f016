"""Static checks of the deployment files: compose.yaml, docker/Dockerfile, docker/redis.conf.

No Docker engine runs where the tests run, so compose.yaml is validated against the official
Compose Specification JSON schema, the copy that the ``check-jsonschema`` package ships (its
``vendor/compose-spec.json``, taken from the compose-spec repository), with ``jsonschema``. The
file is checked as written and after ``${VAR}`` interpolation. Then the deployment rules:
Redis has a password and AOF, each GPU worker reserves exactly its ``--gpus``, no two workers
that can run together share a queue, the sim profile needs no GPU, and every samullm service
runs a known sub-command. Where a Docker Compose v2 CLI exists, ``docker compose config``
parses the file too (skipped otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
REDIS_CONF = REPO / "docker" / "redis.conf"
SUBCOMMANDS = {"coordinator", "worker"}  # samullm sub-commands a container may run
ENV = {"REDIS_PASSWORD": "test-password"}  # what a user must export; the rest has defaults

_VAR = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


# -- helpers ---------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    """The Compose Specification schema bundled with check-jsonschema (a dev dependency)."""
    try:
        vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:  # pragma: no cover - a broken dev environment
        pytest.fail("check-jsonschema is missing: pip install -e '.[dev]' (it ships the schema)")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}`` and
    ``$$`` on every string of ``value``; a missing required variable raises ``KeyError``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match["name"] or match["bare"], match["op"], match["arg"]
        have = env.get(name)
        unset = have is None or (op is not None and op.startswith(":") and have == "")
        if op is not None and op.endswith("?") and unset:
            raise KeyError(f"required variable {name} is not set: {arg}")
        if op is not None and op.endswith("-") and unset:
            return arg
        return have or ""

    return _VAR.sub(one, value)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    errors = validator.iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def flags(command: list[str]) -> dict[str, str]:
    """``--name value`` pairs of a container command (after the sub-command)."""
    args = command[1:]
    assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2]), command
    return dict(zip(args[::2], args[1::2], strict=True))


def devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    found: list[dict[str, Any]] = reservations.get("devices", [])
    return found


def conf_directives(path: Path) -> dict[str, str]:
    """``name -> value`` of a redis.conf (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    pairs = (line.split(None, 1) for line in lines if line)
    return {p[0].lower(): (p[1] if len(p) > 1 else "") for p in pairs}


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves `<<:` merge keys
    return doc


@pytest.fixture(scope="module")
def project(raw: dict[str, Any]) -> dict[str, Any]:
    """compose.yaml as Compose sees it with REDIS_PASSWORD exported and nothing else."""
    doc: dict[str, Any] = interpolate(raw, ENV)
    return doc


@pytest.fixture(scope="module")
def workers(project: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = project["services"]
    return {n: s for n, s in services.items() if s.get("command", [None])[0] == "worker"}


# -- schema ----------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec_schema(
    raw: dict[str, Any], project: dict[str, Any]
) -> None:
    assert "version" not in raw  # obsolete in the Compose Specification
    assert schema_errors(raw) == []
    assert schema_errors(project) == []


def test_schema_check_rejects_a_bad_file(raw: dict[str, Any]) -> None:
    """Negative control: the validator is live (typo'd key, wrong type)."""
    bad = json.loads(json.dumps(raw))
    bad["services"]["redis"]["imagee"] = "redis:7"
    bad["services"]["coordinator"]["depends_on"] = 5
    assert len(schema_errors(bad)) >= 2


def test_redis_password_is_required(raw: dict[str, Any]) -> None:
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(raw, {})


# -- redis -----------------------------------------------------------------------------------


def test_redis_has_a_password_aof_a_volume_and_a_healthcheck(
    raw: dict[str, Any], project: dict[str, Any]
) -> None:
    redis = project["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == ENV["REDIS_PASSWORD"]
    assert "${REDIS_PASSWORD:?" in raw["services"]["redis"]["command"][-1]
    assert "--appendonly" not in command or command[command.index("--appendonly") + 1] == "yes"
    conf_mount = next(v for v in redis["volumes"] if v.startswith("./docker/redis.conf:"))
    assert conf_mount.split(":")[1] == command[1] and conf_mount.endswith(":ro")
    data = next(v for v in redis["volumes"] if v.split(":")[1] == "/data")
    assert data.split(":")[0] in project["volumes"]  # a named volume, not a bind mount
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert "ports" not in redis  # reachable on the compose network only


def test_redis_conf_follows_the_baseline() -> None:
    conf = conf_directives(REDIS_CONF)
    assert conf["appendonly"] == "yes" and conf["appendfsync"] in {"everysec", "always"}
    assert conf["maxmemory-policy"] == "noeviction" and conf["protected-mode"] == "yes"
    assert conf["enable-debug-command"] == "no" and conf["enable-module-command"] == "no"
    assert "requirepass" not in conf and "aclfile" not in conf  # no secret in the repository


@pytest.mark.integration
def test_redis_conf_is_accepted_by_a_real_redis_server() -> None:
    from coordinator.redis_server import RedisServer

    with RedisServer.start(config=REDIS_CONF, password="pw") as server:  # flags override bind
        client = server.client()
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("aof-use-rdb-preamble") == {"aof-use-rdb-preamble": "yes"}


# -- services --------------------------------------------------------------------------------


def test_samullm_services_run_known_subcommands(project: dict[str, Any]) -> None:
    services = project["services"]
    ours = {n: s for n, s in services.items() if "build" in s}
    assert set(ours) >= {"coordinator"} and len(ours) == len(services) - 1  # all but redis
    for name, service in ours.items():
        assert service["command"][0] in SUBCOMMANDS, name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["environment"]["SAMULLM_BROKER_URL"].startswith("redis://:"), name
        assert service["build"]["dockerfile"] == "docker/Dockerfile", name


def test_gpu_workers_reserve_exactly_their_gpus(workers: dict[str, dict[str, Any]]) -> None:
    gpu = {n: s for n, s in workers.items() if flags(s["command"])["--engine"] == "vllm"}
    assert set(gpu) == {"worker-gpu0-1", "worker-gpu2", "worker-gpu3"}
    for name, service in gpu.items():
        (device,) = devices(service)
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert device["device_ids"] == flags(service["command"])["--gpus"].split(","), name
        assert service["profiles"] == ["gpu"], name
        assert service["build"]["args"]["EXTRAS"] == "vllm", name


def test_sim_profile_runs_without_gpus(workers: dict[str, dict[str, Any]]) -> None:
    sim = {n: s for n, s in workers.items() if flags(s["command"])["--engine"] == "sim"}
    assert sim
    for name, service in sim.items():
        assert service["profiles"] == ["sim"] and devices(service) == [], name
        assert "EXTRAS" not in service["build"].get("args", {}), name


def test_no_two_workers_share_a_queue(workers: dict[str, dict[str, Any]]) -> None:
    """Per profile (what `--profile P up` starts), queues are unique and GPU groups disjoint;
    the sim profile mirrors the gpu profile's queues."""
    queues: dict[str, list[tuple[str, str]]] = {}
    for service in workers.values():
        args = flags(service["command"])
        for profile in service.get("profiles", ["(default)"]):
            queues.setdefault(profile, []).append((args["--node"], args["--gpus"]))
    for profile, pairs in queues.items():
        assert len(pairs) == len(set(pairs)), profile
        used = [(node, gpu) for node, gpus in pairs for gpu in gpus.split(",")]
        assert len(used) == len(set(used)), f"{profile}: overlapping GPU groups"
    assert sorted(queues["sim"]) == sorted(queues["gpu"])


def test_commands_parse_with_the_samullm_cli(project: dict[str, Any]) -> None:
    """Each container command parses with the real CLI, once its sub-command exists."""
    from coordinator.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = SUBCOMMANDS - set(sub.choices)
    if missing:
        pytest.skip(f"samullm {', '.join(sorted(missing))} not registered yet")
    for name, service in project["services"].items():
        if "build" in service:
            try:
                parser.parse_args(service["command"])
            except SystemExit as exc:  # argparse reports and exits on a bad command
                pytest.fail(f"{name}: samullm {' '.join(service['command'])}: exit {exc.code}")


# -- image -----------------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_samullm_image() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^ARG EXTRAS=", text, re.M)
    assert re.search(r'^RUN pip install "\.\$\{EXTRAS:\+\[\$EXTRAS\]\}"', text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in {"root", "0"}
    assert re.search(r'^ENTRYPOINT \["samullm"\]', text, re.M)


# -- optional: the real Compose CLI ----------------------------------------------------------


def _compose_cli() -> list[str] | None:
    """``docker compose`` or a v2 ``docker-compose``, when one is installed."""
    for name, *sub in (["docker", "compose"], ["docker-compose"]):
        exe = shutil.which(name)
        if exe is None:
            continue
        cmd = [exe, *sub]
        out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and re.search(r"v?2\.\d+", out.stdout):
            return cmd
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI (the schema test above covers the file)")
    argv = [*cli, "-f", str(COMPOSE), "--profile", "sim", "--profile", "gpu", "config", "-q"]
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "SAMULLM_"))}
    env = {**keep, **ENV}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    env.pop("REDIS_PASSWORD")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0 and "set REDIS_PASSWORD" in done.stderr
