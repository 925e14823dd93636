"""Training through the queue (RETRAIN_BACKEND=celery): a real `magpie worker` process on the local Redis and
RabbitMQ carries out the run the bot queued; the bot follows the run's row and reports as it does for a local run.

The row's rules for queued runs (one running run per database, a worker takes a run once, a dead worker's run is
`interrupted`) are tested on SQLite and PostgreSQL without a broker, with an injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import func, select

from core.chat.service import ChatService
from core.errors import ConfigError
from core.outcomes import AlreadyRunning, CouldNotStart, RunEndReason
from core.serving.engine import Engine
from core.serving.model_serving import ModelServing
from core.settings import Settings, load_settings
from core.storage.db import Database
from core.storage.models import ModelVersion, RunStatus
from core.storage.versions import get_active_version
from core.texts import run_request
from tests.conftest import _empty_tables
from tests.loop_support import (
    ADMIN,
    RecordingNotifier,
    build_loop_model,
    greedy_engine,
    log_community,
    loop_settings,
    msg,
)
from tests.loop_support import started_engine as start_engine
from tests.paused_retrain import SOCKET_VARIABLE, pause_server
from tests.run_rows import add_run, run_row
from tests.throwaway_services import ThrowawayRedis
from trainer import runs
from trainer.celery_queue import celery_app
from trainer.orchestrator import RunningRun, TrainingOrchestrator
from trainer.process import child_environment, this_host, trainer_command, trainer_process_alive
from trainer.runs import HEARTBEAT_STALE, StartPolicy

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
BROKERS = {
    "redis": ("redis://127.0.0.1:6379/13", 6379),
    "rabbitmq": ("amqp://guest:guest@127.0.0.1:5672//", 5672),
}


# --- the row's rules for queued runs (no broker) ----------------------------------------------------------------


_queued_run = partial(add_run, triggered_by="telegram:42", started_at=NOW, heartbeat_at=NOW)
_row = run_row


@pytest.fixture
def settings(tmp_path: Path, database_url: str, tiny_model_dir: Path) -> Settings:
    return loop_settings(tmp_path, database_url, tiny_model_dir, retrain_timeout_minutes=180.0)


async def test_only_one_run_is_running_per_database(db: Database) -> None:
    """Whoever creates a run (a bot, another replica, `magpie retrain`, both at once): the database keeps one."""
    first = await runs.create(db, triggered_by="telegram:42", notify=None, now=NOW)
    second = await runs.create(db, triggered_by="cli:alice", notify=None, now=NOW, queued=True)
    assert isinstance(first, int) and second == AlreadyRunning(first, 0.0)
    await runs.fail(db, first, RunEndReason.STOPPED, now=NOW)
    assert isinstance(await runs.create(db, triggered_by="cli:alice", notify=None, now=NOW), int)


async def test_a_queued_run_waits_for_a_worker_until_the_timeout(db: Database, settings: Settings) -> None:
    run_id = await _queued_run(db)
    later = await runs.settle_running(db, settings, now=NOW + timedelta(minutes=179), policy=StartPolicy())
    assert later.running == AlreadyRunning(run_id, 0.0) and not later.ended
    settled = await runs.settle_running(db, settings, now=NOW + timedelta(minutes=181), policy=StartPolicy())
    assert [ended.run_id for ended in settled.ended] == [run_id] and not settled.ended[0].kill
    row = await _row(db, run_id)
    assert row.status is RunStatus.FAILED and row.error == RunEndReason.NO_WORKER


async def test_a_run_whose_worker_stopped_beating_is_interrupted(db: Database, settings: Settings) -> None:
    """A worker on another machine: only its heartbeat tells that it lives (its pid means nothing here)."""
    run_id = await _queued_run(db, worker_host="gpu-box-elsewhere", pid=1, process_start="1")
    beating = await runs.settle_running(db, settings, now=NOW + HEARTBEAT_STALE, policy=StartPolicy(True, "cli:x"))
    assert beating.running is None and beating.ended[0].kill is False, "stopped, but never a local pid killed"
    assert (await _row(db, run_id)).error == RunEndReason.STOPPED

    run_id = await _queued_run(db, worker_host="gpu-box-elsewhere", pid=1, process_start="1")
    assert await runs.follow_queued(db, settings, run_id, now=NOW + HEARTBEAT_STALE) == 0.0
    assert await runs.beat(db, run_id, now=NOW + timedelta(minutes=5))
    assert await runs.follow_queued(db, settings, run_id, now=NOW + timedelta(minutes=6)) == 0.0
    assert await runs.follow_queued(db, settings, run_id, now=NOW + timedelta(minutes=8)) is None
    row = await _row(db, run_id)
    assert row.status is RunStatus.FAILED and row.error == RunEndReason.INTERRUPTED
    assert not await runs.beat(db, run_id, now=NOW + timedelta(minutes=9)), "its worker learns it ended"


async def test_a_bot_leaves_a_queued_run_going_and_the_next_start_reports_it(db: Database, settings: Settings) -> None:
    """The worker does not depend on the bot: stopping the bot stops following the run, not the run; the next
    start follows it again and tells the admin who asked."""
    queued = settings.model_copy(
        update={"retrain_backend": "celery", "celery_broker_url": SecretStr("redis://127.0.0.1:1/0")}
    )
    run_id = await _queued_run(db, worker_host="gpu-box", notify_platform="telegram", notify_chat_id=ADMIN)
    first = TrainingOrchestrator(settings=queued, db=db, clock=lambda: NOW, poll_interval_s=0.05)
    await first.start()
    assert first.running == RunningRun(run_id, None, 0.0)
    await first.stop()
    assert (await _row(db, run_id)).status is RunStatus.RUNNING

    notifier = RecordingNotifier()
    second = TrainingOrchestrator(settings=queued, db=db, notifier=notifier, clock=lambda: NOW, poll_interval_s=0.05)
    await second.start()
    try:
        await runs.end_if_running(db, run_id, RunStatus.REJECTED, RunEndReason.WORSE_THAN_ACTIVE, now=NOW)
        told = await notifier.wait_for(f"Training run #{run_id} finished", timeout=30)
    finally:
        await second.stop()
    assert "it did worse than the active version" in told and notifier.sent[-1][:2] == ("telegram", ADMIN)


async def test_a_broker_that_does_not_answer_fails_the_run_at_once(db: Database, settings: Settings) -> None:
    queued = settings.model_copy(
        update={"retrain_backend": "celery", "celery_broker_url": SecretStr("redis://:hunter22@127.0.0.1:1/0")}
    )
    orchestrator = TrainingOrchestrator(settings=queued, db=db, clock=lambda: NOW)
    try:
        refused = await orchestrator.request(triggered_by="telegram:42", notify_platform=None, notify_chat_id=None)
    finally:
        await orchestrator.stop()
    assert refused == CouldNotStart(queue_unreachable=True) and orchestrator.running is None
    row = await _row(db, 1)
    assert row.status is RunStatus.FAILED and row.error == RunEndReason.QUEUE_UNREACHABLE


async def test_a_broker_that_went_away_is_named_to_the_admin_who_asked(
    db: Database, settings: Settings, throwaway_redis: ThrowawayRedis
) -> None:
    """The broker answered one /retrain and then died: the next /retrain is answered at once, in words the admin
    can act on (which setting, and to send it again), not "the log says why"; the run is failed, not left queued."""
    queued = settings.model_copy(
        update={"retrain_backend": "celery", "celery_broker_url": SecretStr(throwaway_redis.url)}
    )
    notifier = RecordingNotifier()
    orchestrator = TrainingOrchestrator(settings=queued, db=db, notifier=notifier, poll_interval_s=0.1)
    service = ChatService(settings=queued, db=db, engine=greedy_engine(), retrainer=orchestrator)
    try:
        first = await service.handle(msg("/retrain", user=ADMIN))
        assert first is not None and first.text.startswith("Training run #1 started")
        await runs.fail(db, 1, RunEndReason.CLEARED, now=datetime.now(UTC))  # no worker: the next run may start
        await notifier.wait_for("Training run #1 failed")
        await throwaway_redis.kill()
        second = await service.handle(msg("/retrain", user=ADMIN))
    finally:
        await orchestrator.stop()
    assert second is not None
    assert second.text == run_request(CouldNotStart(queue_unreachable=True))
    assert "training queue is not answering" in second.text and "CELERY_BROKER_URL" in second.text
    row = await _row(db, 2)
    assert row.status is RunStatus.FAILED and row.error == RunEndReason.QUEUE_UNREACHABLE


async def test_force_clears_a_queued_run_no_worker_took(db: Database, settings: Settings) -> None:
    run_id = await _queued_run(db)
    settled = await runs.settle_running(db, settings, now=NOW, policy=StartPolicy(clear_starting=True))
    assert settled.running is None and (await _row(db, run_id)).error == RunEndReason.CLEARED


async def test_a_worker_takes_a_run_once(db: Database) -> None:
    run_id = await _queued_run(db)
    taken = await runs.take(db, run_id, host="worker-a", now=NOW)
    assert taken.taken and taken.started_at == NOW
    again = await runs.take(db, run_id, host="worker-b", now=NOW + timedelta(seconds=30))
    assert not again.taken and "being carried out by the worker on worker-a" in again.why_not
    assert (await _row(db, run_id)).status is RunStatus.RUNNING

    late = await runs.take(db, run_id, host="worker-b", now=NOW + HEARTBEAT_STALE + timedelta(seconds=1))
    assert not late.taken and late.ended is not None and "lost its worker" in late.why_not
    assert (await _row(db, run_id)).error == RunEndReason.INTERRUPTED
    ended = await runs.take(db, run_id, host="worker-b", now=NOW + timedelta(hours=1))
    assert not ended.taken and ended.why_not.endswith("is already failed")


async def test_a_run_whose_trainer_died_on_this_machine_is_interrupted_at_once(db: Database) -> None:
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await dead.wait()
    run_id = await _queued_run(db, worker_host=this_host(), pid=dead.pid)
    retaken = await runs.take(db, run_id, host=this_host(), now=NOW + timedelta(seconds=5))
    assert not retaken.taken and (await _row(db, run_id)).error == RunEndReason.INTERRUPTED


def test_celery_settings_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings().retrain_backend == "local" and load_settings().celery_broker_url is None
    monkeypatch.setenv("RETRAIN_BACKEND", "celery")
    with pytest.raises(ConfigError, match="CELERY_BROKER_URL must be set when RETRAIN_BACKEND=celery"):
        load_settings()
    monkeypatch.setenv("CELERY_BROKER_URL", "http://guest:hunter22@broker")
    with pytest.raises(ConfigError, match="CELERY_BROKER_URL must start with one of") as info:
        load_settings()
    assert "hunter22" not in str(info.value)
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://guest:hunter22@broker//")
    assert "hunter22" not in repr(load_settings())


def test_the_accelerate_launcher(tmp_path: Path) -> None:
    config = tmp_path / "accelerate.yaml"
    base = Settings(_env_file=None, train_launcher="accelerate")  # type: ignore[call-arg]
    command = trainer_command("trainer.retrain", 7, base)
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[-4:] == [
        "-m",
        "trainer.retrain",
        "--run-id",
        "7",
    ]
    with pytest.raises(FileNotFoundError, match="ACCELERATE_CONFIG"):
        trainer_command("trainer.retrain", 7, base.model_copy(update={"accelerate_config": config}))
    config.write_text("num_processes: 1\n")
    with_config = trainer_command("trainer.retrain", 7, base.model_copy(update={"accelerate_config": config}))
    assert with_config[3:5] == ["--config_file", str(config)]
    assert trainer_command("trainer.retrain", 7, Settings(_env_file=None))[1:] == [
        "-m",
        "trainer.retrain",
        "--run-id",
        "7",
    ]  # type: ignore[call-arg]


# --- a real worker on a real broker -------------------------------------------------------------------------------


ACCELERATE_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
mixed_precision: 'no'
num_machines: 1
num_processes: 1
use_cpu: true
"""


