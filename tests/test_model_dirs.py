"""MODELS_DIR and the registry agree: no unregistered version is left behind by a run that died after writing it,
`magpie models check` finds and removes strays, and a broken active version does not stop the bot from starting.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.cli import _start_engine, build_parser
from bot.cli_training import run_command
from core.chat.service import ChatService
from core.outcomes import RunEndReason, RunOutcome
from core.serving.engine import Engine
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import ModelVersion, RunStatus, VersionStatus
from core.storage.versions import activate_version, register_version, set_version_status
from tests.loop_support import ADMIN, build_loop_model, greedy_engine, log_community, loop_settings, msg
from tests.paused_retrain import SOCKET_VARIABLE, pause_server
from tests.run_rows import add_run
from trainer.orchestrator import TrainingOrchestrator

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def loop_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_loop_model(tmp_path_factory.mktemp("loop-model"))


@pytest.fixture
def settings(tmp_path: Path, database_url: str, loop_model_dir: Path) -> Settings:
    return loop_settings(tmp_path, database_url, loop_model_dir, train_epochs=2)


def _version_dir(settings: Settings, name: str, source: Path) -> Path:
    """A complete version directory (a copy of a real model) under MODELS_DIR."""
    target = settings.models_dir / name
    shutil.copytree(source, target)
    return target


async def _register(db: Database, name: str, path: Path, *, active: bool = False) -> int:
    async with db.sessions.begin() as session:
        version = await register_version(session, name=name, path=str(path))
        if active:
            await activate_version(session, version_id=version.id)
        return version.id


async def _versions(db: Database) -> list[str]:
    async with db.sessions() as session:
        return [version.name for version in (await session.scalars(select(ModelVersion))).all()]


# --- leftovers of runs --------------------------------------------------------------------------------------------


async def test_a_run_killed_after_the_rename_leaves_nothing_at_the_next_start(
    db: Database, settings: Settings, loop_model_dir: Path
) -> None:
    # The machine died after run #N renamed its complete version into place, before it was registered.
    run_id = await add_run(db, pid=None, started_at=NOW - timedelta(hours=1))
    unregistered = _version_dir(settings, f"v{run_id}", loop_model_dir)
    partial = settings.models_dir / f".v{run_id}.partial"
    partial.mkdir()
    older = _version_dir(settings, f"v{run_id}-from-a-reset-database", loop_model_dir)
    two_years_ago = (NOW - timedelta(days=730)).timestamp()
    os.utime(older, (two_years_ago, two_years_ago))
    kept = _version_dir(settings, "v0", loop_model_dir)
    await _register(db, "v0", kept, active=True)
    orchestrator = TrainingOrchestrator(settings=settings, db=db, clock=lambda: NOW)

    await orchestrator.start()
    await orchestrator.stop()

    assert not unregistered.exists() and not partial.exists()
    assert older.exists(), "written long before the run started: not this run's, left for `magpie models check`"
    assert (kept / "config.json").is_file() and await _versions(db) == ["v0"]


@pytest.fixture
async def logged(db: Database, settings: Settings) -> AsyncIterator[None]:
    await log_community(ChatService(settings=settings, db=db, engine=greedy_engine()), chats=6)
    yield


@pytest.mark.slow
@pytest.mark.parametrize("answer", ["fail", "kill"])
@pytest.mark.usefixtures("logged")
async def test_an_error_or_a_kill_after_the_rename_removes_the_version_directory(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """The training program trained, scored and renamed v1 into place; then it fails (an exception) or is killed
    before registering it. Its directory must go, with the run marked failed."""
    seen: list[int] = []

    async def after_rename(run_id: int) -> str:
        seen.append(run_id)
        assert (settings.models_dir / f"v{run_id}" / "config.json").is_file(), "paused after the rename"
        return answer

    orchestrator = TrainingOrchestrator(settings=settings, db=db, trainer_module="tests.paused_retrain")
    async with pause_server(after_rename) as socket:
        monkeypatch.setenv(SOCKET_VARIABLE, socket)
        outcome = await orchestrator.run_in_foreground(triggered_by="test", on_progress=_ignore)

    assert isinstance(outcome, RunOutcome) and seen == [1]
    assert outcome.status is RunStatus.FAILED
    expected = RunEndReason.KILLED if answer == "kill" else RunEndReason.TRAINING_ERROR
    assert outcome.reason is expected
    assert not settings.models_dir.exists() or list(settings.models_dir.iterdir()) == []
    assert await _versions(db) == []


async def _ignore(fraction: float) -> None:
    return None


# --- magpie models check --------------------------------------------------------------------------------------


async def magpie(settings: Settings, *argv: str) -> int | None:
    return await run_command(build_parser().parse_args(list(argv)), settings)


async def test_models_check_lists_and_removes_strays(
    db: Database, settings: Settings, loop_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _version_dir(settings, "v1", loop_model_dir)
    await _register(db, "v1", good, active=True)
    await _register(db, "v2", settings.models_dir / "v2")  # its directory was deleted by hand
    broken = _version_dir(settings, "v3", loop_model_dir)
    (broken / "model.safetensors").unlink()
    await _register(db, "v3", broken)
    stray = _version_dir(settings, "v9", loop_model_dir)
    stray_partial = settings.models_dir / ".v10.partial"
    stray_partial.mkdir()
    running = await add_run(db, pid=None, started_at=datetime.now(UTC))
    in_progress = settings.models_dir / f".v{running}.partial"
    in_progress.mkdir()
    (settings.models_dir / ".cache").mkdir()
    (settings.models_dir / "README.txt").write_text("notes")

    assert await magpie(settings, "models", "check") == 1

    out = capsys.readouterr().out
    assert f"stray directory (no version row): {stray}" in out
    assert f"stray directory (no version row): {stray_partial}" in out
    assert f"version v2: files missing ({settings.models_dir / 'v2'})" in out
    assert f"version v3: weights missing ({broken})" in out
    lines = out.splitlines()
    assert not any(line.endswith(str(good)) or line.startswith("version v1") for line in lines)
    assert ".cache" not in out and str(in_progress) not in out and "README" not in out
    assert "--remove" in out and stray.exists()

    assert await magpie(settings, "models", "check", "--remove") == 1  # v2 and v3 are still broken
    assert "Removed 2 stray directories." in capsys.readouterr().out
    assert not stray.exists() and not stray_partial.exists()
    assert good.exists() and broken.exists() and in_progress.exists() and (settings.models_dir / ".cache").exists()

    async with db.sessions.begin() as session:
        for version in (await session.scalars(select(ModelVersion).where(ModelVersion.name != "v1"))).all():
            await session.delete(version)
    assert await magpie(settings, "models", "check") == 1, "v3's directory has no row any more: a stray"
    assert f"stray directory (no version row): {broken}" in capsys.readouterr().out
    assert await magpie(settings, "models", "check", "--remove") == 0
    capsys.readouterr()
    assert await magpie(settings, "models", "check") == 0
    assert f"The registry and {settings.models_dir} agree." in capsys.readouterr().out


# --- a broken active version ----------------------------------------------------------------------------------


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    engine = greedy_engine()
    try:
        yield engine
    finally:
        await engine.close()


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
async def test_a_broken_active_version_falls_back_to_the_one_before(
    db: Database, settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    loop_model_dir = Path(settings.base_model)
    rolled_back = await _register(db, "v1", _version_dir(settings, "v1", loop_model_dir), active=True)
    previous = await _register(db, "v2", _version_dir(settings, "v2", loop_model_dir), active=True)
    await _register(db, "v3", _version_dir(settings, "v3", loop_model_dir), active=True)
    async with db.sessions.begin() as session:  # v1 served badly once: never a fallback
        await set_version_status(session, version_id=rolled_back, status=VersionStatus.ROLLED_BACK)
    active_dir = settings.models_dir / "v3"
    if damage == "deleted":
        shutil.rmtree(active_dir)
    else:
        (active_dir / "model.safetensors").write_bytes(b"not a model")

    with caplog.at_level(logging.INFO):
        await _start_engine(settings, db, ModelServing(settings=settings, db=db, engine=engine))

    assert engine.model_ref is not None and engine.model_ref.name == "v2" and engine.model_ref.version_id == previous
    logged = caplog.text
    if damage == "deleted":
        assert "The active model version v3 cannot be loaded: files missing" in logged
        assert "Serving v2, the version that served before v3, instead." in logged
    else:
        assert "Model version v3 could not be loaded; trying the next one." in logged
    service = ChatService(settings=settings, db=db, engine=engine)
    status = await service.handle(msg("/status", user=ADMIN))
    assert status is not None
    first_line = status.text.splitlines()[0]
    if damage == "deleted":
        assert first_line == "Model: v2 (v3 is active but could not be loaded: files missing)"
    else:
        assert first_line == "Model: v2 (v3 is active but not loaded yet, or it failed to load: the log says which)"


async def test_with_no_version_to_fall_back_to_base_model_serves(
    db: Database, settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    await _register(db, "v1", settings.models_dir / "v1", active=True)  # never there

    with caplog.at_level(logging.INFO):
        await _start_engine(settings, db, ModelServing(settings=settings, db=db, engine=engine))

    assert engine.model_ref is not None and engine.model_ref.name == settings.base_model
    assert engine.model_ref.version_id is None
    assert f"No earlier version can serve instead of v1: serving BASE_MODEL ({settings.base_model})." in caplog.text
