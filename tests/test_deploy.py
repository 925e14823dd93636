"""The deployment files: linted where a linter exists, and the image's entry point run for real.

No image is built here (no container daemon): the Dockerfile goes through hadolint (with shellcheck for its RUN
lines), the entry-point script through shellcheck, docker-compose.yml through the compose-spec JSON schema that
check-jsonschema ships, the systemd unit through `systemd-analyze verify`; then the entry point itself runs as the
container would run it: `magpie db upgrade` and `magpie run` against a fresh PostgreSQL database, and the image's
HEALTHCHECK command against that running process. The linters come from the dev extras (`make install`); where one
is missing its test is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dotenv import dotenv_values
from sqlalchemy import select
from sqlalchemy.engine import make_url

from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Message
from tests.conftest import POSTGRES_ADMIN_URL, _pg_admin, _postgres_reachable

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
COMPOSE = ROOT / "docker-compose.yml"
UNIT = ROOT / "deploy" / "magpie.service"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A linter from this venv (the dev extras install them there) or from PATH; skips the test when absent."""
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"{name} is not installed (it comes with `make install`'s dev extras)")
    return found


def lint(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # hadolint finds shellcheck
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)


# --- linters ------------------------------------------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint() -> None:
    result = lint([tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_entry_point_script_passes_shellcheck() -> None:
    result = lint([tool("shellcheck"), "--shell=sh", str(ENTRYPOINT)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_file_matches_the_compose_spec() -> None:
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema is not installed (it comes with `make install`'s dev extras)")
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = lint([*command, str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_schema_check_catches_a_wrong_condition(tmp_path: Path) -> None:
    """The schema check is not a rubber stamp: a misspelt depends_on condition fails it."""
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema is not installed (it comes with `make install`'s dev extras)")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("service_healthy", "service_ready"))
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    assert lint([*command, str(broken)]).returncode == 1


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` checks that the commands exist, so the unit's /opt/magpie becomes a scratch copy
    with an executable `magpie`; any warning (an unknown key or value) fails the test, not only errors."""
    analyze = tool("systemd-analyze")
    install = tmp_path / "opt-magpie"
    magpie = install / ".venv" / "bin" / "magpie"
    magpie.parent.mkdir(parents=True)
    magpie.write_text("#!/bin/sh\n")
    magpie.chmod(0o755)
    unit = tmp_path / "magpie.service"
    unit.write_text(UNIT.read_text().replace("/opt/magpie", str(install)))

    result = lint([analyze, "verify", str(unit)])

    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# --- how the files fit together -----------------------------------------------------------------------------------


def dockerfile_instructions() -> dict[str, list[str]]:
    """Each instruction's arguments (continuation lines joined), by instruction name."""
    instructions: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text()).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, rest = line.strip().partition(" ")
            instructions.setdefault(name.upper(), []).append(rest)
    return instructions


def healthcheck_command(port: int) -> list[str]:
    """The image's HEALTHCHECK command (its exec form), aimed at `port`."""
    (healthcheck,) = dockerfile_instructions()["HEALTHCHECK"]
    command: list[str] = json.loads(healthcheck.partition(" CMD ")[2])
    return [part.replace(":8080/", f":{port}/") for part in command]


def test_the_image_runs_as_a_non_root_user_with_data_and_models_as_volumes() -> None:
    instructions = dockerfile_instructions()
    (user,) = instructions["USER"]
    assert user.split(":")[0] not in ("root", "0")
    (volumes,) = instructions["VOLUME"]
    assert set(json.loads(volumes)) == {"/data", "/models"}
    env = " ".join(instructions["ENV"])
    assert "MODELS_DIR=/models" in env and "DATABASE_URL=sqlite+aiosqlite:////data/" in env
    assert "HTTP_LISTEN=0.0.0.0:8080" in env and instructions["EXPOSE"] == ["8080"]
    assert instructions["ENTRYPOINT"] == ['["docker-entrypoint.sh"]'] and instructions["CMD"] == ['["run"]']
    assert healthcheck_command(8080)[-1].count("http://127.0.0.1:8080/healthz") == 1
    assert any("TORCH_VARIANT=cpu" in arg for arg in instructions["ARG"]), "the CPU build is the default"


def test_compose_starts_magpie_after_a_healthy_postgres_on_the_image_volumes() -> None:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    postgres, magpie = compose["services"]["postgres"], compose["services"]["magpie"]

    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert magpie["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    url = make_url(magpie["environment"]["DATABASE_URL"].replace("${POSTGRES_PASSWORD}", "secret"))
    assert (url.drivername, url.host, url.database) == ("postgresql+asyncpg", "postgres", "magpie")
    assert {volume.split(":")[1] for volume in magpie["volumes"]} == {"/data", "/models"}
    assert magpie["ports"] == ["127.0.0.1:8080:8080"], "health, metrics and the dashboard stay on the host"
    grace = Settings(_env_file=None).shutdown_grace_seconds  # type: ignore[call-arg]
    assert int(magpie["stop_grace_period"].removesuffix("s")) > grace, "a stop must outlast SHUTDOWN_GRACE_SECONDS"


# --- the entry point, run for real ----------------------------------------------------------------------------------


def container_env(env: dict[str, str], magpie: Path) -> dict[str, str]:
    """This environment without platform tokens, plus `env`, with `magpie` first on PATH (as in the image)."""
    full_env = {key: value for key, value in os.environ.items() if not key.endswith("_TOKEN")}
    return {**full_env, **env, "PATH": f"{magpie.parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def entrypoint(args: list[str], env: dict[str, str], magpie: Path, **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=container_env(env, magpie), check=False,
        **options,
    )  # fmt: skip


def recording_magpie(tmp_path: Path, *, fail_upgrade: bool = False) -> tuple[Path, Path]:
    """A stand-in `magpie` that records its arguments (and can refuse to migrate); returns (it, its record)."""
    record = tmp_path / "calls"
    magpie = tmp_path / "bin" / "magpie"
    magpie.parent.mkdir(parents=True)
    refuse = '[ "$1" = db ] && [ "$2" = upgrade ] && exit 3\n' if fail_upgrade else ""
    magpie.write_text(f'#!/bin/sh\necho "$*" >> {record}\n{refuse}')
    magpie.chmod(0o755)
    return magpie, record


@pytest.mark.parametrize(
    ("args", "calls"),
    [
        ([], ["db upgrade --quiet", "run"]),
        (["run"], ["db upgrade --quiet", "run"]),
        (["db", "stats"], ["db stats"]),
        (["bootstrap", "--minutes", "20"], ["bootstrap --minutes 20"]),
    ],
)
def test_the_entry_point_migrates_before_run_only(tmp_path: Path, args: list[str], calls: list[str]) -> None:
    magpie, record = recording_magpie(tmp_path)

    assert entrypoint(args, {}, magpie, timeout=30).returncode == 0
    assert record.read_text().splitlines() == calls


def test_a_failed_migration_stops_the_entry_point_before_run(tmp_path: Path) -> None:
    magpie, record = recording_magpie(tmp_path, fail_upgrade=True)

    assert entrypoint(["run"], {}, magpie, timeout=30).returncode == 3
    assert record.read_text().splitlines() == ["db upgrade --quiet"]


@pytest.fixture
def fresh_postgresql_url() -> Iterator[str]:
    """An empty PostgreSQL database (no schema: the entry point must migrate it), dropped afterwards."""
    if not _postgres_reachable(POSTGRES_ADMIN_URL):
        reason = f"PostgreSQL not reachable at {make_url(POSTGRES_ADMIN_URL).render_as_string()}"
        if os.environ.get("MAGPIE_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason + " (MAGPIE_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)
    name = f"magpie_deploy_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def real_magpie(tmp_path: Path) -> Path:
    """`magpie` as the image installs it, but running this tree's code."""
    magpie = tmp_path / "bin" / "magpie"
    magpie.parent.mkdir(parents=True)
    magpie.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m bot "$@"\n')
    magpie.chmod(0o755)
    return magpie


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_entry_point_migrates_a_fresh_postgresql_and_serves(
    tmp_path: Path, fresh_postgresql_url: str, tiny_model_dir: Path
) -> None:
    """What `docker run` (or compose, once PostgreSQL is healthy) does on first start, minus the container: the
    schema comes up, the bot answers, and while it runs the image's HEALTHCHECK command passes (once the build has
    an HTTP server: HTTP_LISTEN)."""
    port = free_port()
    env = {
        "DATABASE_URL": fresh_postgresql_url,
        "BASE_MODEL": str(tiny_model_dir),
        "MODELS_DIR": str(tmp_path / "models"),
        "HTTP_LISTEN": f"127.0.0.1:{port}",
        "MAX_NEW_TOKENS": "4",
        "SEED": "0",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    log = tmp_path / "stderr.log"
    with (
        log.open("w") as stderr,
        subprocess.Popen(
            ["sh", str(ENTRYPOINT), "run"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
            cwd=tmp_path, env=container_env(env, real_magpie(tmp_path)),
        ) as process,
    ):  # fmt: skip
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write("hello\n")
            process.stdin.flush()
            first_reply = process.stdout.readline()  # the console answers: migrated, model loaded, serving
            health = healthcheck_status(port)
            process.stdin.close()  # the end of the console's input: it stops
            assert process.wait(timeout=120) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
    assert first_reply.strip(), log.read_text()
    assert health in (0, None), f"the image's HEALTHCHECK failed against the running magpie:\n{log.read_text()}"
    assert asyncio.run(logged_texts(fresh_postgresql_url))[0] == "hello"  # then the answer


async def logged_texts(url: str) -> list[str]:
    """What the run logged, read straight from the database it migrated."""
    async with Database.opened(url) as db, db.sessions() as session:
        return list((await session.scalars(select(Message.text).order_by(Message.id))).all())


def healthcheck_status(port: int) -> int | None:
    """The image's HEALTHCHECK command's exit status against the running process; None where this build has no HTTP
    server yet (no HTTP_LISTEN setting)."""
    if "http_listen" not in Settings.model_fields:
        return None
    program, *args = healthcheck_command(port)
    assert program == "python", "the image's python; here this interpreter stands in for it"
    return subprocess.run([sys.executable, *args], capture_output=True, timeout=30, check=False).returncode


def image_env(tmp_path: Path, port: int) -> dict[str, str]:
    """The environment the image's ENV lines give, with its volumes (/data, /models) under `tmp_path` and its port
    moved to `port` (tests run side by side)."""
    env: dict[str, str] = {}
    for line in dockerfile_instructions()["ENV"]:
        for item in shlex.split(line):
            name, _, value = item.partition("=")
            env[name] = value
    for volume in ("/data", "/models"):
        env = {name: value.replace(volume, str(tmp_path / volume.strip("/"))) for name, value in env.items()}
    return {name: value.replace(":8080", f":{port}") for name, value in env.items()}


def test_a_copy_of_env_example_under_the_image_overrides_nothing_it_sets_and_magpie_serves(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`cp .env.example .env` and `docker compose up`: compose's `env_file` turns every line of the copy into an
    environment variable that overrides the image's ENV, so the copy must not set what the image does (HTTP_LISTEN
    would bind the dashboard to the container's loopback, MODELS_DIR would leave the /models volume unused). Then
    the entry point runs with that environment, the copy in its working directory too, and serves: with no
    platform token and stdin closed, as a container runs, it stays up (CONSOLE=off) until SIGTERM."""
    port = free_port()
    image = image_env(tmp_path, port)
    compose_env = {**image, **{name: value or "" for name, value in dotenv_values(ROOT / ".env.example").items()}}
    assert {name: compose_env[name] for name in image} == image, "the copy overrides the image's ENV"
    workdir = tmp_path / "data"  # WORKDIR /data
    workdir.mkdir()
    shutil.copy(ROOT / ".env.example", workdir / ".env")
    env = {**compose_env, "BASE_MODEL": str(tiny_model_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        ["sh", str(ENTRYPOINT)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=workdir,
        env=container_env(env, real_magpie(tmp_path)),
    ) as process:  # fmt: skip
        assert process.stderr is not None
        try:
            log = ""
            while "serving model" not in log:  # migrated, model loaded: serving
                line = process.stderr.readline()
                assert line, log
                log += line
            health = healthcheck_status(port)  # the image's HEALTHCHECK, on the image's HTTP_LISTEN
            running = process.poll() is None
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    assert health == 0 and running, log + stderr
    assert process.returncode == 0, log + stderr
    assert (workdir / "magpie.db").is_file()  # the image's DATABASE_URL, on the /data volume