@dataclass
class Stack:
    broker_url: str
    database_url: str
    queue: str
    launcher: str


@pytest.fixture(
    params=[("redis", "postgresql", "local"), ("rabbitmq", "sqlite", "accelerate")],
    ids=["redis-postgresql", "rabbitmq-sqlite-accelerate"],
)
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A broker (skipped with the reason when it does not answer) with a queue of this test's own, deleted after;
    a database; how the worker starts its trainer (TRAIN_LAUNCHER)."""
    broker, database, launcher = request.param
    url, port = BROKERS[broker]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        pytest.skip(f"{broker} is not answering on 127.0.0.1:{port} (.ci/run starts it when it can)")
    queue = f"magpie-test-{uuid.uuid4().hex[:10]}"
    yield Stack(url, str(request.getfixturevalue(f"{database}_url")), queue, launcher)
    app = celery_app(Settings(_env_file=None, celery_broker_url=SecretStr(url)))  # type: ignore[call-arg]
    with app.connection_for_write() as connection:
        connection.default_channel.queue_delete(queue)
    app.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_loop_model(tmp_path_factory.mktemp("celery-model"))


@dataclass
class Bot:
    settings: Settings
    db: Database
    notifier: RecordingNotifier
    orchestrator: TrainingOrchestrator
    service: ChatService
    serving: ModelServing
    engine: Engine


@pytest.fixture
async def bot(stack: Stack, model_dir: Path, tmp_path: Path) -> AsyncIterator[Bot]:
    """A bot wired like `magpie run` with RETRAIN_BACKEND=celery (the orchestrator polls its runs' rows often)."""
    extra: dict[str, Any] = {"train_epochs": 1, "train_launcher": stack.launcher}  # one epoch already promotes
    if stack.launcher == "accelerate":
        extra["accelerate_config"] = tmp_path / "accelerate.yaml"
        extra["accelerate_config"].write_text(ACCELERATE_CPU)
    broker = SecretStr(stack.broker_url)
    settings = loop_settings(
        tmp_path, stack.database_url, model_dir, retrain_backend="celery", celery_broker_url=broker,
        celery_queue=stack.queue, **extra,
    )  # fmt: skip
    db = Database.connect(settings.database_url)
    engine = await start_engine(model_dir, "tiny")
    notifier = RecordingNotifier()
    serving = ModelServing(settings=settings, db=db, engine=engine)
    orchestrator = TrainingOrchestrator(
        settings=settings, db=db, serving=serving, notifier=notifier, poll_interval_s=0.2
    )
    await serving.start()
    await orchestrator.start()
    service = ChatService(settings=settings, db=db, engine=engine, retrainer=orchestrator, serving=serving)
    try:
        yield Bot(settings, db, notifier, orchestrator, service, serving, engine)
    finally:
        await orchestrator.stop()
        await serving.stop()
        await engine.close()
        await _empty_tables(db)
        await db.close()


@contextlib.contextmanager
def worker(settings: Settings, tmp_path: Path, module: str = "bot") -> Iterator[subprocess.Popen[bytes]]:
    """`python -m bot worker` (or `tests.celery_worker`) in a session of its own, stopped (SIGTERM) afterwards;
    its log is shown if the test fails."""
    env = child_environment(settings, os.environ)
    assert settings.celery_broker_url is not None
    # The queue's settings are not handed down to trainers (nor a secret ever): a worker's come from its own .env.
    env.update(
        RETRAIN_BACKEND="celery",
        CELERY_BROKER_URL=settings.celery_broker_url.get_secret_value(),
        CELERY_QUEUE=settings.celery_queue,
    )
    command = [sys.executable, "-m", module, *(["worker"] if module == "bot" else [])]
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        yield process
    except BaseException:
        print(log_path.read_text(errors="replace")[-6000:], file=sys.stderr)
        raise
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def test_the_worker_obeys_no_remote_control(sqlite_url: str, tmp_path: Path) -> None:
    """Whoever reaches the broker can write to Celery's broadcast queue: a real `magpie worker` must neither answer
    a ping nor obey a shutdown sent there (on the broker's own terms, as an attacker with its password would)."""
    url, port = BROKERS["redis"]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        pytest.skip(f"redis is not answering on 127.0.0.1:{port} (.ci/run starts it when it can)")
    queue = f"magpie-test-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=sqlite_url, models_dir=tmp_path / "models", celery_broker_url=SecretStr(url), celery_queue=queue,
    )  # fmt: skip
    from celery import Celery

    attacker = Celery("attacker", broker=url, set_as_current=False)  # a plain client: Celery's defaults
    log_path = tmp_path / "worker.log"
    try:
        with worker(settings, tmp_path) as process:
            _wait_for_line(log_path, "ready", process)
            assert attacker.control.ping(timeout=2.0) == [], "the worker answered a broadcast ping"
            attacker.control.broadcast("shutdown")
            assert attacker.control.ping(timeout=1.0) == []
            assert process.poll() is None, "a broadcast shutdown stopped the worker"
    finally:
        attacker.close()


