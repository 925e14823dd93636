"""`magpie retrain`, `magpie models …` and `magpie dataset export`, run in-process through the real parser."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.cli import build_parser
from bot.cli_training import run_command
from core.chat.messages import ChatKind
from core.chat.service import ChatService
from core.outcomes import RunEndReason
from core.serving.engine import Engine
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import ModelVersion, RunStatus, TrainingRun, VersionStatus
from core.storage.versions import activate_version, register_version
from tests.loop_support import PHRASE, QUESTION, build_loop_model, greedy_engine, log_community, loop_settings, msg
from tests.run_rows import add_run
from trainer.process import process_start_token

ROOT = Path(__file__).resolve().parent.parent


async def magpie(settings: Settings, *argv: str) -> int | None:
    return await run_command(build_parser().parse_args(list(argv)), settings)


@pytest.fixture(scope="session")
def loop_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_loop_model(tmp_path_factory.mktemp("loop-model"))


@pytest.fixture
def settings(tmp_path: Path, database_url: str, loop_model_dir: Path) -> Settings:
    return loop_settings(tmp_path, database_url, loop_model_dir, retrain_cooldown_minutes=30)


async def _log(db: Database, settings: Settings) -> None:
    engine: Engine = greedy_engine()  # never started: group messages that nobody addressed need no model
    await log_community(ChatService(settings=settings, db=db, engine=engine))


async def test_other_commands_are_not_mine(
    db: Database, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """`db stats` is left to bot/cli.py untouched (None, nothing printed), while a command of this module runs."""
    assert await magpie(settings, "db", "stats") is None
    assert capsys.readouterr() == ("", "")
    assert await magpie(settings, "models", "list") == 0
    assert "No trained model versions yet" in capsys.readouterr().out


async def test_retrain_in_the_foreground(db: Database, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    await _log(db, settings)

    assert await magpie(settings, "retrain") == 0

    out, err = capsys.readouterr()
    assert out.startswith("Training run #1 finished: v1 is now the active model. Eval loss ")
    assert "Training: 100%|" in err and not re.search(r"it/s|%/s|s/%", err)  # the bar: percent and time, no rate
    async with db.sessions() as session:
        run = await session.get(TrainingRun, 1)
    assert run is not None and run.status is RunStatus.PROMOTED and run.triggered_by.startswith("cli")

    assert await magpie(settings, "retrain") == 1
    out, err = capsys.readouterr()
    assert "RETRAIN_COOLDOWN_MINUTES" in err and not out


async def test_models_list_activate_and_rollback(
    db: Database, settings: Settings, loop_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await magpie(settings, "models", "list") == 0
    assert "No trained model versions yet" in capsys.readouterr().out
    async with db.sessions.begin() as session:
        first = await register_version(session, name="v1", path=str(loop_model_dir), metrics={"eval_loss": 1.0})
        await register_version(session, name="v2", path=str(loop_model_dir))
        await activate_version(session, version_id=first.id)

    assert await magpie(settings, "models", "activate", "v2") == 0
    assert capsys.readouterr().out.startswith("Switched to v2. A running bot switches to it within a few seconds.")
    assert await magpie(settings, "models", "activate", "v7") == 1
    assert "/models lists them" in capsys.readouterr().err
    assert await magpie(settings, "models", "rollback") == 0
    assert "Switched to v1. v2 is marked rolled back" in capsys.readouterr().out
    assert await magpie(settings, "models", "list") == 0
    listing = capsys.readouterr().out
    assert "* v1: active, eval loss 1.000" in listing and "  v2: rolled_back" in listing
    async with db.sessions() as session:
        statuses = {v.name: v.status for v in (await session.scalars(select(ModelVersion))).all()}
    assert statuses == {"v1": VersionStatus.ACTIVE, "v2": VersionStatus.ROLLED_BACK}


async def test_dataset_export(
    db: Database, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _log(db, settings)
    service = ChatService(settings=settings, db=db, engine=greedy_engine())
    await service.handle(msg("/optout", user="3000", chat="-900"))
    await service.handle(msg("mail me at someone@example.com", user="3000", chat="-900", kind=ChatKind.GROUP))
    target = tmp_path / "out" / "dataset.jsonl"

    assert await magpie(settings, "dataset", "export", str(target)) == 0

    out = capsys.readouterr().out
    records = [json.loads(line) for line in target.read_text().splitlines()]
    report, samples = records[0]["report"], records[1:]
    assert out.startswith(f"Wrote {len(samples)} samples to {target}: ")
    assert "near_duplicate_target: 27" in out and "opted_out: 1" in out
    assert report["excluded"]["near_duplicate_target"] == 27
    assert {s["split"] for s in samples} == {"train", "eval"}
    assert sum(PHRASE in s["text"] and QUESTION in s["text"] for s in samples) == 30
    assert not any("example.com" in s["text"] for s in samples)


def test_the_magpie_command_runs_them(tmp_path: Path) -> None:
    """`bot/cli.py` hands these commands over and keeps its one-line errors."""
    env = {key: value for key, value in os.environ.items() if not key.endswith("_TOKEN")}
    env.update(PYTHONPATH=str(ROOT), DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bot", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=env,
            check=False,
        )

    missing = run("models", "list")
    assert missing.returncode == 2 and "magpie db upgrade" in missing.stderr and "Traceback" not in missing.stderr
    assert run("db", "upgrade", "--quiet").returncode == 0
    listed = run("models", "list")
    assert listed.returncode == 0 and "No trained model versions yet" in listed.stdout
    assert "bootstrap" in run("--help").stdout


@pytest.fixture
def live_process() -> Iterator[subprocess.Popen[bytes]]:
    """A live process of ours (standing in for a trainer whose row says it is running)."""
    code = "import sys; print('ready', flush=True); sys.stdin.read()"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "trainer.retrain"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    try:
        yield process
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()


_running_row = partial(add_run, triggered_by="telegram:42")


async def _runs(db: Database) -> dict[int, TrainingRun]:
    async with db.sessions() as session:
        return {run.id: run for run in (await session.scalars(select(TrainingRun))).all()}


async def test_retrain_force_clears_a_stale_run(
    db: Database, settings: Settings, live_process: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    # A reused pid (a live process, but not the one that started at the recorded time) never counts as running.
    token = process_start_token(live_process.pid)
    reused = await _running_row(db, pid=live_process.pid, process_start=f"{token}7", progress=0.3)
    assert await magpie(settings, "retrain") == 1  # it is settled (just now: the cooldown refuses a new run)
    assert (await _runs(db))[reused].status is RunStatus.FAILED, "a reused pid is not the run's process"
    capsys.readouterr()

    # A bot died right after recording a run, before its child started: within the start-up grace the row counts
    # as running (the database holds one running row at a time, so this case comes second).
    starting = await _running_row(db)
    assert await magpie(settings, "retrain") == 1
    assert f"A training run (#{starting}) is already running" in capsys.readouterr().err

    assert await magpie(settings, "retrain", "--force") == 1  # the new run fails: nothing was logged yet
    out = capsys.readouterr().out
    runs = await _runs(db)
    assert runs[starting].status is RunStatus.FAILED and (runs[starting].error or "").startswith("interrupted")
    assert len(runs) == 3 and runs[3].triggered_by.startswith("cli") and "not enough conversation" in out
    assert live_process.poll() is None, "a process that is not the run's own is never killed"


async def test_retrain_stop_running_stops_a_live_run(
    db: Database, settings: Settings, live_process: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    alive = await _running_row(db, pid=live_process.pid, process_start=process_start_token(live_process.pid))

    assert await magpie(settings, "retrain", "--force") == 1
    err = capsys.readouterr().err
    assert f"A training run (#{alive}) is already running" in err and "--stop-running" in err
    assert live_process.poll() is None

    assert await magpie(settings, "retrain", "--stop-running") == 1  # the new run fails: nothing was logged yet
    assert live_process.wait(timeout=30) == -signal.SIGKILL
    run = (await _runs(db))[alive]
    assert run.status is RunStatus.FAILED and run.error == RunEndReason.STOPPED


def test_retrain_force_through_the_magpie_command(tmp_path: Path) -> None:
    """The flags exist on the real command line (`magpie retrain --help`)."""
    env = {key: value for key, value in os.environ.items() if not key.endswith("_TOKEN")}
    env.update(PYTHONPATH=str(ROOT), DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    shown = subprocess.run(
        [sys.executable, "-m", "bot", "retrain", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert shown.returncode == 0 and "--force" in shown.stdout and "--stop-running" in shown.stdout
