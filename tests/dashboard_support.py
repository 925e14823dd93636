"""Shared pieces of the dashboard tests: a database with a history to show, and the dashboard on a real port."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from aiohttp import web
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot.web.dashboard import build_dashboard_app
from core.retraining import Retrainer
from core.serving.model_serving import ModelServing
from core.settings import Settings
from core.storage.db import Database
from core.storage.models import Chat, Delivery, Message, Role, RunStatus, TrainingRun, User, VersionStatus
from core.storage.versions import activate_version, register_version, set_version_status

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
TOKEN = "correct-horse-battery-staple"
EXCLUDED = {
    "bot_reply_context_only": 412,
    "command": 37,
    "near_duplicate_target": 21,
    "opted_out": 12,
    "private_chat": 85,
    "repeated_line": 9,
    "repetitive_context_only": 6,
    "undelivered_bot_reply": 3,
    "user_share_cap": 14,
}
VERSIONS = (("v1", 3.62, 24), ("v2", 3.41, 19), ("v3", 3.47, 14), ("v4", 3.22, 9), ("v5", 3.05, 4), ("v6", 3.31, 1))
"""Name, held-out loss, created how many days before NOW. v3 was rolled back (to v2), v5 is active, v6 rejected."""
_noise = random.Random(5)
CURVE = [
    [step, round(2.9 + 3.1 * math.exp(-step / 90) + _noise.uniform(-0.08, 0.08), 4)]
    for step in [1, *range(10, 410, 10)]
]
GATES = (("v1", 4.95, 3.62), ("v2", 3.55, 3.41), ("v3", 3.52, 3.47), ("v4", 3.30, 3.22), ("v5", 3.12, 3.05))
"""The runs that trained v1..v5 (each promoted): the loss of the version it started from and of the new one, on
that run's own held-out samples (v6's run, rejected, compared 3.04 with 3.31)."""
REPLY_CHAT = "telegram:555"
REPLIES = tuple((hours_ago, round(0.5 + (hours_ago % 7) * 0.4, 1)) for hours_ago in range(1, 7 * 24, 5))
"""The model's replies in REPLY_CHAT: how many hours before NOW each was logged, and how many seconds after the
message it answers. Besides these, that chat holds a command's answer, a failed reply and one from 9 days ago,
none of which the reply plots count."""
_counts = random.Random(3)
_CHATS = (("telegram:-1001", 20, 60), ("telegram:-1002", 5, 25), ("discord:8841", 10, 40), ("discord:9120", 0, 8))
MESSAGES_PER_DAY = {
    chat: {ago: count for ago in range(28) if (count := _counts.randint(low, high)) and _counts.random() > 0.15}
    for chat, low, high in _CHATS
}
"""Messages logged per chat, by how many days before NOW (noon UTC: each stays on its calendar day)."""


def dashboard_settings(tmp_path: Path, database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "models_dir": tmp_path / "models",
        "dashboard_token": TOKEN,
        "retrain_cooldown_minutes": 30,
        "device": "cpu",
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def seed_history(db: Database, model_dir: Path) -> None:
    """Four weeks of a bot's life: six versions (one rolled back, one rejected, v5 active), the last run's loss
    curve and exclusion counts, and messages in four chats."""
    async with db.sessions.begin() as session:
        ids = {}
        for name, loss, days_ago in VERSIONS:
            version = await register_version(session, name=name, path=str(model_dir), metrics={"eval_loss": loss})
            version.created_at = NOW - timedelta(days=days_ago)
            ids[name] = version.id
        for name, days_ago in (("v1", 24), ("v2", 19), ("v3", 14)):
            await activate_version(session, version_id=ids[name], now=NOW - timedelta(days=days_ago))
        back = VersionStatus.ROLLED_BACK
        await activate_version(session, version_id=ids["v2"], previous_becomes=back, now=NOW - timedelta(days=13))
        for name, days_ago in (("v4", 9), ("v5", 4)):
            await activate_version(session, version_id=ids[name], now=NOW - timedelta(days=days_ago))
        await set_version_status(session, version_id=ids["v6"], status=VersionStatus.REJECTED, note="not better")
        for name, before, after in GATES:
            days_ago = next(days for version, _loss, days in VERSIONS if version == name)
            session.add(_gate_run(name, before, after, NOW - timedelta(days=days_ago)))
        metrics = {"version": "v6", "eval_loss": 3.31, "active_eval_loss": 3.04, "loss_curve": CURVE}
        metrics |= {"excluded": EXCLUDED}
        metrics |= {"train_samples": 1630, "eval_samples": 171}
        session.add(
            TrainingRun(
                status=RunStatus.REJECTED,
                triggered_by="telegram:42",
                started_at=NOW - timedelta(days=1, hours=1),
                finished_at=NOW - timedelta(days=1),
                model_version_id=ids["v6"],
                metrics=metrics,
                progress=1.0,
            )
        )
        await _log_messages(session)


def _gate_run(version: str, before: float, after: float, finished: datetime) -> TrainingRun:
    metrics = {"version": version, "active_eval_loss": before, "eval_loss": after, "eval_samples": 40}
    return TrainingRun(
        status=RunStatus.PROMOTED,
        triggered_by="schedule",
        started_at=finished - timedelta(minutes=20),
        finished_at=finished,
        metrics=metrics,
        progress=1.0,
    )


async def _log_replies(session: AsyncSession, user: User) -> None:
    platform, _, chat_id = REPLY_CHAT.partition(":")
    chat = Chat(platform=platform, platform_chat_id=chat_id, kind="private")
    session.add(chat)
    await session.flush()
    extra = ((2.0, 30.0, True, Delivery.SENT), (3.0, 40.0, False, Delivery.FAILED), (9 * 24.0, 50.0, False, None))
    for hours_ago, latency, command, delivery in (*((h, s, False, Delivery.SENT) for h, s in REPLIES), *extra):
        replied = NOW - timedelta(hours=hours_ago)
        asked = Message(chat_id=chat.id, author_id=user.id, role=Role.USER, text="hi", is_command=command,
                        created_at=replied - timedelta(seconds=latency))  # fmt: skip
        session.add(asked)
        await session.flush()
        session.add(Message(chat_id=chat.id, role=Role.BOT, text="hello", reply_to_id=asked.id, created_at=replied,
                            is_command=command, delivery=delivery))  # fmt: skip


def reply_chat_per_day() -> dict[date, int]:
    """The messages of REPLY_CHAT per UTC day (both sides), within the page's 30 days."""
    counts: dict[date, int] = {}
    for hours_ago, latency in (*REPLIES, (2.0, 30.0), (3.0, 40.0), (9 * 24.0, 50.0)):
        for when in (NOW - timedelta(hours=hours_ago), NOW - timedelta(hours=hours_ago, seconds=latency)):
            counts[when.date()] = counts.get(when.date(), 0) + 1
    return counts