def _wait_for_line(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Waits until the worker's log has a line holding `text` (it is ready), failing if the worker exits first."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert process.poll() is None, "the worker exited"
        assert time.monotonic() < deadline, f"no {text!r} in the worker's log after {timeout:.0f}s"
        time.sleep(0.1)


async def _exited(pid: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Waits until process `pid` (not necessarily our child) has exited: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        await asyncio.wait_for(readable.wait(), timeout)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _versions(db: Database) -> int:
    async with db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(ModelVersion)) or 0)


@pytest.mark.slow
async def test_a_queued_run_is_trained_by_the_worker_and_reported(bot: Bot, tmp_path: Path) -> None:
    await log_community(bot.service)
    reply = await bot.service.handle(msg("/retrain", user=ADMIN))
    assert reply is not None and reply.text.startswith("Training run #1 started")
    assert (await _row(bot.db, 1)).heartbeat_at is not None, "queued: no worker has it yet"

    with worker(bot.settings, tmp_path) as process:
        outcome = await bot.notifier.wait_for("Training run #1 finished", "Training run #1 failed")
        assert process.poll() is None, "the worker goes on after the run"

    assert "v1 is now the active model" in outcome and "Eval loss" in outcome
    row = await _row(bot.db, 1)
    assert row.status is RunStatus.PROMOTED and row.progress == 1.0 and row.worker_host == this_host()
    assert row.pid is not None and row.pid != os.getpid() and not trainer_process_alive(row.pid, row.process_start)
    async with bot.db.sessions() as session:
        active = await get_active_version(session)
    assert active is not None and active.name == "v1" and Path(active.path).parent == bot.settings.models_dir.resolve()
    assert bot.engine.model_ref is not None
    assert bot.engine.model_ref.version_id == active.id, "the bot swapped to the version the worker trained"


