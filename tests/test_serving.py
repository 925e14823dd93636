"""The serving side of versions (`core.serving.model_serving`): listing, switching and rolling back, and the watcher
that hot-swaps the engine when another process changes the active version.

Against a real database (SQLite and PostgreSQL) and, where a swap happens, a real engine serving the tiny GPT-2.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from core.outcomes import SwapState, Switched, SwitchRefusal, SwitchRefused
from core.serving.engine import Engine, ModelRef
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import ModelVersion, VersionStatus
from core.storage.versions import activate_version, register_version, set_version_status
from core.texts import switch, version_list
from tests.loop_support import greedy_engine, loop_settings


@pytest.fixture
def settings(tmp_path: Path, database_url: str, tiny_model_dir: Path) -> Settings:
    return loop_settings(tmp_path, database_url, tiny_model_dir, retrain_cooldown_minutes=30)


async def _register(db: Database, name: str, path: Path, *, loss: float | None = None, active: bool = False) -> int:
    async with db.sessions.begin() as session:
        metrics = {"eval_loss": loss} if loss is not None else {}
        version = await register_version(session, name=name, path=str(path), metrics=metrics)
        if active:
            await activate_version(session, version_id=version.id)
        return version.id


@pytest.fixture
async def engine(tiny_model_dir: Path) -> AsyncIterator[Engine]:
    engine = greedy_engine()
    await engine.start(ModelRef(source=str(tiny_model_dir), name="tiny"))
    try:
        yield engine
    finally:
        await engine.close()


async def test_versions_are_listed_newest_first_with_the_active_one_marked(
    db: Database, settings: Settings, tiny_model_dir: Path
) -> None:
    serving = ModelServing(settings=settings, db=db)
    assert version_list(await serving.list_versions()).startswith("No trained model versions yet: serving BASE_MODEL")
    await _register(db, "v1", tiny_model_dir, loss=2.0, active=True)
    rejected = await _register(db, "v2", tiny_model_dir, loss=2.5)
    async with db.sessions.begin() as session:
        await set_version_status(session, version_id=rejected, status=VersionStatus.REJECTED, note="worse")

    lines = version_list(await serving.list_versions()).splitlines()

    assert lines[0] == "Model versions, newest first (* = active):"
    assert lines[1].startswith("  v2: rejected, eval loss 2.500 (perplexity 12.2), ") and lines[1].endswith("(worse)")
    assert lines[2].startswith("* v1: active, eval loss 2.000 (perplexity 7.4), ")


async def test_rollback_refuses_clearly(db: Database, settings: Settings, tiny_model_dir: Path, tmp_path: Path) -> None:
    serving = ModelServing(settings=settings, db=db)

    async def rollback(version: str | None) -> str:
        result = await serving.rollback(version=version, triggered_by="t")
        assert isinstance(result, SwitchRefused)
        return switch(result)

    assert "nothing to roll back" in await rollback(None)
    assert await serving.rollback(version="v9", triggered_by="t") == SwitchRefused(SwitchRefusal.UNKNOWN_VERSION, "v9")
    assert await rollback("v9") == 'I don\'t know a model version called "v9". /models lists them.'
    await _register(db, "v1", tiny_model_dir, active=True)
    assert "no earlier version to go back to from v1" in await rollback(None)
    assert await rollback("v1") == "v1 is already the active model."
    await _register(db, "gone", tmp_path / "deleted")
    assert "files are missing" in await rollback("gone")


async def test_rollback_and_activate_switch_the_engine(
    db: Database, settings: Settings, tiny_model_dir: Path, engine: Engine
) -> None:
    first = await _register(db, "v1", tiny_model_dir, active=True)
    second = await _register(db, "v2", tiny_model_dir, active=True)
    serving = ModelServing(settings=settings, db=db, engine=engine)
    await serving.sync_engine()
    assert engine.model_ref is not None and engine.model_ref.version_id == second

    result = await serving.rollback(version=None, triggered_by="telegram:42")

    assert isinstance(result, Switched) and result.swap.state is SwapState.SERVING
    assert switch(result) == "Switched to v1. v2 is marked rolled back; its replies will not be used for training."
    assert engine.model_ref.version_id == first
    activated = await serving.switch_version(version="2", rolled_back=False, triggered_by="cli:me")
    assert isinstance(activated, Switched) and switch(activated) == "Switched to v2."
    assert engine.model_ref.version_id == second
    async with db.sessions() as session:
        statuses = {v.name: v.status for v in (await session.scalars(select(ModelVersion))).all()}
    assert statuses == {"v1": VersionStatus.RETIRED, "v2": VersionStatus.ACTIVE}


async def test_the_watcher_swaps_when_another_process_activates_a_version(
    db: Database, settings: Settings, tiny_model_dir: Path, engine: Engine
) -> None:
    version = await _register(db, "v1", tiny_model_dir)
    swapped = asyncio.Event()
    original = engine.swap

    async def spy(ref: ModelRef) -> None:
        await original(ref)
        swapped.set()

    engine.swap = spy  # type: ignore[method-assign]
    serving = ModelServing(settings=settings, db=db, engine=engine, poll_interval_s=0.05)
    await serving.start()
    try:
        async with db.sessions.begin() as session:  # what `magpie models activate v1` does in another process
            await activate_version(session, version_id=version)
        await asyncio.wait_for(swapped.wait(), 60)
    finally:
        await serving.stop()
    assert engine.model_ref is not None and engine.model_ref.version_id == version
    assert engine.model_ref.source == str(tiny_model_dir)
