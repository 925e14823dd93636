"""The learning loop end to end: logged conversations → /retrain → a training process → gate → hot swap.

Everything is real: the chat service, the engine with a tiny GPT-2, the database (SQLite and PostgreSQL), the
orchestrator and the `python -m trainer.retrain` child process it spawns. Runs are kept to a few seconds of
training with a tiny model and a high learning rate.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.chat.service import ChatService
from core.outcomes import RunEndReason, RunOutcome
from core.serving.engine import Engine
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Message, ModelVersion, Role, RunStatus, TrainingRun, VersionStatus
from core.storage.versions import activate_version, get_active_version, register_version
from core.texts import run_outcome
from tests.loop_support import (
    ADMIN,
    PHRASE,
    QUESTION,
    WAIT_S,
    RecordingNotifier,
    build_loop_model,
    community_samples,
    greedy_engine,
    log_community,
    loop_settings,
    msg,
    started_engine,
)
from tests.paused_retrain import SOCKET_VARIABLE, pause_server
from tests.run_rows import run_row
from trainer.dataset import split_by_conversation
from trainer.orchestrator import TrainingOrchestrator
from trainer.train import TrainArguments, train

pytestmark = pytest.mark.slow


@dataclass
class Loop:
    """A bot wired like `magpie run` wires it, with a recording notifier."""

    settings: Settings
    db: Database
    engine: Engine
    notifier: RecordingNotifier
    serving: ModelServing
    orchestrator: TrainingOrchestrator
    service: ChatService

    async def stop(self) -> None:
        await self.orchestrator.stop()
        await self.serving.stop()

    async def ask(self, text: str, user: str) -> tuple[str, int | None]:
        """A private message; returns the reply and the model version the service logged it with."""
        reply = await self.service.handle(msg(text, user=user))
        assert reply is not None and reply.log_id is not None
        async with self.db.sessions() as session:
            row = await session.get(Message, reply.log_id)
        assert row is not None and row.role is Role.BOT
        return reply.text, row.model_version_id

    async def admin(self, command: str) -> str:
        reply = await self.service.handle(msg(command, user=ADMIN))
        assert reply is not None
        return reply.text


async def _wire(settings: Settings, db: Database, engine: Engine, **orchestrator_options: Any) -> Loop:
    notifier = RecordingNotifier()
    serving = ModelServing(settings=settings, db=db, engine=engine)
    orchestrator = TrainingOrchestrator(
        settings=settings, db=db, serving=serving, notifier=notifier, **orchestrator_options
    )
    await serving.start()
    await orchestrator.start()
    service = ChatService(settings=settings, db=db, engine=engine, retrainer=orchestrator, serving=serving)
    return Loop(settings, db, engine, notifier, serving, orchestrator, service)


@pytest.fixture(scope="session")
def loop_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_loop_model(tmp_path_factory.mktemp("loop-model"))


@pytest.fixture
async def base_loop(db: Database, database_url: str, loop_model_dir: Path, tmp_path: Path) -> AsyncIterator[Loop]:
    """Serving BASE_MODEL (the tiny random GPT-2): no trained version yet."""
    settings = loop_settings(tmp_path, database_url, loop_model_dir)
    engine = await started_engine(loop_model_dir, "tiny")
    loop = await _wire(settings, db, engine)
    try:
        yield loop
    finally:
        await loop.stop()
        await engine.close()


@pytest.fixture
async def paused_loop(db: Database, database_url: str, loop_model_dir: Path, tmp_path: Path) -> AsyncIterator[Loop]:
    """Like `base_loop`, but its runs are `tests.paused_retrain`: the real training program, which stops after
    training and scoring, before it records, until the test's `decide` answers (see `paused_retrain`)."""
    settings = loop_settings(tmp_path, database_url, loop_model_dir)
    engine = await started_engine(loop_model_dir, "tiny")
    loop = await _wire(settings, db, engine, trainer_module="tests.paused_retrain")
    try:
        yield loop
    finally:
        await loop.orchestrator.stop()
        await engine.close()