@pytest.mark.slow
async def test_a_worker_killed_mid_run_leaves_the_run_interrupted(
    bot: Bot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of the worker (its whole process group: worker, pool, trainer) after the version directory was
    written and before it was registered: the run ends `interrupted`, and no version, no directory is left."""
    await log_community(bot.service)
    workers: list[subprocess.Popen[bytes]] = []
    killed: list[int] = []

    async def kill_the_worker(run_id: int) -> str:
        assert (bot.settings.models_dir / f"v{run_id}").is_dir(), "paused after the rename, before recording"
        trainer = (await _row(bot.db, run_id)).pid
        assert trainer is not None
        os.killpg(workers[0].pid, signal.SIGKILL)
        killed.append(workers[0].wait(timeout=30))
        await _exited(trainer)  # under accelerate the trainer is in a session of its own: tied to the worker
        return "go"  # nobody is listening any more

    async with pause_server(kill_the_worker) as path:
        monkeypatch.setenv(SOCKET_VARIABLE, path)  # the worker's trainer finds the test's socket there
        with worker(bot.settings, tmp_path, module="tests.celery_worker") as process:
            workers.append(process)
            reply = await bot.service.handle(msg("/retrain", user=ADMIN))
            assert reply is not None and reply.text.startswith("Training run #1 started")
            outcome = await bot.notifier.wait_for("Training run #1 finished", "Training run #1 failed")

    assert killed == [-signal.SIGKILL]
    assert outcome.startswith("Training run #1 failed: interrupted"), outcome
    row = await _row(bot.db, 1)
    assert row.status is RunStatus.FAILED and row.error == RunEndReason.INTERRUPTED and row.model_version_id is None
    assert await _versions(bot.db) == 0, "never a half-registered version"
    assert not [path.name for path in bot.settings.models_dir.iterdir()], "its directory was removed"