async def _log_messages(session: AsyncSession) -> None:
    user = User(platform="telegram", platform_user_id="7", display_name="ann")
    session.add(user)
    await session.flush()
    for label, per_day in MESSAGES_PER_DAY.items():
        platform, _, chat_id = label.partition(":")
        chat = Chat(platform=platform, platform_chat_id=chat_id, kind="group")
        session.add(chat)
        await session.flush()
        rows = [
            {"chat_id": chat.id, "author_id": user.id, "role": Role.USER, "text": "hi", "created_at": when}
            for days_ago, count in per_day.items()
            for when in (NOW - timedelta(days=days_ago, minutes=index) for index in range(count))
        ]
        await session.execute(insert(Message), rows)
    await _log_replies(session, user)
    # An old message, outside the window the page shows.
    session.add(
        Message(chat_id=chat.id, author_id=user.id, role=Role.USER, text="hi", created_at=NOW - timedelta(days=90))
    )


PREFIX = "/dashboard"


@asynccontextmanager
async def serve(dashboard: web.Application) -> AsyncIterator[str]:
    """The dashboard mounted at PREFIX of a server on an ephemeral port of 127.0.0.1, as the bot's HTTP server mounts
    it; yields the dashboard's base URL."""
    app = web.Application()
    app.add_subapp(f"{PREFIX}/", dashboard)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}{PREFIX}"
    finally:
        await runner.cleanup()


def dashboard_app(
    settings: Settings, db: Database, serving: ModelServing, retrainer: Retrainer | None = None
) -> web.Application:
    return build_dashboard_app(settings=settings, db=db, serving=serving, retrainer=retrainer, clock=lambda: NOW)
