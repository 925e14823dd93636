"""Shared pieces of the dashboard tests: a database with a history to show, and the dashboard on a real port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiohttp import web
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
EXCLUDED = {"command": 4, "opted_out": 2, "repetitive_context_only": 1}
CURVE = [[1, 5.9], [10, 5.1], [20, 4.4], [30, 4.0]]
MESSAGES_PER_DAY = {"telegram:-100": {0: 3, 1: 5}, "discord:77": {2: 2}}
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
    """v1 served and retired, v2 active, v3 rejected; the run that trained v3 recorded its loss curve and
    exclusion counts; a few days of messages in two chats."""
    async with db.sessions.begin() as session:
        ids = {}
        for index, (name, loss) in enumerate((("v1", 3.25), ("v2", 3.0), ("v3", 3.4))):
            version = await register_version(
                session, name=name, path=str(model_dir), metrics={"eval_loss": loss}, note=f"trained by run #{index}"
            )
            version.created_at = NOW - timedelta(days=3 - index)
            ids[name] = version.id
        await activate_version(session, version_id=ids["v1"], now=NOW - timedelta(days=3))
        await activate_version(session, version_id=ids["v2"], now=NOW - timedelta(days=2))
        await set_version_status(session, version_id=ids["v3"], status=VersionStatus.REJECTED, note="not better")
        metrics = {"version": "v3", "eval_loss": 3.4, "loss_curve": CURVE, "excluded": EXCLUDED}
        metrics |= {"train_samples": 40, "eval_samples": 6}
        session.add(
            TrainingRun(
                status=RunStatus.REJECTED,
                triggered_by="telegram:42",
                started_at=NOW - timedelta(days=1, hours=1),
                finished_at=NOW - timedelta(days=1),
                model_version_id=ids["v3"],
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
        for days_ago, count in per_day.items():
            for index in range(count):
                when = NOW - timedelta(days=days_ago, minutes=index)
                session.add(Message(chat_id=chat.id, author_id=user.id, role=Role.USER, text="hi", created_at=when))
    # An old message, outside the window the page shows.
    session.add(
        Message(chat_id=chat.id, author_id=user.id, role=Role.USER, text="hi", created_at=NOW - timedelta(days=90))
    )


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """The app on an ephemeral port of 127.0.0.1; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def dashboard_app(
    settings: Settings, db: Database, serving: ModelServing, retrainer: Retrainer | None = None
) -> web.Application:
    return build_dashboard_app(settings=settings, db=db, serving=serving, retrainer=retrainer, clock=lambda: NOW)
