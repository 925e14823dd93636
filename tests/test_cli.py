"""Start-up failures are one clear line naming the problem and the fix, never a traceback wall."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_model_not_found_offline_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    assert run_cli(["db", "upgrade", "--quiet"], tmp_path, DATABASE_URL=url).returncode == 0
    result = run_cli(["run"], tmp_path, DATABASE_URL=url, BASE_MODEL=str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("magpie:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "no-such-model" in lines[0] and "BASE_MODEL" in lines[0]
