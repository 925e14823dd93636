"""The orchestrator's decisions and bookkeeping: schedule, cooldown, refusals, recovery, what a run reports.

The pure decisions are tested with an injected clock; the rest against a real database (SQLite and PostgreSQL).
Switching versions and the watcher are the serving side's (tests/test_serving.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from core.chat.service import ChatService
from core.outcomes import (
    AlreadyRunning,
    CoolingDown,
    RunEndReason,
    RunOutcome,
    RunStarted,
    SwapOutcome,
    SwapState,
    TrainingAgain,
    recorded_reason,
)
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import RunStatus, TrainingRun
from core.texts import run_outcome, run_request
from tests.loop_support import ADMIN, RecordingNotifier, greedy_engine, loop_settings, msg
from tests.run_rows import add_run, run_row
from trainer import process
from trainer.orchestrator import TrainingOrchestrator
from trainer.process import child_environment, process_start_token, trainer_process_alive
from trainer.retrain import decide, json_safe
from trainer.schedule import cooldown_left, retrain_due

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# --- pure decisions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_run_hours_ago", "new_messages", "interval", "minimum", "due"),
    [
        (None, 200, 24, 200, True),  # never trained, enough data
        (None, 199, 24, 200, False),  # never trained, too little
        (25, 500, 24, 200, True),  # interval passed, enough data
        (23, 500, 24, 200, False),  # interval not yet passed
        (25, 10, 24, 200, False),  # interval passed, too little new data
        (1000, 10**6, 0, 0, False),  # schedule off
        (0.5, 0, 0.25, 0, True),  # short interval, no minimum
    ],
)
def test_retrain_due(
    last_run_hours_ago: float | None, new_messages: int, interval: float, minimum: int, due: bool
) -> None:
    last = None if last_run_hours_ago is None else NOW - timedelta(hours=last_run_hours_ago)
    decision = retrain_due(
        now=NOW,
        last_run_started_at=last,
        new_messages=new_messages,
        interval_hours=interval,
        min_new_messages=minimum,
    )
    assert decision is due


def test_cooldown_left() -> None:
    five_ago = NOW - timedelta(minutes=5)
    assert cooldown_left(now=NOW, last_finished_at=five_ago, cooldown_minutes=30) == timedelta(minutes=25)
    assert cooldown_left(now=NOW, last_finished_at=five_ago, cooldown_minutes=5) is None
    assert cooldown_left(now=NOW, last_finished_at=five_ago, cooldown_minutes=0) is None
    assert cooldown_left(now=NOW, last_finished_at=None, cooldown_minutes=30) is None


def test_gate_decisions() -> None:
    assert decide(active_loss=2.0, new_loss=2.0, margin=0.0).promote
    assert decide(active_loss=2.0, new_loss=1.5, margin=0.0).promote
    worse = decide(active_loss=2.0, new_loss=2.05, margin=0.0)
    assert not worse.promote and worse.reason is RunEndReason.WORSE_THAN_ACTIVE
    assert str(worse) == "worse_than_active: eval loss 2.000 -> 2.050"
    assert decide(active_loss=2.0, new_loss=2.05, margin=0.1).promote
    diverged = decide(active_loss=2.0, new_loss=math.nan, margin=1.0)
    assert not diverged.promote and diverged.reason is RunEndReason.DIVERGED
    assert decide(active_loss=math.inf, new_loss=3.0, margin=0.0).promote


def test_metrics_are_made_json_safe() -> None:
    assert json_safe({"a": math.nan, "b": [1.5, math.inf], "c": "x", "d": {"e": -math.inf}}) == {
        "a": None,
        "b": [1.5, None],
        "c": "x",
        "d": {"e": None},
    }


def test_outcome_messages() -> None:
    metrics = {"active_eval_loss": 2.0, "eval_loss": 1.0, "eval_samples": 12, "train_samples": 90}
    promoted = run_outcome(RunOutcome(3, RunStatus.PROMOTED, "v3", metrics))
    assert promoted == (
        "Training run #3 finished: v3 is now the active model. Eval loss 2.000 → 1.000 (perplexity 7.4 → 2.7) "
        "on 12 held-out samples; trained on 90."
    )
    rejected = run_outcome(RunOutcome(4, RunStatus.REJECTED, "v4", metrics, reason=RunEndReason.WORSE_THAN_ACTIVE))
    assert rejected.startswith(
        "Training run #4 finished, but v4 was not promoted: it did worse than the active version on the same "
        "held-out conversations. The active model stays. Eval loss 2.000 → 1.000"
    )
    legacy = run_outcome(RunOutcome(4, RunStatus.REJECTED, "v4", metrics, reason=recorded_reason("worse, in 2025")))
    assert legacy.startswith("Training run #4 finished, but v4 was not promoted: worse, in 2025. The active")
    single = run_outcome(RunOutcome(6, RunStatus.PROMOTED, "v6", {**metrics, "eval_samples": 1}))
    assert "on 1 held-out sample; trained on 90." in single
    failed = run_outcome(RunOutcome(5, RunStatus.FAILED, reason=RunEndReason.KILLED))
    assert failed == "Training run #5 failed: the training process was killed. The active model stays."
    elsewhere = run_outcome(RunOutcome(7, RunStatus.PROMOTED, "v7", swap=SwapOutcome(SwapState.ELSEWHERE)))
    assert (
        elsewhere
        == "Training run #7 finished: v7 is now the active model. A running bot switches to it within a few seconds."
    )
    broken = SwapOutcome(SwapState.LOAD_FAILED, "config.json missing", "v6")
    assert run_outcome(RunOutcome(8, RunStatus.PROMOTED, "v8", swap=broken)).endswith(
        " But it could not be loaded (config.json missing); still serving v6."
    )
    withdrawn = {**metrics, "data_withdrawn": 2}
    reason = RunEndReason.TRAINING_DATA_WITHDRAWN
    again = run_outcome(RunOutcome(9, RunStatus.REJECTED, "v9", withdrawn, reason, again=TrainingAgain(10)))
    assert again == (
        "Training run #9 finished, but v9 was not promoted: training data changed during the run: 2 messages were "
        "deleted or withdrawn (/forget or /optout), so the version it trained was discarded. The active model "
        "stays. Training again without them: run #10 started."
    )


def test_child_environment_hands_the_settings_down_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        telegram_bot_token=SecretStr("123:secret"),
        admin_ids=frozenset({"telegram:42", "discord:7"}),
        train_blocklist=("spam", "scam"),
        train_learning_rate=3e-4,
        train_redact_pii=False,
        models_dir=tmp_path / "models",
        train_threads=3,
        seed=5,
    )
    inherited = {"PATH": "/usr/bin", "TELEGRAM_BOT_TOKEN": "123:secret", "train_epochs": "99", "PYTHONPATH": "/x"}

    env = child_environment(settings, inherited)

    assert "123:secret" not in env.values() and "train_epochs" not in env
    assert env["PATH"] == "/usr/bin" and env["OMP_NUM_THREADS"] == "3"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(Path(__file__).resolve().parent.parent), "/x"]
    for key, value in env.items():  # the child reads them from its environment
        monkeypatch.setenv(key, value)
    rebuilt = Settings(_env_file=None)  # type: ignore[call-arg]
    assert rebuilt.model_dump(exclude={"telegram_bot_token"}) == settings.model_dump(exclude={"telegram_bot_token"})
    assert rebuilt.telegram_bot_token is None


SECRETS = {
    "TELEGRAM_BOT_TOKEN": "123456:from-the-dot-env",
    "TELEGRAM_WEBHOOK_SECRET": "webhook-secret-from-the-dot-env",
    "DISCORD_BOT_TOKEN": "discord-token-from-the-dot-env",
    "DASHBOARD_TOKEN": "Dashboard-token-from-the-dot-env-7Qx",
    "CELERY_BROKER_URL": "amqp://magpie:broker-password@127.0.0.1:5672//",
}


async def test_a_trainer_never_holds_a_secret_even_with_a_dot_env_in_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real trainer program, started the bot's way, in a directory whose `.env` holds every secret (as the
    bot's own does), with the same secrets in the bot's settings and environment: the trainer has none of them."""
    (tmp_path / ".env").write_text("".join(f"{key}={value}\n" for key, value in SECRETS.items()))
    monkeypatch.chdir(tmp_path)
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    settings = Settings(retrain_backend="celery", telegram_webhook_url="https://bot.example/hook")  # type: ignore[call-arg]
    assert settings.telegram_bot_token is not None, "the bot itself reads them from .env"
    trainer = await process.spawn_trainer("tests.trainer_probe", 1, settings)
    stdout, _ = await trainer.communicate()
    assert trainer.returncode == 0
    report = json.loads(stdout.decode().strip().splitlines()[-1])
    assert report["event"] == "probe"
    assert report["secrets"] == {}, "no secret setting reached the trainer"
    leaked = [key for key, value in report["environ"].items() if any(s in value for s in SECRETS.values())]
    assert leaked == []


