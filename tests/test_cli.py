"""Start-up failures are one clear line naming the problem and the fix, never a traceback wall."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {key: value for key, value in os.environ.items() if not key.endswith("_TOKEN")}
    full_env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=full_env,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DEVICE": "gpu"}, "DEVICE"),
        ({"ADMIN_IDS": "alice"}, "ADMIN_IDS"),
        ({"DATABASE_URL": "postgresql+asyncpg://magpie:hunter2@127.0.0.1:1/magpie"}, "DATABASE_URL"),
    ],
)
def test_bad_settings_fail_at_start_with_one_line(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    result = run_cli(["run"], tmp_path, **env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("magpie:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0]
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+asyncpg://magpie:hunter2@127.0.0.1:1/magpie", "Cannot reach the database"),
        ("postgresql://magpie:hunter2@127.0.0.1:5432/magpie", "postgresql://"),
        ("mysql://magpie:hunter2@127.0.0.1:3306/magpie", "mysql://"),
        ("hunter2", "not a database URL"),
    ],
    ids=["unreachable", "no-async-driver", "mysql", "not-a-url"],
)
def test_a_mistyped_database_url_is_one_line_naming_the_forms_that_work(
    tmp_path: Path, url: str, expected: str
) -> None:
    """Issue #18, item 5: `magpie db upgrade` printed 149- and 40-line tracebacks (ModuleNotFoundError for a driver
    Magpie lacks). Every command connects through the same `core.storage.db` checks."""
    result = run_cli(["db", "upgrade"], tmp_path, DATABASE_URL=url)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr + result.stdout, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("magpie: ") and expected in line
    assert "sqlite+aiosqlite:///" in line and "postgresql+asyncpg://" in line


def test_model_not_found_offline_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    assert run_cli(["db", "upgrade", "--quiet"], tmp_path, DATABASE_URL=url).returncode == 0
    result = run_cli(["run"], tmp_path, DATABASE_URL=url, BASE_MODEL=str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("magpie:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "no-such-model" in lines[0] and "BASE_MODEL" in lines[0]


def test_secrets_are_redacted_from_log_records_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from bot.cli import RedactSecrets

    token = "123456:SECRET-TOKEN-VALUE"
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "calling https://api/bot%s/getMe", (token,), None)
    try:
        raise RuntimeError(f"failed https://api/bot{token}/getMe")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    assert RedactSecrets([token]).filter(record)
    assert token not in record.getMessage() and "[redacted]" in record.getMessage()
    assert record.exc_text is not None and token not in record.exc_text


def test_the_passwords_in_database_redis_and_broker_urls_are_redacted_from_logs() -> None:
    """DATABASE_URL and REDIS_URL are plain settings (the trainer needs the database's), but their passwords are
    secrets like the tokens: a driver's error may print the URL, or the password alone, encoded or not."""
    import logging

    from core.ops.logging_setup import RedactSecrets, secret_values

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url="postgresql+asyncpg://magpie:pg%40Secret1@db.internal:5432/magpie",
        redis_url="redis://:redis-Secret-2@redis.internal:6379/0",
        celery_broker_url=SecretStr("amqp://magpie:amqp-Secret-3@mq.internal:5671//"),
    )
    line = (
        "could not connect to postgresql+asyncpg://magpie:pg%40Secret1@db.internal:5432/magpie "
        "(password 'pg@Secret1' refused); redis://:redis-Secret-2@redis.internal:6379/0 down; amqp-Secret-3"
    )
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "%s", (line,), None)
    assert RedactSecrets(secret_values(settings)).filter(record)
    message = record.getMessage()
    for password in ("pg%40Secret1", "pg@Secret1", "redis-Secret-2", "amqp-Secret-3"):
        assert password not in message
    assert "db.internal" in message and "redis.internal" in message, "only the passwords go"
