"""When a training run is due by itself, and when another one may start.

`TrainingOrchestrator` asks: the periodic schedule (RETRAIN_INTERVAL_HOURS, RETRAIN_MIN_NEW_MESSAGES) and the
cooldown after a run (RETRAIN_COOLDOWN_MINUTES). The decisions are pure functions of the clock, so they are tested
without waiting hours.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from core.settings import Settings
from core.storage.chat_log import collect_stats
from core.storage.db import Database


async def scheduled_run_due(db: Database, settings: Settings, *, now: datetime) -> int | None:
    """The number of new conversational messages when a scheduled run is due now (`retrain_due`), else None."""
    async with db.sessions() as session:
        stats = await collect_stats(session)
    due = retrain_due(
        now=now,
        last_run_started_at=stats.last_run.started_at if stats.last_run else None,
        new_messages=stats.since_last_training,
        interval_hours=settings.retrain_interval_hours,
        min_new_messages=settings.retrain_min_new_messages,
    )
    return stats.since_last_training if due else None


def retrain_due(
    *,
    now: datetime,
    last_run_started_at: datetime | None,
    new_messages: int,
    interval_hours: float,
    min_new_messages: int,
) -> bool:
    """The periodic schedule: every `interval_hours` (0 = never), and only when enough new conversation arrived."""
    if interval_hours <= 0:
        return False
    if last_run_started_at is not None and now - last_run_started_at < timedelta(hours=interval_hours):
        return False
    return new_messages >= min_new_messages


def cooldown_left(*, now: datetime, last_finished_at: datetime | None, cooldown_minutes: float) -> timedelta | None:
    """How long until another run may start, or None when it may start now."""
    if last_finished_at is None or cooldown_minutes <= 0:
        return None
    left = last_finished_at + timedelta(minutes=cooldown_minutes) - now
    return left if left > timedelta(0) else None