@pytest.fixture
def fake_trainer() -> Iterator[subprocess.Popen[bytes]]:
    """A live process whose command line names trainer.retrain (as a `magpie retrain` in another shell would)."""
    code = "import sys; print('ready', flush=True); sys.stdin.read()"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "trainer.retrain"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"  # it has exec'd by now
    try:
        yield process
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    return process.pid


def test_trainer_process_alive(fake_trainer: subprocess.Popen[bytes]) -> None:
    token = process_start_token(fake_trainer.pid)
    assert token is not None and token.isdigit()
    assert trainer_process_alive(fake_trainer.pid, token)
    later = str(int(token) + 1)
    assert not trainer_process_alive(fake_trainer.pid, later), "the pid is alive, but it is not the run's process"
    assert not trainer_process_alive(os.getpid(), None), "an old row without a token: not a trainer's command line"
    assert not trainer_process_alive(_dead_pid(), token)
    assert not trainer_process_alive(None, token)


def test_a_pid_we_may_not_signal_is_not_our_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /proc only the pid can be checked: a PermissionError means another user's process has that pid."""

    def denied(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(process, "has_proc", lambda: False)
    monkeypatch.setattr(os, "kill", denied)
    assert not trainer_process_alive(1, None)
    assert not trainer_process_alive(1, "123")


# --- runs in the database -------------------------------------------------------------------------------------


_add_run = partial(add_run, started_at=NOW)


@pytest.fixture
def settings(tmp_path: Path, database_url: str, tiny_model_dir: Path) -> Settings:
    return loop_settings(tmp_path, database_url, tiny_model_dir, retrain_cooldown_minutes=30)


async def test_interrupted_runs_are_marked_failed_at_start(
    db: Database, settings: Settings, fake_trainer: subprocess.Popen[bytes]
) -> None:
    """One `running` row at a time (the database allows no more): each kind is settled at start, or left."""
    token = process_start_token(fake_trainer.pid)
    finished = await _add_run(db, status=RunStatus.PROMOTED, finished_at=NOW - timedelta(days=1))
    cases: list[tuple[dict[str, Any], bool]] = [
        ({"pid": _dead_pid(), "progress": 0.4}, True),  # dead
        ({"pid": None, "started_at": NOW - timedelta(hours=1)}, True),  # never spawned
        ({"pid": fake_trainer.pid, "process_start": f"{token}0"}, True),  # reused pid
        ({"pid": None, "started_at": NOW - timedelta(seconds=10)}, False),  # just created
        ({"pid": fake_trainer.pid, "process_start": token}, False),  # another shell's live run
    ]
    for fields, interrupted in cases:
        run_id = await _add_run(db, **fields)
        partial = settings.models_dir / f".v{run_id}.partial"
        partial.mkdir(parents=True)
        orchestrator = TrainingOrchestrator(settings=settings, db=db, clock=Clock())

        await orchestrator.start()
        await orchestrator.stop()

        run = await run_row(db, run_id)
        if interrupted:
            assert run.status is RunStatus.FAILED and run.finished_at == NOW, fields
            assert run.error is not None and run.error.startswith("interrupted")
            assert not partial.exists()
        else:
            assert run.status is RunStatus.RUNNING, fields
            async with db.sessions.begin() as session:  # make room for the next case
                (await session.get(TrainingRun, run_id)).status = RunStatus.FAILED  # type: ignore[union-attr]
    assert (await run_row(db, finished)).status is RunStatus.PROMOTED


async def test_a_run_in_another_process_is_reported_as_running(
    db: Database, settings: Settings, fake_trainer: subprocess.Popen[bytes]
) -> None:
    await _add_run(db, pid=fake_trainer.pid, process_start=process_start_token(fake_trainer.pid), progress=0.42)
    orchestrator = TrainingOrchestrator(settings=settings, db=db, clock=Clock())
    reply = await orchestrator.request(triggered_by="telegram:42", notify_platform="telegram", notify_chat_id="42")
    assert reply == AlreadyRunning(1, 0.42)
    assert run_request(reply) == "A training run (#1) is already running, 42% done."
    async with db.sessions() as session:
        assert len((await session.scalars(select(TrainingRun))).all()) == 1


async def test_a_run_of_another_process_past_the_timeout_is_killed_and_failed(
    db: Database, settings: Settings, fake_trainer: subprocess.Popen[bytes]
) -> None:
    """A hung trainer started by another process (a `magpie retrain` in a shell, a bot that died): its row would
    block retraining forever. Past RETRAIN_TIMEOUT_MINUTES it is killed (verified as that run's process) and
    failed, at start and when a run is asked for."""
    token = process_start_token(fake_trainer.pid)
    limited = settings.model_copy(update={"retrain_timeout_minutes": 180.0})
    hung = await _add_run(db, pid=fake_trainer.pid, process_start=token, started_at=NOW - timedelta(minutes=181))
    orchestrator = TrainingOrchestrator(settings=limited, db=db, clock=Clock())

    assert await orchestrator.recover_interrupted_runs() == [hung]

    assert fake_trainer.wait(timeout=30) == -signal.SIGKILL
    run = await run_row(db, hung)
    assert run.status is RunStatus.FAILED and run.finished_at == NOW
    assert run.error == RunEndReason.TIMED_OUT


async def test_a_run_within_the_timeout_is_left_alone(
    db: Database, settings: Settings, fake_trainer: subprocess.Popen[bytes]
) -> None:
    token = process_start_token(fake_trainer.pid)
    unlimited = settings.model_copy(update={"retrain_timeout_minutes": 0.0})
    long_ago = await _add_run(db, pid=fake_trainer.pid, process_start=token, started_at=NOW - timedelta(days=3))
    limited = settings.model_copy(update={"retrain_timeout_minutes": 180.0})
    assert await TrainingOrchestrator(settings=unlimited, db=db, clock=Clock()).recover_interrupted_runs() == []
    clock = Clock(NOW - timedelta(days=3) + timedelta(minutes=179))
    assert await TrainingOrchestrator(settings=limited, db=db, clock=clock).recover_interrupted_runs() == []
    assert (await run_row(db, long_ago)).status is RunStatus.RUNNING and fake_trainer.poll() is None


async def test_cooldown_refuses_a_new_run_and_the_service_relays_it(db: Database, settings: Settings) -> None:
    clock = Clock()
    await _add_run(db, status=RunStatus.REJECTED, finished_at=NOW - timedelta(minutes=5))
    orchestrator = TrainingOrchestrator(settings=settings, db=db, clock=clock)
    engine = greedy_engine()
    service = ChatService(settings=settings, db=db, engine=engine, retrainer=orchestrator)

    reply = await service.handle(msg("/retrain", user=ADMIN))

    assert reply is not None
    assert reply.text == (
        "The last training run finished less than 30 minutes ago (RETRAIN_COOLDOWN_MINUTES). Try again in 25 min."
    )
    async with db.sessions() as session:
        assert len((await session.scalars(select(TrainingRun))).all()) == 1


async def test_a_run_that_fails_before_training_starts_no_cooldown(db: Database, settings: Settings) -> None:
    """Too little data: the real trainer child fails in a moment, having trained nothing, so the next request may
    start a run at once; a run that trained (here: rejected) starts the cooldown as before."""
    orchestrator = TrainingOrchestrator(settings=settings, db=db)  # the real clock: the child writes real times
    first = await orchestrator.run_in_foreground(triggered_by="test", on_progress=lambda _fraction: None)
    assert isinstance(first, RunOutcome) and first.status is RunStatus.FAILED
    assert first.reason is RunEndReason.NOT_ENOUGH_DATA

    second = await orchestrator.run_in_foreground(triggered_by="test", on_progress=lambda _fraction: None)
    assert isinstance(second, RunOutcome) and second.run_id == first.run_id + 1, "no cooldown after the first"

    await _add_run(db, status=RunStatus.REJECTED, started_at=datetime.now(UTC), finished_at=datetime.now(UTC))
    refused = await orchestrator.request(triggered_by="test", notify_platform=None, notify_chat_id=None)
    assert isinstance(refused, CoolingDown) and refused.minutes_left == 30


async def test_the_schedule_starts_a_run_when_due(db: Database, settings: Settings) -> None:
    clock = Clock()
    scheduled = settings.model_copy(update={"retrain_interval_hours": 24.0, "retrain_min_new_messages": 2})
    orchestrator = TrainingOrchestrator(settings=scheduled, db=db, clock=clock)
    service = ChatService(settings=scheduled, db=db, engine=greedy_engine(), retrainer=orchestrator)
    for text in ("one", "/help"):
        await service.handle(msg(text, user="5", chat="-1"))  # a group: logged, not answered
    await _add_run(
        db, status=RunStatus.FAILED, started_at=NOW - timedelta(hours=30), finished_at=NOW - timedelta(hours=30)
    )

    assert await orchestrator.check_schedule() is None, "one new conversational message; the command does not count"
    await service.handle(msg("two", user="6", chat="-1"))
    clock.now = NOW - timedelta(hours=7)  # only 23 hours after the last run
    assert await orchestrator.check_schedule() is None
    clock.now = NOW

    reply = await orchestrator.check_schedule()
    await orchestrator.stop()

    assert reply == RunStarted(2, reports_here=False)
    assert run_request(reply).startswith("Training run #2 started")
    run = await run_row(db, 2)
    assert run.triggered_by == "schedule" and run.status is RunStatus.FAILED and run.finished_at is not None


# --- what a run reports -------------------------------------------------------------------------------------


async def test_progress_is_notified_every_quarter(db: Database, settings: Settings) -> None:
    notifier = RecordingNotifier()
    orchestrator = TrainingOrchestrator(settings=settings, db=db, notifier=notifier)
    report = orchestrator._progress_notifier(7, ("telegram", "42"))
    assert report is not None
    for fraction in (0.1, 0.26, 0.3, 0.49, 0.51, 0.8, 0.99, 1.0):
        await report(fraction)
    assert notifier.texts() == [
        "Training run #7: 26% done.",
        "Training run #7: 51% done.",
        "Training run #7: 80% done.",
    ]


async def test_a_korean_admin_hears_why_a_run_failed_in_korean(db: Database, settings: Settings) -> None:
    """The end reason is recorded as a value and worded for the reader: the admin who asked in Korean reads the
    Korean reason, not English pasted into a Korean sentence."""
    notifier = RecordingNotifier()
    orchestrator = TrainingOrchestrator(settings=settings, db=db, notifier=notifier)
    service = ChatService(settings=settings, db=db, engine=greedy_engine(), retrainer=orchestrator)
    try:
        reply = await service.handle(replace(msg("/retrain", user=ADMIN), language="ko"))
        assert reply is not None and reply.text.startswith("학습 #1을(를) 시작했어요.")
        outcome = await notifier.wait_for("학습 #1이(가) 실패했어요", "Training run #1")
    finally:
        await orchestrator.stop()
    assert outcome.startswith("학습 #1이(가) 실패했어요: 아직 학습할 대화가 부족해요: 기록된 메시지 2개"), outcome
    assert "distinct" not in outcome and "conversation" not in outcome, "no English pasted into it"
    assert (await run_row(db, 1)).error == RunEndReason.NOT_ENOUGH_DATA == "not_enough_data"