async def test_retrain_teaches_the_community_answer(paused_loop: Loop, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = paused_loop
    before, _ = await loop.ask(QUESTION, user="900")
    assert PHRASE not in before
    await log_community(loop.service)
    during: list[tuple[str, int | None]] = []

    async def while_it_runs(run_id: int) -> str:
        """The run has trained and is held before it records: the bot must still answer, with the old model."""
        assert run_id == 1 and loop.orchestrator.running is not None
        during.append(await loop.ask("are you still there?", user="901"))
        return "go"

    async with pause_server(while_it_runs) as socket:
        monkeypatch.setenv(SOCKET_VARIABLE, socket)
        started = await loop.admin("/retrain")
        assert started.startswith("Training run #1 started")
        assert "already running" in await loop.admin("/retrain")
        outcome = await loop.notifier.wait_for("Training run #1 finished", "Training run #1 failed")

    # The bot kept answering while the child ran: a reply, written by the model that served before the run.
    assert len(during) == 1 and during[0][0].strip() and during[0][1] is None
    assert any(text.endswith("% done.") for text in loop.notifier.texts()), "progress was reported on the way"
    assert "v1 is now the active model" in outcome and "Eval loss" in outcome and "perplexity" in outcome
    assert all(chat == ADMIN for _, chat, _ in loop.notifier.sent)

    after, version_id = await loop.ask(QUESTION, user="902")
    assert PHRASE in after
    async with loop.db.sessions() as session:
        active = await get_active_version(session)
        run = await session.get(TrainingRun, 1)
    assert active is not None and active.name == "v1" and version_id == active.id
    assert loop.engine.model_ref is not None and loop.engine.model_ref.version_id == active.id
    assert run is not None and run.status is RunStatus.PROMOTED and run.triggered_by == f"telegram:{ADMIN}"
    assert run.model_version_id == active.id and run.progress == 1.0 and run.finished_at is not None
    assert run.metrics["eval_loss"] < run.metrics["active_eval_loss"]
    # The recall probe asked both versions the held-out chats' recurring question (issue #19): the base never knew it.
    probe = run.metrics["recall_probe"]
    assert probe["prompts"] == 1 and probe["active"] == 0 and probe["new"] in (0, 1)
    assert "answered as the community does" in outcome
    assert run.metrics["targets"]["follow_up"] >= 1 and run.metrics["targets"].get("exchange_samples", 0) == 0
    # What the dashboard plots of the last run: its training loss from the first step on, every logging step.
    curve = run.metrics["loss_curve"]
    assert curve[0][0] == 1 and len(curve) >= 2 and curve[-1][1] < curve[0][1]
    assert (loop.settings.models_dir / "v1" / "model.safetensors").is_file()
    assert not list(loop.settings.models_dir.glob(".*partial"))
    trained = json.loads((loop.settings.models_dir / "v1" / "metrics.json").read_text())
    assert trained["eval_loss_per_epoch"] == [], "the held-out data judged the version; it did not pick its epoch"


@pytest.fixture(scope="session")
def community_model_dir(loop_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model already taught the community's answer (trained here, outside the loop)."""
    train_samples, eval_samples = split_by_conversation(community_samples(), 0.1)
    # Response-only loss: with the questions in the loss too, whether the model answers or echoes the question was
    # down to float rounding (an AVX-512 CPU echoed it). 60 passes: after 30, an AMD EPYC answered "zebra zebra
    # forever" (rounding again); taught twice as long, the answer no longer hangs on it.
    args = TrainArguments(
        epochs=60, batch_size=2, learning_rate=1e-2, warmup_steps=0, weight_decay=0.01, logging_steps=10,
        max_length=64, threads=1, seed=0, loss_on_response_only=True, precision="fp32", device="auto",
    )  # fmt: skip
    output = tmp_path_factory.mktemp("community") / "taught"
    train(args, train_samples, eval_samples, model_source=str(loop_model_dir), output_dir=output)
    return output


async def _register_active(db: Database, name: str, path: Path) -> int:
    async with db.sessions.begin() as session:
        version = await register_version(session, name=name, path=str(path))
        await activate_version(session, version_id=version.id)
        return version.id


async def test_a_worse_version_is_rejected_and_the_old_one_kept(
    db: Database, database_url: str, loop_model_dir: Path, community_model_dir: Path, tmp_path: Path
) -> None:
    # A diverging run (learning rate 1.0) must not replace a model that already answers well.
    settings = loop_settings(tmp_path, database_url, loop_model_dir, train_learning_rate=1.0, train_epochs=3)
    good = await _register_active(db, "good", community_model_dir)
    engine = await started_engine(community_model_dir, "good", good)
    loop = await _wire(settings, db, engine)
    try:
        await log_community(loop.service)
        assert (await loop.admin("/retrain")).startswith("Training run #1 started")

        outcome = await loop.notifier.wait_for("Training run #1 finished")
        assert "v1 was not promoted: it did worse than the active version" in outcome
        assert "The active model stays" in outcome

        async with db.sessions() as session:
            active = await get_active_version(session)
            rejected = (await session.scalars(select(ModelVersion).where(ModelVersion.name == "v1"))).one()
        run = await run_row(db, 1)
        assert active is not None and active.id == good
        assert rejected.status is VersionStatus.REJECTED and "worse" in (rejected.note or "")
        assert run.status is RunStatus.REJECTED and run.model_version_id == rejected.id and "worse" in (run.error or "")
        assert run.metrics["eval_loss"] > run.metrics["active_eval_loss"]
        assert engine.model_ref is not None and engine.model_ref.version_id == good
        answer, version_id = await loop.ask(QUESTION, user="903")
        assert PHRASE in answer and version_id == good
        assert "v1: rejected" in await loop.admin("/models")
        assert "(it did worse than the active version on the same held-out conversations)" in await loop.admin(
            "/models"
        )
    finally:
        await loop.stop()
        await engine.close()


async def test_killing_the_trainer_keeps_the_active_version_and_rollback_works(
    db: Database, database_url: str, loop_model_dir: Path, community_model_dir: Path, tmp_path: Path
) -> None:
    # Two versions have served: "old" (the untrained model), then "taught". A long run is SIGKILLed mid-way.
    settings = loop_settings(tmp_path, database_url, loop_model_dir, train_learning_rate=1e-4, train_epochs=200)
    old = await _register_active(db, "old", loop_model_dir)
    taught = await _register_active(db, "taught", community_model_dir)
    engine = await started_engine(community_model_dir, "taught", taught)
    loop = await _wire(settings, db, engine)
    killed: list[int] = []

    async def kill_once_it_progresses(fraction: float) -> None:
        running = loop.orchestrator.running
        if fraction > 0 and running is not None and not killed:
            killed.append(running.pid)
            os.kill(running.pid, signal.SIGKILL)

    try:
        await log_community(loop.service)
        outcome = await asyncio.wait_for(
            loop.orchestrator.run_in_foreground(triggered_by="test", on_progress=kill_once_it_progresses), WAIT_S
        )

        assert killed and isinstance(outcome, RunOutcome)
        assert outcome.status is RunStatus.FAILED and "the training process was killed" in run_outcome(outcome)
        run = await run_row(db, 1)
        assert run.status is RunStatus.FAILED and run.error == RunEndReason.KILLED and run.finished_at is not None
        assert 0 < run.progress < 1 and run.model_version_id is None
        assert not list(settings.models_dir.glob(".*partial")), "the half-written version was removed"
        assert engine.model_ref is not None and engine.model_ref.version_id == taught
        answer, version_id = await loop.ask(QUESTION, user="904")
        assert PHRASE in answer and version_id == taught

        rolled = await loop.admin("/rollback")
        assert "Switched to old" in rolled and "taught is marked rolled back" in rolled
        assert engine.model_ref is not None and engine.model_ref.version_id == old
        answer, version_id = await loop.ask(QUESTION, user="905")
        assert version_id == old and PHRASE not in answer
        async with db.sessions() as session:
            statuses = {v.name: v.status for v in (await session.scalars(select(ModelVersion))).all()}
        assert statuses == {"old": VersionStatus.ACTIVE, "taught": VersionStatus.ROLLED_BACK}
    finally:
        await loop.stop()
        await engine.close()


async def test_stopping_the_bot_stops_the_run(
    db: Database, database_url: str, loop_model_dir: Path, tmp_path: Path
) -> None:
    settings = loop_settings(tmp_path, database_url, loop_model_dir, train_learning_rate=1e-4, train_epochs=200)
    engine = await started_engine(loop_model_dir, "tiny")
    loop = await _wire(settings, db, engine)
    try:
        await log_community(loop.service)
        assert (await loop.admin("/retrain")).startswith("Training run #1 started")
        await loop.notifier.wait_for("% done")
        running = loop.orchestrator.running
        assert running is not None

        await loop.stop()

        assert loop.orchestrator.running is None
        run = await run_row(db, 1)
        assert run.status is RunStatus.FAILED and run.error == RunEndReason.STOPPED_WITH_BOT
        assert "Training run #1 failed: stopped with the bot" in loop.notifier.texts()[-1]
        with pytest.raises(ProcessLookupError):
            os.kill(running.pid, 0)
    finally:
        await loop.stop()
        await engine.close()


async def test_cancelling_a_foreground_run_stops_the_child(
    db: Database, database_url: str, loop_model_dir: Path, tmp_path: Path
) -> None:
    """What Ctrl-C during `magpie retrain` does: the child is terminated and the run marked failed."""
    settings = loop_settings(tmp_path, database_url, loop_model_dir, train_learning_rate=1e-4, train_epochs=200)
    orchestrator = TrainingOrchestrator(settings=settings, db=db)
    await log_community(ChatService(settings=settings, db=db, engine=greedy_engine()))
    progressed = asyncio.Event()

    async def on_progress(fraction: float) -> None:
        progressed.set()

    task = asyncio.create_task(orchestrator.run_in_foreground(triggered_by="cli:me", on_progress=on_progress))
    await asyncio.wait_for(progressed.wait(), WAIT_S)
    running = orchestrator.running
    assert running is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    run = await run_row(db, 1)
    assert run.status is RunStatus.FAILED and run.error == RunEndReason.INTERRUPTED_FROM_SHELL
    assert orchestrator.running is None
    with pytest.raises(ProcessLookupError):
        os.kill(running.pid, 0)


async def test_too_little_data_fails_with_a_clear_reason(base_loop: Loop) -> None:
    await base_loop.ask("hello", user="906")
    assert (await base_loop.admin("/retrain")).startswith("Training run #1 started")
    failed = await base_loop.notifier.wait_for("Training run #1 failed")
    assert "not enough conversation to train on yet" in failed and "at least two distinct lines" in failed
    run = await run_row(base_loop.db, 1)
    assert run.status is RunStatus.FAILED and run.model_version_id is None
    assert not base_loop.settings.models_dir.exists() or not any(base_loop.settings.models_dir.iterdir())


async def test_forget_names_the_versions_that_trained_on_the_user(base_loop: Loop, loop_model_dir: Path) -> None:
    loop = base_loop
    await log_community(loop.service, chats=2)
    async with loop.db.sessions() as session:
        rows = (await session.scalars(select(Message).where(Message.role == Role.USER))).all()
    asker = rows[0].author_id
    manifest = [(row.id, row.author_id) for row in rows]
    async with loop.db.sessions.begin() as session:
        for name in ("v2", "v3"):
            await register_version(session, name=name, path=str(loop_model_dir), manifest=manifest)
        await register_version(session, name="v4", path=str(loop_model_dir), manifest=manifest[1:2])

    reply = await loop.service.handle(msg("/forget", user="1000"))

    assert reply is not None and asker is not None
    assert "deleted 2 messages" in reply.text
    assert "training data of versions v2, v3; they will not be in future versions" in reply.text
    other = await loop.service.handle(msg("/forget", user="77"))
    assert other is not None and "training data" not in other.text


async def test_a_run_past_the_timeout_is_stopped_and_failed(
    db: Database, database_url: str, loop_model_dir: Path, tmp_path: Path
) -> None:
    """A hung trainer must not block retraining forever: past RETRAIN_TIMEOUT_MINUTES (by the orchestrator's
    clock, here moved on by hand) the orchestrator stops its child and fails the run."""
    settings = loop_settings(
        tmp_path, database_url, loop_model_dir, train_learning_rate=1e-4, train_epochs=200, retrain_timeout_minutes=180
    )
    await log_community(ChatService(settings=settings, db=db, engine=greedy_engine()))
    now = [datetime.now(UTC)]
    orchestrator = TrainingOrchestrator(settings=settings, db=db, clock=lambda: now[0], poll_interval_s=0.05)
    pids: list[int] = []

    async def hours_pass(fraction: float) -> None:
        running = orchestrator.running
        if running is not None and not pids:
            pids.append(running.pid)
            now[0] += timedelta(minutes=181)

    outcome = await asyncio.wait_for(
        orchestrator.run_in_foreground(triggered_by="cli:me", on_progress=hours_pass), WAIT_S
    )

    assert isinstance(outcome, RunOutcome) and outcome.status is RunStatus.FAILED
    assert outcome.reason is RunEndReason.TIMED_OUT
    run = await run_row(db, 1)
    assert run.status is RunStatus.FAILED and run.error == outcome.reason and run.model_version_id is None
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)
    assert not settings.models_dir.exists() or list(settings.models_dir.iterdir()) == []
