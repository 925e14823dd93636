"""Training-run rows for tests, made in one place: a `running` row by default (who asked: "test"), any column
overridden by keyword, and the row read back."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from core.storage.db import Database
from core.storage.models import RunStatus, TrainingRun


def new_run(**fields: Any) -> TrainingRun:
    """An unsaved row, for a test that adds it inside a session of its own."""
    values: dict[str, Any] = {"status": RunStatus.RUNNING, "triggered_by": "test", "started_at": datetime.now(UTC)}
    return TrainingRun(**{**values, **fields})


async def add_run(db: Database, **fields: Any) -> int:
    """Writes `new_run(**fields)`; its id."""
    async with db.sessions.begin() as session:
        run = new_run(**fields)
        session.add(run)
        await session.flush()
        return run.id


async def run_row(db: Database, run_id: int) -> TrainingRun:
    async with db.sessions() as session:
        run = await session.get(TrainingRun, run_id)
    assert run is not None, f"no training run #{run_id}"
    return run
