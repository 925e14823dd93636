"""Shared pieces of the dashboard tests: a database with a history to show, and the dashboard on a real port."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiohttp import web
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot.dashboard import build_dashboard_app
from core.db import Database
from core.models import Chat, Message, Role, RunStatus, TrainingRun, User, VersionStatus
from core.retraining import Retrainer
from core.serving import ModelServing
from core.settings import Settings
from core.versions import activate_version, register_version, set_version_status

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
TOKEN = "correct-horse-battery-staple"
EXCLUDED = {
    "bot_reply_context_only": 412,
    "command": 37,
    "opted_out": 12,
    "private_chat": 85,
    "repeated_line": 9,
    "repetitive_context_only": 6,
    "undelivered_bot_reply": 3,
}
VERSIONS = (("v1", 3.62, 24), ("v2", 3.41, 19), ("v3", 3.47, 14), ("v4", 3.22, 9), ("v5", 3.05, 4), ("v6", 3.31, 1))
"""Name, held-out loss, created how many days before NOW. v3 was rolled back (to v2), v5 is active, v6 rejected."""
_noise = random.Random(5)
CURVE = [
    [step, round(2.9 + 3.1 * math.exp(-step / 90) + _noise.uniform(-0.08, 0.08), 4)]
    for step in [1, *range(10, 410, 10)]
]
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
        metrics = {"version": "v6", "eval_loss": 3.31, "loss_curve": CURVE, "excluded": EXCLUDED}
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
