"""/forget and /optout while a training run trains: the version trained on that data must never serve.

The run reads its dataset when it starts; a person who sends /forget or /optout before it records its outcome has
been promised their messages are not in future versions. The check is made in the transaction that would promote
(`trainer.retrain._record`); the moment "while it trains" is made exact by pausing the training program after it
trained and scored, before it records (`tests/paused_retrain.py`, or the `before_record` hook in-process).
Everything else is real: the tiny GPT-2, the database (SQLite and PostgreSQL), the chat service, the orchestrator
and its child process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from core.chat.service import ChatService
from core.outcomes import DATA_WITHDRAWN, RunEndReason
from core.serving.engine import Engine
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import ModelVersion, ModelVersionMessage, RunStatus, TrainingRun, User
from core.storage.versions import activate_version, get_active_version, register_version
from tests.loop_support import (
    ADMIN,
    WAIT_S,
    RecordingNotifier,
    build_loop_model,
    greedy_engine,
    log_community,
    loop_settings,
    msg,
    started_engine,
)
from tests.paused_retrain import SOCKET_VARIABLE, pause_server
from tests.run_rows import new_run
from trainer.orchestrator import TrainingOrchestrator
from trainer.retrain import retrain

pytestmark = pytest.mark.slow

X = "1000"
"""The person who withdraws: one of the askers of `log_community`, whose question is in many samples."""
IN_PROGRESS = "A training run is in progress: the version it trains will not be used with your messages in it."


@pytest.fixture(scope="session")
def loop_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_loop_model(tmp_path_factory.mktemp("loop-model"))


@pytest.fixture
def settings(tmp_path: Path, database_url: str, loop_model_dir: Path) -> Settings:
    return loop_settings(tmp_path, database_url, loop_model_dir, train_epochs=8, retrain_cooldown_minutes=30)


@pytest.fixture
async def service(db: Database, settings: Settings) -> ChatService:
    service = ChatService(settings=settings, db=db, engine=greedy_engine())  # group messages need no model
    await log_community(service, chats=8)
    return service


async def _active_base(db: Database, loop_model_dir: Path) -> int:
    async with db.sessions.begin() as session:
        version = await register_version(session, name="v0", path=str(loop_model_dir))
        await activate_version(session, version_id=version.id)
        return version.id


async def _user_row(db: Database, platform_user_id: str) -> int:
    async with db.sessions() as session:
        user = await session.scalar(select(User).where(User.platform_user_id == platform_user_id))
    assert user is not None
    return user.id


def _manifest_count(version_dir: Path, user_row: int) -> int:
    """How many of the user's messages the paused run's version trained on (its manifest, before recording)."""
    pairs = json.loads((version_dir / "manifest.json").read_text())["messages"]
    return sum(1 for _, user in pairs if user == user_row)


@pytest.mark.parametrize("command", ["/forget", "/optout"])
async def test_a_run_is_not_promoted_with_data_withdrawn_while_it_trained(
    db: Database, settings: Settings, service: ChatService, loop_model_dir: Path, command: str
) -> None:
    active = await _active_base(db, loop_model_dir)
    x_row = await _user_row(db, X)
    async with db.sessions.begin() as session:
        run = new_run()
        session.add(run)
        await session.flush()
        run_id = run.id
    version_dir = settings.models_dir / f"v{run_id}"
    replies: list[str] = []
    in_manifest: list[int] = []

    async def while_it_trains() -> None:
        in_manifest.append(_manifest_count(version_dir, x_row))
        reply = await service.handle(msg(command, user=X))
        assert reply is not None
        replies.append(reply.text)

    status = await retrain(settings, run_id, emit=lambda event: None, before_record=while_it_trains)

    assert status is RunStatus.REJECTED and in_manifest[0] > 0, "X's messages were in the data it trained on"
    async with db.sessions() as session:
        row = await session.get(TrainingRun, run_id)
        versions = [version.name for version in (await session.scalars(select(ModelVersion))).all()]
        serving = await get_active_version(session)
    assert row is not None and row.status is RunStatus.REJECTED and row.model_version_id is None
    assert row.error == RunEndReason.TRAINING_DATA_WITHDRAWN and in_manifest[0] == row.metrics[DATA_WITHDRAWN]
    assert versions == ["v0"] and serving is not None and serving.id == active, "nothing registered, v0 serves"
    assert not version_dir.exists() and list(settings.models_dir.iterdir()) == [], "its files are gone"
    if command == "/forget":
        assert IN_PROGRESS in replies[0]
    else:
        assert "won't be used for training" in replies[0]


async def test_forget_says_nothing_about_training_when_no_run_is_going(service: ChatService) -> None:
    reply = await service.handle(msg("/forget", user=X))
    assert reply is not None and "deleted" in reply.text and "training run" not in reply.text


@pytest.fixture
async def engine(loop_model_dir: Path) -> AsyncIterator[Engine]:
    engine = await started_engine(loop_model_dir, "tiny")
    try:
        yield engine
    finally:
        await engine.close()


@pytest.mark.parametrize("command", ["/forget", "/optout"])
async def test_the_run_is_rejected_and_trained_again_without_the_withdrawn_data(  # noqa: PLR0917
    db: Database,
    settings: Settings,
    service: ChatService,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    """Through the bot: /retrain, X withdraws while run #1 trains, #1 is discarded (the cooldown does not apply)
    and run #2 starts by itself, reads the data again and trains without X."""
    x_row = await _user_row(db, X)
    notifier = RecordingNotifier()
    serving = ModelServing(settings=settings, db=db, engine=engine)
    orchestrator = TrainingOrchestrator(
        settings=settings, db=db, serving=serving, notifier=notifier, trainer_module="tests.paused_retrain"
    )
    bot = ChatService(settings=settings, db=db, engine=engine, retrainer=orchestrator)
    replies: list[str] = []
    checked = asyncio.Event()

    async def paused(run_id: int) -> str:
        if run_id == 1:
            reply = await bot.handle(msg(command, user=X))
            assert reply is not None
            replies.append(reply.text)
        else:
            await asyncio.wait_for(checked.wait(), WAIT_S)  # until the test looked at the state between the runs
        return "go"

    async with pause_server(paused) as socket:
        monkeypatch.setenv(SOCKET_VARIABLE, socket)
        started = await bot.handle(msg("/retrain", user=ADMIN))
        assert started is not None and started.text.startswith("Training run #1 started")

        first = await notifier.wait_for("Training run #1 finished")
        assert "the new version was not promoted: training data changed during the run" in first
        assert first.endswith("The active model stays. Training again without them: run #2 started.")
        async with db.sessions() as session:
            assert (await session.scalars(select(ModelVersion))).all() == []
            assert await get_active_version(session) is None
        assert not (settings.models_dir / "v1").exists()
        assert engine.model_ref is not None and engine.model_ref.name == "tiny"
        checked.set()

        second = await notifier.wait_for("Training run #2 finished")
    await orchestrator.stop()

    assert "v2" in second
    if command == "/forget":
        assert IN_PROGRESS in replies[0]
    async with db.sessions() as session:
        runs = {run.id: run for run in (await session.scalars(select(TrainingRun))).all()}
        v2 = await session.scalar(select(ModelVersion).where(ModelVersion.name == "v2"))
        assert v2 is not None
        authors = set((await session.scalars(select(ModelVersionMessage.user_id).where(
            ModelVersionMessage.model_version_id == v2.id
        ))).all())  # fmt: skip
    assert runs[1].status is RunStatus.REJECTED and runs[1].metrics[DATA_WITHDRAWN] > 0
    assert runs[2].triggered_by == "rerun of #1" and runs[2].status in {RunStatus.PROMOTED, RunStatus.REJECTED}
    assert authors and x_row not in authors, "the rerun trained without X"
    assert len(runs) == 2, "one rerun, not more"
